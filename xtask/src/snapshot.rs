//! The rendered manifests of each successful rollout, kept with the deploy
//! history: what a rollback applies (server-side, as the deploy did) to
//! return every object, not only a Deployment's pod template, to exactly
//! what it was. Stored gzip-compressed in the history ConfigMap's
//! `binaryData`, under the key of the entry they belong to; only the
//! newest [`KEEP`] (a few kilobytes each, a ConfigMap holds 1 MiB).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exec::{Cmd, Exec};

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
        Ok(base64_encode(&compressed))
    }

    pub fn decode(exec: &Exec, text: &str) -> Result<Snapshot> {
        let compressed = base64_decode(text)?;
        let gunzip = Cmd::new("gzip").args(["-d", "-c"]).hidden_stdin(compressed);
        let json = exec
            .read(&gunzip)
            .context("decompressing the kept manifests")?;
        serde_json::from_str(&json).context("parsing the kept manifests")
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as the API encodes `binaryData`.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, b)| w | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(word >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let digits: Vec<u32> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .map(|b| match ALPHABET.iter().position(|a| *a == b) {
            Some(value) => Ok(value as u32),
            None => bail!("not base64: {:?}", b as char),
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        if chunk.len() == 1 {
            bail!("not base64: a dangling character");
        }
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, d)| w | d << (18 - 6 * i));
        for i in 0..chunk.len() - 1 {
            out.push((word >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_the_standard_encoding() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_encode(&[0xff, 0xfe, 0x00]), "//4A");
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert!(base64_decode("Zm9v!").is_err());
    }
}
