//! Stopping the cluster and clearing everything it made, also after every
//! one of its processes was SIGKILLed: the daemons, the containerd shims
//! and pod processes they leave behind, the mounts (container root
//! filesystems, pod volumes, network namespaces, all under the state
//! directory), the bridges, iptables rules that name them or the cluster's
//! addresses, the cgroups under its own root, and the state directory.
//! Nothing else: another node's pods, cgroups and `KUBE-*` chains (every
//! kubelet names its chains alike, so they are left) are not touched.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{Paths, BRIDGE, DAEMONS, NODE_LINK};
use crate::exec::{Cmd, Exec};

/// What in an iptables rule makes it the cluster's: its bridges (it adds
/// no rule itself; one that names its bridges can only be about it). An
/// address in its range could be in someone else's rule.
const OURS_IN_RULES: [&str; 2] = [BRIDGE, NODE_LINK];

/// Process names of a Kubernetes node (the kubelet, or the one binary of
/// k3s, k0s, RKE2 or MicroK8s) that are not this cluster's.
const NODE_PROCESSES: [&str; 8] = [
    "kubelet",
    "kube-apiserver",
    "k3s",
    "k3s-server",
    "k3s-agent",
    "k0s",
    "rke2",
    "kubelite",
];

/// Every process of another Kubernetes node on this machine: a kubelet or
/// a distribution's node binary whose command line does not name this
/// cluster's state directory.
pub fn foreign_node(paths: &Paths) -> Vec<(u32, String)> {
    let state = paths.state.display().to_string();
    processes()
        .into_iter()
        .filter(|(pid, cmdline)| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // kind's and minikube's kubelets run in a network namespace of
            // their own, sharing no iptables rule or bridge with this one.
            let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
            // A daemon of this cluster just killed and not yet reaped is a
            // zombie with an empty command line: not another node.
            NODE_PROCESSES.contains(&comm.trim())
                && alive(*pid)
                && !cmdline.trim().is_empty()
                && !cmdline.contains(&state)
                && net(&pid.to_string()) == net("self")
        })
        .collect()
}

/// The pid in `daemon`'s pid file, if that process is alive and is still
/// ours: its command line names the state directory (a pid file can
/// outlive its process, and pids are reused).
pub fn live_pid(paths: &Paths, daemon: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(paths.pid_file(daemon))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)
        .replace('\0', " ");
    let ours = cmdline.contains(&paths.state.display().to_string());
    ours.then_some(pid)
}

/// Whether `pid` runs (a zombie has exited).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

pub fn run(exec: &Exec, paths: &Paths) -> Result<()> {
    // The kubelet first, so it restarts nothing; etcd last.
    let daemons: Vec<u32> = DAEMONS
        .iter()
        .rev()
        .filter_map(|d| live_pid(paths, d))
        .collect();
    kill(exec, "TERM", &daemons)?;
    if !exec.dry_run {
        wait_gone(&daemons, Duration::from_secs(5));
    }
    let survivors: Vec<u32> = daemons.into_iter().filter(|p| alive(*p)).collect();
    kill(exec, "KILL", &survivors)?;
    // Shims outlive containerd, and pod processes outlive their shims.
    let socket = paths.containerd_socket();
    let shims: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("containerd-shim") && cmdline.contains(&socket))
        .map(|(pid, _)| pid)
        .collect();
    kill(exec, "KILL", &shims)?;
    if exec.dry_run {
        // Printed once; nothing was killed, so nothing is waited for.
        kill(exec, "KILL", &pod_processes())?;
    } else {
        kill_pod_processes(exec)?;
    }
    unmount_all_under(exec, &paths.state)?;
    for link in [BRIDGE, NODE_LINK] {
        if Path::new("/sys/class/net").join(link).exists() {
            exec.run(&Cmd::new("ip").args(["link", "delete", link]))?;
        }
    }
    for iptables in ["iptables", "ip6tables"] {
        remove_our_rules(exec, iptables)?;
    }
    if !exec.dry_run {
        remove_pod_cgroups()?;
    }
    if paths.state.exists() {
        exec.run(&Cmd::new("rm").args(["-rf", &paths.state.display().to_string()]))?;
    }
    Ok(())
}

