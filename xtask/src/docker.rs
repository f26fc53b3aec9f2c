//! docker buildx: the bake file (the exported commit as the context, each
//! image's dependency store as its `deps` context, base images pinned by
//! digest), the bake command line on the pinned builder, its metadata, and
//! the `build.json` hand-off. Pushing is in `push.rs`.
//!
//! Two fresh builds of one commit give the same digests: every input is
//! the commit's (the tree, its time as the `SOURCE_DATE_EPOCH` build arg
//! and the exporter's `source-date-epoch`, labels from the configuration
//! and the commit), base images are resolved
//! once, and the output clamps file times (`rewrite-timestamp`), names its
//! media types and compression, and carries no provenance (it records
//! times).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    config::{Config, Image},
    deps::{self, Store},
    exec::{require_tool, Cmd, Exec},
    exit::refuse,
    git::Revision,
    time::rfc3339,
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

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Reuse BuildKit's cache (drops `--no-cache --pull`).
    pub cache: bool,
    pub push: bool,
    pub builder: Option<String>,
    /// `cache-from` / `cache-to` for `--cache` builds (from configuration).
    pub cache_from: Vec<String>,
    pub cache_to: Vec<String>,
    /// A retry of a push: a fresh build keeps `--pull` (so the base
    /// resolves as it did) but drops `--no-cache`, reusing what the failed
    /// attempt built instead of compiling again.
    pub retry: bool,
    /// Never download dependencies: each lockfile's store must exist.
    pub offline: bool,
    /// Build into BuildKit only, for the digest (no push, no load): how a
    /// build is compared with what a registry already holds.
    pub digest_only: bool,
    /// Base image digests to build from instead of resolving them now: a
    /// rebuild uses the ones recorded for the build it checks.
    pub pinned_bases: Option<BTreeMap<String, String>>,
    /// Build every image, even one the registry holds under its input key.
    pub rebuild: bool,
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

/// The label that carries an image's whole input key: what a later build
/// looks for before it builds.
pub const KEY_LABEL: &str = "org.aiq.xtask.input-key";

