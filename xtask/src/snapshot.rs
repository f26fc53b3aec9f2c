//! The rendered manifests of each successful rollout, kept with the deploy
//! history: what a rollback applies (server-side, as the deploy did) to
//! return every object, not only a Deployment's pod template, to exactly
//! what it was. Stored gzip-compressed in the history ConfigMap's
//! `binaryData`, under the key of the entry they belong to; only the
//! newest [`KEEP`] (a few kilobytes each, a ConfigMap holds 1 MiB).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    base64,
    exec::{Cmd, Exec},
    kube::applied_with,
};

/// A `binaryData` key: this prefix, then the history entry's key.
pub const PREFIX: &str = "manifests-";
/// Kept: what runs, and what ran before it (what undoing the newest
/// successful deploy returns to).
pub const KEEP: usize = 2;

/// What one successful rollout applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The tag of the revision the manifests pin, for messages.
    pub tag: String,
    /// Every rendered object, as the apply got it.
    pub objects: Vec<Value>,
}

impl Snapshot {
    /// What a rollback can restore of `rendered`: the objects applied with
    /// one of `deployments`. Never a Secret: the history is a ConfigMap,
    /// readable more widely than Secrets and not encrypted at rest.
    pub fn of(tag: String, rendered: &[Value], deployments: &[String]) -> Snapshot {
        let objects = rendered
            .iter()
            .filter(|o| o["kind"] != "Secret")
            .filter(|o| deployments.iter().any(|name| applied_with(o, name)))
            .cloned()
            .collect();
        Snapshot { tag, objects }
    }

    /// Gzip (by the system's `gzip`, so the xtask needs no compression
    /// crate), then base64, as `binaryData` holds it.
    pub fn encode(&self, exec: &Exec) -> Result<String> {
        let json = serde_json::to_vec(self)?;
        let gzip = Cmd::new("gzip").args(["-9", "-n", "-c"]).hidden_stdin(json);
        let compressed = exec
            .read_bytes(&gzip)
            .context("compressing the manifests")?;
        Ok(base64::encode(&compressed))
    }

    pub fn decode(exec: &Exec, text: &str) -> Result<Snapshot> {
        let compressed = base64::decode(text)?;
        let gunzip = Cmd::new("gzip").args(["-d", "-c"]).hidden_stdin(compressed);
        let json = exec
            .read(&gunzip)
            .context("decompressing the kept manifests")?;
        serde_json::from_str(&json).context("parsing the kept manifests")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_deployment_applies_is_kept_and_never_a_secret() {
        let object = |kind: &str, name: &str, app: Option<&str>| {
            let mut object = serde_json::json!({"kind": kind, "metadata": {"name": name}});
            if let Some(app) = app {
                object["metadata"]["labels"] = serde_json::json!({"app.kubernetes.io/name": app});
            }
            object
        };
        let rendered = [
            object("Deployment", "web", Some("web")),
            object("Service", "web", Some("web")),
            object("Secret", "web-keys", Some("web")),
            object("ConfigMap", "shared", None),
            object("Deployment", "other", Some("other")),
        ];
        let kept = Snapshot::of("t".into(), &rendered, &["web".to_owned()]);
        let names: Vec<_> = kept
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Deployment", "Service"]);
    }
}
