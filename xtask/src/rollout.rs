//! Rolling images out to the cluster, shared by `deploy` and `rollback`:
//! render the digest-pinned overlay, apply each deployment in order, wait
//! failing fast, verify the digests, undo on failure, and keep the history
//! entry up to date all along.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::{
    config::Config,
    docker::BuiltImage,
    exec::Exec,
    exit::{refuse, rollback_failed},
    git::Revision,
    history::{Entry, ImageRecord, Record, INTERRUPTED},
    kube::{
        applied_with, object_ref, Autoscaled, Deployment, Kube, CONTROLLER_REVISION,
        DEPLOYED_REVISION_ANNOTATION, DEPLOYED_TAG_ANNOTATION, DIRTY_ANNOTATION,
        REVISION_ANNOTATION, TAG_ANNOTATION, TEMPLATE_HASH_LABEL,
    },
    snapshot::Snapshot,
    time::now_epoch,
};

/// How a rollout is watched and what happens when it fails.
#[derive(Args, Debug, Clone)]
pub struct WaitFlags {
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
    /// How long a new pod may stay unschedulable (a cluster autoscaler may add a node), in seconds
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub unschedulable_timeout: u64,
}

impl WaitFlags {
    pub fn check(&self) -> Result<()> {
        if !self.poll_interval.is_finite() || self.poll_interval <= 0.0 {
            return Err(refuse(
                "--poll-interval must be a positive number of seconds",
            ));
        }
        Ok(())
    }

    fn sleep(&self) {
        std::thread::sleep(Duration::from_secs_f64(self.poll_interval));
    }
}

/// One deployment rolled out and verified.
pub struct Verified {
    pub name: String,
    /// Its image's tag: its own revision and input key.
    pub tag: String,
    pub digest: String,
    pub ready: usize,
    /// Its pods still there past their deletion time and grace period.
    pub stuck: Vec<String>,
}

/// One rollout of a set of deployments, recorded in the history as it goes.
pub struct Rollout<'k, 'a> {
    pub kube: &'k Kube<'a>,
    pub flags: &'k WaitFlags,
    pub record: Record,
    pub verified: Vec<Verified>,
    /// What the previous successful rollout applied: what a failure
    /// returns to.
    restore: Option<Snapshot>,
    /// The overlay's rendered YAML and its objects, as last read.
    rendered: (String, Vec<Value>),
}

impl<'k, 'a> Rollout<'k, 'a> {
    /// Starts a rollout: its history entry is written "in progress" first.
    pub fn start(
        kube: &'k Kube<'a>,
        flags: &'k WaitFlags,
        entry: Entry,
        past: &crate::history::History,
    ) -> Result<Rollout<'k, 'a>> {
        let record = Record::start(kube, entry, past)?;
        Ok(Rollout {
            kube,
            flags,
            restore: past.snapshot_before(kube, &record.key),
            record,
            verified: Vec::new(),
            rendered: Default::default(),
        })
    }

    /// The objects of the overlay as rendered now (the seed flow renders it
    /// again mid-rollout).
    fn rendered(&mut self, overlay: &str) -> Result<&[Value]> {
        let path = Path::new(overlay).join("rendered.yaml");
        let yaml = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if yaml != self.rendered.0 {
            let objects = self.kube.to_objects(yaml.clone())?;
            self.rendered = (yaml, objects);
        }
        Ok(&self.rendered.1)
    }

