//! The revision being built: full SHA, short tag, commit time, dirty state;
//! and each image's own revision, the last commit that changed its inputs.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
};

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
    /// A revision for unit tests, dirty with `dirty` as its hash.
    #[cfg(test)]
    pub fn example(dirty: Option<&str>) -> Revision {
        Revision {
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            commit_time: 1_795_464_000,
            dirty_hash: dirty.map(Into::into),
        }
    }

    pub fn short(&self) -> &str {
        short(&self.sha)
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

/// The first 12 hex digits of `sha`, as tags and messages show it.
pub fn short(sha: &str) -> &str {
    &sha[..SHORT_LEN.min(sha.len())]
}

/// A commit (`HEAD`, a SHA or a prefix of one), as a clean revision.
pub fn commit(exec: &Exec, rev: &str) -> Result<Revision> {
    // A revision from a user (`--to`, a workflow input) must never be read
    // as an option: `--output=FILE` would make git write a file.
    if rev.starts_with('-') {
        return Err(refuse(format!(
            "{rev:?} is not a git revision: revisions do not start with '-'"
        )));
    }
    let spec = format!("{rev}^{{commit}}");
    let line = exec
        .read(&Cmd::new("git").args([
            "show",
            "--no-patch",
            "--format=%H %ct",
            "--end-of-options",
            &spec,
        ]))
        .map_err(|e| {
            refuse(format!(
                "cannot read git revision {rev:?} (is this a git repository that has it?): {e}"
            ))
        })?;
    let (sha, commit_time) = line
        .split_once(' ')
        .with_context(|| format!("unexpected `git show` output {line:?}"))?;
    Ok(Revision {
        sha: sha.to_owned(),
        commit_time: commit_time
            .parse()
            .with_context(|| format!("parsing the commit time of {rev}"))?,
        dirty_hash: None,
    })
}

/// Reads HEAD and the working tree. A dirty tree is refused unless
/// `allow_dirty`.
pub fn revision(exec: &Exec, allow_dirty: bool) -> Result<Revision> {
    let head = commit(exec, "HEAD")?;
    let status = exec.read(&Cmd::new("git").args([
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
    ]))?;
    let changed = parse_porcelain_z(&status);
    let dirty_hash = if changed.is_empty() {
        None
    } else if allow_dirty {
        Some(dirty_hash(exec, &changed)?)
    } else {
        let shown: Vec<&str> = changed.iter().take(5).map(|c| c.path.as_str()).collect();
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
    Ok(Revision { dirty_hash, ..head })
}

/// Refuses a shallow clone: an image's revision is the last commit that
/// changed its inputs, and a clone whose history is cut would name the
/// oldest commit it has instead. Every command that builds, deploys or
/// judges what runs calls it in its preflight (`build`, `deploy`, `up`,
/// `verify`, `status`, `rollback`), before anything is built or changed.
pub fn refuse_shallow(exec: &Exec) -> Result<()> {
    let shallow = exec.read(&Cmd::new("git").args(["rev-parse", "--is-shallow-repository"]))?;
    if shallow.trim() == "true" {
        return Err(refuse(
            "this clone is shallow, and an image's revision is the last commit that changed its inputs: fetch the whole history (`git fetch --unshallow`; in GitHub Actions, actions/checkout with `fetch-depth: 0`)",
        ));
    }
    Ok(())
}

/// The image's own revision: the last commit at or before `rev` that
/// changed any of `paths` (its inputs), checked: every path there is what
/// it is at `rev` (`git log` simplifies merges, so a merge could name a
/// commit whose inputs differ; then `rev` itself is the answer, never a
/// wrong one). A dirty revision's inputs are its own.
pub fn inputs_revision(
    exec: &Exec,
    rev: &Revision,
    image: &str,
    paths: &[PathBuf],
) -> Result<String> {
    if rev.is_dirty() {
        return Ok(rev.sha.clone());
    }
    let shown = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let objects = |commit: &str| -> Vec<String> {
        paths
            .iter()
            .map(|p| format!("{commit}:{}", tree_path(p)))
            .collect()
    };
    // Every argument starts with a full SHA: none can be read as an option.
    let at_rev = exec
        .read(&Cmd::new("git").arg("rev-parse").args(objects(&rev.sha)))
        .map_err(|e| {
            refuse(format!(
                "{image}'s inputs ({shown}) must each exist at {} (this checkout's configuration describes the images: rebuild an older layout from a checkout of it): {e}",
                rev.short()
            ))
        })?;
    // Literal pathspecs, as `rev-parse` reads the paths; `rev-list`, which
    // no user setting (`log.showSignature`, ...) changes.
    let last = exec.read(
        &Cmd::new("git")
            .args(["--literal-pathspecs", "rev-list", "-1", &rev.sha, "--"])
            .args(paths.iter().map(|p| p.display().to_string())),
    )?;
    if last.is_empty() || last == rev.sha {
        return Ok(rev.sha.clone());
    }
    let at_last = exec.read(&Cmd::new("git").arg("rev-parse").args(objects(&last)));
    Ok(match at_last {
        Ok(at_last) if at_last == at_rev => last,
        _ => rev.sha.clone(),
    })
}

/// `path` as `<commit>:<path>` wants it: relative, `/`-separated, the root
/// empty.
fn tree_path(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// One entry of `git status --porcelain`: a tracked file that differs from
/// HEAD, or an untracked file git does not ignore.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    path: String,
    untracked: bool,
}

fn parse_porcelain_z(status: &str) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut entries = status.split('\0').filter(|e| !e.is_empty());
    while let Some(entry) = entries.next() {
        if entry.len() < 4 {
            continue;
        }
        let (code, path) = entry.split_at(3);
        changes.push(Change {
            path: path.to_owned(),
            untracked: code == "?? ",
        });
        // Renames and copies carry the original path as a second entry.
        if code.starts_with('R') || code.starts_with('C') {
            entries.next();
        }
    }
    changes
}

/// 8 hex of a hash over `git diff HEAD` and the untracked files' names and
/// contents: the same uncommitted state always gives the same tag.
fn dirty_hash(exec: &Exec, changes: &[Change]) -> Result<String> {
    let mut material = exec
        .read(&Cmd::new("git").args(["diff", "HEAD", "--binary"]))?
        .into_bytes();
    for change in changes.iter().filter(|c| c.untracked) {
        material.extend_from_slice(change.path.as_bytes());
        material.push(0);
        let contents = std::fs::read(exec.sh.current_dir().join(&change.path))
            .with_context(|| format!("reading untracked file {}", change.path))?;
        material.extend_from_slice(&contents);
        material.push(0);
    }
    let hash = exec.read(
        &Cmd::new("git")
            .args(["hash-object", "--stdin"])
            .hidden_stdin(material),
    )?;
    Ok(hash[..8].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_paths_are_named_as_tree_paths() {
        assert_eq!(tree_path(Path::new(".")), "");
        assert_eq!(tree_path(Path::new("./backend/")), "backend");
        assert_eq!(tree_path(Path::new("frontend/app")), "frontend/app");
    }

    #[test]
    fn tags_are_short_sha_or_marked_dirty() {
        assert_eq!(Revision::example(None).tag(), "0123456789ab");
        assert_eq!(
            Revision::example(Some("deadbeef")).tag(),
            "0123456789ab-dirty-deadbeef"
        );
        assert!(!Revision::example(None).is_dirty());
    }

    #[test]
    fn porcelain_lists_modified_untracked_and_renamed() {
        let status = " M backend/src/main.rs\0?? new file.txt\0R  new.rs\0old.rs\0";
        assert_eq!(
            parse_porcelain_z(status)
                .iter()
                .map(|c| (c.path.as_str(), c.untracked))
                .collect::<Vec<_>>(),
            [
                ("backend/src/main.rs", false),
                ("new file.txt", true),
                ("new.rs", false)
            ]
        );
        assert!(parse_porcelain_z("").is_empty());
    }
}
