//! `cargo xtask verify`: the release engineer's manual checks, automated;
//! with `--rebuild`, checked against the source itself.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::{
    bake::BuildOptions,
    commands::cluster_flags::ClusterFlags,
    commands::status::state,
    config::Config,
    docker,
    exec::Exec,
    exit::refuse,
    git::{self, Revision},
    health::Running,
    history::{self, History},
    kube::Kube,
    rollout::{digests_for, own_revisions},
};

/// Exit 0 only if every deployment runs exactly the digests built for HEAD
/// (with --rebuild: the digests a fresh rebuild of its source gives)
#[derive(Args, Debug)]
pub struct Verify {
    /// Images to check (default: all configured)
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Rebuild, fresh and without pushing, the revision the cluster runs
    /// from its commit, on the BuildKit and base images recorded for it, and
    /// check every pod runs the rebuilt digests
    #[arg(long)]
    pub rebuild: bool,
    /// The revision to rebuild instead of the one the cluster runs
    #[arg(long, value_name = "REV", requires = "rebuild")]
    pub rev: Option<String>,
    /// buildx builder to rebuild on (default: the pinned BuildKit of the
    /// recorded version)
    #[arg(long, value_name = "NAME", requires = "rebuild")]
    pub builder: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

impl Verify {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let (mut config, kube, _) = self.cluster.connect(exec, true)?;
        // Only the named images are read, rebuilt and judged.
        config.images = config.select_images(&self.images)?;
        // A fresh CI runner reads ECR only once logged in.
        crate::registry::login(exec, &config)?;
        let history = History::read(&kube)?;
        // Each image's own revision needs the whole history.
        git::refuse_shallow(exec)?;
        if self.rebuild {
            return self.rebuild(exec, &config, &kube, &history);
        }
        let head = git::commit(exec, "HEAD")?;
        let mut running = running_deployments(&kube, &config)?;
        // Each image's own revision at HEAD: a deployment runs HEAD when its
        // image is the one HEAD's inputs give, whatever commit deployed it.
        let own = own_revisions(exec, &config, &history, &head)?;
        let runs_head = |r: &Running| {
            !r.dirty && r.revision.is_some() && r.revision.as_ref() == own.get(&r.name)
        };
        // HEAD's digests are needed only where a deployment says it runs
        // HEAD; elsewhere the revision it runs is the finding.
        let expected = if running.values().flatten().any(runs_head) {
            digests_for(exec, &config, &history, &head)?
        } else {
            digests_for(exec, &config, &history, &head).unwrap_or_default()
        };
        let mut failures = Vec::new();
        for image in &config.images {
            let name = &image.name;
            let digest = expected
                .iter()
                .find(|b| &b.name == name)
                .and_then(|b| b.digest.as_deref())
                .unwrap_or_default();
            let running = running.remove(name).flatten();
            let own = own.get(name).map_or("?", |o| git::short(o));
            let problem = match &running {
                None => Some(format!("deployment/{name} does not exist")),
                Some(r) if r.dirty => Some(format!(
                    "deployment/{name} runs a dirty build ({}): uncommitted code, not HEAD; deploy a commit",
                    r.tag.as_deref().unwrap_or("?")
                )),
                Some(r) if !runs_head(r) => Some(format!(
                    "deployment/{name} runs revision {} ({}), not HEAD ({}, where {name}'s inputs last changed at {own}){}",
                    r.revision.as_deref().unwrap_or("unknown"),
                    r.tag.as_deref().unwrap_or("no tag"),
                    head.short(),
                    if digest.is_empty() {
                        String::new()
                    } else {
                        format!(", whose build is {digest}")
                    }
                )),
                Some(r) if r.digest.as_deref() != Some(digest) => Some(format!(
                    "deployment/{name} pins {} (revision {}), not HEAD's {digest}",
                    r.digest.as_deref().unwrap_or("no digest"),
                    r.revision.as_deref().unwrap_or("unknown")
                )),
                Some(r) => not_serving(r, r.revision.as_deref().unwrap_or_default()),
            };
            report(exec, name, digest, &running, problem, &mut failures);
        }
        if !failures.is_empty() {
            bail!(
                "the cluster does not run HEAD ({}): {}",
                head.short(),
                failures.join("; ")
            );
        }
        eprintln!("the cluster runs exactly HEAD ({})", head.short());
        Ok(())
    }

