//! The bake file and the `docker buildx bake` line: each image's target
//! (the exported commit as the context, its dependency store as the `deps`
//! context, base images pinned by digest), its input key and tags, the
//! reproducible output, and the metadata buildx writes back. `docker.rs`
//! plans and runs a build with them; `push.rs` retries a push with them.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::{
    config::{Config, Image},
    deps::Store,
    exec::Cmd,
    git::Revision,
    time::rfc3339,
};

/// How to build: fresh or cached, pushed or not, on which builder.
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
}
