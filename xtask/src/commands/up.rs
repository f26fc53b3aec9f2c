//! `cargo xtask up`: the whole stack on the local Docker engine, by digest,
//! replaced only once the new revision has proven itself ready.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::{
    commands::{
        build::BuildFlags,
        local::{
            network_name, networks, remove_containers, COMPONENT_LABEL, PROJECT_LABEL,
            REVISION_LABEL, SLOT_LABEL,
        },
        mirror,
    },
    config::Config,
    docker::{self, BuiltImage},
    exec::{Cmd, Exec},
    exit::refuse,
    git::{self, Revision},
    registry,
};

/// Build fresh, push to a local registry, and run the stack on local Docker
#[derive(Args, Debug)]
pub struct Up {
    #[command(flatten)]
    pub flags: BuildFlags,
    /// Host port for the frontend on 127.0.0.1 (default: its port in the container)
    #[arg(long, value_name = "PORT")]
    pub frontend_port: Option<u16>,
    /// Host port for the backend on 127.0.0.1 (default: its port in the container)
    #[arg(long, value_name = "PORT")]
    pub backend_port: Option<u16>,
    /// How long new containers get to become ready, in seconds
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub ready_timeout: u64,
    /// Name of the local stack (containers and networks are labelled with it)
    #[arg(long, default_value = "aiq", value_name = "NAME")]
    pub project: String,
}

/// Where a container stands: a candidate on an ephemeral loopback port,
/// proving itself beside the old revision, or live on its host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Candidate,
    Live(u16),
}

impl Slot {
    fn label(self) -> &'static str {
        match self {
            Slot::Candidate => "candidate",
            Slot::Live(_) => "live",
        }
    }
}

/// A component's alias on the stack's network: per revision, so a new
/// frontend always talks to the backend of its own revision.
fn alias(image: &str, rev: &Revision) -> String {
    format!("{image}-{}", rev.tag())
}

/// One running component of the stack.
struct Component<'a> {
    image: &'a BuiltImage,
    port: u16,
    env: Vec<String>,
    /// Paths that must answer a revision: each with the image's own.
    revision_paths: Vec<(&'a str, &'a str)>,
}

impl Up {
    pub fn run(self, exec: &Exec) -> Result<()> {
        // A new machine: Docker and what the stack needs, installed and
        // started here (as root), before anything else.
        crate::setup::ensure(exec, crate::setup::Need::Up)?;
        let (mut config, stack, rev) = exec.step("preflight", || {
            docker::preflight(exec)?;
            let config = Config::load(exec, &self.flags.overrides)?;
            exec.sh.change_dir(&config.root);
            let stack = config.local.clone().ok_or_else(|| {
                refuse("[workspace.metadata.xtask.local] is missing: `up` needs the backend and frontend images and their ports")
            })?;
            let rev = git::revision(exec, self.flags.allow_dirty)?;
            git::refuse_shallow(exec)?;
            self.flags.check_builder(exec)?;
            Ok((config, stack, rev))
        })?;
        let backend_port = self.backend_port.unwrap_or(stack.backend.port);
        let frontend_port = self.frontend_port.unwrap_or(stack.frontend.port);
        if frontend_port == backend_port {
            return Err(refuse("the frontend and the backend need different host ports (--frontend-port, --backend-port)"));
        }
        config.registry = exec.step("local registry", || registry::ensure_local(exec))?;
        config.base_registry = exec.step("base images", || {
            mirror::usable_base_registry(exec, &config, &config.registry)
        })?;
        eprintln!(
            "images go to {} (never to the deploy registry)",
            config.registry
        );
        let opts = self.flags.options(&exec.env, &config, true);
        let mode = if opts.cache { "cached" } else { "fresh" };
        let built = exec.step(format!("build and push ({mode}) at {}", rev.tag()), || {
            let images = config
                .select_images(&[stack.backend.image.clone(), stack.frontend.image.clone()])?;
            docker::build(exec, &config, &images, &rev, &opts).map(|(built, _)| built)
        })?;
        let find = |name: &str| {
            built
                .iter()
                .find(|b| b.name == name)
                .expect("built both images")
        };
        let backend_alias = alias(&stack.backend.image, &rev);
        let components = [
            Component {
                image: find(&stack.backend.image),
                port: stack.backend.port,
                env: vec![],
                revision_paths: vec![("/version", find(&stack.backend.image).own_revision())],
            },
            Component {
                image: find(&stack.frontend.image),
                port: stack.frontend.port,
                env: vec![format!(
                    "{}=http://{backend_alias}:{}",
                    stack.backend_url_env, stack.backend.port
                )],
                // Each image answers its own revision: the last commit
                // that changed its inputs.
                revision_paths: vec![
                    ("/version", find(&stack.frontend.image).own_revision()),
                    (
                        &stack.backend_version_path,
                        find(&stack.backend.image).own_revision(),
                    ),
                ],
            },
        ];
        let host_ports = [backend_port, frontend_port];
        let network = network_name(&self.project);

        exec.step("start the new revision beside the old one", || {
            if !networks(exec, &self.project)?.contains(&network) {
                exec.run(
                    &Cmd::new("docker")
                        .args(["network", "create", "--label"])
                        .arg(format!("{PROJECT_LABEL}={}", self.project))
                        .arg(&network),
                )?;
            }
            let outcome = components
                .iter()
                .try_for_each(|component| self.start(exec, component, &rev, Slot::Candidate));
            if let Err(error) = outcome {
                remove_containers(exec, &self.project, Some(Slot::Candidate.label()))?;
                return Err(error.context(format!(
                    "revision {} failed readiness; the running stack was left as it was",
                    rev.tag()
                )));
            }
            Ok(())
        })?;
        exec.step(
            "swap: stop the old revision, give the new one the host ports",
            || {
                remove_containers(exec, &self.project, Some(Slot::Live(0).label()))?;
                for (component, host_port) in components.iter().zip(host_ports) {
                    self.start(exec, component, &rev, Slot::Live(host_port))?;
                }
                remove_containers(exec, &self.project, Some(Slot::Candidate.label()))
            },
        )?;
        let out = exec.output;
        out.result(&format!("frontend  http://127.0.0.1:{}", frontend_port));
        out.result(&format!("backend   http://127.0.0.1:{}", backend_port));
        out.result(&format!(
            "revision  {}{}",
            rev.sha,
            if rev.is_dirty() { " (dirty)" } else { "" }
        ));
        out.event(
            "stack_up",
            serde_json::json!({
                "frontend": format!("http://127.0.0.1:{}", frontend_port),
                "backend": format!("http://127.0.0.1:{}", backend_port),
                "revision": rev.sha,
                "dirty": rev.is_dirty(),
            }),
        );
        Ok(())
    }

