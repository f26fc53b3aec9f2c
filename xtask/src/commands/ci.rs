//! `cargo xtask ci`: the whole gate, in order, stopping at the first
//! failure, with a timed summary.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::{
    commands::test::Test,
    config::{Config, Overrides},
    deps, docker,
    exec::{Cmd, Exec},
    exit::refuse,
    rollout::render_overlay,
};

/// One gate step: its key (for `ci STEP`), its name, and its work, boxed
/// so the list reads in the order it runs.
type CiStep<'a> = (&'static str, &'static str, Box<dyn Fn() -> Result<()> + 'a>);

/// Run the whole gate: fmt, clippy, the frontend's tsc and ESLint, tests, Dockerfile, manifest, workflow and shell lint
#[derive(Args, Debug, Default)]
pub struct Ci {
    /// Run only these steps, in the gate's order: fmt, clippy, frontend, test, hadolint, manifests, actionlint, shellcheck
    #[arg(value_name = "STEP")]
    pub only: Vec<String>,
}

impl Ci {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let config = Config::load(exec, &Overrides::default())?;
        exec.sh.change_dir(&config.root);
        // Everything the tests and linters need, installed first (as root);
        // not for a run of only the Rust and frontend checks.
        let local = ["fmt", "clippy", "frontend"];
        if self.only.is_empty() || self.only.iter().any(|s| !local.contains(&s.as_str())) {
            crate::setup::ensure(exec, crate::setup::Need::Test)?;
            crate::setup::linters(exec, &config.root)?;
        }
        // The test cluster's kubectl (built by the test step) renders the
        // manifests too.
        let _path = exec
            .sh
            .push_env("PATH", crate::cluster::path_with_tools(&exec.env)?);
        let cargo = exec.env.cargo();
        // `cargo ARGS --manifest-path M [-- AFTER]` for the repository's
        // workspace, then each image's own.
        let workspaces: Vec<std::path::PathBuf> = std::iter::once("Cargo.toml".into())
            .chain(config.image_workspaces())
            .collect();
        let in_each_workspace = |args: &[&str], after: &[&str]| -> Result<()> {
            for manifest in &workspaces {
                let mut cmd = Cmd::new(&cargo)
                    .args(args.iter().copied())
                    .arg("--manifest-path")
                    .arg(manifest.display().to_string());
                if !after.is_empty() {
                    cmd = cmd.arg("--").args(after.iter().copied());
                }
                exec.run_anyway(&cmd)?;
            }
            Ok(())
        };
        let mut timings: Vec<(&str, Duration, bool)> = Vec::new();
        let steps: Vec<CiStep> = vec![
            (
                "fmt",
                "cargo fmt --check",
                Box::new(|| in_each_workspace(&["fmt", "--all", "--check"], &[])),
            ),
            (
                "clippy",
                "cargo clippy",
                Box::new(|| {
                    in_each_workspace(
                        &["clippy", "--workspace", "--all-targets", "--locked"],
                        &["-D", "warnings"],
                    )
                }),
            ),
            (
                "frontend",
                "frontend: tsc, eslint",
                Box::new(|| frontend_checks(exec, &config)),
            ),
            (
                "test",
                "cargo xtask test",
                Box::new(|| Test::default().run_in(exec, &config)),
            ),
            ("hadolint", "hadolint", Box::new(|| hadolint(exec, &config))),
            (
                "manifests",
                "manifests",
                Box::new(|| validate_manifests(exec, &config)),
            ),
            ("actionlint", "actionlint", Box::new(|| actionlint(exec))),
            ("shellcheck", "shellcheck", Box::new(|| shellcheck(exec))),
        ];
        let keys: Vec<&str> = steps.iter().map(|(key, _, _)| *key).collect();
        if let Some(unknown) = self.only.iter().find(|s| !keys.contains(&s.as_str())) {
            return Err(refuse(format!(
                "unknown ci step {unknown:?}; steps: {}",
                keys.join(", ")
            )));
        }
        let mut result = Ok(());
        for (key, name, step) in &steps {
            if !self.only.is_empty() && !self.only.iter().any(|s| s == key) {
                continue;
            }
            let started = std::time::Instant::now();
            let outcome = exec.step(*name, step);
            timings.push((name, started.elapsed(), outcome.is_ok()));
            if let Err(e) = outcome {
                result = Err(e.context(format!("ci step `{name}` failed")));
                break;
            }
        }
        eprintln!("\n{:<20} {:>9}  result", "step", "seconds");
        for (name, took, ok) in &timings {
            eprintln!(
                "{name:<20} {:>9.1}  {}",
                took.as_secs_f64(),
                if *ok { "ok" } else { "FAILED" }
            );
        }
        result
    }
}

