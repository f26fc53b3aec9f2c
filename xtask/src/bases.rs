//! Base images: the ones each Dockerfile names as `FROM
//! ${BASE_REGISTRY}/name:tag`, and whether the base registry serves them.

use anyhow::{Context, Result};

use crate::{
    config::{Config, Image},
    exec::{Cmd, Exec},
};

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
pub fn explain_base_image_failure(
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

/// Resolves every base image `images` build on that `resolved` does not
/// hold yet, once, at the start of a build (that is what `--pull` means):
/// reference → manifest digest. The build then uses exactly these (as
/// named contexts), and `build.json` records them. A dry run resolves
/// nothing.
pub fn resolve_all(
    exec: &Exec,
    config: &Config,
    images: &[Image],
    resolved: &mut std::collections::BTreeMap<String, String>,
) -> Result<()> {
    if exec.dry_run {
        return Ok(());
    }
    for base in base_images_of(config, images)? {
        let reference = format!("{}/{base}", config.base_registry);
        if resolved.contains_key(&reference) {
            continue;
        }
        match crate::registry::resolve(exec, &reference) {
            Ok(found) => {
                resolved.insert(reference, found.digest);
            }
            Err(error) => {
                return Err(explain_base_image_failure(exec, config, images)
                    .unwrap_or_else(|| error.context(format!("resolving base image {reference}"))))
            }
        }
    }
    Ok(())
}

/// How the Dockerfile frontend names a base image when it looks for a
/// named context: Docker Hub's `docker.io/library/` prefix dropped.
pub fn familiar(reference: &str) -> String {
    let reference = reference
        .strip_prefix("docker.io/")
        .or_else(|| reference.strip_prefix("index.docker.io/"))
        .map(|rest| rest.strip_prefix("library/").unwrap_or(rest))
        .unwrap_or(reference);
    reference.to_owned()
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
    fn named_contexts_use_the_familiar_name() {
        assert_eq!(familiar("docker.io/library/rust:1.95"), "rust:1.95");
        assert_eq!(familiar("docker.io/acme/x:1"), "acme/x:1");
        assert_eq!(
            familiar("127.0.0.1:5000/library/debian:bookworm-slim"),
            "127.0.0.1:5000/library/debian:bookworm-slim"
        );
    }

    #[test]
    fn base_images_come_from_from_lines() {
        let dockerfile = "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/rust:1.95-bookworm AS builder\nRUN x\nfrom --platform=linux/amd64 ${BASE_REGISTRY}/debian:bookworm-slim\nFROM scratch\n";
        assert_eq!(
            base_images(dockerfile),
            ["rust:1.95-bookworm", "debian:bookworm-slim"]
        );
    }
}
