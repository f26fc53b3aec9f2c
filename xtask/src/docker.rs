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
    output::progress_style,
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
        }
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

/// The OCI labels every image carries, from the configuration and the
/// commit only: `created` is the commit time, whatever the caller's
/// environment says, so the same commit always describes itself the same.
pub fn labels(image: &Image, rev: &Revision, source: &str) -> BTreeMap<String, String> {
    let created = rev.commit_time;
    [
        ("org.opencontainers.image.revision", rev.sha.clone()),
        ("org.opencontainers.image.source", source.to_owned()),
        ("org.opencontainers.image.created", rfc3339(created)),
        ("org.opencontainers.image.title", image.name.clone()),
        ("org.opencontainers.image.version", rev.tag()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// What one bake builds from, beside the configuration and the revision.
#[derive(Clone, Copy)]
pub struct BakeInputs<'a> {
    /// Each image's exported inputs (the repository root in its build).
    pub trees: &'a BTreeMap<String, PathBuf>,
    /// Each image's dependency store.
    pub stores: &'a [(String, Store)],
    /// Base image reference → digest.
    pub bases: &'a BTreeMap<String, String>,
    /// The build secret's file.
    pub secret: &'a Path,
    /// A fresh (`--no-cache`) build.
    pub fresh: bool,
}

/// The bake definition for `images`: one target each, tags, labels, the
/// build args that bake the revision into the binaries, the image's
/// exported inputs as the context, each image's dependency store as its `deps` context,
/// each base image pinned to its digest, and the build secret. A fresh
/// build also gets the commit time as the `SOURCE_DATE_EPOCH` build arg
/// (see [`REPRODUCIBLE_OUTPUT`]).
pub fn bake_file(
    config: &Config,
    images: &[Image],
    rev: &Revision,
    inputs: &BakeInputs,
) -> serde_json::Value {
    let BakeInputs {
        trees,
        stores,
        bases,
        secret,
        fresh,
    } = *inputs;
    let source = config.source.as_deref().unwrap_or("unknown");
    let mut targets = serde_json::Map::new();
    for image in images {
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
        if let Some((_, store)) = stores.iter().find(|(name, _)| *name == image.name) {
            contexts.insert("deps".into(), json!(store.dir));
        }
        for (reference, digest) in bases {
            contexts.insert(
                crate::bases::familiar(reference),
                json!(format!("docker-image://{reference}@{digest}")),
            );
        }
        let tree = &trees[&image.name];
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
        targets.insert(image.name.clone(), target);
    }
    let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
    json!({
        "group": { "default": { "targets": names } },
        "target": targets,
    })
}

/// `<registry>/<image>:<sha tag>`, and `:latest` unless configured off; a
/// dirty build never moves `:latest`.
pub fn tags(config: &Config, image: &Image, rev: &Revision) -> Vec<String> {
    let mut tags = vec![config.image_ref(&image.name, &rev.tag())];
    if config.push_latest && !rev.is_dirty() {
        tags.push(config.image_ref(&image.name, "latest"));
    }
    tags
}

/// The build secret's id in `RUN --mount=type=secret`: keys a build must
/// make (Next.js's) are derived from it, never from the source.
pub const BUILD_SECRET_ID: &str = "build_key";

/// The build secret's file, made (32 random bytes, readable by its owner
/// only) the first time a build needs it.
fn build_secret(exec: &Exec) -> Result<PathBuf> {
    let path = crate::config::build_secret_file();
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
/// and an invocation id, so no two builds would share a digest. `epoch` is
/// the commit time, the exporter's `source-date-epoch`.
pub fn bake_command(
    bake_file: &Path,
    metadata_file: &Path,
    images: &[(&Image, Vec<String>)],
    opts: &BuildOptions,
    epoch: i64,
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
                progress_style()
            }
        ))
        .arg("--provenance=false");
    if !opts.cache {
        if !opts.retry {
            cmd = cmd.arg("--no-cache");
        }
        cmd = cmd.arg("--pull");
    } else {
        for from in &opts.cache_from {
            cmd = cmd.arg("--set").arg(format!("*.cache-from={from}"));
        }
        for to in &opts.cache_to {
            cmd = cmd.arg("--set").arg(format!("*.cache-to={to}"));
        }
    }
    let epoch = format!("source-date-epoch={epoch}");
    let output = if opts.digest_only {
        format!("type=image,push=false,{REPRODUCIBLE_OUTPUT},{epoch}")
    } else if opts.push {
        format!("type=image,push=true,{REPRODUCIBLE_OUTPUT},{epoch}")
    } else {
        format!("type=docker,rewrite-timestamp=true,{epoch}")
    };
    for (image, tags) in images {
        for tag in tags {
            cmd = cmd.arg("--set").arg(format!("{}.tags={tag}", image.name));
        }
        cmd = cmd
            .arg("--set")
            .arg(format!("{}.output={output}", image.name));
    }
    cmd.args(images.iter().map(|(i, _)| i.name.clone()))
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

/// Builds (and with `push`, pushes) `images` in one bake session on the
/// pinned builder (or `opts.builder`), from the revision's exported tree
/// and base images resolved now (or as `pinned_bases` recorded them).
/// Returns the images and what they were built on. In a dry run only the
/// bake file is written and the commands printed.
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
    if opts.builder.is_none() {
        opts.builder = Some(crate::builder::ensure(exec, config)?);
    }
    let bake_path = out.join("bake.json");
    let metadata_path = out.join("bake-metadata.json");
    // Each image's inputs, exported; its lockfile and Dockerfile are the
    // revision's, as exported (a dry run exports nothing: there, the
    // working tree's).
    let mut trees = BTreeMap::new();
    let mut since = BTreeMap::new();
    let mut stores = Vec::new();
    let mut bases = opts.pinned_bases.clone().unwrap_or_default();
    for image in images {
        since.insert(
            image.name.clone(),
            crate::git::inputs_revision(exec, rev, &image.name, &image.input_paths())?,
        );
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
        stores.extend(deps::ensure_all(exec, &source, one, opts.offline)?);
        if opts.pinned_bases.is_none() {
            crate::bases::resolve_all(exec, &source, one, &mut bases)?;
        }
        trees.insert(image.name.clone(), tree);
    }
    let secret = build_secret(exec)?;
    let inputs = BakeInputs {
        trees: &trees,
        stores: &stores,
        bases: &bases,
        secret: &secret,
        fresh: !opts.cache,
    };
    let bake = serde_json::to_string_pretty(&bake_file(config, images, rev, &inputs))?;
    std::fs::write(&bake_path, bake).with_context(|| format!("writing {}", bake_path.display()))?;
    let _ = std::fs::remove_file(&metadata_path);

    // Digests exist only in a registry (or, digest_only, in BuildKit): a
    // build loaded into Docker has none.
    let digests = if opts.push {
        crate::push::push(exec, config, images, rev, &opts, &bake_path, &metadata_path)?
    } else {
        let tagged: Vec<(&Image, Vec<String>)> =
            images.iter().map(|i| (i, tags(config, i, rev))).collect();
        let cmd = bake_command(&bake_path, &metadata_path, &tagged, &opts, rev.commit_time);
        if let Err(error) = exec.run(&cmd) {
            return Err(
                crate::bases::explain_base_image_failure(exec, config, images).unwrap_or(error),
            );
        }
        if opts.digest_only && !exec.dry_run {
            let metadata = std::fs::read_to_string(&metadata_path)
                .with_context(|| format!("reading {}", metadata_path.display()))?;
            parse_metadata(&metadata, images)?
        } else {
            BTreeMap::new()
        }
    };
    let built: Vec<BuiltImage> = images
        .iter()
        .map(|image| BuiltImage {
            inputs_revision: since.remove(&image.name),
            ..BuiltImage::new(config, &image.name, rev, digests.get(&image.name).cloned())
        })
        .collect();
    for image in &built {
        let kind = if image.digest.is_some() {
            "image_pushed"
        } else {
            "image_built"
        };
        exec.output.event(kind, serde_json::to_value(image)?);
    }
    let inputs = Inputs {
        buildkit: config.buildkit.clone(),
        base_registry: config.base_registry.clone(),
        bases,
    };
    Ok((built, inputs))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bake inputs with no dependency stores and the test secret.
    fn inputs<'a>(
        trees: &'a BTreeMap<String, PathBuf>,
        bases: &'a BTreeMap<String, String>,
        fresh: bool,
    ) -> BakeInputs<'a> {
        BakeInputs {
            trees,
            stores: &[],
            bases,
            secret: Path::new("/secret"),
            fresh,
        }
    }

    /// The example image's exported inputs at `dir`.
    fn tree(dir: &str) -> BTreeMap<String, PathBuf> {
        BTreeMap::from([("aiq-agent".to_owned(), PathBuf::from(dir))])
    }

    #[test]
    fn bake_file_tags_labels_and_args() {
        let c = Config::example();
        let bases = BTreeMap::from([(
            "127.0.0.1:5000/library/rust:1.95".to_owned(),
            "sha256:b".to_owned(),
        )]);
        let bake = bake_file(
            &c,
            &c.images,
            &Revision::example(None),
            &inputs(
                &tree("/repo/target/xtask/context/0123456789ab/aiq-agent"),
                &bases,
                true,
            ),
        );
        let target = &bake["target"]["aiq-agent"];
        assert_eq!(
            tags(&c, &c.images[0], &Revision::example(None)),
            [
                "ghcr.io/acme/aiq-agent:0123456789ab",
                "ghcr.io/acme/aiq-agent:latest"
            ]
        );
        assert_eq!(target["args"]["GIT_REVISION"], Revision::example(None).sha);
        assert_eq!(target["args"]["BASE_REGISTRY"], "127.0.0.1:5000/library");
        assert_eq!(target["args"]["EXTRA"], "1");
        let labels = &target["labels"];
        assert_eq!(
            labels["org.opencontainers.image.revision"],
            Revision::example(None).sha
        );
        assert_eq!(
            labels["org.opencontainers.image.created"],
            "2026-11-23T20:00:00Z"
        );
        assert_eq!(labels["org.opencontainers.image.title"], "aiq-agent");
        assert_eq!(labels["org.opencontainers.image.version"], "0123456789ab");
        assert_eq!(
            target["dockerfile"],
            "/repo/target/xtask/context/0123456789ab/aiq-agent/backend/Dockerfile"
        );
        assert_eq!(target["args"]["SOURCE_DATE_EPOCH"], "1795464000");
        let cached = bake_file(
            &c,
            &c.images,
            &Revision::example(None),
            &inputs(&tree("/x"), &bases, false),
        );
        assert!(
            cached["target"]["aiq-agent"]["args"]
                .get("SOURCE_DATE_EPOCH")
                .is_none(),
            "a cached build keeps the epoch out of every step's cache key"
        );
        assert_eq!(
            target["contexts"]["127.0.0.1:5000/library/rust:1.95"],
            "docker-image://127.0.0.1:5000/library/rust:1.95@sha256:b"
        );
        assert_eq!(target["secret"][0], "id=build_key,src=/secret");
        assert_eq!(labels["org.opencontainers.image.source"], "unknown");
        assert_eq!(bake["group"]["default"]["targets"], json!(["aiq-agent"]));
    }

    #[test]
    fn dirty_builds_never_move_latest() {
        let c = Config::example();
        let bake = bake_file(
            &c,
            &c.images,
            &Revision::example(Some("deadbeef")),
            &inputs(&tree("/x"), &BTreeMap::new(), true),
        );
        assert_eq!(
            tags(&c, &c.images[0], &Revision::example(Some("deadbeef"))),
            ["ghcr.io/acme/aiq-agent:0123456789ab-dirty-deadbeef"]
        );
        assert_eq!(bake["target"]["aiq-agent"]["args"]["GIT_DIRTY"], "true");
    }

    #[test]
    fn fresh_by_default_cached_on_request() {
        let c = Config::example();
        let tagged = [(
            &c.images[0],
            tags(&c, &c.images[0], &Revision::example(None)),
        )];
        let fresh = bake_command(
            Path::new("b.json"),
            Path::new("m.json"),
            &tagged,
            &BuildOptions::default(),
            0,
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
            cache_to: vec!["type=registry,ref=r/cache:aiq,mode=max".into()],
            ..BuildOptions::default()
        };
        let cached = bake_command(Path::new("b.json"), Path::new("m.json"), &tagged, &opts, 0);
        assert!(cached.to_string().contains(
            "--set '*.cache-from=type=registry,ref=r/cache:aiq' --set '*.cache-to=type=registry,ref=r/cache:aiq,mode=max'"
        ), "{cached}");
        assert!(
            !fresh.to_string().contains("cache-from"),
            "fresh builds import no cache"
        );
        let retry = BuildOptions {
            retry: true,
            ..BuildOptions::default()
        };
        let retry = bake_command(Path::new("b.json"), Path::new("m.json"), &tagged, &retry, 0);
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
        };
        assert_eq!(
            image.pinned().unwrap(),
            "localhost:5000/aiq-agent@sha256:abc"
        );
    }
}
