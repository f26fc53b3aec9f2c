//! Pushing a build: retries from this build's cache when the registry
//! hiccups, and the immutable-tag policy (skip `:latest`; an existing SHA
//! tag counts only if it holds this exact build).

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context, Result};

use crate::{
    bake::{bake_command, parse_metadata, BuildOptions, Planned},
    bases::explain_base_image_failure,
    config::{Config, Image},
    exec::Exec,
    progress::{self, FailedStep},
    registry::resolve,
};

/// Attempts at a push that fails on the registry's side.
const PUSH_ATTEMPTS: u32 = 3;

/// How a push failed, read from the step that failed in BuildKit's
/// progress.
#[derive(Debug, PartialEq, Eq)]
enum PushFailure {
    /// The registry hiccuped (5xx, 429, a dropped connection): retry.
    Transient,
    /// The registry refuses to overwrite an existing tag (ECR's immutable
    /// tags).
    Immutable,
}

/// Whether the build failed in its push, and how: only when the export's
/// step failed (it runs once every build step has succeeded), so a compile
/// error whose text says "immutable" (rustc's E0502) or a base image the
/// registry could not serve is never taken for one. Other failed steps are
/// not looked at: one the build survived (a registry cache not there yet
/// to import) precedes an export. What the registry said is in the
/// export's error and its last lines (BuildKit retries a hiccup itself,
/// four tries over about 7 s, and logs each status).
fn push_failure(failed: &[FailedStep]) -> Option<PushFailure> {
    let push = failed.iter().find(|step| step.is_push())?;
    let said = format!("{}\n{}", push.error, push.tail.join("\n")).to_ascii_lowercase();
    if ["tag invalid", "immutable", "cannot be overwritten"]
        .iter()
        .any(|t| said.contains(t))
    {
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
    transient
        .iter()
        .any(|t| said.contains(t))
        .then_some(PushFailure::Transient)
}

/// A failed build's error: each failed step, what BuildKit said, and its
/// last lines.
fn build_error(cmd: &crate::exec::Cmd, failed: &[FailedStep]) -> anyhow::Error {
    let mut message = format!("`{cmd}` failed");
    if failed.is_empty() {
        message.push_str(" (its output is above)");
    }
    for step in failed {
        message.push_str(&format!("\n{}: {}", step.name, step.error));
        for line in &step.tail {
            message.push_str(&format!("\n  {line}"));
        }
    }
    anyhow::anyhow!(message)
}

/// Builds and pushes in one bake, retrying what the registry gets wrong:
/// a transient failure is retried (up to [`PUSH_ATTEMPTS`], with backoff)
/// from BuildKit's cache of this very build, so nothing is compiled twice;
/// immutable tags skip `:latest` with a warning, and an existing SHA tag
/// that already holds this exact build counts as published (another build
/// under it is an error). Returns each image's manifest digest.
pub fn push(
    exec: &Exec,
    config: &Config,
    planned: &[Planned],
    opts: &BuildOptions,
    bake_path: &Path,
    metadata_path: &Path,
) -> Result<BTreeMap<String, String>> {
    let mut digests = BTreeMap::new();
    let mut remaining: Vec<&Planned> = planned.iter().collect();
    let images = |of: &[&Planned]| -> Vec<Image> { of.iter().map(|p| p.image.clone()).collect() };
    let mut opts = opts.clone();
    // Immutable tags turn `push_latest` off for the attempts that follow.
    let mut config = config.clone();
    let mut failures = 0;
    loop {
        let tagged: Vec<(&Image, Vec<String>, i64)> = remaining
            .iter()
            .map(|p| (&p.image, p.tags(&config), p.rev.commit_time))
            .collect();
        let cmd = bake_command(
            bake_path,
            metadata_path,
            &tagged,
            &opts,
            exec.output.progress_style(),
        );
        let (succeeded, failed) = exec.run_following(&cmd, |stderr| {
            progress::follow(stderr, &mut std::io::stderr())
        })?;
        if succeeded {
            if exec.dry_run {
                return Ok(digests);
            }
            let metadata = std::fs::read_to_string(metadata_path)
                .with_context(|| format!("reading {}", metadata_path.display()))?;
            digests.extend(parse_metadata(&metadata, &images(&remaining))?);
            return Ok(digests);
        }
        let error = build_error(&cmd, &failed);
        failures += 1;
        match push_failure(&failed) {
            Some(PushFailure::Immutable)
                if config.push_latest && remaining.iter().any(|p| !p.rev.is_dirty()) =>
            {
                exec.output.warn("the registry refuses to move a tag (immutable tags): pushing again without :latest, which nothing deployed uses (set push_latest = false for this registry)");
                config.push_latest = false;
            }
            Some(PushFailure::Immutable) => {
                let built = built_digests(exec, &remaining, &opts, bake_path, metadata_path)?;
                for planned in &remaining {
                    let this_build = built
                        .get(&planned.image.name)
                        .context("BuildKit gave no digest for the build")?;
                    if let Some(digest) = already_published(exec, &config, planned, this_build)? {
                        digests.insert(planned.image.name.clone(), digest);
                    }
                }
                remaining.retain(|p| !digests.contains_key(&p.image.name));
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
                return Err(
                    explain_base_image_failure(exec, &config, &images(&remaining)).unwrap_or(error),
                );
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

/// When the planned tag already exists in the registry: its digest if it
/// holds the image just built, an error if it holds another build. `None`
/// when the tag is not there. Builds are reproducible, so "the same build"
/// is the same manifest digest: `built` is this build's, from BuildKit.
fn already_published(
    exec: &Exec,
    config: &Config,
    planned: &Planned,
    built: &str,
) -> Result<Option<String>> {
    let reference = config.image_ref(&planned.image.name, &planned.tag);
    let Ok(found) = resolve(exec, &reference) else {
        return Ok(None);
    };
    let published = found.digest;
    if published != built {
        bail!(
            "{reference} already exists with another build ({published}; this build is {built}) and the registry's tags are immutable: the same inputs built otherwise (a build that is not reproducible, or one pushed by something else); find what differs (`docker buildx imagetools inspect` both), and deploy the published one or change the image's inputs"
        );
    }
    exec.output.warn(&format!(
        "{reference} already holds this exact build ({published}): counted as published"
    ));
    Ok(Some(published))
}

/// The digests BuildKit gives `planned` without pushing them (from this
/// build's cache): what an existing tag is compared with.
fn built_digests(
    exec: &Exec,
    planned: &[&Planned],
    opts: &BuildOptions,
    bake_path: &Path,
    metadata_path: &Path,
) -> Result<BTreeMap<String, String>> {
    let opts = BuildOptions {
        digest_only: true,
        retry: true,
        ..opts.clone()
    };
    let tagged: Vec<(&Image, Vec<String>, i64)> = planned
        .iter()
        .map(|p| (&p.image, vec![], p.rev.commit_time))
        .collect();
    exec.run(&bake_command(
        bake_path,
        metadata_path,
        &tagged,
        &opts,
        exec.output.progress_style(),
    ))?;
    let metadata = std::fs::read_to_string(metadata_path)
        .with_context(|| format!("reading {}", metadata_path.display()))?;
    let images: Vec<Image> = planned.iter().map(|p| p.image.clone()).collect();
    parse_metadata(&metadata, &images)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, error: &str, tail: &[&str]) -> FailedStep {
        FailedStep {
            name: name.into(),
            error: error.into(),
            tail: tail.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn push_failures_are_told_apart_by_the_step_that_failed() {
        let export = "exporting to image";
        let exhausted = step(
            export,
            "failed to push 127.0.0.1:47111/fx/flk:b08d2e271a96: unavailable",
            &["pushing layers done", "error: failed commit on ref \"manifest-sha256:54e2\": unexpected status from PUT request to http://127.0.0.1:47111/v2/fx/flk/manifests/b08d2e271a96: 503 Service Unavailable"],
        );
        assert_eq!(push_failure(&[exhausted]), Some(PushFailure::Transient));
        let immutable = step(
            export,
            "failed to push 127.0.0.1:34011/fixtures/x:latest: unknown: The image tag 'latest' already exists in the 'fixtures/x' repository and cannot be overwritten because the repository is immutable.",
            &[],
        );
        assert_eq!(push_failure(&[immutable]), Some(PushFailure::Immutable));
        let refused = step(export, "failed to push r/x:1: unauthorized", &[]);
        assert_eq!(push_failure(&[refused]), None, "not the registry's hiccup");
        let e0502 = step(
            "[web 4/5] RUN cargo build --release",
            "process \"/bin/sh -c cargo build --release\" did not complete successfully: exit code: 101",
            &["error[E0502]: cannot borrow `v` as mutable because it is also borrowed as immutable", "pushing v.push(1) here", "503 service unavailable"],
        );
        assert_eq!(
            push_failure(std::slice::from_ref(&e0502)),
            None,
            "a compile error is not a push"
        );
        let no_cache_yet = step(
            "importing cache manifest from r/cache:x",
            "failed to configure registry cache importer: r/cache:x: not found",
            &[],
        );
        let hiccup = step(export, "failed to push r/x:1: 503 Service Unavailable", &[]);
        assert_eq!(
            push_failure(&[no_cache_yet, hiccup]),
            Some(PushFailure::Transient),
            "a cache not there yet is no build failure"
        );
        let base = step(
            "[internal] load metadata for 127.0.0.1:5000/library/rust:1.95",
            "127.0.0.1:5000/library/rust:1.95: 503 Service Unavailable",
            &[],
        );
        assert_eq!(
            push_failure(&[base]),
            None,
            "a base image pull is not a push"
        );
        assert_eq!(push_failure(&[]), None);
    }
}
