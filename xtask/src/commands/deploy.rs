//! `cargo xtask deploy`: build fresh, push, pin by digest, apply in order,
//! fail fast, roll back on failure, and prove every pod runs the new digest.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::{
    bake::{BuildOptions, KEY_LABEL},
    commands::build::BuildFlags,
    config::{Config, Image},
    docker::{self, BuildFile, BuiltImage},
    exec::Exec,
    exit::refuse,
    git::{self, Revision},
    history::{Entry, History},
    kube::Kube,
    lock::Lock,
    registry,
    rollout::{print_diff, render_overlay, Rollout, WaitFlags},
};

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
    #[command(flatten)]
    pub wait: WaitFlags,
    /// Bound on waiting for a seed Service's LoadBalancer address, in seconds
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub seed_timeout: u64,
}

impl Deploy {
    pub fn run(self, exec: &Exec) -> Result<()> {
        self.wait.check()?;
        let started = Instant::now();
        // 1. Preflight: nothing changes until every check has passed.
        let (config, rev, kube, reachable, from, manifests) = exec.step("preflight", || {
            if self.from.is_none() {
                docker::preflight(exec)?;
            }
            let config = Config::load(exec, &self.flags.overrides)?;
            exec.sh.change_dir(&config.root);
            let rev = git::revision(exec, self.flags.allow_dirty)?;
            git::refuse_shallow(exec)?;
            let (kube, reachable) =
                Kube::connect(exec, &config, self.context.as_deref(), !exec.dry_run)?;
            if !reachable {
                exec.output.result(
                    "# the cluster is not reachable: the plan below is printed without a diff",
                );
            }
            // The workloads as rendered: checked now, and read again under
            // the lock for their autoscalers.
            let manifests = if reachable {
                kube.manifests(&config.manifests.display().to_string())?
            } else {
                Vec::new()
            };
            if reachable {
                refuse_paused(&kube, &config, &manifests)?;
            }
            // Log in first: the build file's digests are checked in the
            // registry, which a fresh CI runner can read only once logged in.
            registry::login(exec, &config)?;
            registry::check(exec, &config.registry)?;
            let from = match &self.from {
                Some(path) => Some(self.load_build_file(exec, &config, path, &rev)?),
                None => {
                    self.flags.check_builder(exec)?;
                    None
                }
            };
            // What is deployed is the build file's revision, whatever HEAD
            // is: the pods and the history say so, and `status` and
            // `verify` then tell it from HEAD.
            let rev = match &from {
                Some(file) => file_revision(exec, file),
                None => rev,
            };
            Ok((config, rev, kube, reachable, from, manifests))
        })?;
        // 2. Lock, then steps 3 to 8.
        let verified = Lock::hold(&kube, reachable, || {
            self.locked(&kube, &config, &rev, from, &manifests, reachable)
        })?;
        if !exec.dry_run {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "deployed {} in {seconds:.1}s: every ready pod runs its image's digest",
                rev.tag()
            );
            print_summary(exec, &verified);
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
        manifests: &[serde_json::Value],
        reachable: bool,
    ) -> Result<Vec<crate::rollout::Verified>> {
        let exec = kube.exec;
        let past = if reachable {
            History::read(kube)?
        } else {
            History::default()
        };
        // This run holds the lock, so an "in progress" entry is a killed run.
        past.warn_unfinished(&exec.output, false);
        // Images built now; seeded ones without a configured value wait for
        // their Service (the seed flow).
        let opts = self.flags.options(&exec.env, config, true);
        let (ahead, seeded): (Vec<Image>, Vec<Image>) = config
            .images
            .iter()
            .cloned()
            .partition(|i| i.seed.is_none() || config.seed_value(i).is_some());
        // 3. Build and push, or take the digests built earlier.
        let (mut built, inputs) = match from {
            Some(file) => (file.images, file.inputs),
            None => {
                let mode = if opts.cache { "cached" } else { "fresh" };
                let (mut built, inputs) =
                    exec.step(format!("build and push ({mode}) at {}", rev.tag()), || {
                        docker::build(
                            exec,
                            config,
                            &config.with_seed_values(ahead, &exec.output),
                            rev,
                            &opts,
                        )
                    })?;
                // Seeded images get their digest once built, mid-rollout.
                built.extend(
                    seeded
                        .iter()
                        .map(|image| BuiltImage::new(config, &image.name, rev, None)),
                );
                if !exec.dry_run {
                    docker::write_build_file(config, rev, &built, &inputs)?;
                }
                (built, inputs)
            }
        };
        // 4. Render the digest-pinned overlay.
        let order = config.rollout();
        let autoscaled = if reachable {
            kube.autoscaled(manifests, &order)?
        } else {
            Vec::new()
        };
        let cause = format!("cargo xtask deploy {}", rev.tag());
        let render = |built: &[BuiltImage]| {
            render_overlay(exec, &kube.kubectl, config, built, rev, &cause, &autoscaled)
        };
        let overlay = exec.step("render the digest-pinned overlay", || render(&built))?;
        // Changes no value: who owns the replica count (a dry run prints it).
        kube.hand_over_replicas(&autoscaled)?;
        if exec.dry_run {
            return self.print_plan(kube, &order, &overlay, &seeded, reachable);
        }

        // 5-8. Apply in order, wait, verify, roll back on failure, record.
        let mut entry = Entry::new(&exec.env, "deploy", rev, &built);
        entry.inputs = inputs.clone();
        let mut rollout = Rollout::start(kube, &self.wait, entry, &past)?;
        let mut image_for = |name: &str| -> Result<BuiltImage> {
            let image = built
                .iter()
                .find(|b| b.name == name)
                .with_context(|| format!("no image configured for deployment {name}"))?;
            if image.digest.is_some() {
                return Ok(image.clone());
            }
            let seed_image = seeded
                .iter()
                .find(|i| i.name == name)
                .with_context(|| format!("{name} has no pushed digest"))?;
            let pushed = self.build_seeded(kube, config, rev, seed_image, &opts)?;
            built.retain(|b| b.name != name);
            built.push(pushed.clone());
            render(&built)?;
            docker::write_build_file(config, rev, &built, &inputs)?;
            Ok(pushed)
        };
        let outcome = rollout.run(&order, &overlay, &mut image_for);
        outcome.with_context(|| format!("deploy of {} failed", rev.tag()))?;
        Ok(rollout.verified)
    }

