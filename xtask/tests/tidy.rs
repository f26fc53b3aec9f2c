//! Repository invariants that need no Docker and no cluster.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

use std::path::Path;

/// The `#[test]` functions of `xtask/tests/*.rs` whose bodies point
/// `XTASK_KUBECTL` at something: tests that do not run on the real cluster.
fn tests_off_the_real_cluster() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension() != Some("rs".as_ref()) || path.ends_with("tidy.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for chunk in text.split("#[test]").skip(1) {
            let name = chunk
                .split("fn ")
                .nth(1)
                .and_then(|rest| rest.split('(').next())
                .unwrap()
                .trim()
                .to_owned();
            if chunk.contains("XTASK_KUBECTL") {
                found.push(name);
            }
        }
    }
    found.sort();
    found
}

/// The tests `docs/testing.md` lists as not on the real cluster: the
/// backticked names in the bullets under that heading.
fn listed_in_the_docs() -> Vec<String> {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/testing.md"))
            .unwrap();
    let heading = "## Tests that do not use the real cluster";
    let section = page
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("docs/testing.md has no {heading:?} section"));
    let section = section.split("\n#").next().unwrap();
    let mut listed: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    listed.sort();
    listed
}

#[test]
fn every_test_off_the_real_cluster_is_listed_in_the_docs_with_its_reason() {
    assert_eq!(tests_off_the_real_cluster(), listed_in_the_docs());
}

/// A manifest that names another namespace's Service host would send
/// traffic across environments when `--env` deploys to another namespace.
#[test]
fn manifests_name_services_by_their_short_name() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(".svc"),
            "{} names a namespace-qualified host",
            path.display()
        );
    }
}

/// The services' builds reach nothing: every RUN step of their Dockerfiles
/// has no network (dependencies come from the stores), and the real fresh
/// build in `real_images.rs` succeeds that way.
#[test]
fn every_build_step_of_the_services_runs_without_a_network() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dockerfile in ["backend/Dockerfile", "frontend/Dockerfile"] {
        let text = std::fs::read_to_string(root.join(dockerfile)).unwrap();
        let runs: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("RUN "))
            .collect();
        assert!(!runs.is_empty(), "{dockerfile} has RUN steps");
        for run in runs {
            assert!(
                run.contains("--network=none"),
                "{dockerfile}: `{run}` may reach the network"
            );
        }
    }
}

/// Least privilege: the job that runs the repository's build code holds
/// the build role (push and read ECR), never the deploy role, and each job
/// that deploys or rolls back holds the deploy role.
#[test]
fn the_build_job_holds_the_build_role_and_only_deploys_hold_the_deploy_role() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.github/workflows");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let Some((_, jobs)) = text.split_once("\njobs:\n") else {
            continue;
        };
        // Each job: from its two-space-indented name to the next one.
        let mut job = String::new();
        let mut bodies: Vec<String> = Vec::new();
        for line in jobs.lines() {
            if line.starts_with("  ") && !line.starts_with("   ") && line.ends_with(':') {
                bodies.push(std::mem::take(&mut job));
            }
            job.push_str(line);
            job.push('\n');
        }
        bodies.push(job);
        for body in bodies.iter().filter(|b| b.contains("role-to-assume")) {
            let name = body.lines().next().unwrap_or_default().trim();
            let builds = body.contains("xtask build --push");
            let deploys = body.contains("xtask deploy") || body.contains("xtask rollback");
            assert!(
                builds != deploys,
                "{}: job {name} both builds and deploys",
                path.display()
            );
            let role = if builds {
                "AWS_BUILD_ROLE_ARN"
            } else {
                "AWS_DEPLOY_ROLE_ARN"
            };
            let roles: Vec<&str> = body
                .lines()
                .filter(|l| l.contains("role-to-assume"))
                .collect();
            assert!(
                roles.iter().all(|l| l.contains(role)),
                "{}: job {name} must assume {role} only: {roles:?}",
                path.display()
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 4,
        "build, deploy-staging, deploy-prod and rollback"
    );
}

/// The environment is read in one place and processes are made in one
/// place: clippy's `disallowed-methods` keeps it so (`cargo clippy` in
/// `ci` fails on any other use), as long as `clippy.toml` names them.
#[test]
fn clippy_keeps_environment_reads_and_processes_in_their_modules() {
    let rules =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("clippy.toml")).unwrap();
    for method in [
        "std::env::var",
        "std::env::var_os",
        "std::env::vars",
        "std::env::vars_os",
        "std::env::temp_dir",
        "std::process::Command::new",
        "xshell::Shell::cmd",
        "xshell::Shell::var",
        "xshell::Shell::var_os",
        "xshell::cmd",
    ] {
        assert!(
            rules.contains(&format!("path = \"{method}\"")),
            "clippy.toml lacks {method}"
        );
    }
}