    /// `docker run` of one component by digest, labelled so `up`, `down`
    /// and `status` find it, then waits until it is ready and answers `rev`.
    fn start(&self, exec: &Exec, component: &Component, rev: &Revision, slot: Slot) -> Result<()> {
        let mut name = format!("{}-{}-{}", self.project, component.image.name, rev.tag());
        if slot == Slot::Candidate {
            name.push_str("-candidate");
        }
        let pinned = component
            .image
            .pinned()
            .unwrap_or_else(|| format!("{}@<digest>", component.image.reference));
        let publish = match slot {
            Slot::Live(port) => format!("127.0.0.1:{port}:{}", component.port),
            Slot::Candidate => format!("127.0.0.1::{}", component.port),
        };
        let mut cmd = Cmd::new("docker")
            .args(["run", "--detach", "--name", &name, "--network"])
            .arg(network_name(&self.project))
            .arg("--network-alias")
            .arg(alias(&component.image.name, rev))
            .arg("--publish")
            .arg(publish);
        for (key, value) in [
            (PROJECT_LABEL, self.project.as_str()),
            (REVISION_LABEL, &rev.sha),
            (COMPONENT_LABEL, &component.image.name),
            (SLOT_LABEL, slot.label()),
        ] {
            cmd = cmd.arg("--label").arg(format!("{key}={value}"));
        }
        for env in &component.env {
            cmd = cmd.arg("--env").arg(env);
        }
        exec.run(&cmd.arg(pinned))?;
        self.wait_ready(
            exec,
            &name,
            component,
            Duration::from_secs(self.ready_timeout),
        )
    }

    /// Waits for `/readyz`, then checks `/version` (and, for the frontend,
    /// the backend behind it) answers each image's own revision. Fails at
    /// once if the container exits.
    fn wait_ready(
        &self,
        exec: &Exec,
        name: &str,
        component: &Component,
        timeout: Duration,
    ) -> Result<()> {
        if exec.dry_run {
            return Ok(());
        }
        let port = exec.read(&Cmd::new("docker").args([
            "port",
            name,
            &format!("{}/tcp", component.port),
        ]))?;
        let addr = port
            .lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .with_context(|| format!("{name} publishes no loopback port"))?
            .to_owned();
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(exit) = exited(exec, name)? {
                return Err(self.failure(
                    exec,
                    name,
                    &format!("{name} exited ({exit}) before it was ready"),
                ));
            }
            match registry::http_get(&addr, "/readyz", Duration::from_secs(2)) {
                Ok((200, _)) => break,
                Ok((status, body)) => last = format!("/readyz answered {status} {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                return Err(self.failure(
                    exec,
                    name,
                    &format!("{name} not ready after {}s: {last}", timeout.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        for (path, expected) in &component.revision_paths {
            let revision = answered_revision(&addr, path)?;
            if revision != *expected {
                return Err(self.failure(
                    exec,
                    name,
                    &format!("{name} {path} answers revision {revision}, expected {expected}"),
                ));
            }
        }
        eprintln!("{name} is ready and answers its image's own revision");
        Ok(())
    }

    fn failure(&self, exec: &Exec, name: &str, reason: &str) -> anyhow::Error {
        let logs = exec
            .read_all(&Cmd::new("docker").args(["logs", "--tail", "20", name]))
            .unwrap_or_default();
        anyhow!(
            "{reason}\n--- last log lines of {name} ---\n{}",
            logs.trim_end()
        )
    }
}

/// `Some(exit code)` once the container has stopped.
fn exited(exec: &Exec, name: &str) -> Result<Option<i64>> {
    #[derive(Deserialize)]
    struct State {
        #[serde(rename = "Running")]
        running: bool,
        #[serde(rename = "ExitCode")]
        exit_code: i64,
    }
    let json =
        exec.read(&Cmd::new("docker").args(["inspect", "--format", "{{json .State}}", name]))?;
    let state: State = serde_json::from_str(&json).context("parsing docker inspect's State")?;
    Ok((!state.running).then_some(state.exit_code))
}

/// The `revision` field of a `/version` answer.
pub fn answered_revision(addr: &str, path: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Version {
        revision: String,
    }
    let (status, body) = registry::http_get(addr, path, Duration::from_secs(5))?;
    if status != 200 {
        bail!("{addr}{path} answered {status}: {}", body.trim());
    }
    let version: Version = serde_json::from_str(body.trim())
        .with_context(|| format!("parsing {addr}{path}: {body:?}"))?;
    Ok(version.revision)
}
