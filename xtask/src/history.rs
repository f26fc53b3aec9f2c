//! The namespace's deploy history: a ConfigMap with one JSON entry per
//! deploy or rollback, keyed `<epoch>-<short sha>` so keys sort by time.
//! An entry is written when the work starts ("in progress") and updated as
//! it goes, so a deploy killed outright still leaves what it had got to.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::env::Env;
use crate::{
    docker::{BuiltImage, Inputs},
    git::Revision,
    kube::Kube,
    snapshot::{Snapshot, PREFIX},
    time::{now_epoch, rfc3339},
};

pub const IN_PROGRESS: &str = "in progress";
pub const SUCCEEDED: &str = "succeeded";
pub const INTERRUPTED: &str = "interrupted";
/// Entries kept: enough to look back weeks, far below a ConfigMap's 1 MiB.
const KEEP: usize = 50;
/// The largest kept manifests, base64: far below a ConfigMap's 1 MiB and
/// a command-line argument's 128 KiB.
const MAX_KEPT_BYTES: usize = 96 * 1024;
/// How long a run's result is tried again when it cannot be written (the
/// API server down or wedged): the lease's lifetime.
const RESULT_WRITE_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `deploy` or `rollback`.
    #[serde(default)]
    pub kind: String,
    pub revision: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub dirty: bool,
    /// Image name → digest.
    #[serde(default)]
    pub digests: BTreeMap<String, Option<String>>,
    /// Image name → its own revision, tag and key, and whether it was
    /// reused; absent in entries an older xtask wrote.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, ImageRecord>,
    pub time: String,
    pub who: String,
    #[serde(default)]
    pub ci_run: Option<String>,
    pub result: String,
    /// The step it was at: what an interrupted deploy had got to.
    #[serde(default)]
    pub step: String,
    /// Deployments this run changed, in the order applied.
    #[serde(default)]
    pub changed: Vec<String>,
    /// The revision (`deployment.kubernetes.io/revision`) each changed
    /// deployment had before this run, so undoing returns to exactly that;
    /// null for one this run created.
    #[serde(default)]
    pub previous: BTreeMap<String, Option<String>>,
    /// The objects (`kind.group/name`) applied with each changed deployment
    /// that did not exist before this run: a rollback deletes them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub created: BTreeMap<String, Vec<String>>,
    /// The BuildKit version and base image digests the images were built
    /// on: what `verify --rebuild` builds them again with.
    #[serde(default, flatten)]
    pub inputs: Inputs,
}

/// One image of a deploy, as deployed: the deploy's revision is the
/// entry's, this is the image's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The last commit that changed its inputs.
    pub revision: String,
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

impl ImageRecord {
    /// The record of `image`, if it knows its own revision.
    pub fn of(image: &BuiltImage) -> Option<ImageRecord> {
        Some(ImageRecord {
            revision: image.inputs_revision.clone()?,
            tag: image.tag.clone(),
            key: image.key.clone(),
            reused: image.reused,
        })
    }

    /// `image` as this record and `digest` describe it.
    pub fn apply(&self, image: &mut BuiltImage, config: &crate::config::Config) {
        image.reference = config.image_ref(&image.name, &self.tag);
        image.tag = self.tag.clone();
        image.inputs_revision = Some(self.revision.clone());
        image.key = self.key.clone();
    }
}

impl Entry {
    pub fn new(env: &Env, kind: &str, rev: &Revision, images: &[BuiltImage]) -> Entry {
        Entry {
            kind: kind.into(),
            revision: rev.sha.clone(),
            tag: rev.tag(),
            dirty: rev.is_dirty(),
            digests: images
                .iter()
                .map(|b| (b.name.clone(), b.digest.clone()))
                .collect(),
            images: images
                .iter()
                .filter(|b| b.digest.is_some())
                .filter_map(|b| Some((b.name.clone(), ImageRecord::of(b)?)))
                .collect(),
            time: rfc3339(now_epoch()),
            who: who(env),
            ci_run: env.ci_run_id(),
            result: IN_PROGRESS.into(),
            step: String::new(),
            changed: Vec::new(),
            previous: BTreeMap::new(),
            created: BTreeMap::new(),
            inputs: Inputs::default(),
        }
    }

