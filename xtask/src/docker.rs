//! A build with docker buildx: plans each image (its revision, exported
//! inputs, dependency store, base images, key and tag: the bake file is in
//! `bake.rs`), reuses what the registry holds under a key, runs the bake
//! on the pinned builder, and writes the `build.json` hand-off. Pushing is
//! in `push.rs`.
//!
//! Two fresh builds of one commit give the same digests: every input is
//! the commit's (the tree, its time as the `SOURCE_DATE_EPOCH` build arg
//! and the exporter's `source-date-epoch`, labels from the configuration
//! and the commit), base images are resolved
//! once, and the output clamps file times (`rewrite-timestamp`), names its
//! media types and compression, and carries no provenance (it records
//! times).

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    bake::{
        bake_command, bake_file, bake_target, key_material, parse_metadata, BuildOptions,
        KeyContext, Planned, TargetInputs, KEY_LABEL,
    },
    config::{Config, Image},
    deps,
    exec::{require_tool, Cmd, Exec},
    exit::refuse,
    git::Revision,
};

/// Finds git, docker and the buildx plugin, or refuses naming what is
/// missing.
pub fn preflight(exec: &Exec) -> Result<()> {
    require_tool("git", "install git (e.g. `apt-get install git`)")?;
    require_tool(
        "docker",
        "install Docker (https://docs.docker.com/engine/install/)",
    )?;
    if !exec.succeeds(&Cmd::new("docker").args(["buildx", "version"])) {
        return Err(refuse(
            "the docker buildx plugin is missing: install it (Debian: `apt-get install docker-buildx`; Docker Desktop ships it)",
        ));
    }
    Ok(())
}

/// One built image, as recorded in `target/xtask/build.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    pub name: String,
    /// The immutable reference: `<registry>/<name>:<sha tag>`.
    pub reference: String,
    pub tag: String,
    /// The manifest digest in the registry; `None` when not pushed.
    pub digest: Option<String>,
    pub revision: String,
    pub dirty: bool,
    /// The last commit that changed the image's inputs (its revision
    /// itself when they changed there); absent in older build files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_revision: Option<String>,
    /// The input key (see [`Planned`]); none for a dirty build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Found in the registry under its input key: not built, not pushed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

impl BuiltImage {
    /// `name` built at `rev`, tagged `<registry>/<name>:<sha tag>`; `digest`
    /// once it is in the registry.
    pub fn new(config: &Config, name: &str, rev: &Revision, digest: Option<String>) -> BuiltImage {
        BuiltImage {
            name: name.to_owned(),
            reference: config.image_ref(name, &rev.tag()),
            tag: rev.tag(),
            digest,
            revision: rev.sha.clone(),
            dirty: rev.is_dirty(),
            inputs_revision: None,
            key: None,
            reused: false,
        }
    }

    /// The image's own revision: the last commit that changed its inputs
    /// (the build's revision for a file written before it was recorded).
    pub fn own_revision(&self) -> &str {
        self.inputs_revision.as_deref().unwrap_or(&self.revision)
    }

    /// `<registry>/<name>`: the reference without its tag.
    pub fn repository(&self) -> &str {
        self.reference
            .strip_suffix(&format!(":{}", self.tag))
            .unwrap_or(&self.reference)
    }

