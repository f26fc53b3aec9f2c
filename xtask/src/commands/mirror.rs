//! `cargo xtask mirror`: seeds a local registry with the base images the
//! Dockerfiles name, built from Debian's packages and this machine's Rust
//! toolchain and Node.js, for machines that cannot reach Docker Hub.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    config::{Config, Overrides},
    docker,
    exec::{require_tool, Cmd, Exec},
    exit::refuse,
    registry,
};

const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Seed a local base-image mirror (no Docker Hub needed); use it with XTASK_BASE_REGISTRY=127.0.0.1:5000/library
#[derive(Args, Debug, Default)]
pub struct Mirror {
    /// Rebuild images the mirror already has
    #[arg(long)]
    pub force: bool,
}

impl Mirror {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let config = Config::load(exec, &Overrides::default())?;
        exec.sh.change_dir(&config.root);
        docker::preflight(exec)?;
        let registry = registry::ensure_local(exec)?;
        seed(exec, &config, &registry, self.force)?;
        eprintln!(
            "base images are in {registry}/library: export XTASK_BASE_REGISTRY={registry}/library"
        );
        Ok(())
    }
}

/// The base registry `up` and `test` build on: the configured one when it
/// serves every base image; otherwise the local mirror in `registry`, seeded
/// now if it lacks one and this machine can (root and debootstrap). `build`
/// and `deploy` never call this: an image for an environment is built only
/// on the bases its configuration names.
pub fn usable_base_registry(exec: &Exec, config: &Config, registry: &str) -> Result<String> {
    let bases = crate::bases::base_images_of(config, &config.images)?;
    let mirror = format!("{registry}/library");
    if config.base_registry != mirror
        && bases
            .iter()
            .all(|base| crate::bases::can_pull(exec, &format!("{}/{base}", config.base_registry)))
    {
        return Ok(config.base_registry.clone());
    }
    let mirrored = |base: &String| {
        base.split_once(':').is_some_and(|(name, tag)| {
            registry::has_image(registry, &format!("library/{name}"), tag)
        })
    };
    if bases.iter().all(mirrored) {
        if config.base_registry != mirror {
            eprintln!(
                "base images cannot be pulled from {}; using the local mirror {mirror}",
                config.base_registry
            );
        }
        return Ok(mirror);
    }
    if !crate::exec::is_root() || which::which("debootstrap").is_err() {
        return Err(refuse(format!(
            "base images cannot be pulled from {} and the local mirror lacks some: run `cargo xtask mirror` as root (it needs debootstrap), or set XTASK_BASE_REGISTRY to a registry that has {}",
            config.base_registry,
            bases.join(", ")
        )));
    }
    eprintln!(
        "base images cannot be pulled from {}; seeding the local mirror {mirror} (debootstrap, once)",
        config.base_registry
    );
    seed(exec, config, registry, false)?;
    Ok(mirror)
}

/// Builds and pushes every base image the Dockerfiles name that the registry
/// at `registry` does not have yet.
pub fn seed(exec: &Exec, config: &Config, registry: &str, force: bool) -> Result<()> {
    for base in crate::bases::base_images_of(config, &config.images)? {
        let (name, tag) = base
            .split_once(':')
            .with_context(|| format!("base image {base} has no tag"))?;
        if !force && registry::has_image(registry, &format!("library/{name}"), tag) {
            eprintln!("{registry}/library/{base}: already seeded");
            continue;
        }
        exec.step(format!("seed {registry}/library/{base}"), || {
        let rootfs = config.root.join("target/xtask/mirror").join(name);
        let suite = debian_suite(tag);
        let (packages, changes): (&[&str], Vec<String>) = match name {
            "debian" => (&[], vec!["CMD [\"bash\"]".into()]),
            "rust" => (
                &["gcc", "libc6-dev", "ca-certificates"],
                vec![
                    "ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    "ENV CARGO_HOME=/usr/local/cargo".into(),
                ],
            ),
            "node" => (
                &[],
                vec![
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    // Node.js reads the CA bundle only through this variable.
                    format!("ENV NODE_EXTRA_CA_CERTS={CA_BUNDLE}"),
                    "CMD [\"node\"]".into(),
                ],
            ),
            other => bail!("cannot seed base image {other}: the mirror knows how to make debian, rust and node images only"),
        };
        make_rootfs(exec, &rootfs, suite, packages)?;
        match name {
            "rust" => copy_toolchain(exec, &rootfs)?,
            "node" => copy_node(exec, &rootfs, tag)?,
            _ => {}
        }
        let tarball = rootfs.with_extension("tar");
        let reference = format!("{registry}/library/{base}");
        exec.run(&Cmd::new("tar").args([
            "--create",
            "--file",
            &path_str(&tarball),
            "--directory",
            &path_str(&rootfs),
            ".",
        ]))?;
        let mut import = Cmd::new("docker").arg("import");
        for change in &changes {
            import = import.args(["--change", change]);
        }
        exec.run(&import.arg(path_str(&tarball)).arg(&reference))?;
        exec.run(&Cmd::new("docker").args(["push", "--quiet", &reference]))?;
        // Builds pull it from the registry: Docker's copy would only fill
        // the disk (kept if a container uses it).
        let _ = exec.run(&Cmd::new("docker").args(["image", "rm", &reference]));
        exec.run(&Cmd::new("rm").args(["-rf", &path_str(&rootfs), &path_str(&tarball)]))
        })?;
    }
    Ok(())
}

