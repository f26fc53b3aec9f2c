//! Dependency stores: the packages a lockfile pins, downloaded once per
//! lockfile content into `<cache>/deps/<kind>-<hash>` and handed to the
//! image's build as its `deps` build context. The Dockerfiles check every
//! package against the lockfile before using it (`backend/vendor-crates.sh`,
//! `frontend/verify-deps.mjs`), and their build steps have no network. So a
//! store only saves downloads: a new lockfile is a new key, and a store that
//! does not match its lockfile fails the build.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{
    config::{Config, Image, LockfileKind},
    exec::{Cmd, Exec},
    exit::refuse,
};

/// One image's dependency store.
#[derive(Clone, Debug)]
pub struct Store {
    pub kind: LockfileKind,
    /// The lockfile read: the exported revision's, in a build.
    pub lockfile: PathBuf,
    /// The lockfile as the repository names it, for messages.
    pub shown: PathBuf,
    /// `<cache>/deps/<kind>-<first 16 hex digits of the lockfile's sha256>`.
    pub dir: PathBuf,
    /// Where npm runs to fill an npm store on a machine without npm: the
    /// image's first base image (Docker is all a newcomer needs).
    npm_image: Option<String>,
}

impl Store {
    /// The store for `image`'s lockfile, if it names one; its key is the
    /// lockfile's content, so a changed lockfile names a new store.
    pub fn of(exec: &Exec, config: &Config, image: &Image) -> Result<Option<Store>> {
        let Some(lockfile) = &image.lockfile else {
            return Ok(None);
        };
        let lockfile = config.root.join(lockfile);
        let kind = LockfileKind::of(&lockfile).context("lockfile kind checked at load")?;
        let sum = exec
            .read(&Cmd::new("sha256sum").arg(lockfile.display().to_string()))
            .with_context(|| format!("hashing {}", lockfile.display()))?;
        let key = sum.get(..16).context("sha256sum printed no sum")?;
        let dir = crate::cache::deps_dir(&exec.env)?.join(format!("{}-{key}", kind.name()));
        let npm_image = crate::bases::base_images_of(config, std::slice::from_ref(image))?
            .first()
            .map(|base| format!("{}/{base}", config.base_registry));
        Ok(Some(Store {
            kind,
            lockfile,
            shown: image.lockfile.clone().unwrap_or_default(),
            dir,
            npm_image,
        }))
    }