/// SIGKILLs every pod process until none is left (a process can fork
/// while its siblings die), for 10 s at most.
fn kill_pod_processes(exec: &Exec) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pods = pod_processes();
        if pods.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pod processes survive SIGKILL: {pods:?}"
        );
        kill(exec, "KILL", &pods)?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kill(exec: &Exec, signal: &str, pids: &[u32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    // A process may exit between the look and the kill: not an error.
    let _ = exec.run(
        &Cmd::new("kill")
            .arg(format!("-{signal}"))
            .args(pids.iter().map(u32::to_string)),
    );
    Ok(())
}

fn wait_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && pids.iter().any(|pid| alive(*pid)) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every process's pid and command line.
fn processes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .collect()
}

/// Every process in a cgroup under the cluster's own root.
fn pod_processes() -> Vec<u32> {
    let mut pids = Vec::new();
    for root in super::cgroup_roots() {
        for dir in cgroup_tree(&root) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `root` and every cgroup below it, deepest last.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(entry.path());
            }
        }
        all.push(dir);
    }
    all
}

/// Removes the cluster's cgroup root from every hierarchy, children first
/// (a cgroup directory goes only once it is empty).
fn remove_pod_cgroups() -> Result<()> {
    for root in super::cgroup_roots() {
        let mut tree = cgroup_tree(&root);
        tree.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in tree {
            std::fs::remove_dir(&dir)
                .or_else(|e| if dir.exists() { Err(e) } else { Ok(()) })
                .with_context(|| format!("removing cgroup {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Unmounts, deepest first, every mount at or below `dir`: container root
/// filesystems, pod volumes and `/dev/shm`s, network namespaces.
fn unmount_all_under(exec: &Exec, dir: &Path) -> Result<()> {
    let prefix = dir.display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points.dedup();
    exec.run(&Cmd::new("umount").arg("--lazy").args(points))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Deletes every rule that names the cluster's bridges or addresses, in
/// every table; chains stay.
fn remove_our_rules(exec: &Exec, iptables: &str) -> Result<()> {
    if which::which(iptables).is_err() {
        return Ok(());
    }
    let Ok(saved) = exec.read(&Cmd::new(format!("{iptables}-save"))) else {
        return Ok(());
    };
    for (table, rule) in our_rules(&saved) {
        let mut words = split_rule(&rule);
        words[0] = "-D".into();
        exec.run(&Cmd::new(iptables).args(["-t", &table]).args(words))?;
    }
    Ok(())
}

/// The words of an `iptables-save` rule, whose comments are in double
/// quotes.
fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => word.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The rules of an `iptables-save` dump that are the cluster's, each with
/// its table.
fn our_rules(saved: &str) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut rules = Vec::new();
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            name.clone_into(&mut table);
        } else if line.starts_with("-A ") && OURS_IN_RULES.iter().any(|o| line.contains(o)) {
            rules.push((table.clone(), line.to_owned()));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rules_naming_the_clusters_bridges_are_ours() {
        let saved = "\
# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -i aiq-cni0 -j ACCEPT
-A KUBE-FIREWALL -m comment --comment \"drop\" -j DROP
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o aiq-node0 -j RETURN
-A POSTROUTING -s 10.213.1.0/24 -j MASQUERADE
COMMIT
";
        assert_eq!(
            our_rules(saved),
            [
                (
                    "filter".to_owned(),
                    "-A FORWARD -i aiq-cni0 -j ACCEPT".to_owned()
                ),
                (
                    "nat".to_owned(),
                    "-A POSTROUTING -o aiq-node0 -j RETURN".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn quoted_comments_stay_one_word() {
        assert_eq!(
            split_rule(
                r#"-A INPUT -m comment --comment "kubernetes \"firewall\"" -j KUBE-FIREWALL"#
            ),
            [
                "-A",
                "INPUT",
                "-m",
                "comment",
                "--comment",
                "kubernetes \"firewall\"",
                "-j",
                "KUBE-FIREWALL"
            ]
        );
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