/// A minimal Debian root with `packages`, plus the host's CA bundle so
/// builds inside reach crates.io through TLS-inspecting networks too.
fn make_rootfs(exec: &Exec, rootfs: &Path, suite: &str, packages: &[&str]) -> Result<()> {
    require_tool(
        "debootstrap",
        "install it (`apt-get install debootstrap`); it needs root",
    )?;
    exec.run(&Cmd::new("rm").args(["-rf", &path_str(rootfs)]))?;
    let mut debootstrap = Cmd::new("debootstrap").args(["--variant=minbase"]);
    if !packages.is_empty() {
        debootstrap = debootstrap.arg(format!("--include={}", packages.join(",")));
    }
    exec.run(
        &debootstrap
            .arg(suite)
            .arg(path_str(rootfs))
            .arg(DEBIAN_MIRROR),
    )?;
    exec.run(
        &Cmd::new("rm")
            .args(["-rf"])
            .arg(path_str(&rootfs.join("var/cache/apt/archives")))
            .arg(path_str(&rootfs.join("var/lib/apt/lists"))),
    )?;
    exec.run(&Cmd::new("mkdir").args(["-p", &path_str(&rootfs.join("etc/ssl/certs"))]))?;
    exec.run(&Cmd::new("cp").args([
        CA_BUNDLE,
        &path_str(&rootfs.join("etc/ssl/certs/ca-certificates.crt")),
    ]))?;
    Ok(())
}

/// This machine's Rust toolchain, without its docs, under /usr/local/rust.
fn copy_toolchain(exec: &Exec, rootfs: &Path) -> Result<()> {
    let sysroot = exec.read(&Cmd::new("rustc").args(["--print", "sysroot"]))?;
    let dest = rootfs.join("usr/local/rust");
    exec.run(&Cmd::new("mkdir").args([
        "-p",
        &path_str(&dest),
        &path_str(&rootfs.join("usr/local/cargo")),
    ]))?;
    for part in ["bin", "lib", "libexec", "etc"] {
        let from = Path::new(&sysroot).join(part);
        if from.exists() {
            exec.run(&Cmd::new("cp").args(["-a", &path_str(&from), &path_str(&dest)]))?;
        }
    }
    Ok(())
}

/// This machine's Node.js and npm under /usr/local, if its major version is
/// the one `tag` names (`20` in `20-bookworm-slim`).
fn copy_node(exec: &Exec, rootfs: &Path, tag: &str) -> Result<()> {
    let node = require_tool("node", "install Node.js (https://nodejs.org/en/download)")?;
    let version = exec.read(&Cmd::new(path_str(&node)).arg("--version"))?;
    let major = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .unwrap_or("");
    let wanted = tag.split('-').next().unwrap_or("");
    if major != wanted {
        bail!("cannot seed node:{tag}: this machine's Node.js is {version}, the tag names major version {wanted}");
    }
    let npm = exec.read(&Cmd::new(path_str(&node)).args([
        "--print",
        "require('path').dirname(require.resolve('npm/package.json', { paths: [require('path').join(process.execPath, '../../lib/node_modules')] }))",
    ]))?;
    let bin = rootfs.join("usr/local/bin");
    let modules = rootfs.join("usr/local/lib/node_modules");
    exec.run(&Cmd::new("mkdir").args(["-p", &path_str(&bin), &path_str(&modules)]))?;
    exec.run(&Cmd::new("cp").args([&path_str(&node), &path_str(&bin.join("node"))]))?;
    exec.run(&Cmd::new("cp").args(["-a", &npm, &path_str(&modules.join("npm"))]))?;
    for (link, target) in [("npm", "npm-cli.js"), ("npx", "npx-cli.js")] {
        exec.run(&Cmd::new("ln").args([
            "-sf",
            &format!("../lib/node_modules/npm/bin/{target}"),
            &path_str(&bin.join(link)),
        ]))?;
    }
    Ok(())
}

/// The Debian release a tag names: `bookworm` in `1.95-bookworm` and in
/// `bookworm-slim`.
fn debian_suite(tag: &str) -> &str {
    tag.split('-')
        .find(|part| {
            *part != "slim" && !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase())
        })
        .unwrap_or("bookworm")
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn suite_comes_from_the_tag() {
        assert_eq!(super::debian_suite("1.95-bookworm"), "bookworm");
        assert_eq!(super::debian_suite("bookworm-slim"), "bookworm");
        assert_eq!(super::debian_suite("trixie"), "trixie");
        assert_eq!(super::debian_suite("20-bookworm-slim"), "bookworm");
    }
}