    /// `<registry>/<name>@sha256:...`: what deploys and containers run.
    pub fn pinned(&self) -> Option<String> {
        self.digest
            .as_ref()
            .map(|d| format!("{}@{d}", self.repository()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BuildFile {
    pub revision: String,
    pub tag: String,
    pub images: Vec<BuiltImage>,
    /// What they were built on: BuildKit's version and the base images'
    /// digests.
    #[serde(default, flatten)]
    pub inputs: Inputs,
}

/// What a build ran on and from, beyond the commit: what a rebuild needs
/// to give the same digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    #[serde(default)]
    pub buildkit: String,
    /// The `BASE_REGISTRY` build arg the Dockerfiles' `FROM`s expand with.
    #[serde(default)]
    pub base_registry: String,
    /// Base image reference → the digest it resolved to.
    #[serde(default)]
    pub bases: BTreeMap<String, String>,
}

/// The build secret's file, made (32 random bytes, readable by its owner
/// only) the first time a build needs it.
fn build_secret(exec: &Exec) -> Result<PathBuf> {
    let path = crate::cache::build_secret_file(&exec.env)?;
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.len() < 32 {
            return Err(crate::exit::refuse(format!(
                "the build secret {} holds {} bytes; it needs at least 32 (delete it to have a new one made, or point XTASK_BUILD_SECRET at the team's)",
                path.display(),
                meta.len()
            )));
        }
        return Ok(path);
    }
    if exec.dry_run {
        return Ok(path);
    }
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut key))
        .context("reading /dev/urandom for the build secret")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    std::io::Write::write_all(&mut file, &key)?;
    // Parallel first builds: whoever renames first wins, the others keep it.
    if std::fs::hard_link(&partial, &path).is_ok() {
        eprintln!("made the build secret {}", path.display());
    }
    std::fs::remove_file(&partial)?;
    Ok(path)
}

/// The sha256 of `bytes`, in hex.
fn sha256(exec: &Exec, bytes: Vec<u8>) -> Result<String> {
    let sum = exec.read(&Cmd::new("sha256sum").hidden_stdin(bytes))?;
    sum.get(..64)
        .map(str::to_owned)
        .context("sha256sum printed no sum")
}

/// Plans `images` at `rev`: each one's own revision (the last commit that
/// changed its inputs), its exported inputs, its dependency store (named,
/// not filled), its base images (resolved now, or as `pinned_bases`
/// recorded them), its bake target, its input key and its tag. `builder`
/// names the builder for the key.
fn plan(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    rev: &Revision,
    opts: &BuildOptions,
    builder: &str,
) -> Result<Vec<Planned>> {
    let secret = build_secret(exec)?;
    let secret_sha256 = if secret.exists() {
        sha256(
            exec,
            std::fs::read(&secret).with_context(|| format!("reading {}", secret.display()))?,
        )?
    } else {
        "none yet (dry run)".to_owned()
    };
    let fresh = !opts.cache;
    let mut resolved = opts.pinned_bases.clone().unwrap_or_default();
    let mut planned = Vec::new();
    for image in images {
        let own = crate::git::inputs_revision(exec, rev, &image.name, &image.input_paths())?;
        let own = if own == rev.sha {
            rev.clone()
        } else {
            crate::git::commit(exec, &own)?
        };
        // The inputs are exported from `rev` (its tree is `own`'s, checked
        // path by path); a dry run exports nothing and reads the working
        // tree's lockfile and Dockerfile.
        let tree = crate::export::export(exec, config, rev, image)?;
        let source = Config {
            root: if exec.dry_run {
                config.root.clone()
            } else {
                tree.clone()
            },
            ..config.clone()
        };
        let one = std::slice::from_ref(image);
        let store = deps::Store::of(exec, &source, image)?;
        if opts.pinned_bases.is_none() {
            crate::bases::resolve_all(exec, &source, one, &mut resolved)?;
        }
        let bases: BTreeMap<String, String> = crate::bases::base_images_of(&source, one)?
            .into_iter()
            .filter_map(|base| {
                let reference = format!("{}/{base}", config.base_registry);
                let digest = resolved.get(&reference)?.clone();
                Some((reference, digest))
            })
            .collect();
        let mut target = bake_target(
            config,
            image,
            &TargetInputs {
                rev: &own,
                tree: &tree,
                store: store.as_ref(),
                bases: &bases,
                secret: &secret,
                fresh,
            },
        );
        // What the build can read: the exported tree, hashed as a
        // canonical tar (a dirty build has no key; a dry run no tree).
        let tree_sha256 = if own.is_dirty() || exec.dry_run {
            "none".to_owned()
        } else {
            sha256(exec, exec.read_bytes(&crate::export::canonical_tar(&tree))?)?
        };
        let material = key_material(
            &target,
            &tree,
            &KeyContext {
                tree_sha256: &tree_sha256,
                secret_sha256: &secret_sha256,
                builder,
                epoch: own.commit_time,
                fresh,
            },
        );
        let key = if own.is_dirty() {
            None
        } else {
            Some(sha256(exec, material.to_string().into_bytes())?)
        };
        let tag = Planned::tag_for(&own, key.as_deref());
        target["labels"]["org.opencontainers.image.version"] = json!(tag);
        if let Some(key) = &key {
            target["labels"][KEY_LABEL] = json!(key);
        }
        planned.push(Planned {
            image: image.clone(),
            rev: own,
            key,
            material,
            tag,
            target,
            store,
            bases,
        });
    }
    Ok(planned)
}

