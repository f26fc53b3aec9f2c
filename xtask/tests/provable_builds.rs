//! Provable builds on the real pinned BuildKit and registry: the commit's
//! tree (the image's declared inputs) is the only context, cached builds
//! rebuild what changed whatever the commit times say, and two fresh
//! builds of the run's commit give the same digests. `verify --rebuild`
//! on the cluster is in deploy.rs.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

/// A fixture whose image holds its whole context in /src.
fn context_fixture(image: &str) -> FixtureRepo {
    require_docker();
    let dir = TempDir::new("context");
    let root = dir.path();
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[workspace]\nmembers = []\n\n[workspace.metadata.xtask]\nregistry = \"{}/fixtures\"\npush_latest = false\n\n[[workspace.metadata.xtask.images]]\nname = \"{image}\"\ndockerfile = \"Dockerfile\"\n",
            registry()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/debian:bookworm-slim\nCOPY . /src\n",
    )
    .unwrap();
    std::fs::write(root.join(".gitignore"), "/target\n.env\n").unwrap();
    std::fs::write(root.join("app.txt"), "committed\n").unwrap();
    init_repo(root);
    commit_all(root, "fixture");
    FixtureRepo::new(dir, &[format!("{}/fixtures/{image}", registry())])
}

/// The pinned reference of `image` in the build file `root` wrote.
fn pinned(root: &Path, image: &str) -> String {
    let build = build_file(root);
    let built = build["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image)
        .unwrap_or_else(|| panic!("{image} in {build}"));
    let reference = built["reference"].as_str().unwrap();
    let repository = reference.rsplit_once(':').unwrap().0;
    format!("{repository}@{}", built["digest"].as_str().unwrap())
}

/// Runs `script` with sh in a container of `reference`; its stdout.
fn in_image(reference: &str, script: &str) -> String {
    ok(
        Path::new("."),
        "docker",
        &[
            "run",
            "--rm",
            "--network=none",
            reference,
            "sh",
            "-c",
            script,
        ],
    )
}

#[test]
fn files_git_ignores_never_enter_an_image() {
    let image = unique("ignored");
    let repo = context_fixture(&image);
    let root = repo.path();
    // A developer's secret beside the code, ignored by .gitignore, and one
    // ignored only by this clone's .git/info/exclude.
    std::fs::write(root.join(".env"), "API_KEY=do-not-ship\n").unwrap();
    std::fs::write(root.join("local-notes.txt"), "mine\n").unwrap();
    std::fs::write(root.join(".git/info/exclude"), "local-notes.txt\n").unwrap();
    assert_eq!(
        git(root, &["status", "--porcelain"]),
        "",
        "the tree is clean"
    );

    xtask(root, &["build", "--push"], &[]).assert_ok();
    let listing = in_image(&pinned(root, &image), "ls -A /src");
    let files: Vec<&str> = listing.lines().collect();
    assert!(files.contains(&"app.txt"), "{listing}");
    for ignored in [".env", "local-notes.txt", "target", ".git"] {
        assert!(
            !files.contains(&ignored),
            "{ignored} entered the image: {listing}"
        );
    }

    // A dirty build holds what the dirty tag covers: a changed tracked file
    // and an untracked file git does not ignore; still no ignored one.
    std::fs::write(root.join("app.txt"), "changed\n").unwrap();
    std::fs::write(root.join("new.txt"), "new\n").unwrap();
    xtask(root, &["build", "--push", "--allow-dirty"], &[]).assert_ok();
    let dirty = pinned(root, &image);
    assert!(dirty.contains('@'));
    let listing = in_image(&dirty, "ls -A /src && cat /src/app.txt");
    assert!(
        listing.contains("new.txt") && listing.contains("changed"),
        "{listing}"
    );
    assert!(
        !listing.contains(".env") && !listing.contains("local-notes"),
        "{listing}"
    );
    // Modes are a 022 umask's, whatever the clone's.
    let modes = in_image(&dirty, "stat -c '%a %n' /src/app.txt /src/new.txt");
    assert_eq!(modes, "644 /src/app.txt\n644 /src/new.txt", "{modes}");
}

/// The context is the image's declared inputs only: a Dockerfile that
/// reads a committed file outside them fails its build naming the file
/// (instead of silently depending on it), and passes once it is declared.
#[test]
fn a_build_reads_only_the_inputs_its_image_declares() {
    let image = unique("inputs");
    let repo = context_fixture(&image);
    let root = repo.path();
    let declare = |inputs: &str| {
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let manifest = manifest
            .lines()
            .filter(|l| !l.starts_with("inputs = "))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + &format!("inputs = [{inputs}]\n");
        std::fs::write(root.join("Cargo.toml"), manifest).unwrap();
        commit_all(root, "declare inputs")
    };
    std::fs::write(root.join("other.txt"), "undeclared\n").unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/debian:bookworm-slim\nCOPY app.txt other.txt /src/\n",
    )
    .unwrap();
    declare("\"app.txt\"");

    let refused = xtask(root, &["build", "--push"], &[]);
    refused.assert_fails(1, "\"/other.txt\": not found");
    assert!(
        !refused.stderr.contains("\"/app.txt\": not found"),
        "{}",
        refused.stderr
    );

    declare("\"app.txt\", \"other.txt\"");
    xtask(root, &["build", "--push"], &[]).assert_ok();
    let listing = in_image(&pinned(root, &image), "ls -A /src");
    assert_eq!(listing, "app.txt\nother.txt", "{listing}");
}