    /// Applies `order` one deployment at a time from `overlay`, each waited
    /// for and verified before the next. `image_for` gives the image (and
    /// digest) each must run (and may build it first: the seed flow). On failure the
    /// deployments this run changed are undone, unless `--no-rollback`.
    pub fn run(
        &mut self,
        order: &[String],
        overlay: &str,
        image_for: &mut dyn FnMut(&str) -> Result<BuiltImage>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.flags.timeout);
        let outcome = self.apply_all(order, overlay, image_for, deadline);
        let kube = self.kube;
        let Err(failure) = outcome else {
            let tag = self.record.entry.tag.clone();
            let applied = Snapshot::of(tag, self.rendered(overlay)?, order);
            return self.record.succeed(kube, &applied);
        };
        let entry = self.record.entry.clone();
        let changed = &entry.changed;
        let changed_list = self.record.entry.changed_list();
        if kube.exec.cancel.lock_lost() {
            // The namespace may be another deploy's now: touch nothing more
            // than this run's own history entry.
            let _ = self.record.finish(kube, "failed: lost the deploy lock");
            return Err(failure.context(format!(
                "stopped without rolling back; changed so far: {changed_list}. See `cargo xtask status`"
            )));
        }
        if kube.exec.cancel.interrupted() {
            self.record.finish(kube, INTERRUPTED)?;
            let step = &self.record.entry.step;
            return Err(failure.context(format!(
                "interrupted during {step}; changed so far: {changed_list}. Nothing was rolled back: see `cargo xtask status`, then deploy again or `cargo xtask rollback`"
            )));
        }
        if self.flags.no_rollback {
            self.record
                .finish(kube, "failed, left for inspection (--no-rollback)")?;
            return Err(failure);
        }
        let dir = Path::new(overlay).with_file_name("rollback");
        let undone = kube
            .exec
            .step(format!("roll back {}", changed.join(", ")), || {
                roll_back(kube, self.flags, &entry, self.restore.as_ref(), &dir)
            });
        if let Err(rollback) = undone {
            let _ = self.record.finish(kube, "failed, rollback failed");
            return Err(rollback_failed(format!(
                "{failure:#}\nROLLBACK FAILED: {rollback:#}\nThe cluster may run a mix of revisions: inspect with `kubectl --namespace {} get deployments,replicasets,pods`",
                kube.namespace
            )));
        }
        self.record.finish(kube, "failed, rolled back")?;
        Err(failure.context("rolled back: the cluster is as it was before this deploy"))
    }

    fn apply_all(
        &mut self,
        order: &[String],
        overlay: &str,
        image_for: &mut dyn FnMut(&str) -> Result<BuiltImage>,
        deadline: Instant,
    ) -> Result<()> {
        let kube = self.kube;
        for name in order {
            kube.exec.cancel.check()?;
            let image = image_for(name)?;
            let digest = image
                .digest
                .clone()
                .with_context(|| format!("{name} has no pushed digest"))?;
            // A seeded image's digest is known only now.
            let entry = &mut self.record.entry;
            entry.digests.insert(name.clone(), Some(digest.clone()));
            if let Some(record) = ImageRecord::of(&image) {
                entry.images.insert(name.clone(), record);
            }
            // Every object applied with it, as it is before the apply.
            let deployment_ref = format!("deployment.apps/{name}");
            let mut refs: Vec<String> = self
                .rendered(overlay)?
                .iter()
                .filter(|o| applied_with(o, name))
                .map(object_ref)
                .collect();
            if !refs.contains(&deployment_ref) {
                refs.push(deployment_ref.clone());
            }
            let objects_before = kube.get_objects(&refs)?;
            let found: HashSet<String> = objects_before.iter().map(object_ref).collect();
            let created: Vec<String> = refs
                .iter()
                .filter(|r| !found.contains(*r))
                .cloned()
                .collect();
            let before: Option<Deployment> = objects_before
                .iter()
                .find(|o| object_ref(o) == deployment_ref)
                .map(|o| serde_json::from_value(o.clone()))
                .transpose()
                .with_context(|| format!("parsing deployment/{name}"))?;
            // Pods from before the apply are judged by their present state
            // only (see `Pod::failure`).
            let existing: HashSet<String> = match &before {
                Some(deployment) => kube.pods(deployment)?,
                None => Vec::new(),
            }
            .into_iter()
            .map(|p| p.metadata.name)
            .collect();
            // Counted as changed before its apply starts, and recorded so
            // with what it will create: an apply that fails half-way (the
            // Deployment applied, a later object refused) or a run killed
            // during it has changed it.
            self.record.entry.changed.push(name.clone());
            if !created.is_empty() {
                self.record.entry.created.insert(name.clone(), created);
            }
            // None: it did not exist. One without a revision annotation
            // gets no entry, so a plain undo.
            match &before {
                None => {
                    self.record.entry.previous.insert(name.clone(), None);
                }
                Some(existed) => {
                    if let Some(revision) = existed.revision() {
                        self.record
                            .entry
                            .previous
                            .insert(name.clone(), Some(revision));
                    }
                }
            }
            self.record
                .step(kube, &format!("apply deployment/{name}"))?;
            let step = format!("apply and roll out deployment/{name}");
            kube.exec.step(step, || {
                kube.exec.run(&kube.apply(overlay, name))?;
                if contents(&objects_before) == contents(&kube.get_objects(&refs)?) {
                    // The apply changed nothing: nothing to undo.
                    let entry = &mut self.record.entry;
                    entry.changed.retain(|c| c != name);
                    entry.previous.remove(name);
                    entry.created.remove(name);
                }
                let rolled_out = wait(
                    kube,
                    self.flags,
                    name,
                    Some(&existing),
                    before.as_ref(),
                    deadline,
                )?;
                let (ready, stuck) = verify_pods(kube, &rolled_out, &digest)?;
                self.verified.push(Verified {
                    name: name.clone(),
                    tag: image.tag.clone(),
                    digest: digest.clone(),
                    ready,
                    stuck,
                });
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// What an apply can change of each object, by `kind.group/name`: all but
/// its status and the metadata the API server and controllers write.
fn contents(objects: &[Value]) -> BTreeMap<String, Value> {
    objects
        .iter()
        .map(|object| {
            let mut content = object.clone();
            if let Some(fields) = content.as_object_mut() {
                fields.remove("status");
                let mut annotations = object["metadata"]["annotations"].clone();
                if let Some(annotations) = annotations.as_object_mut() {
                    annotations.remove(CONTROLLER_REVISION);
                }
                let labels = object["metadata"]["labels"].clone();
                fields.insert(
                    "metadata".into(),
                    json!({"labels": labels, "annotations": annotations}),
                );
            }
            (object_ref(object), content)
        })
        .collect()
}

/// How long pods may fail to be created because an admission webhook
/// timed out before the rollout fails: a webhook restarting or briefly
/// overloaded answers again within it; one that is down stays down.
const WEBHOOK_BUDGET: Duration = Duration::from_secs(30);

/// Polls until `name` has rolled out; with `watched` (the pods that
/// existed before the apply), fails as soon as a pod of its current
/// ReplicaSet shows a state that will not fix itself. `before` is the
/// Deployment as it was before the apply, whose stall is not this
/// rollout's. Reports progress as it changes. Returns the Deployment as it
/// was when it had rolled out.
pub fn wait(
    kube: &Kube,
    flags: &WaitFlags,
    name: &str,
    watched: Option<&HashSet<String>>,
    before: Option<&Deployment>,
    deadline: Instant,
) -> Result<Deployment> {
    let mut last = None;
    // When each new pod was first seen unschedulable, on our own clock.
    let mut unschedulable: std::collections::HashMap<String, Instant> = Default::default();
    // Since when pods cannot be created because a webhook timed out.
    let mut webhook_timing_out: Option<Instant> = None;
    // The generation and `pod-template-hash` of the current ReplicaSet.
    let mut template: Option<(i64, String)> = None;
    loop {
        kube.exec.cancel.check()?;
        let deployment: Deployment = kube
            .get("deployment", name)?
            .with_context(|| format!("deployment/{name} does not exist"))?;
        match deployment.stalled(before) {
            Some(stalled) if stalled.webhook_timeout => {
                let since = *webhook_timing_out.get_or_insert_with(|| {
                    eprintln!(
                        "deployment/{name}: {}; waiting up to {}s for the webhook to answer",
                        stalled.message,
                        WEBHOOK_BUDGET.as_secs()
                    );
                    Instant::now()
                });
                if since.elapsed() >= WEBHOOK_BUDGET {
                    bail!(
                        "deployment/{name}: {} (still after {}s)",
                        stalled.message,
                        WEBHOOK_BUDGET.as_secs()
                    );
                }
            }
            Some(stalled) => bail!("deployment/{name}: {}", stalled.message),
            None => webhook_timing_out = None,
        }
        if let Some(existing) = watched {
            // The rollout's pods are its current ReplicaSet's: an older
            // one's pods, even of the same digest (a crash-looping one
            // this deploy fixes by its manifest alone), are not judged.
            if template.as_ref().map(|(generation, _)| *generation)
                != Some(deployment.metadata.generation)
            {
                template = kube
                    .template_hash(&deployment)?
                    .map(|hash| (deployment.metadata.generation, hash));
            }
            let current = |pod: &&crate::kube::Pod| {
                template.as_ref().is_some_and(|(_, hash)| {
                    pod.metadata.labels.get(TEMPLATE_HASH_LABEL) == Some(hash)
                })
            };
            for pod in kube.pods(&deployment)?.iter().filter(current) {
                let pod_name = &pod.metadata.name;
                let new = !existing.contains(pod_name);
                let mut reason = pod.failure(now_epoch(), flags.grace, new);
                match pod.unschedulable() {
                    Some(message) => {
                        let since = *unschedulable
                            .entry(pod_name.clone())
                            .or_insert_with(Instant::now);
                        if since.elapsed().as_secs() >= flags.unschedulable_timeout {
                            reason = Some(format!(
                                "unschedulable for {}s: {message}",
                                flags.unschedulable_timeout
                            ));
                        }
                    }
                    None => {
                        unschedulable.remove(pod_name);
                    }
                }
                if let Some(reason) = reason {
                    bail!(
                        "deployment/{name}: pod {pod_name} {reason}\n--- recent warning events of {pod_name} ---\n{}\n--- last log lines of {pod_name} ---\n{}",
                        kube.warning_events(pod_name),
                        kube.logs(pod_name)
                    );
                }
            }
        }
        let s = &deployment.status;
        let progress = (s.updated_replicas, s.ready_replicas, s.available_replicas);
        if last != Some(progress) {
            last = Some(progress);
            eprintln!(
                "deployment/{name}: {} of {} updated, {} ready, {} available",
                s.updated_replicas,
                deployment.spec.replicas,
                s.ready_replicas,
                s.available_replicas
            );
            kube.exec.output.event(
                "rollout",
                json!({
                    "deployment": name,
                    "desired": deployment.spec.replicas,
                    "updated": s.updated_replicas,
                    "ready": s.ready_replicas,
                    "available": s.available_replicas,
                }),
            );
        }
        if deployment.rolled_out() {
            return Ok(deployment);
        }
        if Instant::now() > deadline {
            bail!(
                "deployment/{name} not rolled out within --timeout {}s: {} of {} replicas updated, {} available",
                flags.timeout,
                s.updated_replicas,
                deployment.spec.replicas,
                s.available_replicas
            );
        }
        flags.sleep();
    }
}

/// Returns what `entry` changed to what the rollout before it applied
/// (`restore`), newest first, and waits for each deployment and verifies it
/// runs the digest its restored template pins.
///
/// What the run created and `restore` does not hold is deleted. Every
/// other object applied with a changed deployment is applied again as
/// `restore` holds it, by server-side apply as the deploy's field manager:
/// fields the run added go, fields it removed come back owned by the
/// xtask, and fields other managers own (an autoscaler's replica count, a
/// `rollout restart`) stay theirs. Without `restore` (a history an older
/// xtask wrote) only pod templates go back: `rollout undo` to the recorded
/// revision.
pub fn roll_back(
    kube: &Kube,
    flags: &WaitFlags,
    entry: &Entry,
    restore: Option<&Snapshot>,
    dir: &Path,
) -> Result<()> {
    let exec = kube.exec;
    let deadline = Instant::now() + Duration::from_secs(flags.timeout);
    let restored = |name: &str| -> Vec<Value> {
        restore
            .iter()
            .flat_map(|s| &s.objects)
            .filter(|o| applied_with(o, name))
            .cloned()
            .collect()
    };
    let mut deleted = HashSet::new();
    for name in entry.changed.iter().rev() {
        let kept: HashSet<String> = restored(name).iter().map(object_ref).collect();
        let mut created = entry.created.get(name).cloned().unwrap_or_default();
        // An entry written before `created` was: its deployment, if new.
        let deployment_ref = format!("deployment.apps/{name}");
        if entry.previous.get(name) == Some(&None) && !created.contains(&deployment_ref) {
            created.push(deployment_ref);
        }
        let doomed: Vec<&str> = created
            .iter()
            .filter(|r| !kept.contains(*r))
            .map(String::as_str)
            .collect();
        if doomed.is_empty() {
            continue;
        }
        kube.exec.cancel.check()?;
        exec.run(&kube.delete_objects(&doomed))?;
        for object in doomed {
            if !exec.dry_run {
                eprintln!("{object} did not exist before this deploy: deleted");
            }
            deleted.insert(object.to_owned());
        }
    }
    // A replica count an autoscaler owns now stays its own.
    let autoscaled: Vec<String> = match restore {
        Some(snapshot) => kube
            .autoscaled(&snapshot.objects, &entry.changed)?
            .into_iter()
            .map(|a| a.name)
            .collect(),
        None => Vec::new(),
    };
    for name in entry.changed.iter().rev() {
        if deleted.contains(&format!("deployment.apps/{name}")) {
            continue;
        }
        // The lock may have been lost while a write hung: then the
        // namespace may be another run's.
        kube.exec.cancel.check()?;
        let mut objects = restored(name);
        // The Deployment as the failed rollout left it: its stall is not
        // the rollback's.
        let before: Option<Deployment> = if exec.dry_run {
            None
        } else {
            // It only refines the stall check: a failed read restores anyway.
            kube.get("deployment", name).unwrap_or_else(|e| {
                exec.output.warn(&format!(
                    "deployment/{name} could not be read before its rollback ({e:#}): a stall it shows counts as the rollback's"
                ));
                None
            })
        };
        match restore.filter(|_| !objects.is_empty()) {
            Some(snapshot) => {
                for object in &mut objects {
                    let scaled = object["kind"] == "Deployment"
                        && autoscaled.iter().any(|a| object["metadata"]["name"] == *a);
                    if let (true, Some(spec)) = (scaled, object["spec"].as_object_mut()) {
                        spec.remove("replicas");
                    }
                }
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(format!("{name}.json"));
                let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
                std::fs::write(&path, serde_json::to_string_pretty(&list)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!(
                    "deployment/{name}: applying again what the deploy of {} applied",
                    snapshot.tag
                );
                exec.run(&kube.apply_file(&path.display().to_string()))?;
            }
            None => {
                exec.output.warn(&format!(
                    "no manifests were kept of the rollout before this one (the history was written by an older xtask): only deployment/{name}'s pod template goes back"
                ));
                let revision = entry.previous.get(name).and_then(Option::as_ref);
                exec.run(&kube.undo(name, revision))?;
                // The undone deploy's stamps on the Deployment itself (an
                // undo restores only the pod template): the deploy before
                // it, by an older xtask, left none.
                let unstamp = json!({"metadata": {"annotations": {
                    DEPLOYED_REVISION_ANNOTATION: null,
                    DEPLOYED_TAG_ANNOTATION: null,
                }}});
                exec.run(&kube.merge_patch("deployment", name, &unstamp))?;
            }
        }
        if exec.dry_run {
            continue;
        }
        let rolled_out = wait(kube, flags, name, None, before.as_ref(), deadline)?;
        if let Some(digest) = rolled_out.pinned_digest() {
            verify_pods(kube, &rolled_out, digest)?;
        }
    }
    Ok(())
}

/// Every ready pod reports `digest`, and no pod of an older ReplicaSet is
/// still ready. Returns how many pods are ready, and the pods stuck
/// terminating.
pub fn verify_pods(
    kube: &Kube,
    deployment: &Deployment,
    digest: &str,
) -> Result<(usize, Vec<String>)> {
    let name = &deployment.metadata.name;
    let pods = kube.pods(deployment)?;
    let ready: Vec<_> = pods.iter().filter(|p| p.is_ready()).collect();
    if ready.is_empty() {
        // Scaled to zero on purpose: rolled out, with nothing to run.
        if deployment.spec.replicas != 0 {
            bail!("deployment/{name}: no ready pod");
        }
        eprintln!("deployment/{name}: replicas: 0, so no pods to verify (it pins {digest})");
        kube.exec.output.event(
            "verified",
            json!({"deployment": name, "digest": digest, "ready": 0}),
        );
        return Ok((0, crate::health::stuck_terminating(&pods, now_epoch())));
    }
    if let Some(stale) = ready.iter().find(|p| !p.runs(name, digest)) {
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
    kube.exec.output.event(
        "verified",
        json!({"deployment": name, "digest": digest, "ready": ready.len()}),
    );
    let now = now_epoch();
    let stuck = crate::health::stuck_terminating(&pods, now);
    Ok((ready.len(), stuck))
}

/// A dry run's view of what would change: `kubectl diff --server-side`.
pub fn print_diff(kube: &Kube, overlay: &str) -> Result<()> {
    let diff = kube.exec.read_all(&kube.diff(overlay))?;
    let out = kube.exec.output;
    out.result("# kubectl diff --server-side of what would change:");
    for line in diff.lines() {
        out.result(&format!("# {line}"));
    }
    out.event("diff", json!({ "diff": diff }));
    Ok(())
}

/// Writes `target/xtask/deploy/kustomization.yaml` over the base, pinning
/// every image by digest (a placeholder for one not pushed yet), stamping
/// the revision on each pod template, and leaving `spec.replicas` out of
/// each `autoscaled` Deployment. Returns the overlay directory.
pub fn render_overlay(
    exec: &Exec,
    kubectl: &str,
    config: &Config,
    built: &[BuiltImage],
    rev: &Revision,
    cause: &str,
    autoscaled: &[Autoscaled],
) -> Result<String> {
    let dir = config.out_dir().join("deploy");
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
    // The deploy's revision and cause go on each Deployment's own metadata;
    // a pod template carries only what belongs to its image (its own
    // revision, its tag; the digest is in its image reference), so a
    // reused image's pods do not restart.
    let deployed = json!({
        DEPLOYED_REVISION_ANNOTATION: rev.sha,
        DEPLOYED_TAG_ANNOTATION: rev.tag(),
        "kubernetes.io/change-cause": cause,
    });
    let patch = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "any", "annotations": deployed},
    });
    let mut patches = vec![json!({"target": {"kind": "Deployment"}, "patch": patch.to_string()})];
    for image in built {
        let stamps = json!({
            REVISION_ANNOTATION: image.own_revision(),
            TAG_ANNOTATION: image.tag,
            DIRTY_ANNOTATION: image.dirty.to_string(),
        });
        let patch = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": image.name},
            "spec": {"template": {"metadata": {"annotations": stamps}}},
        });
        patches.push(json!({
            "target": {"kind": "Deployment", "name": image.name},
            "patch": patch.to_string(),
        }));
    }
    for scaled in autoscaled {
        // A null in a strategic merge patch removes the field.
        let patch = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": scaled.name},
            "spec": {"replicas": null},
        });
        patches.push(json!({
            "target": {"kind": "Deployment", "name": scaled.name},
            "patch": patch.to_string(),
        }));
    }
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": config.namespace,
        "resources": [base.display().to_string()],
        "images": images,
        "patches": patches,
    });
    let path = dir.join("kustomization.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&kustomization)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let dir_str = dir.display().to_string();
    let rendered = exec.read(&crate::kube::kustomize(kubectl, &dir_str))?;
    std::fs::write(dir.join("rendered.yaml"), &rendered)?;
    if exec.dry_run {
        let out = exec.output;
        out.result(&format!("# rendered manifests ({}):", path.display()));
        for line in rendered.lines() {
            out.result(&format!("# {line}"));
        }
        out.event(
            "manifests",
            json!({"path": dir.join("rendered.yaml"), "yaml": rendered}),
        );
    }
    Ok(dir_str)
}