    /// The dry run's plan: the apply lines, the build of seeded images,
    /// and when the cluster answers, what would change.
    fn print_plan(
        &self,
        kube: &Kube,
        order: &[String],
        overlay: &str,
        seeded: &[Image],
        reachable: bool,
    ) -> Result<Vec<crate::rollout::Verified>> {
        let exec = kube.exec;
        for name in order {
            if let Some(image) = seeded.iter().find(|i| &i.name == name) {
                let seed = image.seed.as_ref().expect("seeded images have a seed");
                exec.output.result(&format!(
                    "# then build and push {name} with {}= the address of service {}",
                    seed.build_arg, seed.service
                ));
            }
            exec.run(&kube.apply(overlay, name))?;
            exec.output.result(&format!(
                "# then wait for deployment/{name} (failing fast), verify every ready pod runs its digest; on failure roll back what changed"
            ));
        }
        exec.output.result(&format!(
            "# the deploy is recorded in configmap/{} as it goes",
            kube.history_name
        ));
        if reachable {
            print_diff(kube, overlay)?;
        }
        Ok(Vec::new())
    }

    /// The seed flow: waits for the Service's external address, then builds
    /// and pushes `image` with it as the build arg.
    fn build_seeded(
        &self,
        kube: &Kube,
        config: &Config,
        rev: &Revision,
        image: &Image,
        opts: &BuildOptions,
    ) -> Result<BuiltImage> {
        let exec = kube.exec;
        let seed = image.seed.as_ref().context("not a seeded image")?;
        let address = exec.step(
            format!("wait for service/{}'s external address", seed.service),
            || {
                wait_for_address(
                    kube,
                    &seed.service,
                    self.seed_timeout,
                    self.wait.poll_interval,
                )
            },
        )?;
        let value = seed.template.replace("{address}", &address);
        let mut image = image.clone();
        image
            .build_args
            .insert(seed.build_arg.clone(), value.clone());
        let built = exec.step(
            format!(
                "build and push {} with {}={value}",
                image.name, seed.build_arg
            ),
            || docker::build(exec, config, &[image.clone()], rev, opts),
        )?;
        built
            .0
            .into_iter()
            .next()
            .context("the seeded build built nothing")
    }

    /// Reads a build file and checks it holds the expected revision, that
    /// every digest is in the registry, and that seeded images had their
    /// value configured (they cannot have been built ahead otherwise).
    fn load_build_file(
        &self,
        exec: &Exec,
        config: &Config,
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
        for image in &config.images {
            if !file.images.iter().any(|b| b.name == image.name) {
                return Err(refuse(format!(
                    "{} has no image {}: build every configured image with `cargo xtask build --push`",
                    path.display(),
                    image.name
                )));
            }
            if let (Some(seed), None) = (&image.seed, config.seed_value(image)) {
                return Err(refuse(format!(
                    "{} takes {} from service {}'s address, which a build made ahead cannot know: set environments.{}.seed_args.{} in [workspace.metadata.xtask], or deploy without --from",
                    image.name,
                    seed.build_arg,
                    seed.service,
                    config.environment.as_deref().unwrap_or("<env>"),
                    seed.build_arg
                )));
            }
        }
        for image in &file.images {
            let pinned = image.pinned().ok_or_else(|| {
                refuse(format!(
                    "{} in {} has no digest: build with --push",
                    image.name,
                    path.display()
                ))
            })?;
            // The environment's registry, or the cluster would pull from
            // wherever the file says.
            if !image
                .reference
                .starts_with(&format!("{}/", config.registry))
            {
                return Err(refuse(format!(
                    "{} in {} is {}, not under this environment's registry {}: build for it (`--env`, `--registry`)",
                    image.name,
                    path.display(),
                    image.reference,
                    config.registry
                )));
            }
            let found = crate::registry::resolve(exec, &pinned)
                .map_err(|e| refuse(format!("{pinned} is not in the registry: {e:#}")))?;
            // The image's own revision: its inputs' last commit at the
            // file's revision, as this clone's history says.
            let own = image.own_revision();
            if let (false, Some(configured)) = (
                image.dirty,
                config.images.iter().find(|i| i.name == image.name),
            ) {
                let at = git::commit(exec, &file.revision)?;
                let expected =
                    git::inputs_revision(exec, &at, &image.name, &configured.input_paths())?;
                if own != expected {
                    return Err(refuse(format!(
                        "{} in {} says its inputs last changed at {own}, but at {} they last changed at {expected}: refusing it",
                        image.name,
                        path.display(),
                        git::short(&file.revision)
                    )));
                }
            }
            if found.revision() != Some(own) {
                return Err(refuse(format!(
                    "{pinned} is labelled revision {} but {} says {own}: refusing it",
                    found.revision().unwrap_or("(none)"),
                    path.display(),
                )));
            }
            if let Some(key) = &image.key {
                if found.label(KEY_LABEL) != Some(key.as_str()) {
                    return Err(refuse(format!(
                        "{pinned} carries input key {} but {} says {key}: refusing it",
                        found.label(KEY_LABEL).unwrap_or("(none)"),
                        path.display(),
                    )));
                }
            }
        }
        Ok(file)
    }
}

