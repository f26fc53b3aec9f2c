//! `cargo xtask clean [--all]`: removes what the xtask made on this machine
//! and no longer needs, says what each removal frees, and with `--dry-run`
//! only says it. It selects by the labels the xtask puts on what it makes
//! (`org.aiq.xtask.made` on images, `org.aiq.xtask.project` on the local
//! stack's containers and networks) and by the paths it owns, so it never
//! touches anyone else's images, containers or volumes. The build secret
//! is never removed: builds that must agree share it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::labels::MADE_LABEL;
use crate::{
    cache::{human, size_of},
    commands::local::PROJECT_LABEL,
    config::{Config, Overrides},
    deps, docker,
    exec::{Cmd, Exec},
};

/// Where the xtask writes an image's own tag.
const VERSION_LABEL: &str = "org.opencontainers.image.version";

/// Remove what the xtask made and no longer needs: stopped local stacks, images nothing runs, dependency stores of old lockfiles, the local registry's pushed images (the mirror stays)
#[derive(Args, Debug)]
pub struct Clean {
    /// Everything it made: also the test cluster (its state and binaries), the BuildKit builder (its cache and binaries), the base-image mirror, the whole local registry, every dependency store and the linters
    #[arg(long)]
    pub all: bool,
}

/// What one removal frees, as it was measured before it.
struct Freed {
    what: String,
    bytes: u64,
}

impl Clean {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let config = Config::load(exec, &Overrides::default())?;
        exec.sh.change_dir(&config.root);
        let cache = crate::cache::dir(&exec.env)?;
        let mut freed: Vec<Freed> = Vec::new();
        if crate::exec::require_tool("docker", "").is_ok()
            && exec.succeeds(&Cmd::new("docker").args([
                "version",
                "--format",
                "{{.Server.Version}}",
            ]))
        {
            freed.extend(stopped_stacks(exec)?);
            if self.all {
                freed.extend(builders(exec, &config)?);
            }
            freed.extend(unused_images(exec)?);
        }
        freed.extend(old_stores(exec, &config, self.all)?);
        freed.extend(registry_data(exec, &cache.join("registry"), self.all)?);
        if self.all {
            if crate::exec::is_root() {
                crate::cluster::down(exec)?;
            }
            for dir in ["kubernetes", "buildkit", "pause", "linters"] {
                freed.extend(remove_dir(exec, &cache.join(dir), dir)?);
            }
        }
        let total: u64 = freed.iter().map(|f| f.bytes).sum();
        let verb = if exec.dry_run { "would free" } else { "freed" };
        for f in &freed {
            eprintln!("{:>10}  {}", human(f.bytes), f.what);
        }
        eprintln!(
            "{verb} {} in {} removal{}{}",
            human(total),
            freed.len(),
            if freed.len() == 1 { "" } else { "s" },
            if exec.dry_run {
                " (dry run: nothing removed)"
            } else {
                ""
            }
        );
        Ok(())
    }
}

#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Names", default)]
    names: String,
    #[serde(rename = "Name", default)]
    name: String,
}

/// The local stacks' containers that no longer run, and the stacks'
/// networks no container is left on.
fn stopped_stacks(exec: &Exec) -> Result<Vec<Freed>> {
    let mut freed = Vec::new();
    let mut ps = Cmd::new("docker").args(["ps", "--all", "--format", "json", "--filter"]);
    ps = ps.arg(format!("label={PROJECT_LABEL}"));
    for status in ["created", "exited", "dead"] {
        ps = ps.args(["--filter", &format!("status={status}")]);
    }
    let stopped: Vec<Listed> = docker::json_lines(exec, &ps)?;
    if !stopped.is_empty() {
        exec.run(
            &Cmd::new("docker")
                .arg("rm")
                .args(stopped.iter().map(|c| c.id.clone())),
        )?;
        freed.extend(stopped.iter().map(|c| Freed {
            what: format!("stopped container {}", c.names),
            bytes: 0,
        }));
    }
    let networks: Vec<Listed> = docker::json_lines(
        exec,
        &Cmd::new("docker")
            .args(["network", "ls", "--format", "json", "--filter"])
            .arg(format!("label={PROJECT_LABEL}")),
    )?;
    for network in networks {
        let attached = exec.read(&Cmd::new("docker").args([
            "ps",
            "--all",
            "--quiet",
            "--filter",
            &format!("network={}", network.name),
        ]))?;
        // A dry run removed no container: those it would remove count as
        // gone.
        let left = attached
            .lines()
            .filter(|id| !stopped.iter().any(|c| c.id.starts_with(id.trim())))
            .count();
        if left == 0 {
            exec.run(&Cmd::new("docker").args(["network", "rm", &network.name]))?;
            freed.push(Freed {
                what: format!("network {}", network.name),
                bytes: 0,
            });
        }
    }
    Ok(freed)
}