    /// `--rebuild`: builds the revision again from its commit, fresh, into
    /// BuildKit only (no tag is pushed, the cluster is only read), and
    /// compares each deployment's pods with the rebuilt digest.
    fn rebuild(&self, exec: &Exec, config: &Config, kube: &Kube, history: &History) -> Result<()> {
        let (rev, mut running) = exec.step("what the cluster runs", || {
            // A named builder must answer before anything is built.
            if let Some(builder) = &self.builder {
                crate::builder::reachable(exec, builder)?;
            }
            let running = running_deployments(kube, config)?;
            let rev = match &self.rev {
                Some(rev) => git::commit(exec, rev)?,
                None => running_revision(exec, &running)?,
            };
            Ok((rev, running))
        })?;
        let inputs = history::recorded_inputs(history, &rev.sha).ok_or_else(|| {
            refuse(format!(
                "no successful deploy of {} in this namespace's history records what it was built on (BuildKit, base images): deploy it with this xtask first",
                rev.short()
            ))
        })?;
        // The configuration as that build had it: the same BuildKit and
        // the same base registry, so the Dockerfiles' FROMs name the
        // recorded bases.
        let recorded = Config {
            buildkit: inputs.buildkit.clone(),
            base_registry: inputs.base_registry.clone(),
            ..config.clone()
        };
        let images: Vec<_> = recorded
            .images
            .iter()
            .filter(|i| matches!(running.get(&i.name), Some(Some(_))))
            .cloned()
            .collect();
        let images = recorded.with_seed_values(images, &exec.output);
        let opts = BuildOptions {
            builder: self.builder.clone(),
            digest_only: true,
            pinned_bases: Some(inputs.bases.clone()),
            ..BuildOptions::default()
        };
        let (rebuilt, _) = exec.step(
            format!(
                "rebuild {} fresh from its commit on BuildKit {}",
                rev.short(),
                inputs.buildkit
            ),
            || docker::build(exec, &recorded, &images, &rev, &opts),
        )?;
        let mut failures = Vec::new();
        for image in &config.images {
            let name = &image.name;
            let running = running.remove(name).flatten();
            let digest = rebuilt
                .iter()
                .find(|b| &b.name == name)
                .and_then(|b| b.digest.clone())
                .unwrap_or_default();
            let problem = match &running {
                None => Some(format!("deployment/{name} does not exist")),
                Some(r) if r.dirty => Some(format!(
                    "deployment/{name} runs a dirty build ({}): it has no commit to rebuild",
                    r.tag.as_deref().unwrap_or("?")
                )),
                Some(r) if r.digest.as_deref() != Some(&digest) => Some(format!(
                    "deployment/{name} runs {}, but {} rebuilt from its commit is {digest}: what runs is not what the commit produces",
                    r.digest.as_deref().unwrap_or("no digest"),
                    rev.short()
                )),
                Some(r) => not_serving(r, r.revision.as_deref().unwrap_or_default()),
            };
            report(exec, name, &digest, &running, problem, &mut failures);
        }
        if !failures.is_empty() {
            bail!(
                "the cluster does not run what {} produces: {}",
                rev.short(),
                failures.join("; ")
            );
        }
        eprintln!(
            "every pod runs exactly what {} produces, rebuilt from source",
            rev.short()
        );
        Ok(())
    }
}

/// What each configured deployment runs (`None`: it does not exist).
fn running_deployments(kube: &Kube, config: &Config) -> Result<BTreeMap<String, Option<Running>>> {
    config
        .images
        .iter()
        .map(|image| {
            Ok((
                image.name.clone(),
                crate::health::running(kube, &image.name)?,
            ))
        })
        .collect()
}

/// The one revision the deployments say they were deployed at (by an
/// older xtask: the one their pod templates carry).
fn running_revision(exec: &Exec, running: &BTreeMap<String, Option<Running>>) -> Result<Revision> {
    let mut revisions: Vec<&str> = running
        .values()
        .flatten()
        .filter_map(|r| r.deployed_revision.as_deref().or(r.revision.as_deref()))
        .collect();
    revisions.sort();
    revisions.dedup();
    match revisions.as_slice() {
        [] => Err(refuse(
            "no deployment here says which revision it runs: name one with --rev",
        )),
        [one] => git::commit(exec, one),
        many => Err(refuse(format!(
            "the deployments run different revisions ({}): name the one to rebuild with --rev",
            many.join(", ")
        ))),
    }
}

/// Why a deployment that pins the right digest still does not serve it
/// everywhere, if it does not; `sha` is its image's expected own revision.
fn not_serving(r: &Running, sha: &str) -> Option<String> {
    (r.stale_pod.is_some() || !r.rolled_out || r.ready as i64 != r.desired).then(|| {
        format!(
            "deployment/{}: {} ({} of {} ready)",
            r.name,
            state(Some(r), sha),
            r.ready,
            r.desired
        )
    })
}

/// One line and one `verified` event per deployment.
fn report(
    exec: &Exec,
    name: &str,
    digest: &str,
    running: &Option<Running>,
    problem: Option<String>,
    failures: &mut Vec<String>,
) {
    let built_at = running
        .as_ref()
        .map(|r| {
            format!(
                " (built at {}, inputs unchanged since; deployed at {})",
                r.revision.as_deref().map_or("?", git::short),
                r.deployed_revision.as_deref().map_or("?", git::short)
            )
        })
        .unwrap_or_default();
    let line = match &problem {
        None => format!("ok    {name}: every one of its ready pods runs {digest}{built_at}"),
        Some(p) => format!("FAIL  {p}"),
    };
    exec.output.result(&line);
    exec.output.event(
        "verified",
        json!({"deployment": name, "expected": digest, "ok": problem.is_none(), "problem": problem, "running": running}),
    );
    failures.extend(problem);
}