    /// One line for people: when, what, who, how it ended.
    pub fn describe(&self, lock_held: bool) -> String {
        let result = if self.result == IN_PROGRESS && !lock_held {
            format!("killed without a result (at: {})", self.step)
        } else if self.result == IN_PROGRESS || self.result == INTERRUPTED {
            format!("{} (at: {})", self.result, self.step)
        } else {
            self.result.clone()
        };
        format!(
            "{}  {:<8} {:<24} {:<20} changed: {}; {result}",
            self.time,
            self.kind,
            self.tag,
            self.who,
            self.changed_list()
        )
    }

    /// The deployments this run changed, for messages: "nothing" if none.
    pub fn changed_list(&self) -> String {
        if self.changed.is_empty() {
            "nothing".to_owned()
        } else {
            self.changed.join(", ")
        }
    }

    /// Whether this run stopped before it could finish: interrupted, or
    /// still "in progress" with nobody holding the lock.
    pub fn unfinished(&self, lock_held: bool) -> bool {
        self.result == INTERRUPTED || (self.result == IN_PROGRESS && !lock_held)
    }
}

/// The namespace's history as read once: whether its ConfigMap exists yet,
/// its entries, oldest first, and the manifests kept of the newest
/// successful ones (encoded, by entry key).
#[derive(Debug, Default)]
pub struct History {
    exists: bool,
    pub entries: Vec<(String, Entry)>,
    snapshots: BTreeMap<String, String>,
}

impl History {
    /// Reads the ConfigMap. An entry that does not parse (edited by hand?)
    /// is skipped with a warning rather than blocking every deploy.
    pub fn read(kube: &Kube) -> Result<History> {
        #[derive(Deserialize)]
        struct ConfigMap {
            #[serde(default)]
            data: BTreeMap<String, String>,
            #[serde(default, rename = "binaryData")]
            binary_data: BTreeMap<String, String>,
        }
        let Some(map) = kube.get::<ConfigMap>("configmap", &kube.history_name)? else {
            return Ok(History::default());
        };
        let entries = map
            .data
            .into_iter()
            .filter_map(|(key, value)| match serde_json::from_str(&value) {
                Ok(entry) => Some((key, entry)),
                Err(e) => {
                    kube.exec.output.warn(&format!(
                        "skipping deploy history entry {key} of configmap/{}: {e}",
                        kube.history_name
                    ));
                    None
                }
            })
            .collect();
        let snapshots = map
            .binary_data
            .into_iter()
            .filter_map(|(key, value)| Some((key.strip_prefix(PREFIX)?.to_owned(), value)))
            .collect();
        Ok(History {
            exists: true,
            entries,
            snapshots,
        })
    }

    /// The manifests of the newest successful rollout before the entry
    /// `key`: what undoing that entry returns to. `None` if none were kept
    /// (a history an older xtask wrote) or they cannot be read (warned).
    pub fn snapshot_before(&self, kube: &Kube, key: &str) -> Option<Snapshot> {
        let (kept, text) = self
            .snapshots
            .range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(key)))
            .next_back()?;
        match Snapshot::decode(kube.exec, text) {
            Ok(snapshot) => Some(snapshot),
            Err(e) => {
                kube.exec.output.warn(&format!(
                    "the manifests kept for history entry {kept} cannot be read ({e:#}): rolling back the pod templates only"
                ));
                None
            }
        }
    }

    /// Warns when the newest entry never finished (interrupted, or killed
    /// if nobody holds the lock), saying what it had got to.
    pub fn warn_unfinished(&self, out: &crate::output::Output, lock_held: bool) {
        if let Some((_, last)) = self.entries.last().filter(|(_, e)| e.unfinished(lock_held)) {
            out.warn(&format!(
                "the previous run did not finish: {}. Deploy again, or `cargo xtask rollback` to undo what it changed",
                last.describe(lock_held)
            ));
        }
    }
}

/// One entry of the history, written as the run goes.
pub struct Record {
    pub key: String,
    pub entry: Entry,
    /// The entry keys of the manifests kept when the run started.
    kept: Vec<String>,
}

