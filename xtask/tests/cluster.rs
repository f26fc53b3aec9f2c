//! `cargo xtask cluster down` and `up` on the real test cluster: `down`
//! leaves nothing of the cluster on the machine, `up` is idempotent, and
//! `up` recovers after every cluster process was SIGKILLed, clearing what
//! they left. One test, in a binary of its own, because it stops and
//! restarts the cluster the other tests deploy to; it ends with the
//! cluster running.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The state directory: where `cluster up` put the kubeconfig.
fn state_dir() -> PathBuf {
    Path::new(&std::env::var("KUBECONFIG").unwrap())
        .parent()
        .unwrap()
        .to_owned()
}

fn processes() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, cmdline)| !cmdline.is_empty())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .starts_with('Z')
    })
}

/// What of the cluster is on the machine right now.
#[derive(Debug)]
struct Traces {
    /// Daemons and shims: processes whose command line names the state
    /// directory.
    processes: Vec<(u32, String)>,
    /// Processes in the kubelet's pod cgroups.
    pod_processes: Vec<u32>,
    mounts: Vec<String>,
    links: Vec<String>,
    iptables_chains: Vec<String>,
    state_dir: bool,
}

fn traces() -> Traces {
    let state = state_dir().display().to_string();
    let mut pod_processes = Vec::new();
    let mut todo = vec![PathBuf::from("/sys/fs/cgroup/pids/kubepods")];
    while let Some(dir) = todo.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pod_processes.extend(procs.lines().filter_map(|l| l.parse::<u32>().ok()));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&state) || m.starts_with("/run/netns/cni-"))
        .map(str::to_owned)
        .collect();
    let links = ["aiq-cni0", "aiq-node0"]
        .into_iter()
        .filter(|l| Path::new("/sys/class/net").join(l).exists())
        .map(str::to_owned)
        .collect();
    let mut iptables_chains = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let dump = ok(Path::new("."), save, &[]);
        iptables_chains.extend(
            dump.lines()
                .filter(|l| l.starts_with(":KUBE-") || l.starts_with(":CNI-"))
                .map(|l| format!("{save} {l}")),
        );
    }
    Traces {
        processes: processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains(&state))
            .collect(),
        pod_processes,
        mounts,
        links,
        iptables_chains,
        state_dir: state_dir().exists(),
    }
}

fn assert_nothing_left(what: &str) {
    let left = traces();
    assert!(
        left.processes.is_empty()
            && left.pod_processes.is_empty()
            && left.mounts.is_empty()
            && left.links.is_empty()
            && left.iptables_chains.is_empty()
            && !left.state_dir,
        "{what} left: {left:#?}"
    );
}

/// Runs a pod in a namespace of its own and waits until it is Ready.
fn run_pod(namespace: &str) {
    kubectl(&["create", "namespace", namespace]);
    let image = format!("{}/library/debian:bookworm-slim", registry());
    // The ServiceAccount controller creates `default` a moment after the
    // namespace; pods are refused until then.
    wait_for(
        &format!("the default ServiceAccount in {namespace}"),
        60,
        || {
            !kubectl_json(&[
                "--namespace",
                namespace,
                "get",
                "serviceaccount",
                "default",
                "--ignore-not-found",
            ])
            .is_null()
        },
    );
    kubectl(&[
        "--namespace",
        namespace,
        "run",
        "sleeper",
        "--image",
        &image,
        "--command",
        "--",
        "sleep",
        "3600",
    ]);
    kubectl(&[
        "--namespace",
        namespace,
        "wait",
        "pod/sleeper",
        "--for=condition=Ready",
        "--timeout=90s",
    ]);
}

fn cluster(action: &str) -> XtaskRun {
    let run = xtask(&project_root(), &["cluster", action], &[]);
    run.assert_ok();
    run
}

#[test]
fn down_leaves_nothing_and_up_recovers_from_a_sigkill_of_every_cluster_process() {
    require_docker();
    require_cluster();
    let kubeconfig_line = format!("KUBECONFIG={}", std::env::var("KUBECONFIG").unwrap());

    // A running pod: a shim, a container, its mounts and network namespace.
    run_pod(&unique("life-"));
    let before = traces();
    assert!(
        !before.pod_processes.is_empty() && !before.mounts.is_empty(),
        "{before:#?}"
    );

    cluster("down");
    assert_nothing_left("down");
    for pid in &before.pod_processes {
        assert!(!alive(*pid), "pod process {pid} survived down");
    }

    let up = cluster("up");
    assert_eq!(up.stdout.trim(), kubeconfig_line);
    run_pod(&unique("life-"));

    // A second up finds it running and changes nothing.
    let daemons = traces().processes;
    let again = cluster("up");
    assert_eq!(again.stdout.trim(), kubeconfig_line);
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    assert_eq!(traces().processes, daemons);

    // SIGKILL every process the cluster started: shims and pods live on.
    let killed = traces();
    let daemon_pids: Vec<String> = std::fs::read_dir(state_dir().join("run"))
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(daemon_pids.len(), 6, "{daemon_pids:?}");
    let mut kill = vec!["-KILL"];
    kill.extend(daemon_pids.iter().map(String::as_str));
    ok(Path::new("."), "kill", &kill);
    wait_for("the SIGKILLed daemons are gone", 30, || {
        daemon_pids.iter().all(|pid| !alive(pid.parse().unwrap()))
    });
    let orphans: Vec<u32> = killed
        .pod_processes
        .iter()
        .copied()
        .filter(|p| alive(*p))
        .collect();
    assert!(
        !orphans.is_empty(),
        "pods outlive a SIGKILLed kubelet: {killed:#?}"
    );

    let recovered = cluster("up");
    assert_eq!(recovered.stdout.trim(), kubeconfig_line);
    for (pid, cmdline) in &killed.processes {
        assert!(!alive(*pid), "{pid} ({cmdline}) survived the recovery");
    }
    for pid in &killed.pod_processes {
        assert!(!alive(*pid), "pod process {pid} survived the recovery");
    }
    let now = traces();
    for mount in &killed.mounts {
        if mount.contains("/netns/") || mount.contains("/rootfs") {
            assert!(!now.mounts.contains(mount), "{mount} is still mounted");
        }
    }
    // And it works: a pod runs on the new node.
    run_pod(&unique("life-"));
}
