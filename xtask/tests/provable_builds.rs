//! Provable builds on the real pinned BuildKit and registry: the commit's
//! tree is the only context, cached builds rebuild what changed whatever
//! the commit times say, and two fresh builds of HEAD give the same
//! digests.

mod common;

use std::path::Path;

use common::*;

/// A fixture whose image holds its whole context in /src.
fn context_fixture(image: &str) -> TempDir {
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
    dir
}

/// The pinned reference of `image` in the build file `root` wrote.
fn pinned(root: &Path, image: &str) -> String {
    let build: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("target/xtask/build.json")).unwrap(),
    )
    .unwrap();
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

/// A one-crate Rust fixture whose binary prints `marker`; its cached
/// builds keep cargo's target directory in a cache mount of its own.
fn rust_fixture(image: &str) -> TempDir {
    require_docker();
    let dir = TempDir::new("cached");
    let root = dir.path();
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fixture\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n[workspace.metadata.xtask]\nregistry = \"{}/fixtures\"\npush_latest = false\n\n[[workspace.metadata.xtask.images]]\nname = \"{image}\"\ndockerfile = \"Dockerfile\"\n",
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
    dir
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
    let repo = rust_fixture(&image);
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

/// Two fresh builds of HEAD's real images give the same digests: one from
/// the suite's shared build, one from another clone at another path, made
/// with umask 002, on a new (so empty) builder restricted to one CPU, so
/// that output depending on parallelism shows.
#[test]
fn two_fresh_builds_of_head_give_the_same_digests() {
    let head = head_images();
    let clone = TempDir::new("repro");
    let script = format!(
        "umask 002 && git clone --quiet {} {}",
        head.clone.display(),
        clone.path().display()
    );
    ok(Path::new("."), "sh", &["-c", &script]);
    let mode = ok(
        Path::new("."),
        "stat",
        &[
            "-c",
            "%a",
            &clone.path().join("Cargo.toml").display().to_string(),
        ],
    );
    assert_eq!(mode, "664", "the second clone is made with umask 002");
    let builder = OneCpuBuilder::new();
    let repository = format!("{}/{}", registry(), unique("repro"));
    xtask(
        clone.path(),
        &["build", "--push", "--builder", &builder.0],
        &[("XTASK_REGISTRY", &repository)],
    )
    .assert_ok();
    let second = build_digests(clone.path());
    assert_eq!(second.len(), 2, "both images: {second:?}");
    let mut differences = Vec::new();
    for (image, digest) in &head.digests {
        let other = &second[image];
        if digest != other {
            differences.push(format!(
                "{image}: {digest} (shared build) != {other} (one CPU, umask 002)\n{}",
                explain_difference(
                    &format!("{}/{image}", head.repository),
                    digest,
                    &format!("{repository}/{image}"),
                    other
                )
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "two fresh builds of {} differ:\n{}",
        head.revision,
        differences.join("\n")
    );
    eprintln!("reproducible: {:?}", head.digests);
}
