//! `cargo xtask deploy`: build fresh, push, pin by digest, apply in order,
//! fail fast, roll back on failure, and prove every pod runs the new digest.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::{
    commands::build::BuildFlags,
    config::Config,
    docker::{self, BuildFile, BuiltImage},
    exec::{refuse, rollback_failed, Cmd, Exec},
    git::{self, Revision},
    kube::{
        Deployment, Kube, FIELD_MANAGER, HISTORY_NAME, LOCK_NAME, NAME_LABEL, REVISION_ANNOTATION,
    },
    time::{micro_time, now_epoch, rfc3339},
};

/// How long a lock lives without renewal: a killed deploy frees the
/// namespace within a minute.
const LOCK_SECONDS: i64 = 60;
const RENEW_EVERY: Duration = Duration::from_secs(15);

/// Build, push, apply and verify: exits 0 only when the cluster runs HEAD
#[derive(Args, Debug)]
pub struct Deploy {
    #[command(flatten)]
    pub flags: BuildFlags,
    /// Kube context to deploy to; needed to deploy anywhere but the configured one
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// Deploy the digests in this build file (from `build --push`) instead of building
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// With --from: the revision the file must hold (default: HEAD)
    #[arg(long, value_name = "SHA", requires = "from")]
    pub rev: Option<String>,
    /// On failure, leave the cluster as it is for inspection
    #[arg(long)]
    pub no_rollback: bool,
    /// Bound on the whole wait, in seconds
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub timeout: u64,
    /// How often to look at the rollout, in seconds
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub poll_interval: f64,
    /// How long a running pod may stay unready before the deploy fails, in seconds
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub grace: i64,
}

