//! `cargo xtask test`: installs and starts what the machine lacks (as root,
//! `setup`), makes sure the local registry, the base images, the dependency
//! stores and the test cluster are there, then runs the whole suite.
//! Without an engine or a cluster it fails, and so does every test that
//! needs one when run any other way (`common::require_docker`,
//! `common::require_cluster`).

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    builder, cluster,
    commands::mirror,
    config::{Config, Overrides},
    deps, docker,
    exec::{Cmd, Exec},
    footprint::Footprint,
    registry, registry_delete, setup,
};

/// Prepare Docker, the local registry, base images, dependency stores and the test cluster, then run every test
#[derive(Args, Debug, Default)]
pub struct Test {
    /// Extra arguments for the xtask's `cargo test` (e.g. a test name filter); with none, each image's own Cargo workspace is tested too
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

impl Test {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let config = Config::load(exec, &Overrides::default())?;
        exec.sh.change_dir(&config.root);
        self.run_in(exec, &config)
    }

    /// The tests of the workspace `config` describes (`ci` has it loaded).
    pub fn run_in(self, exec: &Exec, config: &Config) -> Result<()> {
        let (registry, builder) = exec.step(
            "test environment: Docker engine, buildx, local registry, base images, dependency stores, the pinned BuildKit",
            || {
            setup::ensure(exec, setup::Need::Test)?;
            docker::preflight(exec)?;
            // The cluster's prerequisites too, before minutes of seeding.
            cluster::preflight()?;
            let server = exec
                .read(&Cmd::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
                .context("no Docker engine answers")?;
            eprintln!("Docker engine {server}");
            let registry = registry::ensure_local(exec)?;
            mirror::seed(exec, config, &registry, false)?;
            // The only downloads of the run: the tests' builds then take
            // every package from the stores, with no network.
            deps::ensure_all(exec, config, &config.images, false)?;
            // The pinned builder, made once here rather than by whichever
            // test builds first.
            let mirrored = Config {
                base_registry: format!("{registry}/library"),
                ..config.clone()
            };
            let builder = builder::ensure(exec, &mirrored)?;
            Ok((registry, builder))
        })?;
        let kubeconfig = cluster::up(exec)?;
        exec.step("cargo test", || {
            let _path = exec
                .sh
                .push_env("PATH", cluster::path_with_tools(&exec.env)?);
            let _kubeconfig = exec.sh.push_env("KUBECONFIG", &kubeconfig);
            let _registry = exec.sh.push_env("XTASK_TEST_REGISTRY", &registry);
            // Names this run, so HEAD's real images are built once in it
            // and shared by the tests that need them.
            let _run = exec
                .sh
                .push_env("XTASK_TEST_RUN", crate::time::now_epoch().to_string());
            let _base = exec
                .sh
                .push_env("XTASK_BASE_REGISTRY", format!("{registry}/library"));
            let before = Footprint::take(exec, &registry)?;
            // Unknown (BuildKit did not say): no trim, rather than a
            // guess that empties it.
            let cache_before = builder::records_bytes(exec, &builder)
                .inspect_err(|e| eprintln!("the pinned builder's cache will not be trimmed: {e:#}"))
                .ok();
            let tested = self.cargo_test(exec, config);
            let left = exec.step("what the tests left behind", || {
                // The tests' builds fill the pinned builder's cache with
                // records of commits no one builds again: it goes back to
                // the size it had, the least recently used first.
                if let Some(bytes) = cache_before {
                    builder::trim(exec, &builder, bytes)?;
                }
                left_behind(exec, &registry, &before)
            });
            tested.and(left)
        })
    }

    /// Each image's own workspace's tests, then the xtask's.
    fn cargo_test(&self, exec: &Exec, config: &Config) -> Result<()> {
        let cargo = exec.env.cargo();
        // Each image's own workspace first (its unit tests take
        // seconds), unless the arguments pick tests of the xtask's.
        let own = if self.cargo_args.is_empty() {
            config.image_workspaces()
        } else {
            vec![]
        };
        for manifest in own {
            exec.run_anyway(
                &Cmd::new(&cargo)
                    .args(["test", "--workspace", "--locked", "--all-targets"])
                    .arg("--manifest-path")
                    .arg(manifest.display().to_string()),
            )?;
        }
        // Every target, unless the arguments pick some (`--test NAME`),
        // which `--all-targets` would override.
        let targets = if self.cargo_args.is_empty() {
            vec!["--all-targets"]
        } else {
            vec![]
        };
        exec.run_anyway(
            &Cmd::new(cargo)
                .args(["test", "--workspace", "--locked"])
                .args(targets)
                .args(&self.cargo_args),
        )
    }
}

/// After the tests: the run's shared images are deleted (no single test
/// owns them), then anything else the tests made and left is named and
/// fails the run. The local registry's garbage is collected either way.
fn left_behind(exec: &Exec, registry: &str, before: &Footprint) -> Result<()> {
    let shared = match registry.split_once('/') {
        Some((_, path)) => format!("{path}/head"),
        None => "head".to_owned(),
    };
    let deleted = registry_delete::delete_under(registry::host_of(registry), &shared)
        .map_err(anyhow::Error::msg)
        .context("deleting the run's shared images")?;
    eprintln!("deleted the run's shared images: {}", deleted.join(", "));
    // A test's namespace guard deletes without waiting; the deletion is
    // done when the namespace is gone.
    let ending: Vec<String> = before
        .new_namespaces(exec)?
        .into_iter()
        .map(|n| format!("namespace/{n}"))
        .collect();
    if !ending.is_empty() {
        exec.read_all(
            &Cmd::new("kubectl")
                .args(["wait", "--for=delete", "--timeout=180s"])
                .args(ending),
        )?;
    }
    let left = Footprint::take(exec, registry)?.left_since(before);
    if registry == registry::DEFAULT_LOCAL {
        if let Some(freed) = registry::collect_garbage(exec)? {
            eprintln!(
                "the local registry's garbage collected: {} freed",
                crate::cache::human(freed)
            );
        }
    }
    if !left.is_empty() {
        bail!(
            "the tests left behind what they made:\n  - {}",
            left.join("\n  - ")
        );
    }
    eprintln!("the tests left nothing behind in the cluster, the local registry or Docker");
    Ok(())
}
