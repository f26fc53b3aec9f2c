//! `cargo xtask rollback`: undo the last deploy, or redeploy an earlier
//! revision by its recorded digests, under the same lock, wait and verify.

use anyhow::Result;
use clap::Args;

use crate::{
    commands::cluster_flags::ClusterFlags,
    config::Config,
    docker::BuiltImage,
    exec::Exec,
    exit::{refuse, rollback_failed},
    git::{self, Revision},
    history::{Entry, History, ImageRecord, Record, IN_PROGRESS, SUCCEEDED},
    kube::Kube,
    lock::Lock,
    rollout::{digests_for, print_diff, render_overlay, roll_back, Rollout, WaitFlags},
};

/// Undo the last deploy, or with --to redeploy an earlier revision's digests (no rebuild)
#[derive(Args, Debug)]
pub struct Rollback {
    /// Revision to go back to (a SHA or prefix); default: undo the last deploy
    #[arg(long, value_name = "REV")]
    pub to: Option<String>,
    #[command(flatten)]
    pub wait: WaitFlags,
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

/// What the rollback will do, settled before the lock is taken.
enum Plan {
    /// Redeploy `rev`'s images by digest.
    Redeploy {
        rev: Revision,
        images: Vec<BuiltImage>,
    },
    /// Undo what the newest deploy (history entry `key`) changed.
    Undo { key: String, last: Box<Entry> },
}

impl Plan {
    /// Redeploy `target`'s digests, or undo the newest deploy; refused
    /// (exit 2) when `history` allows neither.
    fn make(
        exec: &Exec,
        config: &Config,
        history: &History,
        target: Option<&Revision>,
    ) -> Result<Plan> {
        Ok(match target {
            Some(rev) => Plan::Redeploy {
                rev: rev.clone(),
                images: digests_for(exec, config, history, rev)
                    .map_err(|e| refuse(format!("{e:#}")))?,
            },
            None => {
                let (key, last) = undoable(history)?;
                Plan::Undo {
                    key,
                    last: Box::new(last),
                }
            }
        })
    }
}

impl Rollback {
    pub fn run(self, exec: &Exec) -> Result<()> {
        self.wait.check()?;
        // Everything that can refuse is checked before the lock.
        let (config, kube, reachable, target, history, plan) = exec.step("preflight", || {
            let (config, kube, reachable) = self.cluster.connect(exec, !exec.dry_run)?;
            // An image's own revision needs the whole history.
            git::refuse_shallow(exec)?;
            // `--to` reads the registry: a fresh CI runner can only once
            // logged in.
            crate::registry::login(exec, &config)?;
            let target = self
                .to
                .as_deref()
                .map(|rev| git::commit(exec, rev))
                .transpose()?;
            let history = if reachable {
                History::read(&kube)?
            } else {
                History::default()
            };
            let plan = Plan::make(exec, &config, &history, target.as_ref())?;
            Ok((config, kube, reachable, target, history, plan))
        })?;
        Lock::hold(&kube, reachable, || {
            // What was read before the lock only let it refuse early: a
            // deploy may have finished since. The plan is made again from
            // the history as it is now that nothing else can write it.
            let (history, plan) = if reachable {
                let history = History::read(&kube)?;
                let plan = Plan::make(exec, &config, &history, target.as_ref())?;
                (history, plan)
            } else {
                (history, plan)
            };
            match plan {
                Plan::Redeploy { rev, images } => {
                    self.redeploy(&kube, &config, &history, &rev, &images, reachable)
                }
                Plan::Undo { key, last } => self.undo(&kube, &config, &history, &key, *last),
            }
        })
    }

