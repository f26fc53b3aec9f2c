//! `cargo xtask status`: what the cluster runs, against HEAD.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::{
    commands::cluster_flags::ClusterFlags, exec::Exec, git, health::Running, history::History,
    lock, rollout::own_revisions,
};

/// What each deployment runs (revision, digest, readiness, age), drift from HEAD, the deploy history
#[derive(Args, Debug)]
pub struct Status {
    /// History entries to show
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub history: usize,
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

impl Status {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let (config, kube, _) = self.cluster.connect(exec, true)?;
        // Each image's own revision at HEAD needs the whole history.
        git::refuse_shallow(exec)?;
        let head = git::commit(exec, "HEAD")?;
        let history = History::read(&kube)?;
        // Each image's own revision at HEAD (its inputs' last commit).
        let own = own_revisions(exec, &config, &history, &head)?;
        let out = exec.output;
        out.result(&format!(
            "namespace {} on {}; HEAD is {}",
            config.namespace,
            kube.context.as_deref().unwrap_or("?"),
            head.short()
        ));
        out.result(&format!(
            "{:<14} {:<26} {:<14} {:<20} {:>7} {:>8}  state",
            "component", "image tag", "deployed at", "digest", "ready", "age"
        ));
        for name in config.rollout() {
            let running = crate::health::running(&kube, &name)?;
            // A deployment of no configured image (none of ours) has no
            // revision of its own: HEAD's stands in.
            let expected = own.get(&name).unwrap_or(&head.sha);
            let state = state(running.as_ref(), expected);
            match &running {
                Some(r) => out.result(&format!(
                    "{:<14} {:<26} {:<14} {:<20} {:>7} {:>8}  {state}",
                    name,
                    r.tag.as_deref().unwrap_or("(not by xtask)"),
                    r.deployed_revision.as_deref().map_or("-", git::short),
                    r.digest.as_deref().map_or("-", |d| &d[..d.len().min(19)]),
                    format!("{}/{}", r.ready, r.desired),
                    r.age_secs.map_or("-".into(), age),
                )),
                None => out.result(&format!(
                    "{name:<14} {:<26} {:<14} {:<20} {:>7} {:>8}  {state}",
                    "-", "-", "-", "-", "-"
                )),
            }
            for other in running.iter().flat_map(|r| &r.other_containers) {
                out.result(&format!(
                    "  also runs {other}: not built by the xtask, not checked"
                ));
            }
            for pod in running.iter().flat_map(|r| &r.stuck_pods) {
                out.result(&format!(
                    "  pod {pod} is still terminating past its grace period (a finalizer, or a node that stopped answering)"
                ));
            }
            out.event(
                "component",
                json!({"name": name, "running": running, "state": state, "head": head.sha, "head_image_revision": own.get(&name)}),
            );
        }
        let holder = lock::live_holder(&kube)?;
        match &holder {
            Some(holder) => out.result(&format!("deploy lock: held by {holder}")),
            None => out.result("deploy lock: free"),
        }
        out.event("lock", json!({ "holder": holder }));
        let entries = &history.entries;
        out.result(&format!(
            "last {} deploys (newest last):",
            self.history.min(entries.len())
        ));
        let newest = entries.len().saturating_sub(1);
        for (index, (key, entry)) in entries
            .iter()
            .enumerate()
            .skip(entries.len().saturating_sub(self.history))
        {
            // Only the newest entry can belong to a run still holding the lock.
            let held = index == newest && holder.is_some();
            out.result(&format!("  {}", entry.describe(held)));
            out.event(
                "history",
                json!({"key": key, "entry": entry, "unfinished": entry.unfinished(held)}),
            );
        }
        history.warn_unfinished(&out, holder.is_some());
        Ok(())
    }
}

/// One word or phrase for how a deployment compares with HEAD: `head` is
/// its image's own revision at HEAD.
pub fn state(running: Option<&Running>, head: &str) -> String {
    let Some(r) = running else {
        return "not deployed".into();
    };
    if r.dirty {
        return "dirty (an uncommitted build)".into();
    }
    if let Some(pod) = &r.stale_pod {
        return format!("mixed (ready pod {pod} runs another digest)");
    }
    if !r.rolled_out {
        return "rolling out".into();
    }
    match r.revision.as_deref() {
        Some(rev) if rev == head => "ok (HEAD)".into(),
        Some(_) => "drift (not HEAD)".into(),
        None => "unknown (not deployed by xtask)".into(),
    }
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