/// A paused Deployment never rolls out: the wait would run to its timeout
/// and the rollback would be refused by the API. Refused before anything
/// is built, whether the manifests pause it or someone did by hand.
fn refuse_paused(kube: &Kube, config: &Config, manifests: &[serde_json::Value]) -> Result<()> {
    let paused = |object: &serde_json::Value| {
        object["kind"] == "Deployment" && object["spec"]["paused"] == true
    };
    for object in manifests {
        if paused(object) {
            return Err(refuse(format!(
                "deployment/{} is paused in {} (spec.paused: true), so it would never roll out: remove `paused` from the manifest to deploy it",
                object["metadata"]["name"].as_str().unwrap_or("?"),
                config.manifests.display()
            )));
        }
    }
    for name in config.rollout() {
        if let Some(live) = kube.get::<serde_json::Value>("deployment", &name)? {
            if paused(&live) {
                return Err(refuse(format!(
                    "deployment/{name} is paused in namespace {} (spec.paused: true, as `kubectl rollout pause` leaves it), so it would never roll out: `kubectl rollout resume deployment/{name} --namespace {}`, then deploy",
                    kube.namespace, kube.namespace
                )));
            }
        }
    }
    Ok(())
}

/// The revision a build file holds: its commit (and commit time, where
/// this clone has the commit) and, for a dirty build, its tag's hash.
fn file_revision(exec: &Exec, file: &BuildFile) -> Revision {
    let commit_time = git::commit(exec, &file.revision)
        .map(|r| r.commit_time)
        .unwrap_or_default();
    let dirty_hash = file
        .tag
        .split_once("-dirty-")
        .map(|(_, hash)| hash.to_owned());
    Revision {
        sha: file.revision.clone(),
        commit_time,
        dirty_hash,
    }
}

/// Polls a Service until its LoadBalancer has a hostname or IP.
fn wait_for_address(kube: &Kube, service: &str, timeout: u64, poll: f64) -> Result<String> {
    #[derive(Deserialize)]
    struct Service {
        status: Option<serde_json::Value>,
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        kube.exec.cancel.check()?;
        if let Some(svc) = kube.get::<Service>("service", service)? {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s["loadBalancer"]["ingress"].as_array().cloned())
                .unwrap_or_default();
            let address = ingress.iter().find_map(|i| {
                i["hostname"]
                    .as_str()
                    .or_else(|| i["ip"].as_str())
                    .map(str::to_owned)
            });
            if let Some(address) = address {
                eprintln!("service/{service} is at {address}");
                return Ok(address);
            }
        }
        if Instant::now() > deadline {
            bail!("service/{service} has no external address after {timeout}s (--seed-timeout): is its LoadBalancer being provisioned?");
        }
        eprintln!("service/{service}: waiting for a LoadBalancer address");
        std::thread::sleep(Duration::from_secs_f64(poll));
    }
}

fn print_summary(exec: &Exec, verified: &[crate::rollout::Verified]) {
    let out = exec.output;
    eprintln!(
        "\n{:<14} {:<21} {:<73} ready",
        "component", "image tag", "digest"
    );
    for v in verified {
        out.result(&format!(
            "{:<14} {:<21} {:<73} {}",
            v.name, v.tag, v.digest, v.ready
        ));
    }
    for v in verified {
        for pod in &v.stuck {
            out.warn(&format!(
                "pod {pod} of deployment/{} is still terminating past its grace period (a finalizer, or a node that stopped answering)",
                v.name
            ));
        }
    }
    eprintln!("\n{:>8}  step", "seconds");
    for (name, seconds) in exec.timings() {
        eprintln!("{seconds:>8.1}  {name}");
    }
}
