//! `cargo xtask ci`, one step at a time.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

#[test]
fn ci_renders_the_manifests_with_the_kubectl_xtask_kubectl_names() {
    // A wrapper that records each call, then runs the real kubectl: the
    // test asks which kubectl `ci` runs, not what a fake answers.
    let real = ok(Path::new("."), "sh", &["-c", "command -v kubectl"]);
    let dir = TempDir::new("kubectl-wrapper");
    let calls = dir.path().join("calls");
    let wrapper = dir.path().join("kubectl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{real}' \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    ok(
        Path::new("."),
        "chmod",
        &["+x", &wrapper.display().to_string()],
    );
    let clone = clone_project("ci-kubectl");
    let run = xtask(
        clone.path(),
        &["ci", "manifests"],
        &[("XTASK_KUBECTL", wrapper.to_str().unwrap())],
    );
    run.assert_ok();
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        recorded.lines().any(|l| l == "kustomize k8s"),
        "the base rendered by the named kubectl: {recorded}"
    );
    assert!(
        recorded
            .lines()
            .any(|l| l.starts_with("kustomize ") && l.ends_with("target/xtask/deploy")),
        "the overlay too: {recorded}"
    );
    assert!(
        !run.stderr.contains("cargo clippy"),
        "only the manifests step ran: {}",
        run.stderr
    );

    xtask(clone.path(), &["ci", "lint"], &[]).assert_fails(2, "unknown ci step \"lint\"");
}