/// Images the xtask made that no container uses (their registry copies
/// stay where they were pushed).
fn unused_images(exec: &Exec) -> Result<Vec<Freed>> {
    #[derive(Deserialize)]
    struct Container {
        #[serde(rename = "Image")]
        image: String,
    }
    #[derive(Deserialize)]
    struct Image {
        #[serde(rename = "Id")]
        id: String,
        #[serde(rename = "RepoTags", default)]
        tags: Vec<String>,
        #[serde(rename = "Size", default)]
        size: u64,
        #[serde(rename = "Config")]
        config: ImageConfig,
    }
    #[derive(Deserialize)]
    struct ImageConfig {
        #[serde(rename = "Labels", default)]
        labels: Option<std::collections::BTreeMap<String, String>>,
    }
    let ids = exec.read(&Cmd::new("docker").args(["ps", "--all", "--quiet", "--no-trunc"]))?;
    let used: Vec<String> = if ids.trim().is_empty() {
        Vec::new()
    } else {
        let inspected = exec.read(
            &Cmd::new("docker")
                .args(["container", "inspect"])
                .args(ids.lines().map(str::to_owned)),
        )?;
        serde_json::from_str::<Vec<Container>>(&inspected)
            .context("parsing docker container inspect")?
            .into_iter()
            .map(|c| c.image)
            .collect()
    };
    let ids = exec.read(&Cmd::new("docker").args([
        "image",
        "ls",
        "--all",
        "--quiet",
        "--no-trunc",
        "--filter",
        &format!("label={MADE_LABEL}"),
    ]))?;
    let mut ids: Vec<String> = ids.lines().map(str::to_owned).collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let images: Vec<Image> =
        serde_json::from_str(&exec.read(&Cmd::new("docker").args(["image", "inspect"]).args(ids))?)
            .context("parsing docker image inspect")?;
    // Made here: still under a tag the xtask gave it (not an image built
    // FROM one, which inherits the labels, nor one retagged by someone).
    let made_here = |i: &Image| {
        let version = i
            .config
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL).cloned());
        version.is_some_and(|v| i.tags.iter().any(|t| t.ends_with(&format!(":{v}"))))
    };
    let unused: Vec<Image> = images
        .into_iter()
        .filter(|i| !used.contains(&i.id) && made_here(i))
        .collect();
    if unused.is_empty() {
        return Ok(Vec::new());
    }
    // --force: an image under several tags is removed with all of them;
    // none of these is used by a container.
    exec.run(
        &Cmd::new("docker")
            .args(["image", "rm", "--force"])
            .args(unused.iter().map(|i| i.id.clone())),
    )?;
    Ok(unused
        .into_iter()
        .map(|i| Freed {
            what: format!(
                "image {}",
                if i.tags.is_empty() {
                    i.id.clone()
                } else {
                    i.tags.join(", ")
                }
            ),
            bytes: i.size,
        })
        .collect())
}