/// A one-crate Rust fixture whose binary prints `marker`; its cached
/// builds keep cargo's target directory in a cache mount of its own.
/// `settings` are more lines of its `[workspace.metadata.xtask]`.
fn rust_fixture(image: &str, settings: &str) -> FixtureRepo {
    require_docker();
    let dir = TempDir::new("cached");
    let root = dir.path();
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fixture\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n[workspace.metadata.xtask]\nregistry = \"{}/fixtures\"\npush_latest = false\n{settings}\n[[workspace.metadata.xtask.images]]\nname = \"{image}\"\ndockerfile = \"Dockerfile\"\n",
            registry()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        format!("ARG BASE_REGISTRY=docker.io/library\nFROM ${{BASE_REGISTRY}}/rust:1.95-bookworm\nWORKDIR /src\nCOPY . .\nRUN --network=none --mount=type=cache,id={image},target=/src/target \\\n    cargo build --release --offline && cp target/release/fixture /fixture\nCMD [\"/fixture\"]\n"),
    )
    .unwrap();
    std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
    std::fs::write(
        root.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"fixture\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::create_dir(root.join("src")).unwrap();
    init_repo(root);
    // A registry cache goes to `cache/<image>` (see the registry cache
    // test).
    FixtureRepo::new(
        dir,
        &[
            format!("{}/fixtures/{image}", registry()),
            format!("{}/cache/{image}", registry()),
        ],
    )
}

fn set_marker(root: &Path, marker: &str) {
    std::fs::write(
        root.join("src/main.rs"),
        format!("fn main() {{\n    println!(\"{marker}\");\n}}\n"),
    )
    .unwrap();
}

/// What the image a cached build of `root` pushed prints.
fn cached_build_serves(root: &Path, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["build", "--push", "--cache"];
    args.extend(extra);
    xtask(root, &args, &[]).assert_ok();
    ok(
        Path::new("."),
        "docker",
        &["run", "--rm", "--network=none", &pinned(root, image)],
    )
}

/// cargo (like Next) rebuilds by file times. Files exported with their
/// commit's time would make a kept target directory look newer than the
/// sources of an older commit that was never built, and serve the newer
/// build's code: the export gives every file the export's time.
#[test]
fn cached_builds_serve_what_changed_whatever_the_commit_times() {
    let image = unique("cached");
    let repo = rust_fixture(&image, "");
    let root = repo.path();
    set_marker(root, "older commit");
    commit_all(root, "older");
    let older = git(root, &["rev-parse", "HEAD"]);
    set_marker(root, "newer commit");
    commit_all(root, "newer");

    assert_eq!(cached_build_serves(root, &image, &[]), "newer commit");
    // The older commit, never built: its sources' commit time is before
    // the target directory's last build.
    git(root, &["checkout", "--quiet", &older]);
    assert_eq!(cached_build_serves(root, &image, &[]), "older commit");
    git(root, &["checkout", "--quiet", "main"]);
    assert_eq!(cached_build_serves(root, &image, &[]), "newer commit");
    // A file changed between two dirty cached builds.
    set_marker(root, "first edit");
    assert_eq!(
        cached_build_serves(root, &image, &["--allow-dirty"]),
        "first edit"
    );
    set_marker(root, "second edit");
    assert_eq!(
        cached_build_serves(root, &image, &["--allow-dirty"]),
        "second edit"
    );
}