impl Deploy {
    pub fn run(self, exec: &Exec) -> Result<()> {
        if !self.poll_interval.is_finite() || self.poll_interval <= 0.0 {
            return Err(refuse(
                "--poll-interval must be a positive number of seconds",
            ));
        }
        let started = Instant::now();
        // 1. Preflight: nothing changes until every check has passed.
        let (config, rev, kube, reachable, from) = {
            let _step = exec.step("preflight");
            let kubectl = Kube::find_kubectl()?;
            if self.from.is_none() {
                docker::preflight(exec)?;
            }
            let config = Config::load(exec, &self.flags.overrides)?;
            exec.sh.change_dir(&config.root);
            let rev = git::revision(exec, self.flags.allow_dirty)?;
            let context = self.choose_context(exec, &kubectl, &config)?;
            let kube = Kube {
                exec,
                kubectl,
                context: Some(context.clone()),
                namespace: config.namespace.clone(),
            };
            let reachable = match exec.read(&kube.global(&[
                "version",
                "--output",
                "json",
                "--request-timeout",
                "10s",
            ])) {
                Ok(_) => true,
                Err(e) if exec.dry_run => {
                    println!("# cluster {context} is not reachable ({e:#}); the plan below is printed without a diff");
                    false
                }
                Err(e) => {
                    return Err(refuse(format!(
                        "kube context {context} is not reachable: {e:#}"
                    )))
                }
            };
            let from = match &self.from {
                Some(path) => Some(self.load_build_file(exec, path, &rev)?),
                None => None,
            };
            docker::ecr_login(exec, &config.registry)?;
            (config, rev, kube, reachable, from)
        };

        // 2. Lock.
        let lock = {
            let _step = exec.step(format!("lock namespace {}", config.namespace));
            Lock::take(&kube, reachable)?
        };
        let outcome = self.locked(&kube, &config, &rev, from, reachable);
        let released = lock.release(&kube);
        outcome.and(released)?;
        if !exec.dry_run {
            eprintln!(
                "deployed {} in {:.1}s: every ready pod runs the digests just pushed",
                rev.tag(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Steps 3 to 8, under the lock.
    fn locked(
        &self,
        kube: &Kube,
        config: &Config,
        rev: &Revision,
        from: Option<BuildFile>,
        reachable: bool,
    ) -> Result<()> {
        let exec = kube.exec;
        // 3. Build and push, or take the digests built earlier.
        let built = match from {
            Some(file) => file.images,
            None => {
                let opts = self.flags.options(true);
                let _step = exec.step(format!(
                    "build and push ({}) at {}",
                    if opts.cache { "cached" } else { "fresh" },
                    rev.tag()
                ));
                docker::build(exec, config, &config.images, rev, &opts)?
            }
        };
        // 4. Render the digest-pinned overlay.
        let overlay = {
            let _step = exec.step("render the digest-pinned overlay");
            render_overlay(exec, kube, config, &built, rev)?
        };
        let order = config.rollout();
        if exec.dry_run {
            for name in &order {
                exec.run(&apply_command(kube, &overlay, name))?;
            }
            if reachable {
                let diff = exec.read_all(&kube.global(&[
                    "diff",
                    "--server-side",
                    "--field-manager",
                    FIELD_MANAGER,
                    "--force-conflicts",
                    "--kustomize",
                    &overlay,
                ]))?;
                println!("# kubectl diff --server-side of what would change:");
                for line in diff.lines() {
                    println!("# {line}");
                }
            }
            return Ok(());
        }

        // 5-6. Apply in order, each watched until rolled out or failed.
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        let mut changed: Vec<String> = Vec::new();
        // Per deployment: name, digest, ready pods.
        let mut rolled_out: Vec<(&str, String, usize)> = Vec::new();
        let mut outcome = Ok(());
        for name in &order {
            let image = built
                .iter()
                .find(|b| &b.name == name)
                .with_context(|| format!("no image built for deployment {name}"))?;
            let digest = image
                .digest
                .clone()
                .with_context(|| format!("{name} has no pushed digest"))?;
            let _step = exec.step(format!("apply and roll out deployment/{name}"));
            let before: Option<Deployment> = kube.get("deployment", name)?;
            exec.run(&apply_command(kube, &overlay, name))?;
            let after: Option<Deployment> = kube.get("deployment", name)?;
            if before.as_ref().map(|d| d.metadata.generation)
                != after.as_ref().map(|d| d.metadata.generation)
            {
                changed.push(name.clone());
            }
            outcome = self
                .wait(kube, name, Some(&digest), deadline)
                .and_then(|()| verify(kube, name, &digest))
                .map(|ready| rolled_out.push((name, digest, ready)));
            if outcome.is_err() {
                break;
            }
        }

        // 7. On failure, undo what this run changed.
        if let Err(failure) = outcome {
            let failure = failure.context(format!("deploy of {} failed", rev.tag()));
            if self.no_rollback {
                record(
                    kube,
                    rev,
                    &built,
                    "failed, left for inspection (--no-rollback)",
                )?;
                return Err(failure);
            }
            let _step = exec.step(format!("roll back {}", changed.join(", ")));
            if let Err(rollback) = self.roll_back(kube, &changed) {
                let _ = record(kube, rev, &built, "failed, rollback failed");
                return Err(rollback_failed(format!(
                    "{failure:#}\nROLLBACK FAILED: {rollback:#}\nThe cluster may run a mix of revisions: inspect with `kubectl --namespace {} get deployments,replicasets,pods`",
                    config.namespace
                )));
            }
            record(kube, rev, &built, "failed, rolled back")?;
            return Err(failure.context("rolled back: the previous version is serving"));
        }

        // 8. Record and report.
        record(kube, rev, &built, "succeeded")?;
        eprintln!(
            "\n{:<14} {:<12} {:<73} ready",
            "component", "revision", "digest"
        );
        for (name, digest, ready) in &rolled_out {
            println!("{name:<14} {:<12} {digest:<73} {ready}", rev.tag());
        }
        Ok(())
    }

    /// The context to use: `--context` if given; else the current one, which
    /// must be the configured one (the wrong-cluster guard).
    fn choose_context(&self, exec: &Exec, kubectl: &str, config: &Config) -> Result<String> {
        if let Some(context) = &self.context {
            return Ok(context.clone());
        }
        let current = exec
            .read(&Cmd::new(kubectl).args(["config", "current-context"]))
            .map_err(|e| refuse(format!("no current kube context: {e:#}")))?;
        if let Some(expected) = &config.context {
            if &current != expected {
                let env = config
                    .environment
                    .as_deref()
                    .map_or(String::new(), |e| format!(" for environment {e}"));
                return Err(refuse(format!(
                    "the current kube context is {current:?} but the configuration expects {expected:?}{env}: switch context, or pass --context {current} to deploy there on purpose"
                )));
            }
        }
        Ok(current)
    }

    /// Reads a build file and checks it holds the expected revision and that
    /// every digest is in the registry.
    fn load_build_file(
        &self,
        exec: &Exec,
        path: &std::path::Path,
        rev: &Revision,
    ) -> Result<BuildFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse(format!("cannot read build file {}: {e}", path.display())))?;
        let file: BuildFile = serde_json::from_str(&text)
            .map_err(|e| refuse(format!("{} is not a build file: {e}", path.display())))?;
        let expected = self.rev.clone().unwrap_or_else(|| rev.sha.clone());
        if file.revision != expected {
            return Err(refuse(format!(
                "{} holds revision {} but HEAD is {}: pass --rev {} to deploy it on purpose",
                path.display(),
                file.revision,
                rev.sha,
                file.revision
            )));
        }
        for image in &file.images {
            let pinned = image.pinned().ok_or_else(|| {
                refuse(format!(
                    "{} in {} has no digest: build with --push",
                    image.name,
                    path.display()
                ))
            })?;
            if !exec.succeeds(&Cmd::new("docker").args([
                "buildx",
                "imagetools",
                "inspect",
                "--raw",
                &pinned,
            ])) {
                return Err(refuse(format!("{pinned} is not in the registry")));
            }
        }
        Ok(file)
    }

    /// Polls until `name` has rolled out; with `digest`, fails as soon as a
    /// new pod shows a state that will not fix itself.
    fn wait(&self, kube: &Kube, name: &str, digest: Option<&str>, deadline: Instant) -> Result<()> {
        loop {
            let deployment: Deployment = kube
                .get("deployment", name)?
                .with_context(|| format!("deployment/{name} does not exist"))?;
            if let Some(digest) = digest {
                for pod in kube.pods(name)?.iter().filter(|p| p.wants(digest)) {
                    if let Some(reason) = pod.failure(now_epoch(), self.grace) {
                        bail!(
                            "deployment/{name}: pod {} {reason}\n--- last log lines of {} ---\n{}",
                            pod.metadata.name,
                            pod.metadata.name,
                            kube.logs(&pod.metadata.name)
                        );
                    }
                }
            }
            if deployment.rolled_out() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let s = &deployment.status;
                bail!(
                    "deployment/{name} not rolled out within --timeout {}s: {} of {} replicas updated, {} available",
                    self.timeout,
                    s.updated_replicas,
                    deployment.spec.replicas,
                    s.available_replicas
                );
            }
            std::thread::sleep(Duration::from_secs_f64(self.poll_interval));
        }
    }

    fn roll_back(&self, kube: &Kube, changed: &[String]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        for name in changed.iter().rev() {
            kube.exec
                .run(&kube.cmd(&["rollout", "undo", &format!("deployment/{name}")]))?;
            self.wait(kube, name, None, deadline)?;
        }
        Ok(())
    }
}

/// Every ready pod reports the new digest, and no pod of an older
/// ReplicaSet is still ready. Returns how many pods are ready.
fn verify(kube: &Kube, name: &str, digest: &str) -> Result<usize> {
    let pods = kube.pods(name)?;
    let ready: Vec<_> = pods.iter().filter(|p| p.is_ready()).collect();
    if ready.is_empty() {
        bail!("deployment/{name}: no ready pod");
    }
    if let Some(stale) = ready.iter().find(|p| !p.runs(digest)) {
        let running: Vec<&str> = stale
            .status
            .container_statuses
            .iter()
            .map(|c| c.image_id.as_str())
            .collect();
        bail!(
            "deployment/{name}: pod {} is ready but runs {} instead of {digest}",
            stale.metadata.name,
            running.join(", ")
        );
    }
    eprintln!(
        "deployment/{name}: {} ready pod(s), all running {digest}",
        ready.len()
    );
    Ok(ready.len())
}

/// `kubectl apply --server-side` of one component of the overlay. Conflicts
/// are forced on purpose: after a `rollout undo` the image field belongs to
/// kubectl's rollback manager, and the deploy must take it back.
fn apply_command(kube: &Kube, overlay: &str, name: &str) -> Cmd {
    kube.global(&[
        "apply",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        "--force-conflicts",
        "--kustomize",
        overlay,
        "--selector",
        &format!("{NAME_LABEL}={name}"),
    ])
}

/// Writes `target/xtask/deploy/kustomization.yaml` over the base, pinning
/// every image by digest and stamping the revision on each pod template.
/// Returns the overlay directory.
fn render_overlay(
    exec: &Exec,
    kube: &Kube,
    config: &Config,
    built: &[BuiltImage],
    rev: &Revision,
) -> Result<String> {
    let dir = docker::out_dir(config).join("deploy");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // kustomize takes only relative resource paths: the overlay sits three
    // levels below the root.
    let base = std::path::Path::new("../../..").join(&config.manifests);
    let images: Vec<serde_json::Value> = built
        .iter()
        .map(|image| {
            let digest = image
                .digest
                .clone()
                .unwrap_or_else(|| format!("sha256:<{}-digest-after-push>", image.name));
            json!({"name": image.name, "newName": image.repository(), "digest": digest})
        })
        .collect();
    let annotations = json!({
        REVISION_ANNOTATION: rev.sha,
        "aiq.dev/tag": rev.tag(),
        "kubernetes.io/change-cause": format!("cargo xtask deploy {} (commit {})", rev.tag(), rfc3339(rev.commit_time)),
    });
    let patch = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "any"},
        "spec": {"template": {"metadata": {"annotations": annotations}}},
    });
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": config.namespace,
        "resources": [base.display().to_string()],
        "images": images,
        "patches": [{"target": {"kind": "Deployment"}, "patch": patch.to_string()}],
    });
    let path = dir.join("kustomization.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&kustomization)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let dir_str = dir.display().to_string();
    let rendered = exec.read(&Cmd::new(&kube.kubectl).args(["kustomize", &dir_str]))?;
    std::fs::write(dir.join("rendered.yaml"), &rendered)?;
    if exec.dry_run {
        println!("# rendered manifests ({}):", path.display());
        for line in rendered.lines() {
            println!("# {line}");
        }
    }
    Ok(dir_str)
}

