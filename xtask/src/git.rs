//! The revision being built: full SHA, short tag, commit time, dirty state.

use anyhow::{Context, Result};

use crate::exec::{refuse, Cmd, Exec};

/// Short SHAs in tags are 12 hex digits: unambiguous in any real repository,
/// short enough to read.
const SHORT_LEN: usize = 12;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// Full 40-hex SHA of HEAD.
    pub sha: String,
    /// Commit time of HEAD, seconds since the epoch.
    pub commit_time: i64,
    /// With uncommitted changes: 8 hex of a hash over them.
    pub dirty_hash: Option<String>,
}

impl Revision {
    pub fn short(&self) -> &str {
        &self.sha[..SHORT_LEN.min(self.sha.len())]
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty_hash.is_some()
    }

    /// The image tag: `<short-sha>`, or `<short-sha>-dirty-<hash>` for a
    /// dirty tree, so a dirty build can never pass for the commit.
    pub fn tag(&self) -> String {
        match &self.dirty_hash {
            None => self.short().to_owned(),
            Some(hash) => format!("{}-dirty-{hash}", self.short()),
        }
    }
}

/// Reads HEAD and the working tree. A dirty tree is refused unless
/// `allow_dirty`.
pub fn revision(exec: &Exec, allow_dirty: bool) -> Result<Revision> {
    let sha = exec
        .read(&Cmd::new("git").args(["rev-parse", "--verify", "HEAD"]))
        .map_err(|e| {
            refuse(format!(
                "cannot read the git revision (is this a git repository with a commit?): {e}"
            ))
        })?;
    let commit_time = exec
        .read(&Cmd::new("git").args(["show", "-s", "--format=%ct", "HEAD"]))?
        .parse()
        .context("parsing the commit time of HEAD")?;
    let changed = changed_paths(exec)?;
    let dirty_hash = if changed.is_empty() {
        None
    } else if allow_dirty {
        Some(dirty_hash(exec)?)
    } else {
        let shown: Vec<&str> = changed.iter().take(5).map(String::as_str).collect();
        let more = changed.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        return Err(refuse(format!(
            "the working tree has uncommitted changes ({}{more}): commit them, or pass --allow-dirty for a build tagged as dirty",
            shown.join(", ")
        )));
    };
    Ok(Revision {
        sha,
        commit_time,
        dirty_hash,
    })
}

/// Tracked files that differ from HEAD and untracked files git does not
/// ignore.
fn changed_paths(exec: &Exec) -> Result<Vec<String>> {
    let status = exec.read(&Cmd::new("git").args([
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
    ]))?;
    Ok(parse_porcelain_z(&status))
}

fn parse_porcelain_z(status: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut entries = status.split('\0').filter(|e| !e.is_empty());
    while let Some(entry) = entries.next() {
        if entry.len() < 4 {
            continue;
        }
        let (code, path) = entry.split_at(3);
        paths.push(path.to_owned());
        // Renames and copies carry the original path as a second entry.
        if code.starts_with('R') || code.starts_with('C') {
            entries.next();
        }
    }
    paths
}

/// 8 hex of a hash over `git diff HEAD` and the untracked files' names and
/// contents: the same uncommitted state always gives the same tag.
fn dirty_hash(exec: &Exec) -> Result<String> {
    let mut material = exec
        .read(&Cmd::new("git").args(["diff", "HEAD", "--binary"]))?
        .into_bytes();
    let untracked =
        exec.read(&Cmd::new("git").args(["ls-files", "--others", "--exclude-standard", "-z"]))?;
    for path in untracked.split('\0').filter(|p| !p.is_empty()) {
        material.extend_from_slice(path.as_bytes());
        material.push(0);
        let contents = std::fs::read(exec.sh.current_dir().join(path))
            .with_context(|| format!("reading untracked file {path}"))?;
        material.extend_from_slice(&contents);
        material.push(0);
    }
    let hash = exec.read(
        &Cmd::new("git")
            .args(["hash-object", "--stdin"])
            .stdin(material),
    )?;
    Ok(hash[..8].to_owned())
}

/// The remote's URL, for the `source` label when the configuration has none.
pub fn origin_url(exec: &Exec) -> Option<String> {
    exec.read(&Cmd::new("git").args(["remote", "get-url", "origin"]))
        .ok()
}

/// Formats seconds since the epoch as RFC 3339 UTC (the OCI `created`
/// format) without a date crate.
pub fn rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(dirty: Option<&str>) -> Revision {
        Revision {
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            commit_time: 0,
            dirty_hash: dirty.map(Into::into),
        }
    }

    #[test]
    fn tags_are_short_sha_or_marked_dirty() {
        assert_eq!(rev(None).tag(), "0123456789ab");
        assert_eq!(rev(Some("deadbeef")).tag(), "0123456789ab-dirty-deadbeef");
        assert!(!rev(None).is_dirty());
    }

    #[test]
    fn porcelain_lists_modified_untracked_and_renamed() {
        let status = " M backend/src/main.rs\0?? new file.txt\0R  new.rs\0old.rs\0";
        assert_eq!(
            parse_porcelain_z(status),
            ["backend/src/main.rs", "new file.txt", "new.rs"]
        );
        assert!(parse_porcelain_z("").is_empty());
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_464_000), "2026-11-23T20:00:00Z");
    }
}
