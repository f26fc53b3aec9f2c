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
    env::Env,
    exec::{Cmd, Exec},
    exit::refuse,
};

/// Where the xtask keeps what outlives a clone and `cargo clean`: the
/// local registry's data, the test cluster's binaries, the dependency
/// stores: `$XDG_CACHE_HOME/aiq-xtask`, else `~/.cache/aiq-xtask`, checked
/// by [`checked`]. Never the temporary directory, where anyone could have
/// put what root would then run.
pub fn dir(env: &Env) -> Result<PathBuf> {
    checked(unchecked_dir(env)?)
}

fn unchecked_dir(env: &Env) -> Result<PathBuf> {
    if let Some(cache) = env.var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(cache).join("aiq-xtask"));
    }
    let home = env.var_os("HOME").ok_or_else(|| {
        refuse(
            "HOME is not set (nor XDG_CACHE_HOME): the xtask keeps its cache under it and never in the temporary directory; set HOME",
        )
    })?;
    Ok(PathBuf::from(home).join(".cache").join("aiq-xtask"))
}

/// Where dependency stores live: `XTASK_DEPS_DIR`, else `<cache>/deps`.
pub fn deps_dir(env: &Env) -> Result<PathBuf> {
    match env.var_os("XTASK_DEPS_DIR") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(dir(env)?.join("deps")),
    }
}

/// The build secret's file (`XTASK_BUILD_SECRET`), else
/// `<cache>/secrets/build-key`, made on first use. Keys a build must
/// generate (Next.js's) are derived from it, so two builds agree and no one
/// can derive them from the source.
pub fn build_secret_file(env: &Env) -> Result<PathBuf> {
    match env.var_os("XTASK_BUILD_SECRET") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(dir(env)?.join("secrets").join("build-key")),
    }
}

/// Cargo's home, where it keeps downloaded crates: `CARGO_HOME`, else
/// `~/.cargo`.
pub fn cargo_home(env: &Env) -> Result<PathBuf> {
    if let Some(dir) = env.var_os("CARGO_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = env
        .var_os("HOME")
        .context("neither CARGO_HOME nor HOME is set: cargo's downloads cannot be found")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// `dir`, its links resolved, once every directory on its path (those
/// that exist; the rest the xtask makes itself) is safe to write to and
/// run from.
pub fn checked(dir: PathBuf) -> Result<PathBuf> {
    check_path(&dir)
}

/// Refuses, naming the directory and the fix, when a directory on `path`
/// could be changed by a user other than the one running this (or root):
/// each directory on the path as written (a link's own directory decides
/// where it points) and on the path it resolves to. Returns the resolved
/// path, which is what the caller then uses.
fn check_path(path: &Path) -> Result<PathBuf> {
    let me = std::fs::metadata("/proc/self")
        .context("reading who runs this (/proc/self)")?
        .uid();
    let mut existing = path.to_owned();
    while !existing.exists() {
        if !existing.pop() {
            return Ok(path.to_owned());
        }
    }
    let real = existing
        .canonicalize()
        .with_context(|| format!("resolving {}", existing.display()))?;
    for start in [&existing, &real] {
        for (depth, dir) in start.ancestors().enumerate() {
            let meta =
                std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
            // Only the cache itself must not be a shared directory; a
            // directory it is yet to be made in may be one.
            let above = depth > 0 || existing != path;
            let private = private_group(meta.uid(), meta.gid());
            if let Some(problem) = problem(dir, meta.uid(), meta.mode(), me, above, private) {
                return Err(refuse(problem));
            }
        }
    }
    let rest = path.strip_prefix(&existing).unwrap_or(Path::new(""));
    Ok(real.join(rest))
}

/// Whether `gid` is the private group of user `uid` (Debian's and
/// Ubuntu's default: a group of the user's name, with no other member),
/// so that its write permission gives no one else anything. Ubuntu's
/// umask 002 makes every directory a user creates group-writable.
fn private_group(uid: u32, gid: u32) -> bool {
    let field = |line: &str, n: usize| line.split(':').nth(n).map(str::to_owned);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some(user) = passwd
        .lines()
        .find(|l| field(l, 2) == Some(uid.to_string()))
    else {
        return false;
    };
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let Some(entry) = group.lines().find(|l| field(l, 2) == Some(gid.to_string())) else {
        return false;
    };
    let members = field(entry, 3).unwrap_or_default();
    // No one else has it as their primary group either.
    let others = passwd
        .lines()
        .filter(|l| field(l, 3) == Some(gid.to_string()) && field(l, 2) != Some(uid.to_string()))
        .count();
    field(user, 3) == Some(gid.to_string())
        && field(entry, 0) == field(user, 0)
        && others == 0
        && members
            .split(',')
            .all(|m| m.is_empty() || Some(m.to_owned()) == field(user, 0))
}

/// What makes `dir` (owned by `owner`, with `mode`) unsafe for user `me`.
/// A root-owned sticky directory (`/tmp`) is safe above the cache, not as
/// it: others can add entries there but not replace root's or `me`'s, and
/// the next directory down is checked in turn. Group write is harmless
/// when the group is the owner's private one.
fn problem(
    dir: &Path,
    owner: u32,
    mode: u32,
    me: u32,
    above: bool,
    private_group: bool,
) -> Option<String> {
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
    let writable = if private_group { 0o002 } else { 0o022 };
    if mode & writable != 0 && !(sticky && above) {
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
    let bin = &check_path(bin)?;
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

/// The bytes of every file under `path`, links not followed.
pub fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// `1.4 GB`, `12.0 MB`, `512 B`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cache_is_never_the_temporary_directory() {
        let home_only = unchecked_dir(&Env::of(&[("HOME", "/root")]));
        assert_eq!(home_only.unwrap(), PathBuf::from("/root/.cache/aiq-xtask"));
        let xdg = unchecked_dir(&Env::of(&[("XDG_CACHE_HOME", "/c"), ("HOME", "/root")]));
        assert_eq!(xdg.unwrap(), PathBuf::from("/c/aiq-xtask"));
        let neither = unchecked_dir(&Env::of(&[])).unwrap_err().to_string();
        assert!(neither.contains("HOME is not set"), "{neither}");
    }

    use super::*;

    #[test]
    fn a_directory_another_user_owns_or_can_write_is_refused() {
        let dir = Path::new("/home/alice/.cache");
        assert_eq!(problem(dir, 0, 0o40755, 0, false, false), None);
        assert_eq!(problem(dir, 1000, 0o40700, 1000, false, false), None);
        assert_eq!(
            problem(dir, 1000, 0o40775, 1000, false, true),
            None,
            "Ubuntu's umask 002"
        );
        assert!(problem(dir, 1000, 0o40777, 1000, false, true).is_some());
        let sudo = problem(dir, 1000, 0o40755, 0, true, false).unwrap();
        assert!(
            sudo.contains("/home/alice/.cache, owned by uid 1000") && sudo.contains("sudo -H"),
            "{sudo}"
        );
        let writable = problem(dir, 0, 0o40775, 0, true, false).unwrap();
        assert!(
            writable.contains("mode 775") && writable.contains("chmod go-w /home/alice/.cache"),
            "{writable}"
        );
        let tmp = Path::new("/tmp");
        assert!(
            problem(tmp, 0, 0o41777, 0, false, false).is_some(),
            "the cache itself"
        );
        assert_eq!(
            problem(tmp, 0, 0o41777, 0, true, false),
            None,
            "above the cache"
        );
        assert!(
            problem(tmp, 1000, 0o41777, 0, true, false).is_some(),
            "not root's"
        );
    }
}
