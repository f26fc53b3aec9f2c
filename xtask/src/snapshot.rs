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
