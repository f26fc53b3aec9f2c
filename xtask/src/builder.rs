//! The pinned BuildKit every build runs on: a buildx `docker-container`
//! builder on BuildKit of the configured version, with the host's network
//! (so 127.0.0.1 is the machine's, where the local registry is). Docker's
//! own builder (BuildKit 0.13 inside dockerd) cannot give reproducible
//! images or export a registry cache (README, "Provable builds").
//!
//! The builder runs `moby/buildkit:<version>` where that image can be
//! pulled (a GitHub runner); elsewhere an equivalent the xtask makes once:
//! `buildkitd` and `buildctl` compiled from the Go module proxy, Debian's
//! runc, on the base-image mirror's Debian, pushed to the local registry.
//! It is created once, under a lock, and left running between commands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{
    config::Config,
    exec::{require_tool, Cmd, Exec},
    registry,
};

/// The official image's repository, where it can be pulled.
const OFFICIAL_IMAGE: &str = "moby/buildkit";

/// The builder's name for `version`: a new version is a new builder.
pub fn name(version: &str) -> String {
    format!("xtask-buildkit-{}", version.replace('.', "-"))
}

/// The builder every build uses unless `--builder` names another: created
/// (under a lock, so parallel runs make it once) and started if needed.
/// Returns its name. A dry run prints what it would create.
pub fn ensure(exec: &Exec, config: &Config) -> Result<String> {
    let builder = name(&config.buildkit);
    let dir = state_dir(&exec.env, &config.buildkit)?;
    let settings = dir.join("buildkitd.toml");
    let wanted = buildkitd_config(config.build_cache_gb);
    // Made with other settings (an older xtask, another cache limit): made
    // again, since buildx reads them only when it creates a builder.
    let current = || std::fs::read_to_string(&settings).is_ok_and(|s| s == wanted);
    if exec.dry_run {
        // Only asked whether it exists: `--bootstrap` would start it.
        let exists = exec.succeeds(&inspect(&builder));
        if exists && !current() {
            exec.run(&Cmd::new("docker").args(["buildx", "rm", "--force", &builder]))?;
        }
        if !exists || !current() {
            exec.run(&create(
                &builder,
                &official_image(&config.buildkit),
                &[],
                &settings,
            ))?;
        }
        return Ok(builder);
    }
    if current() && running(exec, &builder) {
        return Ok(builder);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("lock"))
        .with_context(|| format!("creating {}", dir.join("lock").display()))?;
    lock.lock()
        .context("waiting for the BuildKit builder's lock")?;
    if current() && running(exec, &builder) {
        return Ok(builder);
    }
    exec.step(
        format!("BuildKit {} builder {builder} (once)", config.buildkit),
        || {
            // A builder whose container is gone, or made with other
            // settings, is removed (its cache with it) and made again.
            if exec.succeeds(&inspect(&builder)) {
                exec.run(&Cmd::new("docker").args(["buildx", "rm", "--force", &builder]))?;
            }
            let image = image(exec, config)?;
            std::fs::write(&settings, &wanted)
                .with_context(|| format!("writing {}", settings.display()))?;
            exec.run(&create(&builder, &image, &[], &settings))
        },
    )?;
    Ok(builder)
}

/// The pinned builder's BuildKit settings: garbage collection keeps its
/// build cache under `limit_gb` (BuildKit's `maxUsedSpace`), so repeated
/// builds do not fill the disk.
pub fn buildkitd_config(limit_gb: u32) -> String {
    format!(
        "# Written by cargo xtask: the build cache stays under build_cache_gb.\n[worker.oci]\n  gc = true\n  maxUsedSpace = \"{limit_gb}GB\"\n"
    )
}

/// `docker buildx create` of a builder on `image`, with the host's network,
/// `extra` driver options (e.g. `cpuset-cpus=0`) and BuildKit's settings
/// from `settings`.
pub fn create(builder: &str, image: &str, extra: &[&str], settings: &Path) -> Cmd {
    let mut cmd = Cmd::new("docker").args([
        "buildx",
        "create",
        "--name",
        builder,
        "--driver",
        "docker-container",
        "--driver-opt",
        &format!("image={image}"),
        "--driver-opt",
        "network=host",
    ]);
    for opt in extra {
        cmd = cmd.args(["--driver-opt", opt]);
    }
    cmd.arg("--buildkitd-config")
        .arg(settings.display().to_string())
        .arg("--bootstrap")
}