/// `cache_to` and `cache_from` work on the pinned builder: a `--cache`
/// build on a second, empty builder imports the first one's registry
/// cache, compiles nothing, and gives the same image.
#[test]
fn a_cached_build_on_an_empty_builder_takes_everything_from_the_registry_cache() {
    let image = unique("regcache");
    let cache = format!("{}/cache/{image}:buildcache", registry());
    let repo = rust_fixture(
        &image,
        &format!(
            "cache_from = [\"type=registry,ref={cache}\"]\ncache_to = [\"type=registry,ref={cache},mode=max\"]\n"
        ),
    );
    let root = repo.path();
    set_marker(root, "from the registry cache");
    commit_all(root, "cached");
    let first = xtask(root, &["build", "--push", "--cache"], &[]);
    first.assert_ok();
    assert!(
        first.stderr.contains("Compiling fixture"),
        "{}",
        first.stderr
    );
    let built = pinned(root, &image);

    let empty = OneCpuBuilder::new();
    let second = xtask(
        root,
        &["build", "--push", "--cache", "--builder", &empty.0],
        &[],
    );
    second.assert_ok();
    assert!(
        !second.stderr.contains("Compiling fixture"),
        "the second builder compiled: {}",
        second.stderr
    );
    // BuildKit's plain progress: `#N [..] RUN ... cargo build ...`, then
    // for a step taken from the cache either `#N CACHED`, or (when its
    // layer must be exported) only the cache's blobs arriving and `#N
    // DONE`: never a line the step itself printed.
    let header = second
        .stderr
        .lines()
        .find(|l| l.contains("RUN") && l.contains("cargo build --release"))
        .unwrap_or_else(|| panic!("no cargo step in {}", second.stderr));
    let step = format!("{} ", header.split_whitespace().next().unwrap());
    let ran: Vec<&str> = second
        .stderr
        .lines()
        .filter(|l| *l != header)
        .filter_map(|l| l.strip_prefix(step.as_str()))
        .filter(|rest| {
            !(*rest == "CACHED" || rest.starts_with("DONE") || rest.starts_with("sha256:"))
        })
        .collect();
    assert!(
        ran.is_empty(),
        "the cargo step ran on the empty builder: {ran:?}\n{}",
        second.stderr
    );
    assert_eq!(pinned(root, &image), built, "the same image");
    assert_eq!(
        ok(
            Path::new("."),
            "docker",
            &["run", "--rm", "--network=none", &built]
        ),
        "from the registry cache"
    );
}

/// Two fresh builds of the run's commit give the same digest for both
/// real images: the run's shared build, and one from another clone (at
/// another path, made with umask 002) on a new, so empty, builder
/// restricted to one CPU, so that output depending on parallelism shows.
/// The two run at once: the second leaves the other CPU to the first.
/// When they differ, the failure says which image, and which config
/// fields, layers and files.
#[test]
fn two_fresh_builds_of_the_runs_commit_give_the_same_digests() {
    require_docker();
    let commit = run_commit();
    let clone = TempDir::new("repro");
    clone_into(&commit.clone, clone.path(), "002");
    let root = clone.path();
    let mode = ok(root, "stat", &["-c", "%a", "backend/Cargo.toml"]);
    assert_eq!(mode, "664", "the second clone is made with umask 002");
    let shared = std::thread::spawn(head_images);
    let builder = OneCpuBuilder::new();
    let repository = format!("{}/{}", registry(), unique("repro"));
    let _pushed = Pushed::at(&repository);
    let second = xtask(
        root,
        &["build", "--push", "--builder", &builder.0],
        &[("XTASK_REGISTRY", &repository)],
    );
    let head = shared.join().expect("the run's shared build");
    second.assert_ok();
    assert!(
        second.stderr.contains("--no-cache --pull"),
        "{}",
        second.stderr
    );
    let second = build_digests(root);
    let mut why = Vec::new();
    for (image, digest) in &head.digests {
        if &second[image] != digest {
            why.push(format!(
                "{image}: {digest} (shared build) != {} (one CPU, umask 002)\n{}",
                second[image],
                explain_difference(
                    &format!("{}/{image}", head.repository),
                    digest,
                    &format!("{repository}/{image}"),
                    &second[image]
                )
            ));
        }
    }
    assert!(
        why.is_empty(),
        "two fresh builds of {} differ:\n{}",
        head.revision,
        why.join("\n")
    );
    assert_eq!(second.len(), 2, "both real images: {second:?}");
}