/// TypeScript's check and ESLint for every npm package an image builds,
/// with its packages installed offline from the image's dependency store.
fn frontend_checks(exec: &Exec, config: &Config) -> Result<()> {
    let _telemetry = exec.sh.push_env("NEXT_TELEMETRY_DISABLED", "1");
    for store in deps::npm_stores(exec, config)? {
        store.ensure(exec, false)?;
        let dir = store
            .lockfile
            .parent()
            .context("lockfile has a directory")?;
        let _in_package = exec.sh.push_dir(dir);
        exec.run_anyway(&store.install_offline())?;
        exec.run_anyway(&Cmd::new("npm").args(["run", "typecheck"]))?;
        exec.run_anyway(&Cmd::new("npm").args(["run", "lint"]))?;
    }
    Ok(())
}

/// A linter from the project's own virtual environment, where
/// `ci` puts the versions `.ci/linters.txt` pins (`setup::linters`).
fn linter(env: &crate::env::Env, name: &str) -> Result<String> {
    let venv = crate::cache::dir(env)?.join("linters");
    let path = venv.join("bin").join(name);
    if !path.is_file() {
        return Err(crate::exit::refuse(format!(
            "{} not found: `cargo xtask ci` installs the linters at pinned versions into {}",
            path.display(),
            venv.display()
        )));
    }
    Ok(path.display().to_string())
}

fn hadolint(exec: &Exec, config: &Config) -> Result<()> {
    let hadolint = linter(&exec.env, "hadolint")?;
    // The classic variants `bench` builds are linted too.
    let dockerfiles = config
        .images
        .iter()
        .flat_map(|i| [i.dockerfile.clone(), i.dockerfile.with_extension("classic")])
        .filter(|path| config.root.join(path).is_file())
        .map(|path| path.display().to_string());
    exec.run_anyway(&Cmd::new(hadolint).args(dockerfiles))
}

/// Renders the kustomize base and validates every object against
/// Kubernetes' schemas.
fn validate_manifests(exec: &Exec, config: &Config) -> Result<()> {
    let kubectl = crate::kube::Kube::find_kubectl(exec)?;
    let kubernetes_validate = linter(&exec.env, "kubernetes-validate")?;
    let manifests = config.manifests.display().to_string();
    let rendered = exec.read(&crate::kube::kustomize(&kubectl, &manifests))?;
    let base = config.out_dir().join("rendered-base.yaml");
    std::fs::create_dir_all(config.out_dir())?;
    std::fs::write(&base, rendered).with_context(|| format!("writing {}", base.display()))?;
    // The overlay a deploy of HEAD would apply, with a made-up digest.
    let rev = crate::git::commit(exec, "HEAD")?;
    let digest = format!("sha256:{}", "0".repeat(64));
    let images: Vec<docker::BuiltImage> = config
        .images
        .iter()
        .map(|image| docker::BuiltImage::new(config, &image.name, &rev, Some(digest.clone())))
        .collect();
    let overlay = render_overlay(exec, &kubectl, config, &images, &rev, "cargo xtask ci", &[])?;
    let overlay = std::path::Path::new(&overlay).join("rendered.yaml");
    exec.run_anyway(&Cmd::new(kubernetes_validate).args([
        "--strict",
        &base.display().to_string(),
        &overlay.display().to_string(),
    ]))
}

fn actionlint(exec: &Exec) -> Result<()> {
    let actionlint = linter(&exec.env, "actionlint")?;
    exec.run_anyway(&Cmd::new(actionlint))
}

/// Every tracked file whose shebang names a shell, whatever its name.
fn shellcheck(exec: &Exec) -> Result<()> {
    let shellcheck = linter(&exec.env, "shellcheck")?;
    let files = exec.read(&Cmd::new("git").args(["ls-files", "-z"]))?;
    let scripts: Vec<String> = files
        .split('\0')
        .filter(|f| !f.is_empty())
        .filter(|f| {
            std::fs::read(f).is_ok_and(|bytes| {
                let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
                is_shell_shebang(&String::from_utf8_lossy(first))
            })
        })
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        !scripts.is_empty(),
        "no shell scripts found, not even .ci/run"
    );
    exec.run_anyway(&Cmd::new(shellcheck).args(scripts))
}

fn is_shell_shebang(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("#!") else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let program = words.next().unwrap_or_default();
    let program = if program.ends_with("/env") {
        words.next().unwrap_or_default()
    } else {
        program
    };
    let name = program.rsplit('/').next().unwrap_or_default();
    matches!(name, "sh" | "bash" | "dash" | "ksh")
}

#[cfg(test)]
mod tests {
    use super::is_shell_shebang;

    #[test]
    fn shell_scripts_are_found_by_shebang() {
        assert!(is_shell_shebang("#!/usr/bin/env bash"));
        assert!(is_shell_shebang("#!/bin/sh -e"));
        assert!(!is_shell_shebang("#!/usr/bin/env python3"));
        assert!(!is_shell_shebang("fn main() {}"));
    }
}