/// The digest of the image the registry holds under `planned`'s tag, if
/// it carries `planned`'s whole key: then a fresh build would give exactly
/// it. Anything else (no such tag, an unreadable registry, another key) is
/// no reuse, and the image is built.
fn reusable(exec: &Exec, config: &Config, planned: &Planned) -> Option<String> {
    let key = planned.key.as_deref()?;
    let reference = config.image_ref(&planned.image.name, &planned.tag);
    let found = crate::registry::resolve(exec, &reference).ok()?;
    (found.label(KEY_LABEL) == Some(key)).then_some(found.digest)
}

/// Builds (and with `push`, pushes) `images` in one bake session on the
/// pinned builder (or `opts.builder`), each from its exported inputs at
/// its own revision, on base images resolved now (or as `pinned_bases`
/// recorded them). A fresh push first looks each image's input key up in
/// the registry: one already there is reused, not built (unless
/// `rebuild`). Returns the images and what they were built on. In a dry
/// run only the bake file is written and the commands printed.
pub fn build(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    rev: &Revision,
    opts: &BuildOptions,
) -> Result<(Vec<BuiltImage>, Inputs)> {
    let out = config.out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut opts = opts.clone();
    // A builder named with `--builder` was checked in the preflight
    // (`BuildFlags::check_builder`).
    if opts.builder.is_none() {
        opts.builder = Some(crate::builder::ensure(exec, config)?);
    }
    let name = opts.builder.clone().unwrap_or_default();
    // The key names the builder by its BuildKit version and the platform
    // it builds for: one version on one platform gives one image, on the
    // pinned builder, a one-CPU one or a remote one.
    let builder =
        crate::builder::identity(exec, &name).unwrap_or_else(|| format!("buildx builder {name}"));
    let bake_path = out.join("bake.json");
    let metadata_path = out.join("bake-metadata.json");
    let planned = plan(exec, config, images, rev, &opts, &builder)?;
    let mut reused = BTreeMap::new();
    let may_reuse = opts.push && !opts.cache && !opts.rebuild && !opts.digest_only;
    if may_reuse && !exec.dry_run {
        for p in &planned {
            if let Some(digest) = reusable(exec, config, p) {
                eprintln!(
                    "{}: reused {}@{digest}, not built: its inputs are unchanged since {} ({})",
                    p.image.name,
                    config.image_ref(&p.image.name, &p.tag),
                    p.rev.short(),
                    p.describe_key()
                );
                reused.insert(p.image.name.clone(), digest);
            }
        }
    }
    let to_build: Vec<&Planned> = planned
        .iter()
        .filter(|p| !reused.contains_key(&p.image.name))
        .collect();
    for store in to_build.iter().filter_map(|p| p.store.as_ref()) {
        store.ensure(exec, opts.offline)?;
    }
    let digests = if to_build.is_empty() {
        // Nothing built: no bake file of an earlier build is left to read.
        let _ = std::fs::remove_file(&bake_path);
        BTreeMap::new()
    } else {
        let building: Vec<Planned> = to_build.iter().map(|p| (*p).clone()).collect();
        let bake = serde_json::to_string_pretty(&bake_file(&building))?;
        std::fs::write(&bake_path, bake)
            .with_context(|| format!("writing {}", bake_path.display()))?;
        let _ = std::fs::remove_file(&metadata_path);
        let images: Vec<Image> = building.iter().map(|p| p.image.clone()).collect();
        // Digests exist only in a registry (or, digest_only, in BuildKit):
        // a build loaded into Docker has none.
        if opts.push {
            crate::push::push(exec, config, &building, &opts, &bake_path, &metadata_path)
                .with_context(|| format!("building on builder {name}"))?
        } else {
            let targets: Vec<(&Image, Vec<String>, i64)> = building
                .iter()
                .map(|p| (&p.image, p.tags(config), p.rev.commit_time))
                .collect();
            let cmd = bake_command(
                &bake_path,
                &metadata_path,
                &targets,
                &opts,
                exec.output.progress_style(),
            );
            if let Err(error) = exec.run(&cmd) {
                return Err(
                    crate::bases::explain_base_image_failure(exec, config, &images)
                        .unwrap_or(error)
                        .context(format!("building on builder {name}")),
                );
            }
            if opts.digest_only && !exec.dry_run {
                let metadata = std::fs::read_to_string(&metadata_path)
                    .with_context(|| format!("reading {}", metadata_path.display()))?;
                parse_metadata(&metadata, &images)?
            } else {
                BTreeMap::new()
            }
        }
    };
    let mut bases = BTreeMap::new();
    let mut built = Vec::new();
    for p in &planned {
        bases.extend(p.bases.clone());
        let name = &p.image.name;
        let image = BuiltImage {
            name: name.clone(),
            reference: config.image_ref(name, &p.tag),
            tag: p.tag.clone(),
            digest: reused.get(name).or_else(|| digests.get(name)).cloned(),
            revision: rev.sha.clone(),
            dirty: rev.is_dirty(),
            inputs_revision: Some(p.rev.sha.clone()),
            key: p.key.clone(),
            reused: reused.contains_key(name),
        };
        let mut event = serde_json::to_value(&image)?;
        let kind = if image.reused {
            event["key_parts"] = p.material.clone();
            "image_reused"
        } else if image.digest.is_some() {
            "image_pushed"
        } else {
            "image_built"
        };
        exec.output.event(kind, event);
        built.push(image);
    }
    let inputs = Inputs {
        buildkit: config.buildkit.clone(),
        base_registry: config.base_registry.clone(),
        bases,
    };
    Ok((built, inputs))
}

