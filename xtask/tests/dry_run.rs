//! `--dry-run` changes nothing outside `target/xtask/`: each command's dry
//! run, with a temporary `HOME` (an empty cache), leaves that `HOME`, the
//! test cluster's state directory, `/var/lib`, Docker's containers,
//! networks and images, the registry's catalog, the iptables rules and the
//! cgroup tree as they were. A binary of its own: no other test may change
//! those while it compares.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use common::*;

/// Every path under `dir`, relative to it.
fn tree(dir: &Path, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![(dir.to_owned(), 0)];
    while let Some((at, level)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            found.insert(path.strip_prefix(dir).unwrap().display().to_string());
            if level + 1 < depth && entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push((path, level + 1));
            }
        }
    }
    found
}

/// What a dry run must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Machine {
    home: BTreeSet<String>,
    /// The cluster's state directory, its top and the files `up` writes
    /// (what runs in it, pods and logs, changes by itself).
    cluster_state: BTreeSet<String>,
    var_lib: BTreeSet<String>,
    containers: String,
    networks: String,
    images: String,
    catalog: String,
    iptables: String,
    /// The cgroup tree, but the test cluster's own root, where pods of
    /// earlier tests may still be going away.
    cgroups: BTreeSet<String>,
}

fn docker(args: &[&str]) -> String {
    let mut lines: Vec<String> = ok(Path::new("."), "docker", args)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

fn machine(home: &Path) -> Machine {
    let state = PathBuf::from("/var/lib/aiq-xtask/cluster");
    let mut cluster_state = tree(&state, 1);
    for dir in ["pki", "run"] {
        cluster_state.extend(
            tree(&state.join(dir), 1)
                .into_iter()
                .map(|p| format!("{dir}/{p}")),
        );
    }
    // Counters and the dump's timestamps change by themselves.
    let iptables = ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|save| {
            ok(Path::new("."), save, &[])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (_, catalog) = http_get(&registry(), "/v2/_catalog?n=1000").unwrap();
    Machine {
        home: tree(home, usize::MAX),
        cluster_state,
        var_lib: tree(Path::new("/var/lib"), 1),
        containers: docker(&[
            "ps",
            "--all",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.State}}",
        ]),
        networks: docker(&["network", "ls", "--quiet", "--no-trunc"]),
        images: docker(&["image", "ls", "--all", "--quiet", "--no-trunc"]),
        catalog,
        iptables,
        cgroups: tree(Path::new("/sys/fs/cgroup/pids"), usize::MAX)
            .into_iter()
            .filter(|p| !p.starts_with("aiq-test"))
            .collect(),
    }
}

#[test]
fn every_dry_run_changes_nothing_outside_target_xtask() {
    require_docker();
    require_cluster();
    let home = TempDir::new("dry-run-home");
    let home_env = home.path().display().to_string();
    // Docker's settings (its builders) and kubectl's discovery cache (which
    // every kubectl query fills) stay the real ones: only the xtask's cache
    // is empty.
    let real_home = std::env::var("HOME").unwrap();
    let docker_config = format!("{real_home}/.docker");
    let kube_cache = format!("{real_home}/.kube/cache");
    // The run's clean commit of this repository (its `target/xtask/` is
    // where a dry run may write).
    let root = run_commit().clone;
    // Each with its exit code and whether it has something to do here:
    // `down` finds no stack of this name, and `rollback` an empty history
    // in the real manifests' namespace (a refusal that must change nothing
    // either).
    let commands: [(&[&str], i32, bool); 13] = [
        (&["cluster", "up"], 0, true),
        (&["cluster", "down"], 0, true),
        (&["build"], 0, true),
        (&["build", "--push"], 0, true),
        (&["up"], 0, true),
        (&["down"], 0, false),
        (&["mirror", "--force"], 0, true),
        (&["deploy", "--context", "aiq-test"], 0, true),
        (&["rollback", "--context", "aiq-test"], 2, false),
        (&["clean", "--all"], 0, true),
        (
            &["builder", "up", "--in-cluster", "--context", "aiq-test"],
            0,
            true,
        ),
        (&["builder", "up"], 0, true),
        (
            &["builder", "down", "--in-cluster", "--context", "aiq-test"],
            0,
            false,
        ),
    ];
    for (args, code, acts) in commands {
        let before = machine(home.path());
        let mut all = args.to_vec();
        all.push("--dry-run");
        let run = xtask(
            &root,
            &all,
            &[
                ("HOME", &home_env),
                ("DOCKER_CONFIG", &docker_config),
                ("KUBECACHEDIR", &kube_cache),
                ("XTASK_LOCAL_REGISTRY", &registry()),
            ],
        );
        let after = machine(home.path());
        assert_eq!(run.code, code, "`{}`:\n{}", all.join(" "), run.stderr);
        let printed = run.stdout.lines().any(|l| l.starts_with("$ "));
        assert_eq!(
            printed,
            acts,
            "`{}` printed {}commands:\n{}\n{}",
            all.join(" "),
            if printed { "" } else { "no " },
            run.stdout,
            run.stderr
        );
        assert_eq!(
            before,
            after,
            "`{}` changed the machine:\n{}",
            all.join(" "),
            run.stderr
        );
    }
}