    /// Fills the store unless it exists. `offline` forbids downloads: then
    /// only what this machine's cargo already holds can fill it.
    pub fn ensure(&self, exec: &Exec, offline: bool) -> Result<()> {
        if self.dir.is_dir() {
            return Ok(());
        }
        if offline && self.kind == LockfileKind::Npm {
            return Err(refuse(format!(
                "--offline: no dependency store for {} ({} is missing); build once online to fill it",
                self.shown.display(),
                self.dir.display()
            )));
        }
        let parent = self.dir.parent().context("store has a parent")?;
        let partial = parent.join(format!(
            ".{}.partial-{}",
            self.dir.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        exec.step(
            format!(
                "fill the dependency store for {} ({})",
                self.shown.display(),
                self.dir.display()
            ),
            || {
                if exec.dry_run {
                    exec.run(&self.fetch_command(&exec.env.cargo(), &partial, offline))?;
                    return Ok(());
                }
                let _ = std::fs::remove_dir_all(&partial);
                std::fs::create_dir_all(&partial)
                    .with_context(|| format!("creating {}", partial.display()))?;
                let filled = match self.kind {
                    LockfileKind::Cargo => self.fill_cargo(exec, &partial, offline),
                    LockfileKind::Npm => self.fill_npm(exec, &partial),
                };
                let done = filled.and_then(|()| {
                    std::fs::rename(&partial, &self.dir).or_else(|e| {
                        // Another build filled it meanwhile: the same key
                        // is the same content.
                        if self.dir.is_dir() {
                            Ok(())
                        } else {
                            Err(e).with_context(|| format!("moving {}", partial.display()))
                        }
                    })
                });
                let _ = std::fs::remove_dir_all(&partial);
                done
            },
        )
    }

    /// The download: `cargo fetch` into cargo's own cache, or `npm ci` with
    /// the store as its cache (in a scratch copy of the package files; in a
    /// container of the image's base when this machine has no npm).
    fn fetch_command(&self, cargo: &str, partial: &Path, offline: bool) -> Cmd {
        match self.kind {
            LockfileKind::Cargo => {
                let manifest = self.lockfile.with_file_name("Cargo.toml");
                let mut cmd = Cmd::new(cargo)
                    .args(["fetch", "--locked", "--manifest-path"])
                    .arg(manifest.display().to_string());
                if offline {
                    cmd = cmd.arg("--offline");
                }
                cmd
            }
            LockfileKind::Npm => {
                let ci = [
                    "ci",
                    "--ignore-scripts",
                    "--no-audit",
                    "--no-fund",
                    "--no-update-notifier",
                    "--logs-max=0",
                ];
                match (which::which("npm"), &self.npm_image) {
                    (Err(_), Some(image)) => Cmd::new("docker")
                        .args(["run", "--rm", "--user"])
                        .arg(crate::exec::user_and_group().unwrap_or_else(|| "0:0".into()))
                        .args(["--env", "HOME=/tmp", "--volume"])
                        .arg(format!("{}:/store", partial.display()))
                        .args(["--workdir", "/store/install", image, "npm"])
                        .args(ci)
                        .args(["--cache", "/store"]),
                    _ => Cmd::new("npm")
                        .args(ci)
                        .arg("--cache")
                        .arg(partial.display().to_string())
                        .arg("--prefix")
                        .arg(partial.join("install").display().to_string()),
                }
            }
        }
    }

    /// `npm ci` of an npm store's package, offline, from the store; run in
    /// the lockfile's directory.
    pub fn install_offline(&self) -> Cmd {
        Cmd::new("npm")
            .args([
                "ci",
                "--offline",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--logs-max=0",
                "--cache",
            ])
            .arg(self.dir.display().to_string())
    }

    /// Every `.crate` the lockfile pins, copied from cargo's download cache
    /// after `cargo fetch` (which verifies each download's checksum).
    fn fill_cargo(&self, exec: &Exec, partial: &Path, offline: bool) -> Result<()> {
        let manifest = self.lockfile.with_file_name("Cargo.toml");
        // Offline first: what cargo already downloaded needs no network.
        if offline {
            exec.run(&self.fetch_command(&exec.env.cargo(), partial, true))?;
        } else if !exec.succeeds(&self.fetch_command(&exec.env.cargo(), partial, true)) {
            exec.run(&self.fetch_command(&exec.env.cargo(), partial, false))?;
        }
        #[derive(Deserialize)]
        struct Metadata {
            packages: Vec<Package>,
        }
        #[derive(Deserialize)]
        struct Package {
            name: String,
            version: String,
            source: Option<String>,
        }
        let json = exec.read(
            &Cmd::new(exec.env.cargo())
                .args(["metadata", "--format-version", "1", "--locked", "--offline"])
                .arg("--manifest-path")
                .arg(manifest.display().to_string()),
        )?;
        let metadata: Metadata =
            serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
        let caches = cargo_download_caches(&exec.env)?;
        let crates = partial.join("crates");
        std::fs::create_dir_all(&crates)?;
        for package in metadata.packages {
            let Some(source) = package.source else {
                continue; // a workspace member
            };
            if !source.starts_with("registry+") && !source.starts_with("sparse+") {
                bail!(
                    "{} {} comes from {source}: only registry crates can be stored",
                    package.name,
                    package.version
                );
            }
            let file = format!("{}-{}.crate", package.name, package.version);
            let found = caches
                .iter()
                .map(|dir| dir.join(&file))
                .find(|path| path.is_file())
                .with_context(|| {
                    format!("`cargo fetch` left no {file} in cargo's download cache")
                })?;
            std::fs::copy(&found, crates.join(&file))
                .with_context(|| format!("copying {}", found.display()))?;
        }
        Ok(())
    }

    /// An npm cache holding every package `npm ci` installs on this
    /// platform, made by running it in a scratch directory.
    fn fill_npm(&self, exec: &Exec, partial: &Path) -> Result<()> {
        let install = partial.join("install");
        std::fs::create_dir_all(&install)?;
        let package_json = self.lockfile.with_file_name("package.json");
        for file in [&package_json, &self.lockfile] {
            let name = file.file_name().context("package file name")?;
            std::fs::copy(file, install.join(name))
                .with_context(|| format!("copying {}", file.display()))?;
        }
        exec.run(&self.fetch_command(&exec.env.cargo(), partial, false))?;
        std::fs::remove_dir_all(&install).with_context(|| format!("removing {}", install.display()))
    }
}

/// The store directories this checkout's lockfiles name, as they are in
/// the working tree and as HEAD has them (what a build of HEAD uses):
/// `clean` keeps these.
pub fn current_stores(exec: &Exec, config: &Config) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for image in &config.images {
        let Some(store) = Store::of(exec, config, image)? else {
            continue;
        };
        if let (Some(lockfile), Some(name)) = (&image.lockfile, store.dir.file_name()) {
            let committed = exec.read_bytes(
                &Cmd::new("git").args(["show", &format!("HEAD:{}", lockfile.display())]),
            );
            if let Ok(bytes) = committed {
                let sum = exec.read(&Cmd::new("sha256sum").hidden_stdin(bytes))?;
                let kind = name.to_string_lossy();
                let kind = kind.split('-').next().unwrap_or_default();
                let key = sum.get(..16).context("sha256sum printed no sum")?;
                dirs.push(store.dir.with_file_name(format!("{kind}-{key}")));
            }
        }
        dirs.push(store.dir);
    }
    Ok(dirs)
}

/// The stores `images` build with, filled where missing.
pub fn ensure_all(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    offline: bool,
) -> Result<Vec<(String, Store)>> {
    let mut stores = Vec::new();
    for image in images {
        if let Some(store) = Store::of(exec, config, image)? {
            store.ensure(exec, offline)?;
            stores.push((image.name.clone(), store));
        }
    }
    Ok(stores)
}

/// The stores of the images whose lockfile is a `package-lock.json`; an
/// error when there is none.
pub fn npm_stores(exec: &Exec, config: &Config) -> Result<Vec<Store>> {
    let mut stores = Vec::new();
    for image in &config.images {
        if let Some(store) = Store::of(exec, config, image)? {
            if store.kind == LockfileKind::Npm {
                stores.push(store);
            }
        }
    }
    anyhow::ensure!(!stores.is_empty(), "no image builds an npm package");
    Ok(stores)
}

/// `$CARGO_HOME/registry/cache/*`: where cargo keeps downloaded `.crate`s,
/// one directory per registry.
fn cargo_download_caches(env: &crate::env::Env) -> Result<Vec<PathBuf>> {
    let root = crate::cache::cargo_home(env)?.join("registry/cache");
    let entries =
        std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))?;
    Ok(entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_dir())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::LockfileKind;
    use std::path::Path;

    #[test]
    fn the_kind_comes_from_the_lockfile_name() {
        assert_eq!(
            LockfileKind::of(Path::new("Cargo.lock")),
            Some(LockfileKind::Cargo)
        );
        assert_eq!(
            LockfileKind::of(Path::new("frontend/package-lock.json")),
            Some(LockfileKind::Npm)
        );
        assert_eq!(LockfileKind::of(Path::new("yarn.lock")), None);
    }
}