/// Whether `builder` exists and its BuildKit answers (starting its
/// container if it was stopped, as after a reboot).
fn running(exec: &Exec, builder: &str) -> bool {
    exec.succeeds(&bootstrap(builder))
}

/// What an input key names a builder by: `BuildKit <version> <platform>`,
/// its BuildKit version and the platform it builds for by default (its
/// first, native one); so one version on one platform gives one key, on
/// whichever machine or builder. `None` when buildx does not say (a
/// builder not started), or its nodes differ. Its callers have started
/// the builder already (`ensure`, `reachable`).
pub fn identity(exec: &Exec, builder: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Node {
        #[serde(rename = "Version", default)]
        version: String,
        #[serde(rename = "Platforms", default)]
        platforms: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Builder {
        #[serde(rename = "Name")]
        name: String,
        #[serde(rename = "Nodes", default)]
        nodes: Vec<Node>,
    }
    if exec.dry_run {
        return None;
    }
    // `--format json` is buildx 0.13's; an older one names no version.
    let Ok(listed) = exec.read(&Cmd::new("docker").args(["buildx", "ls", "--format", "json"]))
    else {
        return None;
    };
    let mut identities: Vec<String> = listed
        .lines()
        .filter_map(|line| serde_json::from_str::<Builder>(line).ok())
        .filter(|b| b.name == builder)
        .flat_map(|b| b.nodes)
        .filter_map(|n| {
            let platform = n.platforms.first()?;
            (!n.version.is_empty()).then(|| format!("BuildKit {} {platform}", n.version))
        })
        .collect();
    identities.dedup();
    match identities.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Refuses (exit 2) a builder buildx does not know or whose BuildKit does
/// not answer within a minute: `--bootstrap` connects to a remote one
/// (and would start a stopped container, so a dry run only asks buildx
/// whether it knows the builder).
pub fn reachable(exec: &Exec, builder: &str) -> Result<()> {
    let probe = if exec.dry_run {
        inspect(builder)
    } else {
        Cmd::new("timeout")
            .arg("60")
            .args(bootstrap(builder).argv().iter().cloned())
    };
    exec.read(&probe).map(|_| ()).map_err(|e| {
        crate::exit::refuse(format!(
            "builder {builder} cannot be reached, nothing was built: {e:#}"
        ))
    })
}

/// `docker buildx inspect BUILDER`: whether buildx knows it.
pub fn inspect(builder: &str) -> Cmd {
    Cmd::new("docker").args(["buildx", "inspect", builder])
}

/// `docker buildx inspect --bootstrap BUILDER`: whether its BuildKit
/// answers, starting a stopped container (or connecting to a remote one).
pub fn bootstrap(builder: &str) -> Cmd {
    inspect(builder).arg("--bootstrap")
}

/// The container of the `docker-container` builder `name`'s only node.
fn container(name: &str) -> String {
    format!("buildx_buildkit_{name}0")
}

/// The image the builder runs: the official one when present or pullable,
/// else the xtask's own, made now if the local registry lacks it.
fn image(exec: &Exec, config: &Config) -> Result<String> {
    let official = official_image(&config.buildkit);
    let present = exec.succeeds(&Cmd::new("docker").args(["image", "inspect", &official]));
    if present || crate::bases::can_pull(exec, &official) {
        return Ok(official);
    }
    let registry = registry::ensure_local(exec)?;
    let reference = format!("{registry}/xtask/buildkit:{}", config.buildkit);
    if registry::holds(&registry, "xtask/buildkit", &config.buildkit) {
        eprintln!("{reference} is in the local registry");
        return Ok(reference);
    }
    eprintln!("{official} cannot be pulled: making {reference} from BuildKit's module");
    let bin = binaries(exec, &config.buildkit)?;
    let dir = state_dir(&exec.env, &config.buildkit)?.join("image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for tool in ["buildkitd", "buildctl"] {
        std::fs::copy(bin.join(tool), dir.join(tool)).with_context(|| format!("copying {tool}"))?;
    }
    // Debian's runc, with the one library it adds to the base's.
    let runc = require_tool("runc", "install it (`apt-get install runc`)")?;
    std::fs::copy(&runc, dir.join("runc")).context("copying runc")?;
    std::fs::copy(LIBSECCOMP, dir.join("libseccomp.so.2"))
        .with_context(|| format!("copying {LIBSECCOMP} (apt-get install libseccomp2)"))?;
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE)?;
    let base = debian_base(exec, config, &registry)?;
    // Docker's own builder makes this one image: it is what the pinned
    // builder runs on, so it cannot build itself.
    exec.run(
        &Cmd::new("docker")
            .args(["buildx", "build", "--builder", "default", "--load"])
            .args([
                "--label",
                &format!("{}=buildkit", crate::labels::MADE_LABEL),
            ])
            .args(["--build-arg", &format!("BASE={base}"), "--tag", &reference])
            .arg(dir.display().to_string()),
    )?;
    exec.run(&Cmd::new("docker").args(["push", "--quiet", &reference]))?;
    Ok(reference)
}

/// The pinned BuildKit image as the local registry serves it, copied
/// there when the builder runs the official one: what a cluster whose
/// nodes pull from this machine's registry runs, so no pod names Docker
/// Hub. A dry run names it and makes or copies nothing.
pub fn local_image(exec: &Exec, config: &Config) -> Result<String> {
    let registry = registry::ensure_local(exec)?;
    let local = format!("{registry}/xtask/buildkit:{}", config.buildkit);
    if exec.dry_run {
        return Ok(local);
    }
    let image = image(exec, config)?;
    if image != local {
        if !exec.succeeds(&Cmd::new("docker").args(["image", "inspect", &image])) {
            exec.run(&Cmd::new("docker").args(["pull", "--quiet", &image]))?;
        }
        exec.run(&Cmd::new("docker").args(["tag", &image, &local]))?;
        exec.run(&Cmd::new("docker").args(["push", "--quiet", &local]))?;
    }
    Ok(local)
}

/// The Debian the image is made on: the configured base registry's, else
/// the local mirror's (`cargo xtask mirror`).
fn debian_base(exec: &Exec, config: &Config, local: &str) -> Result<String> {
    let configured = format!("{}/{DEBIAN}", config.base_registry);
    if crate::bases::can_pull(exec, &configured) {
        return Ok(configured);
    }
    let (name, tag) = DEBIAN.split_once(':').expect("a tag");
    if registry::holds(local, &format!("library/{name}"), tag) {
        return Ok(format!("{local}/library/{DEBIAN}"));
    }
    Err(crate::exit::refuse(format!(
        "neither moby/buildkit nor {configured} can be pulled, so there is nothing to run the pinned BuildKit on: run `cargo xtask mirror` (root, debootstrap) to seed {local}/library, or set XTASK_BASE_REGISTRY to a registry that has {DEBIAN}"
    )))
}

const DEBIAN: &str = "debian:bookworm-slim";

/// The official image of `version` (`moby/buildkit:<version>`).
pub fn official_image(version: &str) -> String {
    format!("{OFFICIAL_IMAGE}:{version}")
}

const LIBSECCOMP: &str = "/usr/lib/x86_64-linux-gnu/libseccomp.so.2";

/// The same layout as the official image: buildkitd as the entrypoint, its
/// state in a volume.
const DOCKERFILE: &str = "ARG BASE\nFROM ${BASE}\nCOPY buildkitd buildctl runc /usr/bin/\nCOPY libseccomp.so.2 /usr/lib/x86_64-linux-gnu/\nVOLUME /var/lib/buildkit\nENTRYPOINT [\"buildkitd\"]\n";

/// Where a version's binaries, image files and lock live.
fn state_dir(env: &crate::env::Env, version: &str) -> Result<PathBuf> {
    Ok(crate::cache::dir(env)?.join("buildkit").join(version))
}

/// `buildkitd` and `buildctl` of `version`, compiled once into the cache.
/// `go install github.com/moby/buildkit/cmd/buildkitd@VERSION` is refused
/// (the module's go.mod has `exclude` directives), so they are built inside
/// a copy of the module.
pub fn binaries(exec: &Exec, version: &str) -> Result<PathBuf> {
    let bin = state_dir(&exec.env, version)?.join("bin");
    if crate::cache::verify(exec, &bin, &["buildkitd", "buildctl"])? {
        return Ok(bin);
    }
    require_tool(
        "go",
        "install Go (https://go.dev/dl/): BuildKit is compiled from its module where moby/buildkit cannot be pulled",
    )?;
    let module = crate::gomod::download(exec, &format!("github.com/moby/buildkit@{version}"))?
        .dir
        .context("`go mod download -json` gave no Dir")?;
    let copy = state_dir(&exec.env, version)?.join("module");
    let partial = state_dir(&exec.env, version)?.join("bin.partial");
    for dir in [&copy, &partial] {
        if dir.exists() {
            exec.run(&Cmd::new("chmod").args(["-R", "u+w"]).arg(path(dir)))?;
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    exec.run(&Cmd::new("cp").args(["-r", &module]).arg(path(&copy)))?;
    exec.run(&Cmd::new("chmod").args(["-R", "u+w"]).arg(path(&copy)))?;
    let _dir = exec.sh.push_dir(&copy);
    let _cgo = exec.sh.push_env("CGO_ENABLED", "0");
    let _mod = exec.sh.push_env("GOFLAGS", "-mod=mod");
    let ldflags = format!(
        "-s -w -X github.com/moby/buildkit/version.Version={version} -X github.com/moby/buildkit/version.Revision={version}"
    );
    exec.run(
        &Cmd::new("go")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(format!("{}/", partial.display()))
            .args(["./cmd/buildkitd", "./cmd/buildctl"]),
    )?;
    // Moved into place whole, so an interrupted build never looks cached.
    if bin.exists() {
        std::fs::remove_dir_all(&bin).with_context(|| format!("removing {}", bin.display()))?;
    }
    std::fs::rename(&partial, &bin)
        .with_context(|| format!("moving the binaries to {}", bin.display()))?;
    std::fs::remove_dir_all(&copy).ok();
    crate::cache::record(exec, &bin)?;
    Ok(bin)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// What the builder `name`'s cache holds on disk (the volume buildx made
/// for its state), if Docker says.
pub fn cache_bytes(exec: &Exec, name: &str) -> Option<u64> {
    volume_size(exec, &format!("{}_state", container(name)))
}

/// What the cache records of the `docker-container` builder `name` hold,
/// as BuildKit counts them for `--keep-storage` (its own `buildctl du`, as
/// JSON; the volume holds more: the layers' compressed blobs, its
/// databases).
pub fn records_bytes(exec: &Exec, name: &str) -> Result<u64> {
    #[derive(serde::Deserialize)]
    struct Record {
        size: u64,
    }
    let text = exec.read(&Cmd::new("docker").args([
        "exec",
        &container(name),
        "buildctl",
        "du",
        "--format",
        "{{json .}}",
    ]))?;
    // No records: `null`.
    let records: Option<Vec<Record>> =
        serde_json::from_str(&text).with_context(|| format!("parsing {name}'s `buildctl du`"))?;
    Ok(records.unwrap_or_default().iter().map(|r| r.size).sum())
}

/// Trims the builder `name`'s cache to at most `keep` bytes, the least
/// recently used first (`keep` 0: all of it).
pub fn trim(exec: &Exec, name: &str, keep: u64) -> Result<()> {
    exec.run(
        &Cmd::new("docker")
            .args(["buildx", "prune", "--builder", name, "--force", "--all"])
            .args(["--keep-storage", &keep.to_string()]),
    )
}

/// A Docker volume's size, from `docker system df`'s JSON.
fn volume_size(exec: &Exec, name: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Volume {
        #[serde(rename = "Name")]
        name: String,
        #[serde(rename = "Size")]
        size: String,
    }
    let text = exec
        .read(&Cmd::new("docker").args(["system", "df", "--verbose", "--format", "json"]))
        .ok()?;
    let df: serde_json::Value = serde_json::from_str(&text).ok()?;
    let volumes: Vec<Volume> = serde_json::from_value(df["Volumes"].clone()).ok()?;
    volumes
        .into_iter()
        .find(|v| v.name == name)
        .and_then(|v| parse_size(&v.size))
}

/// Docker's sizes as it prints them: `1.5GB`, `12.3MB`, `0B` (powers of
/// 1000).
fn parse_size(text: &str) -> Option<u64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let factor = match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    Some((number.trim().parse::<f64>().ok()? * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_sizes_read_in_powers_of_1000() {
        assert_eq!(parse_size("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_size("12.3MB"), Some(12_300_000));
        assert_eq!(parse_size("0B"), Some(0));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn a_builder_is_named_after_its_version() {
        assert_eq!(name("v0.34.2"), "xtask-buildkit-v0-34-2");
        let cmd = create(
            "b",
            "img:1",
            &["cpuset-cpus=0"],
            Path::new("/c/buildkitd.toml"),
        )
        .to_string();
        assert!(cmd.contains("--driver docker-container --driver-opt image=img:1 --driver-opt network=host --driver-opt cpuset-cpus=0 --buildkitd-config /c/buildkitd.toml --bootstrap"), "{cmd}");
        assert!(buildkitd_config(10).contains("maxUsedSpace = \"10GB\""));
    }
}