impl Record {
    /// Writes `entry` as a new "in progress" entry, creating the ConfigMap
    /// on a first deploy and dropping entries beyond the newest [`KEEP`]
    /// (a ConfigMap holds at most 1 MiB).
    pub fn start(kube: &Kube, entry: Entry, history: &History) -> Result<Record> {
        if !history.exists {
            kube.exec.run(&kube.create_configmap(&kube.history_name))?;
        }
        let existing = &history.entries;
        let key = format!(
            "{}-{}",
            next_stamp(existing, now_epoch()),
            &entry.revision[..12.min(entry.revision.len())]
        );
        let expired = existing.len().saturating_sub(KEEP - 1);
        let record = Record {
            key,
            entry,
            kept: history.snapshots.keys().cloned().collect(),
        };
        let mut data = serde_json::Map::new();
        for (old, _) in &existing[..expired] {
            data.insert(old.clone(), serde_json::Value::Null);
        }
        record.write_with(kube, data, serde_json::Map::new())?;
        Ok(record)
    }

    pub fn step(&mut self, kube: &Kube, step: &str) -> Result<()> {
        self.entry.step = step.into();
        self.write(kube)
    }

    /// Writes the run's result: retried for up to [`RESULT_WRITE_BUDGET`],
    /// since a run that ends while the API server is down must still
    /// leave a true record once it is back.
    pub fn finish(&mut self, kube: &Kube, result: &str) -> Result<()> {
        self.entry.result = result.into();
        self.write_result(kube, serde_json::Map::new())
    }

    /// Finishes as succeeded, keeping `applied` (what now runs) in the
    /// same write, and dropping kept manifests beyond the newest
    /// [`KEEP`](crate::snapshot::KEEP).
    pub fn succeed(&mut self, kube: &Kube, applied: &Snapshot) -> Result<()> {
        self.entry.result = SUCCEEDED.into();
        let mut binary = serde_json::Map::new();
        let older = self.kept.len().saturating_sub(crate::snapshot::KEEP - 1);
        for old in &self.kept[..older] {
            binary.insert(format!("{PREFIX}{old}"), serde_json::Value::Null);
        }
        // Kept only if it fits in one command-line argument (Linux takes
        // 128 KiB): a deploy that succeeded is recorded so in any case.
        match applied.encode(kube.exec) {
            Ok(encoded) if encoded.len() < MAX_KEPT_BYTES => {
                binary.insert(format!("{PREFIX}{}", self.key), json!(encoded));
            }
            kept => kube.exec.output.warn(&format!(
                "the applied manifests are not kept ({}): undoing this deploy later restores pod templates only",
                match kept {
                    Ok(encoded) => format!("{} bytes compressed", encoded.len()),
                    Err(e) => format!("{e:#}"),
                }
            )),
        }
        self.write_result(kube, binary)
    }