    /// Redeploys `rev`'s images by digest: the deploy's render, apply,
    /// wait and verify, without building.
    fn redeploy(
        &self,
        kube: &Kube,
        config: &Config,
        history: &History,
        rev: &Revision,
        images: &[BuiltImage],
        reachable: bool,
    ) -> Result<()> {
        let exec = kube.exec;
        let order = config.rollout();
        let autoscaled = if reachable {
            let manifests = kube.manifests(&config.manifests.display().to_string())?;
            kube.autoscaled(&manifests, &order)?
        } else {
            Vec::new()
        };
        let cause = format!("cargo xtask rollback --to {}", rev.tag());
        let overlay = exec.step("render the digest-pinned overlay", || {
            render_overlay(
                exec,
                &kube.kubectl,
                config,
                images,
                rev,
                &cause,
                &autoscaled,
            )
        })?;
        // Changes no value: who owns the replica count (a dry run prints it).
        kube.hand_over_replicas(&autoscaled)?;
        if exec.dry_run {
            for name in &order {
                exec.run(&kube.apply(&overlay, name))?;
            }
            return print_diff(kube, &overlay);
        }
        let entry = Entry::new(&exec.env, "rollback", rev, images);
        let mut rollout = Rollout::start(kube, &self.wait, entry, history)?;
        let mut image_for = |name: &str| -> Result<BuiltImage> {
            images
                .iter()
                .find(|i| i.name == name && i.digest.is_some())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no digest for {name}"))
        };
        rollout
            .run(&order, &overlay, &mut image_for)
            .map_err(|e| e.context(format!("rollback to {} failed", rev.tag())))?;
        for v in &rollout.verified {
            exec.output.result(&format!(
                "{:<14} {:<21} {} {}",
                v.name, v.tag, v.digest, v.ready
            ));
        }
        eprintln!(
            "rolled back to {}: every ready pod runs its recorded digests",
            rev.tag()
        );
        Ok(())
    }

    /// Returns what `last` (the history entry `key`) changed to what the
    /// rollout before it applied, newest first (see [`roll_back`]).
    fn undo(
        &self,
        kube: &Kube,
        config: &Config,
        history: &History,
        key: &str,
        last: Entry,
    ) -> Result<()> {
        let exec = kube.exec;
        let changed = last.changed.clone();
        let restore = history.snapshot_before(kube, key);
        let dir = config.out_dir().join("rollback");
        if exec.dry_run {
            return roll_back(kube, &self.wait, &last, restore.as_ref(), &dir);
        }
        let entry = Entry {
            kind: "rollback".into(),
            result: IN_PROGRESS.into(),
            step: format!("undo {}", changed.join(", ")),
            ..last.clone()
        };
        let mut record = Record::start(kube, entry, history)?;
        let undone = exec.step(format!("undo {}", changed.join(", ")), || {
            roll_back(kube, &self.wait, &last, restore.as_ref(), &dir)
        });
        if let Err(error) = undone {
            record.finish(kube, "failed")?;
            return Err(rollback_failed(format!(
                "{error:#}\nThe cluster may run a mix of revisions: inspect with `kubectl --namespace {} get deployments,replicasets,pods`",
                kube.namespace
            )));
        }
        // The entry names what now runs: the restored revision and digests.
        for name in &changed {
            if let Some(running) = crate::health::running(kube, name)? {
                // The deploy's revision, or (deployed by an older xtask)
                // the one its pod template carries.
                record.entry.revision = running
                    .deployed_revision
                    .clone()
                    .or_else(|| running.revision.clone())
                    .unwrap_or_default();
                record.entry.tag = running
                    .deployed_tag
                    .clone()
                    .or_else(|| running.tag.clone())
                    .unwrap_or_default();
                record.entry.dirty = running.dirty;
                record
                    .entry
                    .digests
                    .insert(name.clone(), running.digest.clone());
                match (&running.revision, &running.tag) {
                    (Some(revision), Some(tag)) => {
                        let restored = ImageRecord {
                            revision: revision.clone(),
                            tag: tag.clone(),
                            ..ImageRecord::default()
                        };
                        record.entry.images.insert(name.clone(), restored);
                    }
                    _ => {
                        record.entry.images.remove(name);
                    }
                }
                exec.output.result(&format!(
                    "{name:<14} {:<12} {}",
                    record.entry.tag,
                    running.digest.as_deref().unwrap_or("-")
                ));
            }
        }
        // What runs now is what `restore` holds: kept again as this entry's,
        // so the next rollback finds it newest.
        match &restore {
            Some(restored) => record.succeed(kube, restored)?,
            None => record.finish(kube, SUCCEEDED)?,
        }
        eprintln!("undid the deploy of {}", last.tag);
        Ok(())
    }
}

/// The newest history entry and its key, if it is a deploy whose changes
/// are still in place (not rolled back already).
fn undoable(history: &History) -> Result<(String, Entry)> {
    let Some((key, last)) = history.entries.last() else {
        return Err(refuse("the deploy history is empty: nothing to undo"));
    };
    if last.kind != "deploy" || last.changed.is_empty() || last.result.contains("rolled back") {
        return Err(refuse(format!(
            "the newest history entry is not a deploy that changed anything still in place ({}): pass --to <revision>",
            last.describe(false)
        )));
    }
    Ok((key.clone(), last.clone()))
}
