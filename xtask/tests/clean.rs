//! `cargo xtask clean` on the real Docker engine and Distribution's garbage
//! collector, with a temporary `HOME` whose cache holds a dependency store
//! of an old lockfile, the current one, and a local registry's data: it
//! removes a stopped local stack, an image the xtask made that nothing
//! runs, the old store and the pushed repository, and keeps what it did
//! not make (a container and an image without its labels), the current
//! store and the base-image mirror. Its dry run removes nothing.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn docker(args: &[&str]) -> String {
    ok(Path::new("."), "docker", args)
}

fn exists(kind: &str, name: &str) -> bool {
    run(Path::new("."), "docker", &[kind, "inspect", name])
        .status
        .success()
}

/// The Docker objects the test made, removed when dropped.
struct Made(Vec<(&'static str, String)>);

impl Drop for Made {
    fn drop(&mut self) {
        for (kind, name) in self.0.iter().rev() {
            let _ = run(Path::new("."), "docker", &[kind, "rm", "--force", name]);
        }
    }
}

/// A directory of `size` bytes at `path`.
fn filled(path: &Path, size: usize) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::write(path.join("data"), vec![7u8; size]).unwrap();
    path.to_owned()
}

#[test]
fn clean_removes_what_the_xtask_made_and_nothing_else() {
    require_docker();
    let root = project_root();
    let u = unique("clean");
    let home = TempDir::new("clean-home");
    let cache = home.path().join(".cache/aiq-xtask");

    // The stores: the backend's current lockfile's, and an old one's.
    let sum = ok(&root, "sha256sum", &["backend/Cargo.lock"]);
    let current = filled(&cache.join(format!("deps/cargo-{}", &sum[..16])), 1000);
    let old = filled(&cache.join("deps/cargo-0123456789abcdef"), 250_000);

    // A local registry's data: the mirror and a pushed repository.
    let registry = cache.join("registry");
    let repositories = registry.join("data/docker/registry/v2/repositories");
    // The mirror's tag links to its manifest; a repository whose tags
    // were all deleted (through the API) keeps the manifests of tags that
    // moved, which nothing names any more.
    let mirror = filled(
        &repositories.join("library/debian/_manifests/tags/bookworm-slim/current"),
        10,
    );
    std::fs::write(mirror.join("link"), "sha256:0").unwrap();
    let emptied = filled(
        &repositories.join("library/emptied/_manifests/revisions/sha256/0"),
        10,
    );
    std::fs::write(emptied.join("link"), "sha256:0").unwrap();
    let pushed = filled(&repositories.join(format!("{u}/app/_manifests")), 10);
    std::fs::create_dir_all(registry.join("data/docker/registry/v2/blobs/sha256")).unwrap();
    std::fs::write(
        registry.join("config.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:1\n",
            registry.join("data").display()
        ),
    )
    .unwrap();

    // Docker: a stopped stack (container and network, by the xtask's
    // labels), an image the xtask made, and a container and an image it
    // did not make.
    let base = format!("{}/debian:bookworm-slim", base_registry());
    docker(&["pull", "--quiet", &base]);
    let mut made = Made(Vec::new());
    let project = format!("org.aiq.xtask.project={u}");
    docker(&[
        "network",
        "create",
        "--label",
        &project,
        &format!("{u}-net"),
    ]);
    made.0.push(("network", format!("{u}-net")));
    let stack = format!("{u}-stack");
    docker(&[
        "create",
        "--label",
        &project,
        "--network",
        &format!("{u}-net"),
        "--name",
        &stack,
        &base,
        "true",
    ]);
    made.0.push(("container", stack.clone()));
    let foreign = format!("{u}-foreign");
    docker(&["create", "--name", &foreign, &base, "true"]);
    made.0.push(("container", foreign.clone()));
    // An image as the xtask labels what it builds, from `foreign`'s
    // filesystem, with `extra` config changes.
    let labelled = |name: &str, extra: &[&str]| {
        let version = format!("LABEL org.opencontainers.image.version={u}");
        let mut args = vec!["commit", "--change", "LABEL org.aiq.xtask.made=build"];
        args.extend(["--change", version.as_str()]);
        for change in extra {
            args.extend(["--change", change]);
        }
        args.extend([foreign.as_str(), name]);
        docker(&args);
    };
    let built = format!("cleantest/made:{u}");
    labelled(&built, &[]);
    made.0.push(("image", built.clone()));
    // Built FROM an image the xtask made: it inherits the labels, but no
    // tag the xtask gave is on it.
    let derived = format!("cleantest/derived:{u}-mine");
    labelled(&derived, &["ENV DERIVED=1"]);
    made.0.push(("image", derived.clone()));
    let theirs = format!("cleantest/theirs:{u}");
    docker(&["tag", &base, &theirs]);
    made.0.push(("image", theirs.clone()));

    let home_env = home.path().display().to_string();
    let env = [("HOME", home_env.as_str())];
    let everything_there = || {
        exists("container", &stack)
            && exists("network", &format!("{u}-net"))
            && exists("image", &built)
            && old.exists()
            && pushed.exists()
            && emptied.exists()
    };

    let dry = xtask(&root, &["clean", "--dry-run"], &env);
    dry.assert_ok();
    assert!(
        everything_there(),
        "a dry run removed something: {}",
        dry.stderr
    );
    assert!(dry.stderr.contains("would free"), "{}", dry.stderr);
    assert!(dry.stdout.contains("$ docker rm "), "{}", dry.stdout);
    let all_dry = xtask(&root, &["clean", "--all", "--dry-run"], &env);
    all_dry.assert_ok();
    assert!(
        everything_there(),
        "a dry run removed something: {}",
        all_dry.stderr
    );

    let clean = xtask(&root, &["clean"], &env);
    clean.assert_ok();
    assert!(!exists("container", &stack), "{}", clean.stderr);
    assert!(!exists("network", &format!("{u}-net")), "{}", clean.stderr);
    assert!(!exists("image", &built), "{}", clean.stderr);
    assert!(!old.exists() && !pushed.exists(), "{}", clean.stderr);
    // What it did not make, and what is still needed, stay.
    assert!(exists("container", &foreign) && exists("image", &theirs));
    assert!(
        exists("image", &derived),
        "an image built FROM one of its own"
    );
    assert!(current.exists() && mirror.exists());
    assert!(
        !emptied.exists(),
        "an emptied repository stays: {}",
        clean.stderr
    );
    assert!(
        clean
            .stderr
            .contains("dependency store cargo-0123456789abcdef")
            && clean.stderr.contains(&format!("{u}/app"))
            && clean.stderr.contains("freed "),
        "{}",
        clean.stderr
    );
    assert!(
        clean.stderr.contains("$ docker-registry garbage-collect "),
        "{}",
        clean.stderr
    );
}
