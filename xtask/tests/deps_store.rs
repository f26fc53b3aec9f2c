//! The dependency stores the real images build from: a store that does not
//! match its lockfile fails the fresh build naming the package, a changed
//! lockfile names a new store by itself, and `--offline` never downloads.
//! `cargo xtask test` fills the stores for HEAD's lockfiles first, so these
//! tests copy them instead of downloading anything.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// `<deps dir>/<kind>-<key>` for `lockfile`: the store the xtask names.
fn store_for(deps: &Path, kind: &str, lockfile: &Path) -> PathBuf {
    let sum = ok(
        Path::new("."),
        "sha256sum",
        &[&lockfile.display().to_string()],
    );
    deps.join(format!("{kind}-{}", &sum[..16]))
}

/// Where `cargo xtask test` filled the stores.
fn filled_stores() -> PathBuf {
    std::env::var_os("XTASK_DEPS_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/aiq-xtask/deps"),
        PathBuf::from,
    )
}

/// Copies HEAD's filled store for `lockfile` into `deps`; returns the copy.
fn copy_store(deps: &Path, kind: &str, lockfile: &Path) -> PathBuf {
    let filled = store_for(&filled_stores(), kind, lockfile);
    assert!(
        filled.is_dir(),
        "{} is missing: run the tests with `cargo xtask test`, which fills it",
        filled.display()
    );
    let copy = store_for(deps, kind, lockfile);
    ok(
        Path::new("."),
        "cp",
        &[
            "-a",
            &filled.display().to_string(),
            &copy.display().to_string(),
        ],
    );
    copy
}

/// The name and version of the first crate Cargo.lock pins with a checksum.
fn first_registry_crate(lockfile: &Path) -> (String, String) {
    let text = std::fs::read_to_string(lockfile).unwrap();
    let package = text
        .split("[[package]]")
        .find(|p| p.contains("checksum = "))
        .unwrap();
    let field = |key: &str| {
        package
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .unwrap()
            .trim_end_matches('"')
            .to_owned()
    };
    (field("name"), field("version"))
}

/// The npm cache file that holds `package`'s tarball, by its integrity.
fn npm_tarball(store: &Path, lockfile: &Path, package: &str) -> (PathBuf, String) {
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lockfile).unwrap()).unwrap();
    let entry = &lock["packages"][format!("node_modules/{package}")];
    let integrity = entry["integrity"].as_str().unwrap();
    let base64 = integrity.strip_prefix("sha512-").unwrap();
    let hex = ok(
        Path::new("."),
        "sh",
        &[
            "-c",
            &format!("printf %s '{base64}' | base64 -d | od -An -tx1 -v | tr -d ' \\n'"),
        ],
    );
    let file = store
        .join("_cacache/content-v2/sha512")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(&hex[4..]);
    assert!(file.is_file(), "{} holds {package}", file.display());
    (file, entry["version"].as_str().unwrap().to_owned())
}

fn append_byte(file: &Path) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .unwrap()
        .write_all(b"\n")
        .unwrap();
}

/// Whether Docker has an image under `reference`.
fn image_exists(reference: &str) -> bool {
    run(Path::new("."), "docker", &["image", "inspect", reference])
        .status
        .success()
}

#[test]
fn a_store_that_does_not_match_its_lockfile_fails_the_build_naming_the_package() {
    require_docker();
    let clone = clone_project("deps-tamper");
    let root = clone.path();
    let deps = TempDir::new("deps-tampered");
    let registry_path = format!("{}/{}", registry(), unique("tamper"));
    let _pushed = Pushed::at(&registry_path);
    let tag = git(root, &["rev-parse", "--short=12", "HEAD"]);
    let env = [
        ("XTASK_DEPS_DIR", deps.path().to_str().unwrap()),
        ("XTASK_REGISTRY", registry_path.as_str()),
    ];

    // One changed .crate, under the same key: the backend's build stops.
    let cargo_lock = root.join("backend/Cargo.lock");
    let crates = copy_store(deps.path(), "cargo", &cargo_lock);
    let (name, version) = first_registry_crate(&cargo_lock);
    append_byte(&crates.join(format!("crates/{name}-{version}.crate")));
    xtask(root, &["build", "aiq-agent"], &env).assert_fails(
        1,
        &format!("dependency store: {name} {version} does not match Cargo.lock"),
    );
    assert!(!image_exists(&format!("{registry_path}/aiq-agent:{tag}")));

    // One changed npm tarball, under the same key: the frontend's build stops.
    let package_lock = root.join("frontend/package-lock.json");
    let npm = copy_store(deps.path(), "npm", &package_lock);
    let (react, react_version) = npm_tarball(&npm, &package_lock, "react");
    append_byte(&react);
    xtask(root, &["build", "aiq-frontend"], &env).assert_fails(
        1,
        &format!(
            "dependency store: react {react_version} (node_modules/react) does not match package-lock.json"
        ),
    );
    assert!(!image_exists(&format!(
        "{registry_path}/aiq-frontend:{tag}"
    )));
}

#[test]
fn a_changed_lockfile_names_a_new_store_and_offline_never_downloads() {
    require_docker();
    let clone = clone_project("deps-key");
    let root = clone.path();
    let deps = TempDir::new("deps-empty");
    let registry_path = format!("{}/{}", registry(), unique("offline"));
    let _pushed = Pushed::at(&registry_path);
    let env = [
        ("XTASK_DEPS_DIR", deps.path().to_str().unwrap()),
        ("XTASK_REGISTRY", registry_path.as_str()),
    ];
    let package_lock = root.join("frontend/package-lock.json");
    let deps_context = |root: &Path| -> String {
        let bake: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("target/xtask/bake.json")).unwrap(),
        )
        .unwrap();
        bake["target"]["aiq-frontend"]["contexts"]["deps"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // A dry run names the store by the lockfile and shows the download
    // that would fill it; nothing is filled.
    let dry = xtask(root, &["build", "--dry-run"], &env);
    dry.assert_ok();
    let first = deps_context(root);
    assert_eq!(
        first,
        store_for(deps.path(), "npm", &package_lock)
            .display()
            .to_string()
    );
    assert!(
        dry.stdout
            .lines()
            .any(|l| l.starts_with("$ npm ci ") && l.contains("--cache")),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("cargo fetch --locked --manifest-path"),
        "{}",
        dry.stdout
    );
    assert_eq!(std::fs::read_dir(deps.path()).unwrap().count(), 0);

    // A changed lockfile, committed: a new store, with no flag or command.
    let lock = std::fs::read_to_string(&package_lock).unwrap();
    std::fs::write(&package_lock, format!("{lock}\n")).unwrap();
    commit_all(root, "frontend: the lockfile changes");
    xtask(root, &["build", "--dry-run"], &env).assert_ok();
    let second = deps_context(root);
    assert_ne!(first, second);
    assert_eq!(
        second,
        store_for(deps.path(), "npm", &package_lock)
            .display()
            .to_string()
    );

    // --offline with no store for it: refused before anything is built.
    let tag = git(root, &["rev-parse", "--short=12", "HEAD"]);
    xtask(root, &["build", "--offline", "aiq-frontend"], &env).assert_fails(
        2,
        "--offline: no dependency store for frontend/package-lock.json",
    );
    assert!(!image_exists(&format!(
        "{registry_path}/aiq-frontend:{tag}"
    )));
    assert_eq!(std::fs::read_dir(deps.path()).unwrap().count(), 0);
}
