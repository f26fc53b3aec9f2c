//! docker buildx: the bake file, the bake command line, its metadata, and the
//! `build.json` hand-off.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    config::{Config, Image, RegistryLogin},
    deps::{self, Store},
    exec::{require_tool, Cmd, Exec},
    exit::refuse,
    git::Revision,
    output::progress_style,
    time::rfc3339,
};

/// Where generated files live: inside `target/`, so they never dirty the
/// tree.
pub fn out_dir(config: &Config) -> PathBuf {
    config.root.join("target").join("xtask")
}

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
}

/// The OCI labels every image carries. `created` is the commit time (or
/// SOURCE_DATE_EPOCH), so the same commit always describes itself the same.
pub fn labels(image: &Image, rev: &Revision, source: &str) -> BTreeMap<String, String> {
    let created = crate::config::source_date_epoch().unwrap_or(rev.commit_time);
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

/// The bake definition for `images`: one target each, tags, labels, the
/// build args that bake the revision into the binaries, and each image's
/// dependency store as its `deps` context.
pub fn bake_file(
    config: &Config,
    images: &[Image],
    rev: &Revision,
    source: &str,
    stores: &[(String, Store)],
) -> serde_json::Value {
    let mut targets = serde_json::Map::new();
    for image in images {
        let mut args = BTreeMap::from([
            ("BASE_REGISTRY".to_owned(), config.base_registry.clone()),
            ("GIT_REVISION".to_owned(), rev.sha.clone()),
            ("GIT_DIRTY".to_owned(), rev.is_dirty().to_string()),
            ("GIT_COMMIT_TIME".to_owned(), rfc3339(rev.commit_time)),
        ]);
        args.extend(image.build_args.clone());
        let mut target = json!({
            "context": config.root.join(&image.context),
            "dockerfile": config.root.join(&image.dockerfile),
            "args": args,
            "labels": labels(image, rev, source),
        });
        if let Some((_, store)) = stores.iter().find(|(name, _)| *name == image.name) {
            target["contexts"] = json!({ "deps": store.dir });
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

/// The `docker buildx bake` line. Tags are given with `--set` rather than in
/// the bake file so the printed line shows exactly what gets tagged. Fresh by default: `--no-cache` so no layer
/// (and no cache mount) survives from an earlier build, `--pull` so base
/// images are re-resolved.
pub fn bake_command(
    bake_file: &Path,
    metadata_file: &Path,
    images: &[(&Image, Vec<String>)],
    opts: &BuildOptions,
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
        .arg(format!("--progress={}", progress_style()));
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
    for (image, tags) in images {
        for tag in tags {
            cmd = cmd.arg("--set").arg(format!("{}.tags={tag}", image.name));
        }
    }
    cmd = cmd.arg(if opts.push { "--push" } else { "--load" });
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

/// Builds (and with `push`, pushes) `images` in one bake session, then
/// writes `target/xtask/build.json`. In a dry run only the bake file is
/// written and the command printed.
pub fn build(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    rev: &Revision,
    opts: &BuildOptions,
) -> Result<Vec<BuiltImage>> {
    let out = out_dir(config);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let source = config
        .source
        .clone()
        .or_else(|| crate::git::origin_url(exec))
        .unwrap_or_else(|| "unknown".into());
    let bake_path = out.join("bake.json");
    let metadata_path = out.join("bake-metadata.json");
    let stores = deps::ensure_all(exec, config, images, opts.offline)?;
    let bake = serde_json::to_string_pretty(&bake_file(config, images, rev, &source, &stores))?;
    std::fs::write(&bake_path, bake).with_context(|| format!("writing {}", bake_path.display()))?;
    let _ = std::fs::remove_file(&metadata_path);

    // Digests exist only in a registry: without a push there is none.
    let digests = if opts.push {
        push(exec, config, images, rev, opts, &bake_path, &metadata_path)?
    } else {
        let tagged: Vec<(&Image, Vec<String>)> =
            images.iter().map(|i| (i, tags(config, i, rev))).collect();
        let cmd = bake_command(&bake_path, &metadata_path, &tagged, opts);
        if let Err(error) = exec.run(&cmd) {
            return Err(explain_base_image_failure(exec, config, images).unwrap_or(error));
        }
        BTreeMap::new()
    };
    let built: Vec<BuiltImage> = images
        .iter()
        .map(|image| BuiltImage::new(config, &image.name, rev, digests.get(&image.name).cloned()))
        .collect();
    for image in &built {
        let kind = if image.digest.is_some() {
            "image_pushed"
        } else {
            "image_built"
        };
        exec.output.event(kind, serde_json::to_value(image)?);
    }
    Ok(built)
}

/// Attempts at a push that fails on the registry's side.
const PUSH_ATTEMPTS: u32 = 3;

/// How a push failed, read from the last lines BuildKit printed: there is
/// no machine-readable failure to parse.
#[derive(Debug, PartialEq, Eq)]
enum PushFailure {
    /// The registry hiccuped (5xx, 429, a dropped connection): retry.
    Transient,
    /// The registry refuses to overwrite an existing tag (ECR's immutable
    /// tags).
    Immutable,
}

fn push_failure(message: &str) -> Option<PushFailure> {
    let message = message.to_ascii_lowercase();
    if message.contains("tag invalid") || message.contains("immutable") {
        return Some(PushFailure::Immutable);
    }
    let transient = [
        "500 internal server error",
        "502 bad gateway",
        "503 service unavailable",
        "504 gateway timeout",
        "429 too many requests",
        "connection reset by peer",
        "i/o timeout",
        "tls handshake timeout",
        "unexpected eof",
    ];
    let pushing = message.contains("pushing");
    (pushing && transient.iter().any(|t| message.contains(t))).then_some(PushFailure::Transient)
}

/// Builds and pushes in one bake, retrying what the registry gets wrong:
/// a transient failure is retried (up to [`PUSH_ATTEMPTS`], with backoff)
/// from BuildKit's cache of this very build, so nothing is compiled twice;
/// immutable tags skip `:latest` with a warning, and an existing SHA tag
/// that already holds this exact build counts as published (another build
/// under it is an error). Returns each image's manifest digest.
fn push(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    rev: &Revision,
    opts: &BuildOptions,
    bake_path: &Path,
    metadata_path: &Path,
) -> Result<BTreeMap<String, String>> {
    let mut digests = BTreeMap::new();
    let mut remaining: Vec<Image> = images.to_vec();
    let mut opts = opts.clone();
    // Immutable tags turn `push_latest` off for the attempts that follow.
    let mut config = config.clone();
    let mut failures = 0;
    loop {
        let tagged: Vec<(&Image, Vec<String>)> = remaining
            .iter()
            .map(|i| (i, tags(&config, i, rev)))
            .collect();
        let cmd = bake_command(bake_path, metadata_path, &tagged, &opts);
        let error = match exec.run_keeping_stderr(&cmd) {
            Ok(()) if exec.dry_run => return Ok(digests),
            Ok(()) => {
                let metadata = std::fs::read_to_string(metadata_path)
                    .with_context(|| format!("reading {}", metadata_path.display()))?;
                digests.extend(parse_metadata(&metadata, &remaining)?);
                return Ok(digests);
            }
            Err(error) => error,
        };
        failures += 1;
        // The message is the command line, then the last lines it printed.
        let printed = format!("{error:#}");
        match push_failure(printed.split_once('\n').map_or("", |(_, tail)| tail)) {
            Some(PushFailure::Immutable) if config.push_latest && !rev.is_dirty() => {
                exec.output.warn("the registry refuses to move a tag (immutable tags): pushing again without :latest, which nothing deployed uses (set push_latest = false for this registry)");
                config.push_latest = false;
            }
            Some(PushFailure::Immutable) => {
                for image in &remaining {
                    if let Some(digest) = already_published(exec, &config, image, rev)? {
                        digests.insert(image.name.clone(), digest);
                    }
                }
                remaining.retain(|i| !digests.contains_key(&i.name));
                if remaining.is_empty() {
                    return Ok(digests);
                }
            }
            Some(PushFailure::Transient) if failures < PUSH_ATTEMPTS => {
                let wait = 2u64.pow(failures);
                exec.output.warn(&format!(
                    "push failed on the registry's side (attempt {failures} of {PUSH_ATTEMPTS}); retrying in {wait}s from this build's cache"
                ));
                std::thread::sleep(std::time::Duration::from_secs(wait));
            }
            _ => {
                return Err(explain_base_image_failure(exec, &config, images).unwrap_or(error));
            }
        }
        if failures > PUSH_ATTEMPTS {
            return Err(error.context("the push kept failing"));
        }
        // What this run built is in BuildKit's cache: reuse it rather than
        // compile again. The result is the same image, byte for byte.
        opts.retry = true;
    }
}

/// When `image`'s SHA tag already exists in the registry: its digest if it
/// holds the image just built (same config, so same content), an error if
/// it holds another build. `None` when the tag is not there.
fn already_published(
    exec: &Exec,
    config: &Config,
    image: &Image,
    rev: &Revision,
) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Manifest {
        config: Descriptor,
    }
    #[derive(Deserialize)]
    struct LocalImage {
        #[serde(rename = "Id")]
        id: String,
    }
    let reference = config.image_ref(&image.name, &rev.tag());
    let raw = Cmd::new("docker").args(["buildx", "imagetools", "inspect", "--raw", &reference]);
    let Ok(manifest) = exec.read(&raw) else {
        return Ok(None);
    };
    let remote: Manifest = serde_json::from_str(&manifest)
        .with_context(|| format!("parsing the manifest of {reference}"))?;
    let local = exec
        .read(&Cmd::new("docker").args(["image", "inspect", "--format", "{{json .}}", &reference]))
        .ok()
        .and_then(|json| serde_json::from_str::<LocalImage>(&json).ok())
        .with_context(|| format!("{reference} already exists and the registry's tags are immutable; this build is not in the local image store to compare it with (a remote builder?)"))?;
    if local.id != remote.config.digest {
        bail!(
            "{reference} already exists with another build (config {}; this build is {}) and the registry's tags are immutable: deploy the published one (`cargo xtask rollback --to {}`), or commit and build a new revision",
            remote.config.digest,
            local.id,
            rev.short()
        );
    }
    let (digest, _) = resolve(exec, &reference)?;
    exec.output.warn(&format!(
        "{reference} already holds this exact build ({digest}): counted as published"
    ));
    Ok(Some(digest))
}

/// Writes `target/xtask/build.json`: what `deploy --from` deploys.
pub fn write_build_file(config: &Config, rev: &Revision, built: &[BuiltImage]) -> Result<PathBuf> {
    let file = BuildFile {
        revision: rev.sha.clone(),
        tag: rev.tag(),
        images: built.to_vec(),
    };
    let path = out_dir(config).join("build.json");
    std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What the registry holds under `reference`: its manifest digest and the
/// revision label of its image config (one `imagetools inspect`).
pub fn resolve(exec: &Exec, reference: &str) -> Result<(String, Option<String>)> {
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Inspected {
        manifest: Descriptor,
        #[serde(default)]
        image: serde_json::Value,
    }
    let json = exec.read(&Cmd::new("docker").args([
        "buildx",
        "imagetools",
        "inspect",
        reference,
        "--format",
        "{{json .}}",
    ]))?;
    let Inspected { manifest, image } = serde_json::from_str(&json)
        .with_context(|| format!("parsing `imagetools inspect` of {reference}"))?;
    // A single image answers its config; an index answers one per platform.
    let config = if image.get("config").is_some() {
        Some(&image)
    } else {
        image.as_object().and_then(|m| m.values().next())
    };
    let revision = config
        .and_then(|c| c["config"]["Labels"]["org.opencontainers.image.revision"].as_str())
        .map(str::to_owned);
    Ok((manifest.digest, revision))
}

/// How to log in to `config.registry`: the configured `registry_login`,
/// else for an ECR registry `aws ecr get-login-password --region R` as
/// user `AWS`; none for others (Docker's stored login is used).
fn registry_login(config: &Config) -> Option<RegistryLogin> {
    if let Some(login) = &config.registry_login {
        return Some(login.clone());
    }
    let host = crate::registry::host_of(&config.registry);
    let parts: Vec<&str> = host.split('.').collect();
    let is_ecr = parts.len() == 6
        && parts[1] == "dkr"
        && parts[2] == "ecr"
        && host.ends_with(".amazonaws.com");
    is_ecr.then(|| RegistryLogin {
        username: "AWS".into(),
        password_command: ["aws", "ecr", "get-login-password", "--region", parts[3]]
            .map(String::from)
            .to_vec(),
    })
}

/// Logs Docker in to the registry when it needs a login (see
/// [`registry_login`]): the password goes from the command's stdout to
/// `docker login --password-stdin`, never into a command line or a log.
/// Run before anything reads the registry: a fresh CI runner has no login.
pub fn login(exec: &Exec, config: &Config) -> Result<()> {
    let Some(login) = registry_login(config) else {
        return Ok(());
    };
    let host = crate::registry::host_of(&config.registry);
    let (program, args) = login
        .password_command
        .split_first()
        .ok_or_else(|| refuse("registry_login.password_command is empty"))?;
    require_tool(program, &format!("registry_login runs `{program}`"))?;
    let password_command = Cmd::new(program).args(args);
    let docker_login = Cmd::new("docker").args([
        "login",
        "--username",
        &login.username,
        "--password-stdin",
        host,
    ]);
    if exec.dry_run {
        exec.output
            .result(&format!("$ {password_command} | {docker_login}"));
        return Ok(());
    }
    let password = exec.read(&password_command).map_err(|e| {
        refuse(format!(
            "the registry login's password command failed: {e:#}"
        ))
    })?;
    exec.run(&docker_login.hidden_stdin(password))
        .map_err(|e| refuse(format!("docker login to {host} failed: {e:#}")))
}

/// The base images one Dockerfile names as `FROM ${BASE_REGISTRY}/name:tag`.
fn base_images(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let from = words.next()?;
            if !from.eq_ignore_ascii_case("FROM") {
                return None;
            }
            words
                .find(|w| !w.starts_with("--"))?
                .strip_prefix("${BASE_REGISTRY}/")
                .map(str::to_owned)
        })
        .collect()
}

/// After a failed build: if a base image cannot be resolved, say so in one
/// line with the fix, instead of leaving the user to dig through BuildKit's
/// log.
fn explain_base_image_failure(
    exec: &Exec,
    config: &Config,
    images: &[Image],
) -> Option<anyhow::Error> {
    for base in base_images_of(config, images).ok()? {
        let reference = format!("{}/{base}", config.base_registry);
        if !can_pull(exec, &reference) {
            return Some(anyhow::anyhow!(
                "base image {reference} cannot be pulled: point XTASK_BASE_REGISTRY at a mirror that has it (`cargo xtask mirror` seeds one on 127.0.0.1:5000; then XTASK_BASE_REGISTRY=127.0.0.1:5000/library)"
            ));
        }
    }
    None
}

/// Whether the registry serves `reference` (a read of its manifest).
pub fn can_pull(exec: &Exec, reference: &str) -> bool {
    exec.succeeds(&Cmd::new("docker").args(["buildx", "imagetools", "inspect", "--raw", reference]))
}

/// The base images `images`' Dockerfiles name, each once.
pub fn base_images_of(config: &Config, images: &[Image]) -> Result<Vec<String>> {
    let mut bases = Vec::new();
    for image in images {
        let path = config.root.join(&image.dockerfile);
        let dockerfile = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for base in base_images(&dockerfile) {
            if !bases.contains(&base) {
                bases.push(base);
            }
        }
    }
    Ok(bases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_registries_log_in_with_aws_and_a_configured_login_wins() {
        let mut c = config();
        assert_eq!(registry_login(&c), None, "ghcr.io: Docker's stored login");
        c.registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/aiq".into();
        let ecr = registry_login(&c).unwrap();
        assert_eq!(ecr.username, "AWS");
        assert_eq!(
            ecr.password_command,
            ["aws", "ecr", "get-login-password", "--region", "eu-west-1"]
        );
        let configured = RegistryLogin {
            username: "oauth2accesstoken".into(),
            password_command: vec!["gcloud".into(), "auth".into(), "print-access-token".into()],
        };
        c.registry_login = Some(configured.clone());
        assert_eq!(registry_login(&c), Some(configured));
    }

    fn config() -> Config {
        Config {
            root: "/repo".into(),
            registry: "ghcr.io/acme".into(),
            base_registry: "127.0.0.1:5000/library".into(),
            push_latest: true,
            source: None,
            namespace: "aiq-agent".into(),
            manifests: "k8s".into(),
            context: None,
            rollout_order: vec![],
            environment: None,
            seed_args: BTreeMap::new(),
            cache_from: vec![],
            cache_to: vec![],
            registry_login: None,
            images: vec![Image {
                name: "aiq-agent".into(),
                dockerfile: "backend/Dockerfile".into(),
                context: ".".into(),
                build_args: BTreeMap::from([("EXTRA".into(), "1".into())]),
                seed: None,
                lockfile: None,
            }],
        }
    }

    fn rev(dirty: Option<&str>) -> Revision {
        Revision {
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            commit_time: 1_795_464_000,
            dirty_hash: dirty.map(Into::into),
        }
    }

    #[test]
    fn bake_file_tags_labels_and_args() {
        let c = config();
        let bake = bake_file(&c, &c.images, &rev(None), "https://example.com/repo", &[]);
        let target = &bake["target"]["aiq-agent"];
        assert_eq!(
            tags(&c, &c.images[0], &rev(None)),
            [
                "ghcr.io/acme/aiq-agent:0123456789ab",
                "ghcr.io/acme/aiq-agent:latest"
            ]
        );
        assert_eq!(target["args"]["GIT_REVISION"], rev(None).sha);
        assert_eq!(target["args"]["BASE_REGISTRY"], "127.0.0.1:5000/library");
        assert_eq!(target["args"]["EXTRA"], "1");
        let labels = &target["labels"];
        assert_eq!(labels["org.opencontainers.image.revision"], rev(None).sha);
        assert_eq!(
            labels["org.opencontainers.image.created"],
            "2026-11-23T20:00:00Z"
        );
        assert_eq!(labels["org.opencontainers.image.title"], "aiq-agent");
        assert_eq!(labels["org.opencontainers.image.version"], "0123456789ab");
        assert_eq!(target["dockerfile"], "/repo/backend/Dockerfile");
        assert_eq!(bake["group"]["default"]["targets"], json!(["aiq-agent"]));
    }

    #[test]
    fn dirty_builds_never_move_latest() {
        let c = config();
        let bake = bake_file(&c, &c.images, &rev(Some("deadbeef")), "x", &[]);
        assert_eq!(
            tags(&c, &c.images[0], &rev(Some("deadbeef"))),
            ["ghcr.io/acme/aiq-agent:0123456789ab-dirty-deadbeef"]
        );
        assert_eq!(bake["target"]["aiq-agent"]["args"]["GIT_DIRTY"], "true");
    }

    #[test]
    fn fresh_by_default_cached_on_request() {
        let c = config();
        let tagged = [(&c.images[0], tags(&c, &c.images[0], &rev(None)))];
        let fresh = bake_command(
            Path::new("b.json"),
            Path::new("m.json"),
            &tagged,
            &BuildOptions::default(),
        );
        assert!(fresh
            .to_string()
            .contains("--set aiq-agent.tags=ghcr.io/acme/aiq-agent:0123456789ab --set aiq-agent.tags=ghcr.io/acme/aiq-agent:latest"));
        assert!(fresh.argv().iter().any(|a| a == "--no-cache"));
        assert!(fresh.argv().iter().any(|a| a == "--pull"));
        assert!(fresh.argv().iter().any(|a| a == "--load"));
        let opts = BuildOptions {
            cache: true,
            push: true,
            builder: Some("remote".into()),
            cache_from: vec!["type=registry,ref=r/cache:aiq".into()],
            cache_to: vec!["type=registry,ref=r/cache:aiq,mode=max".into()],
            ..BuildOptions::default()
        };
        let cached = bake_command(Path::new("b.json"), Path::new("m.json"), &tagged, &opts);
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
        let retry = bake_command(Path::new("b.json"), Path::new("m.json"), &tagged, &retry);
        assert!(
            retry.to_string().contains(" --pull ") && !retry.to_string().contains("--no-cache")
        );
        assert!(!cached
            .argv()
            .iter()
            .any(|a| a == "--no-cache" || a == "--pull"));
        assert!(cached.to_string().contains("--builder remote"));
        assert!(cached.argv().iter().any(|a| a == "--push"));
        assert_eq!(cached.argv().last().unwrap(), "aiq-agent");
    }

    #[test]
    fn push_failures_are_told_apart() {
        let hiccup = "#8 pushing r/x:1 with docker\nERROR: received unexpected HTTP status: 503 Service Unavailable";
        assert_eq!(push_failure(hiccup), Some(PushFailure::Transient));
        let ecr = "ERROR: tag invalid: The image tag 'latest' already exists in the 'aiq' repository and cannot be overwritten because the repository is immutable.";
        assert_eq!(push_failure(ecr), Some(PushFailure::Immutable));
        let compile = "ERROR: failed to solve: process \"/bin/sh -c cargo build\" did not complete successfully: exit code: 101";
        assert_eq!(push_failure(compile), None);
        let base =
            "ERROR: failed to solve: 127.0.0.1:5000/library/rust:1.95: 503 Service Unavailable";
        assert_eq!(push_failure(base), None, "a base image pull is not a push");
    }

    #[test]
    fn metadata_digests_are_read_per_target() {
        let c = config();
        let json = r#"{"aiq-agent": {"containerimage.digest": "sha256:abc", "image.name": "x"}, "buildx.build.warnings": []}"#;
        let digests = parse_metadata(json, &c.images).unwrap();
        assert_eq!(digests["aiq-agent"], "sha256:abc");
        assert!(parse_metadata("{}", &c.images).is_err());
    }

    #[test]
    fn base_images_come_from_from_lines() {
        let dockerfile = "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/rust:1.95-bookworm AS builder\nRUN x\nfrom --platform=linux/amd64 ${BASE_REGISTRY}/debian:bookworm-slim\nFROM scratch\n";
        assert_eq!(
            base_images(dockerfile),
            ["rust:1.95-bookworm", "debian:bookworm-slim"]
        );
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
        };
        assert_eq!(
            image.pinned().unwrap(),
            "localhost:5000/aiq-agent@sha256:abc"
        );
    }
}
