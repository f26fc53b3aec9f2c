//! The xtask's cache, which outlives clones and `cargo clean`: the
//! Kubernetes and BuildKit binaries it builds, the local registry's data,
//! the dependency stores, the build secret. Root runs those binaries and
//! writes there, so the cache must be a place no one else can change: every
//! directory on its path is owned by the running user or root and writable
//! by neither group nor others, and each cached binary is checked against
//! the sha256 recorded when it was built.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
};

/// `dir` once every directory on its path (those that exist; the rest the
/// xtask makes itself) is safe to write to and run from.
pub fn checked(dir: PathBuf) -> Result<PathBuf> {
    check_path(&dir)?;
    Ok(dir)
}

/// Refuses, naming the directory and the fix, when a directory on `path`
/// could be changed by a user other than the one running this (or root).
fn check_path(path: &Path) -> Result<()> {
    let me = std::fs::metadata("/proc/self")
        .context("reading who runs this (/proc/self)")?
        .uid();
    let mut existing = path.to_owned();
    while !existing.exists() {
        if !existing.pop() {
            return Ok(());
        }
    }
    // Links resolved: what is checked is where writes and runs really go.
    let real = existing
        .canonicalize()
        .with_context(|| format!("resolving {}", existing.display()))?;
    for (depth, dir) in real.ancestors().enumerate() {
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if let Some(problem) = problem(dir, meta.uid(), meta.mode(), me, depth > 0) {
            return Err(refuse(problem));
        }
    }
    Ok(())
}

/// What makes `dir` (owned by `owner`, with `mode`) unsafe for user `me`.
/// A root-owned sticky directory (`/tmp`) is safe above the cache, not as
/// it: others can add entries there but not replace root's or `me`'s, and
/// the next directory down is checked in turn.
fn problem(dir: &Path, owner: u32, mode: u32, me: u32, above: bool) -> Option<String> {
    if owner != me && owner != 0 {
        let fix = if me == 0 {
            "HOME is another user's, as under `sudo -E`: run with `sudo -H` (HOME=/root), or set XDG_CACHE_HOME to a directory of root's"
        } else {
            "set XDG_CACHE_HOME to a directory of your own"
        };
        return Some(format!(
            "the xtask's cache is in {}, owned by uid {owner}, who could change what uid {me} runs from it: {fix}",
            dir.display()
        ));
    }
    let sticky = mode & 0o1000 != 0 && owner == 0;
    if mode & 0o022 != 0 && !(sticky && above) {
        return Some(format!(
            "the xtask's cache is in {}, writable by group or others (mode {:o}), who could change what it runs: run `chmod go-w {}`, or set XDG_CACHE_HOME elsewhere",
            dir.display(),
            mode & 0o7777,
            dir.display()
        ));
    }
    None
}

/// Where the record of `bin`'s binaries is kept: beside it.
fn record_of(bin: &Path) -> PathBuf {
    bin.with_extension("sha256")
}

/// Every file in `bin`, sorted.
fn files(bin: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(bin)
        .with_context(|| format!("reading {}", bin.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

/// `sha256sum`'s lines for every file in `bin`.
fn sums(exec: &Exec, bin: &Path) -> Result<String> {
    let files = files(bin)?;
    let _dir = exec.sh.push_dir(bin);
    exec.read(&Cmd::new("sha256sum").arg("--").args(files))
}

/// Records the sha256 of every binary just built into `bin`.
pub fn record(exec: &Exec, bin: &Path) -> Result<()> {
    if exec.dry_run {
        return Ok(());
    }
    let sums = sums(exec, bin)?;
    let record = record_of(bin);
    std::fs::write(&record, sums + "\n").with_context(|| format!("writing {}", record.display()))
}

/// Whether `bin` holds `names`, built here: false when a binary or the
/// record is missing (build them again); a refusal naming the file when
/// one differs from what was recorded, or when `bin` is not safe.
pub fn verify(exec: &Exec, bin: &Path, names: &[&str]) -> Result<bool> {
    check_path(bin)?;
    let record = record_of(bin);
    if !names.iter().all(|n| bin.join(n).exists()) || !record.exists() {
        return Ok(false);
    }
    let recorded = std::fs::read_to_string(&record)
        .with_context(|| format!("reading {}", record.display()))?;
    let now = sums(exec, bin)?;
    let recorded: Vec<&str> = recorded.lines().filter(|l| !l.is_empty()).collect();
    for line in now.lines() {
        if !recorded.contains(&line) {
            let name = line.split_once("  ").map_or(line, |(_, n)| n);
            return Err(refuse(format!(
                "{} differs from the sha256 recorded when it was built ({}): something changed it; remove {} and run again to rebuild",
                bin.join(name).display(),
                record.display(),
                bin.display()
            )));
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_another_user_owns_or_can_write_is_refused() {
        let dir = Path::new("/home/alice/.cache");
        assert_eq!(problem(dir, 0, 0o40755, 0, false), None);
        assert_eq!(problem(dir, 1000, 0o40700, 1000, false), None);
        let sudo = problem(dir, 1000, 0o40755, 0, true).unwrap();
        assert!(
            sudo.contains("/home/alice/.cache, owned by uid 1000") && sudo.contains("sudo -H"),
            "{sudo}"
        );
        let writable = problem(dir, 0, 0o40775, 0, true).unwrap();
        assert!(
            writable.contains("mode 775") && writable.contains("chmod go-w /home/alice/.cache"),
            "{writable}"
        );
        let tmp = Path::new("/tmp");
        assert!(
            problem(tmp, 0, 0o41777, 0, false).is_some(),
            "the cache itself"
        );
        assert_eq!(problem(tmp, 0, 0o41777, 0, true), None, "above the cache");
        assert!(problem(tmp, 1000, 0o41777, 0, true).is_some(), "not root's");
    }
}