/// This checkout's last `target/xtask/build.json`, if there is one that
/// parses.
pub fn read_build_file(config: &Config) -> Option<BuildFile> {
    let text = std::fs::read_to_string(config.out_dir().join("build.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `target/xtask/build.json`: what `deploy --from` deploys, and
/// what it was built on.
pub fn write_build_file(
    config: &Config,
    rev: &Revision,
    built: &[BuiltImage],
    inputs: &Inputs,
) -> Result<PathBuf> {
    let file = BuildFile {
        revision: rev.sha.clone(),
        tag: rev.tag(),
        images: built.to_vec(),
        inputs: inputs.clone(),
    };
    let path = config.out_dir().join("build.json");
    std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs a Docker query printing JSON lines (`--format json` or
/// `{{json .}}`) and parses one object per line.
pub fn json_lines<T: for<'de> Deserialize<'de>>(exec: &Exec, cmd: &Cmd) -> Result<Vec<T>> {
    exec.read(cmd)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing `{cmd}`: {l}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_reference_uses_the_digest() {
        let image = BuiltImage {
            name: "aiq-agent".into(),
            reference: "localhost:5000/aiq-agent:0123456789ab".into(),
            tag: "0123456789ab".into(),
            digest: Some("sha256:abc".into()),
            revision: "x".into(),
            dirty: false,
            inputs_revision: None,
            key: None,
            reused: false,
        };
        assert_eq!(
            image.pinned().unwrap(),
            "localhost:5000/aiq-agent@sha256:abc"
        );
    }
}