/// Adds an entry to the namespace's deploy history ConfigMap.
fn record(kube: &Kube, rev: &Revision, built: &[BuiltImage], result: &str) -> Result<()> {
    if kube
        .get::<serde_json::Value>("configmap", HISTORY_NAME)?
        .is_none()
    {
        kube.exec
            .run(&kube.cmd(&["create", "configmap", HISTORY_NAME]))?;
    }
    let now = now_epoch();
    let digests: serde_json::Map<String, serde_json::Value> = built
        .iter()
        .map(|b| (b.name.clone(), json!(b.digest)))
        .collect();
    let entry = json!({
        "revision": rev.sha,
        "dirty": rev.is_dirty(),
        "digests": digests,
        "time": rfc3339(now),
        "who": who(),
        "ci_run": std::env::var("GITHUB_RUN_ID").ok(),
        "result": result,
    });
    let key = format!("{now}-{}", rev.short());
    let patch = json!({"data": {key: entry.to_string()}});
    kube.exec.run(&kube.cmd(&[
        "patch",
        "configmap",
        HISTORY_NAME,
        "--type",
        "merge",
        "--patch",
        &patch.to_string(),
    ]))
}

fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("GITHUB_ACTOR"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host}")
}

/// The deploy lock: a Lease created atomically (create fails if it exists),
/// renewed while the deploy runs, and short-lived so a killed deploy frees
/// the namespace within a minute.
struct Lock {
    /// The renewing thread and its stop flag; none in a dry run.
    renewer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Lock {
    fn take(kube: &Kube, reachable: bool) -> Result<Lock> {
        let exec = kube.exec;
        // Unreachable is allowed only in a dry run, which then plans blind.
        if reachable
            && exec
                .read(&kube.global(&[
                    "get",
                    "namespace",
                    &kube.namespace,
                    "--ignore-not-found",
                    "--output",
                    "name",
                ]))?
                .is_empty()
        {
            exec.run(&kube.global(&["create", "namespace", &kube.namespace]))?;
        }
        let lease = lease_json(kube, &who());
        let create = kube
            .cmd(&["create", "--filename", "-"])
            .stdin(lease.to_string());
        if exec.dry_run {
            exec.run(&create)?;
            return Ok(Lock { renewer: None });
        }
        if let Err(error) = exec.run(&create) {
            take_over_expired(kube, lease, error)?;
        }
        Ok(Lock {
            renewer: Some(start_renewing(kube)),
        })
    }

    fn release(self, kube: &Kube) -> Result<()> {
        if let Some((stop, renewer)) = self.renewer {
            stop.store(true, Ordering::SeqCst);
            let _ = renewer.join();
        }
        kube.exec
            .run(&kube.cmd(&["delete", "lease", LOCK_NAME, "--ignore-not-found"]))
    }
}

/// After a failed create: refuses while the holder's lease is live, takes
/// an expired one over with `replace` on the resourceVersion just read, so
/// two deploys cannot both take it.
fn take_over_expired(
    kube: &Kube,
    mut lease: serde_json::Value,
    create: anyhow::Error,
) -> Result<()> {
    let Some(held) = kube.get::<serde_json::Value>("lease", LOCK_NAME)? else {
        return Err(create.context("taking the deploy lock"));
    };
    let spec = &held["spec"];
    let holder = spec["holderIdentity"].as_str().unwrap_or("unknown");
    let renewed = spec["renewTime"]
        .as_str()
        .and_then(crate::time::parse_rfc3339)
        .unwrap_or(0);
    let duration = spec["leaseDurationSeconds"]
        .as_i64()
        .unwrap_or(LOCK_SECONDS);
    if renewed + duration >= now_epoch() {
        return Err(refuse(format!(
            "another deploy holds the lock in namespace {}: {holder} since {} (renewed {}); wait for it, or if it died, the lock expires {duration}s after its last renewal",
            kube.namespace,
            spec["acquireTime"].as_str().unwrap_or("?"),
            spec["renewTime"].as_str().unwrap_or("?"),
        )));
    }
    lease["metadata"]["resourceVersion"] = held["metadata"]["resourceVersion"].clone();
    eprintln!("the lock held by {holder} expired; taking it over");
    kube.exec
        .run(
            &kube
                .cmd(&["replace", "--filename", "-"])
                .stdin(lease.to_string()),
        )
        .map_err(|e| refuse(format!("another deploy took the expired lock first: {e:#}")))
}

/// Renews the lease every RENEW_EVERY on a thread of its own (with its own
/// Shell: `Exec` is not `Send`) until the returned flag is set.
fn start_renewing(kube: &Kube) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let renew = kube.cmd(&["patch", "lease", LOCK_NAME, "--type", "merge", "--patch"]);
    let flag = stop.clone();
    let renewer = std::thread::spawn(move || {
        let Ok(sh) = xshell::Shell::new() else { return };
        let exec = Exec::new(&sh, false);
        let mut last = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() >= RENEW_EVERY {
                let patch = json!({"spec": {"renewTime": micro_time(now_epoch())}}).to_string();
                if let Err(e) = exec.read(&renew.clone().arg(patch)) {
                    eprintln!("warning: renewing the deploy lock failed: {e:#}");
                }
                last = Instant::now();
            }
        }
    });
    (stop, renewer)
}

fn lease_json(kube: &Kube, holder: &str) -> serde_json::Value {
    let now = micro_time(now_epoch());
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LOCK_NAME, "namespace": kube.namespace},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": LOCK_SECONDS,
            "acquireTime": now,
            "renewTime": now,
        },
    })
}