/// The OCI labels every image carries, from the configuration and the
/// image's own revision only: `created` is that commit's time, whatever the
/// caller's environment says, so the same inputs always describe
/// themselves the same. The version (its tag) and the key are added once
/// the key is known.
pub fn labels(image: &Image, rev: &Revision, source: &str) -> BTreeMap<String, String> {
    let created = rev.commit_time;
    [
        ("org.opencontainers.image.revision", rev.sha.clone()),
        ("org.opencontainers.image.source", source.to_owned()),
        ("org.opencontainers.image.created", rfc3339(created)),
        ("org.opencontainers.image.title", image.name.clone()),
        // What `cargo xtask clean` selects by: the xtask made it.
        (crate::labels::MADE_LABEL, "build".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// What one image's bake target is made from, beside the configuration.
pub struct TargetInputs<'a> {
    /// The image's own revision (its inputs' last commit).
    pub rev: &'a Revision,
    /// The image's exported inputs (the repository root in its build).
    pub tree: &'a Path,
    /// The image's dependency store.
    pub store: Option<&'a Store>,
    /// The image's base images: reference → digest.
    pub bases: &'a BTreeMap<String, String>,
    /// The build secret's file.
    pub secret: &'a Path,
    /// A fresh (`--no-cache`) build.
    pub fresh: bool,
}

/// One image's bake target: the build args that bake its own revision
/// into the binaries, labels, its exported inputs as the context, its
/// dependency store as its `deps` context, each of its base images pinned
/// to its digest, and the build secret. A fresh build also gets the
/// revision's commit time as the `SOURCE_DATE_EPOCH` build arg (see
/// [`REPRODUCIBLE_OUTPUT`]).
pub fn bake_target(config: &Config, image: &Image, inputs: &TargetInputs) -> serde_json::Value {
    let TargetInputs {
        rev,
        tree,
        store,
        bases,
        secret,
        fresh,
    } = *inputs;
    let source = config.source.as_deref().unwrap_or("unknown");
    let mut args = BTreeMap::from([
        ("BASE_REGISTRY".to_owned(), config.base_registry.clone()),
        ("GIT_REVISION".to_owned(), rev.sha.clone()),
        ("GIT_DIRTY".to_owned(), rev.is_dirty().to_string()),
        ("GIT_COMMIT_TIME".to_owned(), rfc3339(rev.commit_time)),
    ]);
    if fresh {
        args.insert("SOURCE_DATE_EPOCH".to_owned(), rev.commit_time.to_string());
    }
    args.extend(image.build_args.clone());
    let mut contexts = serde_json::Map::new();
    if let Some(store) = store {
        contexts.insert("deps".into(), json!(store.dir));
    }
    for (reference, digest) in bases {
        contexts.insert(
            crate::bases::familiar(reference),
            json!(format!("docker-image://{reference}@{digest}")),
        );
    }
    let mut target = json!({
        "context": tree.join(&image.context),
        "dockerfile": tree.join(&image.dockerfile),
        "args": args,
        "labels": labels(image, rev, source),
        "secret": [format!("id={BUILD_SECRET_ID},src={}", secret.display())],
    });
    if !contexts.is_empty() {
        target["contexts"] = serde_json::Value::Object(contexts);
    }
    target
}

/// The version of what [`key_material`] hashes: a change to it gives
/// every image a new key.
const KEY_FORMAT: u32 = 2;

/// What an image's key hashes beside its bake target.
pub struct KeyContext<'a> {
    /// The sha256 of the exported tree's canonical tar: every file the
    /// build can read, whatever selected it (the `inputs` list, git's
    /// export attributes).
    pub tree_sha256: &'a str,
    pub secret_sha256: &'a str,
    /// The builder: its BuildKit version and native platform.
    pub builder: &'a str,
    /// The exporter's `source-date-epoch`.
    pub epoch: i64,
    pub fresh: bool,
}

/// What an image's input key hashes: its bake target as the build sees
/// it, with only what names this machine made portable (paths inside the
/// exported tree, the dependency store by its lockfile's hash, the secret
/// by its content's hash), plus what the target does not name: the
/// exported tree's content, the builder (its BuildKit version and
/// platform, or its name where buildx does not say), the exporter's
/// options and whether the build is fresh. Nothing is listed by hand: a
/// field added to the target is in the key.
pub fn key_material(
    target: &serde_json::Value,
    tree: &Path,
    context: &KeyContext,
) -> serde_json::Value {
    let mut target = target.clone();
    let relative = |value: &serde_json::Value| -> serde_json::Value {
        let path = Path::new(value.as_str().unwrap_or_default());
        json!(path.strip_prefix(tree).unwrap_or(path))
    };
    target["context"] = relative(&target["context"]);
    target["dockerfile"] = relative(&target["dockerfile"]);
    if let Some(deps) = target.pointer_mut("/contexts/deps") {
        let name = Path::new(deps.as_str().unwrap_or_default())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        *deps = json!(format!("dependency store {name}"));
    }
    target["secret"] = json!([format!(
        "id={BUILD_SECRET_ID},sha256={}",
        context.secret_sha256
    )]);
    json!({
        "format": KEY_FORMAT,
        "target": target,
        "tree": context.tree_sha256,
        "builder": context.builder,
        "output": format!("{REPRODUCIBLE_OUTPUT},source-date-epoch={}", context.epoch),
        "fresh": context.fresh,
    })
}

/// One image as a build plans it, before anything is built.
#[derive(Clone, Debug)]
pub struct Planned {
    pub image: Image,
    /// The image's own revision: the last commit that changed its inputs
    /// (for a dirty tree, the dirty HEAD).
    pub rev: Revision,
    /// The sha256 of [`key_material`]; none for a dirty build, which is
    /// never reused and never reusable.
    pub key: Option<String>,
    pub material: serde_json::Value,
    /// `<12-hex revision>-<8-hex key>`, or `<12-hex HEAD>-dirty-<hash>`.
    pub tag: String,
    /// The bake target, with its version and key labels.
    pub target: serde_json::Value,
    pub store: Option<Store>,
    /// Its base images: reference → digest.
    pub bases: BTreeMap<String, String>,
}

impl Planned {
    /// The tag for `key` at `rev`: two keys never share one, so an
    /// immutable registry never has to move it.
    pub fn tag_for(rev: &Revision, key: Option<&str>) -> String {
        match key {
            Some(key) if !rev.is_dirty() => format!("{}-{}", rev.short(), &key[..8]),
            _ => rev.tag(),
        }
    }

    /// `<registry>/<image>:<tag>`, and `:latest` unless configured off; a
    /// dirty build never moves `:latest`.
    pub fn tags(&self, config: &Config) -> Vec<String> {
        let mut tags = vec![config.image_ref(&self.image.name, &self.tag)];
        if config.push_latest && !self.rev.is_dirty() {
            tags.push(config.image_ref(&self.image.name, "latest"));
        }
        tags
    }

    /// The key's parts, in a line: what a reuse is printed with.
    pub fn describe_key(&self) -> String {
        let target = &self.material["target"];
        let bases: Vec<String> = self
            .bases
            .iter()
            .map(|(reference, digest)| {
                format!(
                    "{}@{}",
                    reference.rsplit('/').next().unwrap_or(reference),
                    &digest[..digest.len().min(19)]
                )
            })
            .collect();
        format!(
            "key {} = revision {}, {} build args, bases {}, {}, {}, builder {}",
            &self.key.as_deref().unwrap_or("none")
                [..12.min(self.key.as_deref().unwrap_or("none").len())],
            self.rev.short(),
            target["args"].as_object().map_or(0, |a| a.len()),
            if bases.is_empty() {
                "none".into()
            } else {
                bases.join(", ")
            },
            target
                .pointer("/contexts/deps")
                .and_then(|d| d.as_str())
                .unwrap_or("no dependency store"),
            if self.material["fresh"] == true {
                "fresh"
            } else {
                "cached"
            },
            self.material["builder"].as_str().unwrap_or("?"),
        )
    }
}

/// A bake file of `planned`'s targets.
pub fn bake_file(planned: &[Planned]) -> serde_json::Value {
    let targets: serde_json::Map<String, serde_json::Value> = planned
        .iter()
        .map(|p| (p.image.name.clone(), p.target.clone()))
        .collect();
    let names: Vec<&str> = planned.iter().map(|p| p.image.name.as_str()).collect();
    json!({
        "group": { "default": { "targets": names } },
        "target": targets,
    })
}

/// The build secret's id in `RUN --mount=type=secret`: keys a build must
/// make (Next.js's) are derived from it, never from the source.
pub const BUILD_SECRET_ID: &str = "build_key";

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

/// What every image output says, so the digest depends on nothing
/// BuildKit would otherwise choose: file times clamped to the commit time
/// (the exporter's `source-date-epoch`, which also clamps the config's
/// `created` and history), OCI media types, gzip.
///
/// The exporter only clamps times later than the epoch. A fresh build
/// also passes the commit time as the `SOURCE_DATE_EPOCH` build arg, which
/// makes every step stamp exactly that time, whatever it reuses: that is
/// what makes two fresh builds equal. A `--cache` build does not: BuildKit
/// puts that arg in every step's cache key, so each new commit would
/// rebuild every layer of the dev loop.
const REPRODUCIBLE_OUTPUT: &str = "rewrite-timestamp=true,oci-mediatypes=true,compression=gzip";

/// The `docker buildx bake` line. Tags and outputs are given with `--set`
/// rather than in the bake file so the printed line shows exactly what gets
/// tagged and where it goes. Fresh by default: `--no-cache` so no layer (and
/// no cache mount) survives from an earlier build, `--pull` so base images
/// are re-resolved. No provenance attestation: it records the build's times
/// and an invocation id, so no two builds would share a digest. Each target
/// comes with its tags and its epoch: its own revision's commit time, the
/// exporter's `source-date-epoch`.
pub fn bake_command(
    bake_file: &Path,
    metadata_file: &Path,
    targets: &[(&Image, Vec<String>, i64)],
    opts: &BuildOptions,
    progress_style: &str,
) -> Cmd {
    let mut cmd = Cmd::new("docker").arg("buildx").arg("bake");
    if let Some(builder) = &opts.builder {
        cmd = cmd.args(["--builder", builder]);
    }
    cmd = cmd
        .arg("--file")
        .arg(bake_file.display().to_string())
        .arg("--metadata-file")
        .arg(metadata_file.display().to_string())
        // A push is followed as JSON, to tell its failures apart by the
        // step that failed (`progress.rs`).
        .arg(format!(
            "--progress={}",
            if opts.push && !opts.digest_only {
                "rawjson"
            } else {
                progress_style
            }
        ))
        .arg("--provenance=false");
    if !opts.cache {
        if !opts.retry {
            cmd = cmd.arg("--no-cache");
        }
        cmd = cmd.arg("--pull");
    } else {
        // `{builder}` in a cache ref is the builder's name: each builder
        // exports to a ref of its own (one ref is last-writer-wins) and
        // imports every builder's.
        let builder = opts.builder.as_deref().unwrap_or("default");
        for from in &opts.cache_from {
            let from = from.replace("{builder}", builder);
            cmd = cmd.arg("--set").arg(format!("*.cache-from={from}"));
        }
        for to in &opts.cache_to {
            let to = to.replace("{builder}", builder);
            cmd = cmd.arg("--set").arg(format!("*.cache-to={to}"));
        }
    }
    for (image, tags, epoch) in targets {
        let epoch = format!("source-date-epoch={epoch}");
        let output = if opts.digest_only {
            format!("type=image,push=false,{REPRODUCIBLE_OUTPUT},{epoch}")
        } else if opts.push {
            format!("type=image,push=true,{REPRODUCIBLE_OUTPUT},{epoch}")
        } else {
            format!("type=docker,rewrite-timestamp=true,{epoch}")
        };
        for tag in tags {
            cmd = cmd.arg("--set").arg(format!("{}.tags={tag}", image.name));
        }
        cmd = cmd
            .arg("--set")
            .arg(format!("{}.output={output}", image.name));
    }
    cmd.args(targets.iter().map(|(i, _, _)| i.name.clone()))
}

/// What buildx writes per target in `--metadata-file`.
#[derive(Debug, Deserialize)]
struct TargetMetadata {
    #[serde(rename = "containerimage.digest")]
    digest: Option<String>,
}

/// Reads each target's manifest digest from buildx's metadata file.
pub fn parse_metadata(json: &str, images: &[Image]) -> Result<BTreeMap<String, String>> {
    let all: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).context("parsing buildx's metadata file")?;
    images
        .iter()
        .map(|image| {
            let entry = all
                .get(&image.name)
                .with_context(|| format!("buildx's metadata has no entry for {}", image.name))?;
            let meta: TargetMetadata = serde_json::from_value(entry.clone())
                .with_context(|| format!("parsing buildx's metadata for {}", image.name))?;
            let digest = meta
                .digest
                .with_context(|| format!("buildx reported no digest for {}", image.name))?;
            Ok((image.name.clone(), digest))
        })
        .collect()
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

    /// The example image's target at `rev`, from `/repo/ctx`.
    fn example_target(
        rev: &Revision,
        bases: &BTreeMap<String, String>,
        fresh: bool,
    ) -> serde_json::Value {
        let c = Config::example();
        bake_target(
            &c,
            &c.images[0],
            &TargetInputs {
                rev,
                tree: Path::new("/repo/ctx"),
                store: None,
                bases,
                secret: Path::new("/secret"),
                fresh,
            },
        )
    }

    #[test]
    fn a_target_bakes_in_its_own_revision() {
        let rev = Revision::example(None);
        let bases = BTreeMap::from([(
            "127.0.0.1:5000/library/rust:1.95".to_owned(),
            "sha256:b".to_owned(),
        )]);
        let target = example_target(&rev, &bases, true);
        assert_eq!(target["args"]["GIT_REVISION"], rev.sha);
        assert_eq!(target["args"]["BASE_REGISTRY"], "127.0.0.1:5000/library");
        assert_eq!(target["args"]["EXTRA"], "1");
        assert_eq!(target["args"]["SOURCE_DATE_EPOCH"], "1795464000");
        let labels = &target["labels"];
        assert_eq!(labels["org.opencontainers.image.revision"], rev.sha);
        assert_eq!(
            labels["org.opencontainers.image.created"],
            "2026-11-23T20:00:00Z"
        );
        assert_eq!(labels["org.opencontainers.image.title"], "aiq-agent");
        assert_eq!(labels["org.opencontainers.image.source"], "unknown");
        assert_eq!(target["dockerfile"], "/repo/ctx/backend/Dockerfile");
        assert_eq!(
            target["contexts"]["127.0.0.1:5000/library/rust:1.95"],
            "docker-image://127.0.0.1:5000/library/rust:1.95@sha256:b"
        );
        assert_eq!(target["secret"][0], "id=build_key,src=/secret");
        assert!(
            example_target(&rev, &bases, false)["args"]
                .get("SOURCE_DATE_EPOCH")
                .is_none(),
            "a cached build keeps the epoch out of every step's cache key"
        );
    }

    #[test]
    fn the_key_hashes_what_the_build_sees_and_not_where_this_machine_keeps_it() {
        let rev = Revision::example(None);
        let bases = BTreeMap::from([("r/library/rust:1.95".to_owned(), "sha256:b".to_owned())]);
        let context = |builder| KeyContext {
            tree_sha256: "t",
            secret_sha256: "s",
            builder,
            epoch: 1,
            fresh: true,
        };
        let key = |target: &serde_json::Value, tree: &str| {
            key_material(
                target,
                Path::new(tree),
                &context("BuildKit v0.34.2 linux/amd64"),
            )
        };
        let here = key(&example_target(&rev, &bases, true), "/repo/ctx");
        assert_eq!(here["target"]["dockerfile"], "backend/Dockerfile");
        assert_eq!(here["target"]["secret"][0], "id=build_key,sha256=s");
        let mut elsewhere = example_target(&rev, &bases, true);
        elsewhere["context"] = json!("/other/checkout/backend");
        elsewhere["dockerfile"] = json!("/other/checkout/backend/Dockerfile");
        let mut at_home = here.clone();
        at_home["target"]["context"] = json!("backend");
        assert_eq!(key(&elsewhere, "/other/checkout"), at_home);
        let moved = BTreeMap::from([("r/library/rust:1.95".to_owned(), "sha256:c".to_owned())]);
        assert_ne!(
            key(&example_target(&rev, &moved, true), "/repo/ctx"),
            here,
            "a moved base"
        );
        let mut seeded = example_target(&rev, &bases, true);
        seeded["args"]["NEXT_PUBLIC_BACKEND_URL"] = json!("http://10.0.0.9");
        assert_ne!(key(&seeded, "/repo/ctx"), here, "a changed build arg");
        assert_ne!(
            key_material(
                &example_target(&rev, &bases, true),
                Path::new("/repo/ctx"),
                &context("BuildKit v0.34.2 linux/arm64")
            ),
            here,
            "another platform"
        );
    }

    #[test]
    fn tags_name_the_images_revision_and_key_and_dirty_builds_never_move_latest() {
        let c = Config::example();
        let key = "89abcdef".repeat(8);
        assert_eq!(
            Planned::tag_for(&Revision::example(None), Some(&key)),
            "0123456789ab-89abcdef"
        );
        assert_eq!(
            Planned::tag_for(&Revision::example(Some("deadbeef")), None),
            "0123456789ab-dirty-deadbeef"
        );
        let planned = |rev: Revision, key: Option<String>| Planned {
            image: c.images[0].clone(),
            tag: Planned::tag_for(&rev, key.as_deref()),
            rev,
            key,
            material: json!({}),
            target: json!({}),
            store: None,
            bases: BTreeMap::new(),
        };
        assert_eq!(
            planned(Revision::example(None), Some(key.clone())).tags(&c),
            [
                "ghcr.io/acme/aiq-agent:0123456789ab-89abcdef",
                "ghcr.io/acme/aiq-agent:latest"
            ]
        );
        assert_eq!(
            planned(Revision::example(Some("deadbeef")), None).tags(&c),
            ["ghcr.io/acme/aiq-agent:0123456789ab-dirty-deadbeef"]
        );
        assert_eq!(
            example_target(&Revision::example(Some("deadbeef")), &BTreeMap::new(), true)["args"]
                ["GIT_DIRTY"],
            "true"
        );
    }

    #[test]
    fn fresh_by_default_cached_on_request() {
        let c = Config::example();
        let tagged = [(
            &c.images[0],
            vec![
                "ghcr.io/acme/aiq-agent:0123456789ab".to_owned(),
                "ghcr.io/acme/aiq-agent:latest".to_owned(),
            ],
            0,
        )];
        let fresh = bake_command(
            Path::new("b.json"),
            Path::new("m.json"),
            &tagged,
            &BuildOptions::default(),
            "plain",
        );
        assert!(fresh
            .to_string()
            .contains("--set aiq-agent.tags=ghcr.io/acme/aiq-agent:0123456789ab --set aiq-agent.tags=ghcr.io/acme/aiq-agent:latest"));
        assert!(fresh.argv().iter().any(|a| a == "--no-cache"));
        assert!(fresh.argv().iter().any(|a| a == "--pull"));
        assert!(fresh.argv().iter().any(
            |a| a == "aiq-agent.output=type=docker,rewrite-timestamp=true,source-date-epoch=0"
        ));
        assert!(fresh.argv().iter().any(|a| a == "--provenance=false"));
        let opts = BuildOptions {
            cache: true,
            push: true,
            builder: Some("remote".into()),
            cache_from: vec!["type=registry,ref=r/cache:aiq".into()],
            cache_to: vec!["type=registry,ref=r/cache:{builder},mode=max".into()],
            ..BuildOptions::default()
        };
        let cached = bake_command(
            Path::new("b.json"),
            Path::new("m.json"),
            &tagged,
            &opts,
            "plain",
        );
        assert!(cached.to_string().contains(
            "--set '*.cache-from=type=registry,ref=r/cache:aiq' --set '*.cache-to=type=registry,ref=r/cache:remote,mode=max'"
        ), "{cached}");
        assert!(
            !fresh.to_string().contains("cache-from"),
            "fresh builds import no cache"
        );
        let retry = BuildOptions {
            retry: true,
            ..BuildOptions::default()
        };
        let retry = bake_command(
            Path::new("b.json"),
            Path::new("m.json"),
            &tagged,
            &retry,
            "plain",
        );
        assert!(
            retry.to_string().contains(" --pull ") && !retry.to_string().contains("--no-cache")
        );
        assert!(!cached
            .argv()
            .iter()
            .any(|a| a == "--no-cache" || a == "--pull"));
        assert!(cached.to_string().contains("--builder remote"));
        assert!(cached.argv().iter().any(|a| a
            == "aiq-agent.output=type=image,push=true,rewrite-timestamp=true,oci-mediatypes=true,compression=gzip,source-date-epoch=0"));
        assert_eq!(cached.argv().last().unwrap(), "aiq-agent");
    }

    #[test]
    fn metadata_digests_are_read_per_target() {
        let c = Config::example();
        let json = r#"{"aiq-agent": {"containerimage.digest": "sha256:abc", "image.name": "x"}, "buildx.build.warnings": []}"#;
        let digests = parse_metadata(json, &c.images).unwrap();
        assert_eq!(digests["aiq-agent"], "sha256:abc");
        assert!(parse_metadata("{}", &c.images).is_err());
    }

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
