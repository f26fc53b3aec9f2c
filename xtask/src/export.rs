//! The build context is the commit, never the working tree: each build
//! exports, per image, the revision's files under that image's declared
//! inputs into `target/xtask/context/<tag>/<image>/` and builds from there,
//! so nothing git ignores (a `.env`, editor files, build output) can ever
//! enter an image, and a Dockerfile that reads a path outside its inputs
//! fails its build naming it instead of silently depending on it.
//!
//! Every exported file gets the export's time, not the commit's: cargo and
//! Next decide what to rebuild by file times, and a `--cache` build of an
//! older commit after a newer one would otherwise find its kept target
//! directory newer than its sources and serve stale code. The image's
//! times are clamped to the commit time anyway (`rewrite-timestamp`).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    config::{Config, Image},
    exec::{Cmd, Exec},
    git::Revision,
};

/// Exports `image`'s inputs at `rev` and returns the directory that stands
/// for the repository root in its build. A clean revision is `git archive`
/// of its commit with the modes a 022 umask gives (the cloning user's
/// umask never shows); a dirty one is what the dirty hash covers: the
/// tracked files as they are in the working tree plus the untracked files
/// git does not ignore.
pub fn export(exec: &Exec, config: &Config, rev: &Revision, image: &Image) -> Result<PathBuf> {
    let parent = config.out_dir().join("context").join(rev.tag());
    let dir = parent.join(&image.name);
    let tar = parent.join(format!("{}.tar", image.name));
    let paths = image.input_paths();
    if exec.dry_run {
        // Printed, not run: a dry run writes nothing but the bake file.
        if rev.is_dirty() {
            exec.run(&list_worktree(&config.root, &paths))?;
        } else {
            exec.run(&archive(config, rev, &paths, &tar))?;
            exec.run(&extract(&tar, &dir))?;
        }
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    if rev.is_dirty() {
        copy_worktree(exec, &config.root, &paths, &dir)?;
    } else {
        exec.run(&archive(config, rev, &paths, &tar))?;
        exec.run(&extract(&tar, &dir))?;
        std::fs::remove_file(&tar).with_context(|| format!("removing {}", tar.display()))?;
    }
    Ok(dir)
}

/// `dir` as a tar that depends only on its files' names, contents and
/// modes (sorted, one time, one owner): what an input key hashes.
pub fn canonical_tar(dir: &Path) -> Cmd {
    Cmd::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
            "-c",
            "-f",
            "-",
            "-C",
        ])
        .arg(dir.display().to_string())
        .arg(".")
}

/// Unpacks `tar` into `dir`: `--touch` gives every file the export's time
/// (see above); `-p` keeps the archive's modes whatever the umask.
fn extract(tar: &Path, dir: &Path) -> Cmd {
    Cmd::new("tar")
        .args(["-x", "--touch", "-p", "-f"])
        .arg(tar.display().to_string())
        .arg("-C")
        .arg(dir.display().to_string())
}

/// The files under `paths` a dirty build covers: tracked, or untracked and
/// not ignored.
fn list_worktree(root: &Path, paths: &[PathBuf]) -> Cmd {
    Cmd::new("git")
        .arg("-C")
        .arg(root.display().to_string())
        .args([
            "--literal-pathspecs",
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
        ])
        .args(paths.iter().map(|p| p.display().to_string()))
}

/// `git archive` of `paths` in the commit, with the modes of a 022 umask.
fn archive(config: &Config, rev: &Revision, paths: &[PathBuf], output: &Path) -> Cmd {
    Cmd::new("git")
        .arg("-C")
        .arg(config.root.display().to_string())
        .args([
            "--literal-pathspecs",
            "-c",
            "tar.umask=0022",
            "archive",
            "--format=tar",
            "--output",
        ])
        .arg(output.display().to_string())
        .arg(&rev.sha)
        .arg("--")
        .args(paths.iter().map(|p| p.display().to_string()))
}

/// Copies the files under `paths` a dirty build covers, with the modes
/// `git archive` would give them (0755 for an executable, else 0644;
/// directories 0755).
fn copy_worktree(exec: &Exec, root: &Path, paths: &[PathBuf], dir: &Path) -> Result<()> {
    let list = exec.read(&list_worktree(root, paths))?;
    for path in list.split('\0').filter(|p| !p.is_empty()) {
        let from = root.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&from) else {
            continue; // tracked, but deleted in the working tree
        };
        let to = dir.join(path);
        make_dirs(dir, to.parent().context("an exported path has a parent")?)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&from)?;
            std::os::unix::fs::symlink(&target, &to)
                .with_context(|| format!("linking {}", to.display()))?;
        } else if meta.is_file() {
            std::fs::copy(&from, &to).with_context(|| format!("copying {path}"))?;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// `create_dir_all` below `base`, each new directory 0755 whatever the
/// umask.
fn make_dirs(base: &Path, dir: &Path) -> Result<()> {
    if dir == base || dir.is_dir() {
        return Ok(());
    }
    make_dirs(base, dir.parent().context("a directory below the export")?)?;
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