/// The images built for `rev`, with their digests: those the deploy
/// history recorded for `rev`, or else for each image the newest deploy of
/// it at the same own revision (its inputs unchanged since), or else this
/// checkout's last `build --push` of `rev` (`build.json`), or else those
/// `rev`'s SHA tag resolves to in the registry (an image built before
/// input keys); the last two checked in the registry against the image's
/// labels (a tag can be moved, a file edited; the labels are in the image).
pub fn digests_for(
    exec: &Exec,
    config: &Config,
    history: &crate::history::History,
    rev: &Revision,
) -> Result<Vec<BuiltImage>> {
    let recorded = crate::history::recorded_images(history, &rev.sha);
    let build_file = crate::docker::read_build_file(config)
        .filter(|file| file.revision == rev.sha && file.images.iter().all(|i| !i.dirty));
    config
        .images
        .iter()
        .map(|image| {
            let name = &image.name;
            if let Some((digest, record)) = recorded.as_ref().and_then(|r| r.get(name)) {
                let mut built = BuiltImage::new(config, name, rev, Some(digest.clone()));
                if let Some(record) = record {
                    record.apply(&mut built, config);
                }
                return Ok(built);
            }
            let own = crate::git::inputs_revision(exec, rev, name, &image.input_paths())?;
            if let Some((digest, record)) = crate::history::recorded_image(history, name, &own) {
                let mut built = BuiltImage::new(config, name, rev, Some(digest));
                record.apply(&mut built, config);
                return Ok(built);
            }
            let pushed_here = build_file
                .iter()
                .flat_map(|file| &file.images)
                .find(|built| built.name == *name && built.digest.is_some());
            if let Some(built) = pushed_here {
                let pinned = built.pinned().context("a pushed image has a digest")?;
                let found = crate::registry::resolve(exec, &pinned)?;
                if found.revision() != Some(built.own_revision())
                    || found.label(crate::bake::KEY_LABEL) != built.key.as_deref()
                {
                    bail!("{pinned}, which build.json records for {}, is labelled otherwise in the registry; refusing it", rev.short());
                }
                return Ok(built.clone());
            }
            let reference = config.image_ref(name, &rev.tag());
            let found = crate::registry::resolve(exec, &reference).map_err(|e| {
                anyhow::anyhow!("{name} at {} (inputs unchanged since {}) was never deployed from this namespace's history, and {reference} is not in the registry: deploy that commit (`cargo xtask deploy` from a checkout of it): {e:#}", rev.short(), crate::git::short(&own))
            })?;
            if found.revision() != Some(rev.sha.as_str()) {
                bail!(
                    "{reference} is labelled revision {} instead of {}: the tag was moved; refusing it",
                    found.revision().unwrap_or("(none)"),
                    rev.sha
                );
            }
            Ok(BuiltImage::new(config, name, rev, Some(found.digest)))
        })
        .collect()
}

/// Each image's own revision at `head` (the last commit that changed its
/// inputs): as the history recorded it for a deploy of `head`, else from
/// git. Reads no registry.
pub fn own_revisions(
    exec: &Exec,
    config: &Config,
    history: &crate::history::History,
    head: &Revision,
) -> Result<BTreeMap<String, String>> {
    let recorded = crate::history::recorded_images(history, &head.sha).unwrap_or_default();
    config
        .images
        .iter()
        .map(|image| {
            let own = match recorded.get(&image.name).and_then(|(_, r)| r.as_ref()) {
                Some(record) => record.revision.clone(),
                None => crate::git::inputs_revision(exec, head, &image.name, &image.input_paths())?,
            };
            Ok((image.name.clone(), own))
        })
        .collect()
}