    /// The result's write, with `binary_data`, tried again every 2 s
    /// until it lands; no new try starts after [`RESULT_WRITE_BUDGET`].
    fn write_result(
        &self,
        kube: &Kube,
        binary_data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            match self.write_with(kube, serde_json::Map::new(), binary_data.clone()) {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() < RESULT_WRITE_BUDGET => {
                    kube.exec.output.warn(&format!(
                        "recording the result ({}) failed, trying again: {e:#}",
                        self.entry.result
                    ));
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write(&self, kube: &Kube) -> Result<()> {
        self.write_with(kube, serde_json::Map::new(), serde_json::Map::new())
    }

    /// A merge patch of this entry, plus `data` and `binary_data` (a null
    /// value deletes).
    fn write_with(
        &self,
        kube: &Kube,
        mut data: serde_json::Map<String, serde_json::Value>,
        binary_data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        data.insert(self.key.clone(), json!(serde_json::to_string(&self.entry)?));
        let mut patch = json!({ "data": data });
        if !binary_data.is_empty() {
            patch["binaryData"] = binary_data.into();
        }
        kube.exec
            .run(&kube.merge_patch("configmap", &kube.history_name, &patch))
    }
}

/// The time part of a new entry's key: this machine's clock, but never
/// before the newest entry. Entries are written under the lock, one run
/// after another, so their keys sort in the order the runs held it, even
/// when a writer's clock was ahead (or this one is behind).
fn next_stamp(existing: &[(String, Entry)], now: i64) -> i64 {
    existing
        .iter()
        .filter_map(|(key, _)| key.split('-').next()?.parse::<i64>().ok())
        .max()
        .map_or(now, |newest| now.max(newest + 1))
}

/// `user@host`: who ran it, for the lock and the history.
pub fn who(env: &Env) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{}@{host}", env.operator())
}

/// The successful deploys and rollbacks of a clean build of `sha`, newest
/// first: a failed or interrupted one may name digests that never ran.
fn succeeded<'a>(history: &'a History, sha: &'a str) -> impl Iterator<Item = &'a Entry> {
    history
        .entries
        .iter()
        .rev()
        .map(|(_, e)| e)
        .filter(move |e| e.revision == sha && !e.dirty && e.result == SUCCEEDED)
}

/// What the newest successful deploy of a clean build of `sha` was built
/// on (BuildKit and base images), if it recorded it.
pub fn recorded_inputs(history: &History, sha: &str) -> Option<Inputs> {
    succeeded(history, sha)
        .map(|e| &e.inputs)
        .find(|inputs| !inputs.buildkit.is_empty())
        .cloned()
}

/// The images a clean build of `sha` was deployed with (digest, and its
/// own revision where recorded), from the newest successful deploy or
/// rollback of it that has all of their digests.
pub fn recorded_images(
    history: &History,
    sha: &str,
) -> Option<BTreeMap<String, (String, Option<ImageRecord>)>> {
    succeeded(history, sha).find_map(|e| {
        e.digests
            .clone()
            .into_iter()
            .map(|(name, digest)| {
                let record = e.images.get(&name).cloned();
                Some((name, (digest?, record)))
            })
            .collect()
    })
}

/// The newest successful deploy of a clean build of image `name` at its
/// own revision `own`, whatever revision the deploy was of (an image
/// reused by later commits): its digest and record.
pub fn recorded_image(history: &History, name: &str, own: &str) -> Option<(String, ImageRecord)> {
    history
        .entries
        .iter()
        .rev()
        .map(|(_, e)| e)
        .filter(|e| !e.dirty && e.result == SUCCEEDED)
        .find_map(|e| {
            let record = e.images.get(name).filter(|r| r.revision == own)?;
            let digest = e.digests.get(name)?.clone()?;
            Some((digest, record.clone()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_sorts_after_the_newest_whatever_the_clocks() {
        let keyed = |key: &str| (key.to_owned(), Entry::default());
        assert_eq!(next_stamp(&[], 1_000), 1_000);
        let ahead = [keyed("1000-aaa"), keyed("5000-bbb"), keyed("hand-edited")];
        assert_eq!(
            next_stamp(&ahead, 2_000),
            5_001,
            "a writer's clock was ahead"
        );
        assert_eq!(next_stamp(&ahead, 9_000), 9_000);
    }

    fn entry(revision: &str, result: &str, digest: &str) -> Entry {
        Entry {
            revision: revision.into(),
            result: result.into(),
            digests: BTreeMap::from([("aiq-agent".to_owned(), Some(digest.to_owned()))]),
            inputs: Inputs {
                buildkit: "v0.34.2".into(),
                ..Inputs::default()
            },
            ..Entry::default()
        }
    }

    #[test]
    fn digests_and_inputs_come_only_from_successful_runs_of_that_revision() {
        let history = History {
            entries: vec![
                ("1-a".into(), entry("a", SUCCEEDED, "sha256:good")),
                ("2-a".into(), entry("a", "rolled back", "sha256:never-ran")),
                ("3-a".into(), entry("a", INTERRUPTED, "sha256:half")),
                ("4-b".into(), entry("b", SUCCEEDED, "sha256:other")),
            ],
            ..History::default()
        };
        assert_eq!(
            recorded_images(&history, "a").unwrap()["aiq-agent"].0,
            "sha256:good"
        );
        assert!(recorded_inputs(&history, "a").is_some());
        assert_eq!(recorded_images(&history, "c"), None);
        let failed_only = History {
            entries: vec![("2-a".into(), entry("a", "rolled back", "sha256:x"))],
            ..History::default()
        };
        assert_eq!(recorded_images(&failed_only, "a"), None);
        assert_eq!(recorded_inputs(&failed_only, "a"), None);
    }
}
