//! `cargo xtask verify`: the release engineer's manual checks, automated.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::{
    commands::cluster_flags::ClusterFlags, commands::status::state, exec::Exec, git,
    history::History, rollout::digests_for,
};

/// Exit 0 only if every deployment runs exactly the digests built for HEAD
#[derive(Args, Debug)]
pub struct Verify {
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

impl Verify {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let (config, kube, _) = self.cluster.connect(exec, true)?;
        let head = git::commit(exec, "HEAD")?;
        let history = History::read(&kube)?;
        let expected = digests_for(exec, &config, &history, &head)?;
        let out = exec.output;
        let mut failures = Vec::new();
        for image in &expected {
            let name = &image.name;
            let digest = image.digest.as_deref().unwrap_or_default();
            let running = kube.running(name)?;
            let problem = match &running {
                None => Some(format!("deployment/{name} does not exist")),
                Some(r) if r.dirty => Some(format!(
                    "deployment/{name} runs a dirty build ({}): uncommitted code, not HEAD; deploy a commit",
                    r.tag.as_deref().unwrap_or("?")
                )),
                Some(r) if r.digest.as_deref() != Some(digest) => Some(format!(
                    "deployment/{name} pins {} (revision {}), not HEAD's {digest}",
                    r.digest.as_deref().unwrap_or("no digest"),
                    r.revision.as_deref().unwrap_or("unknown")
                )),
                Some(r) if r.stale_pod.is_some() || !r.rolled_out || r.ready as i64 != r.desired => {
                    Some(format!(
                        "deployment/{name}: {} ({} of {} ready)",
                        state(Some(r), &head.sha),
                        r.ready,
                        r.desired
                    ))
                }
                Some(_) => None,
            };
            let line = match &problem {
                None => format!("ok    {name}: every one of its ready pods runs {digest}"),
                Some(p) => format!("FAIL  {p}"),
            };
            out.result(&line);
            out.event(
                "verified",
                json!({"deployment": name, "expected": digest, "ok": problem.is_none(), "problem": problem, "running": running}),
            );
            failures.extend(problem);
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
}