/// With `--all`, the pinned BuildKit builder with its build cache (the
/// volume buildx made for it).
fn builders(exec: &Exec, config: &Config) -> Result<Vec<Freed>> {
    let builder = crate::builder::name(&config.buildkit);
    if !exec.succeeds(&crate::builder::inspect(&builder)) {
        return Ok(Vec::new());
    }
    let bytes = crate::builder::cache_bytes(exec, &builder).unwrap_or(0);
    exec.run(&Cmd::new("docker").args(["buildx", "rm", "--force", &builder]))?;
    Ok(vec![Freed {
        what: format!("BuildKit builder {builder} and its build cache"),
        bytes,
    }])
}

/// Dependency stores whose lockfile is no longer in the repository (all of
/// them with `--all`).
fn old_stores(exec: &Exec, config: &Config, all: bool) -> Result<Vec<Freed>> {
    let dir = crate::cache::deps_dir(&exec.env)?;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let current: Vec<PathBuf> = if all {
        Vec::new()
    } else {
        deps::current_stores(exec, config)?
    };
    let mut freed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() || current.contains(&path) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only a store's own name (`cargo-<16 hex>`, `npm-<16 hex>`): not a
        // store being filled (`.cargo-...partial`), nor anything else in a
        // shared XTASK_DEPS_DIR.
        let store = name.split_once('-').is_some_and(|(kind, key)| {
            ["cargo", "npm"].contains(&kind)
                && key.len() == 16
                && key.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if store {
            freed.extend(remove_dir(
                exec,
                &path,
                &format!("dependency store {name}"),
            )?);
        }
    }
    Ok(freed)
}

/// The local registry's data: every repository but the base-image mirror
/// (`library/`) and the xtask's own images (`xtask/`), then its
/// unreferenced blobs (Distribution's garbage collector, with the registry
/// stopped: it starts again on demand). With `--all`, all of it.
fn registry_data(exec: &Exec, dir: &Path, all: bool) -> Result<Vec<Freed>> {
    let config = dir.join("config.yml");
    let repositories = dir.join("data/docker/registry/v2/repositories");
    if !config.exists() {
        return Ok(Vec::new());
    }
    if all {
        crate::registry::stop_server(exec)?;
        return remove_dir(exec, dir, "the local registry (all its images)");
    }
    let mut doomed = Vec::new();
    for repo in crate::registry::repositories_under(&repositories) {
        let name = repo
            .strip_prefix(&repositories)
            .unwrap_or(&repo)
            .display()
            .to_string();
        if !name.starts_with("library/") && !name.starts_with("xtask/") {
            doomed.push((name, repo));
        }
    }
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    let before = size_of(&dir.join("data"));
    crate::registry::stop_server(exec)?;
    for (_, repo) in &doomed {
        exec.run(&Cmd::new("rm").args(["-rf", &repo.display().to_string()]))?;
    }
    crate::registry::collect_garbage(exec)?;
    // What the collection freed is what the blobs of those repositories
    // held that no other repository shares; a dry run cannot know it and
    // counts every byte of the data as a bound.
    let bytes = if exec.dry_run {
        before
    } else {
        before.saturating_sub(size_of(&dir.join("data")))
    };
    let names: Vec<&str> = doomed.iter().map(|(n, _)| n.as_str()).collect();
    Ok(vec![Freed {
        what: format!(
            "{} local registry repositor{} ({}{})",
            names.len(),
            if names.len() == 1 { "y" } else { "ies" },
            names.iter().take(5).copied().collect::<Vec<_>>().join(", "),
            if names.len() > 5 { ", ..." } else { "" }
        ),
        bytes,
    }])
}

/// Removes `dir` (printed as `rm -rf`), if it exists.
fn remove_dir(exec: &Exec, dir: &Path, what: &str) -> Result<Vec<Freed>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let bytes = size_of(dir);
    // The module cache Go leaves read-only is writable again first.
    exec.run(&Cmd::new("chmod").args(["-R", "u+w", &dir.display().to_string()]))?;
    exec.run(&Cmd::new("rm").args(["-rf", &dir.display().to_string()]))?;
    Ok(vec![Freed {
        what: format!("{what} ({})", dir.display()),
        bytes,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_powers_of_1000() {
        assert_eq!(human(1_440_000_000), "1.4 GB");
        assert_eq!(human(512), "512 B");
    }
}
