//! Stopping the cluster and clearing everything it made, also after every
//! one of its processes was SIGKILLed: the daemons, the containerd shims
//! and pod processes they leave behind, the mounts (container root
//! filesystems, pod volumes, network namespaces, all under the state
//! directory), the bridge, the iptables chains the kubelet adds, the pod
//! cgroups, and the state directory itself.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{Paths, BRIDGE, DAEMONS, NODE_LINK};
use crate::exec::{Cmd, Exec};

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
    wait_gone(&daemons, Duration::from_secs(5));
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pods = pod_processes();
        if pods.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pod processes survive SIGKILL: {pods:?}"
        );
        kill(exec, "KILL", &pods)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    unmount_all_under(exec, &paths.state)?;
    for link in [BRIDGE, NODE_LINK] {
        if Path::new("/sys/class/net").join(link).exists() {
            exec.run(&Cmd::new("ip").args(["link", "delete", link]))?;
        }
    }
    for iptables in ["iptables", "ip6tables"] {
        remove_kube_chains(exec, iptables)?;
    }
    if !exec.dry_run {
        remove_pod_cgroups()?;
    }
    if paths.state.exists() {
        exec.run(&Cmd::new("rm").args(["-rf", &paths.state.display().to_string()]))?;
    }
    Ok(())
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

/// The cgroup the kubelet puts every pod under (cgroupfs driver), in one
/// v1 hierarchy (pids), or the unified one.
const POD_CGROUPS: [&str; 2] = ["/sys/fs/cgroup/pids/kubepods", "/sys/fs/cgroup/kubepods"];

/// Every process in a pod cgroup.
fn pod_processes() -> Vec<u32> {
    let mut pids = Vec::new();
    for root in POD_CGROUPS {
        for dir in cgroup_tree(Path::new(root)) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
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

/// Removes the pod cgroups from every hierarchy, children first (a cgroup
/// directory goes only once it is empty).
fn remove_pod_cgroups() -> Result<()> {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Ok(());
    };
    let mut roots: Vec<PathBuf> = hierarchies
        .flatten()
        .map(|h| h.path().join("kubepods"))
        .collect();
    roots.push(PathBuf::from("/sys/fs/cgroup/kubepods"));
    for root in roots {
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

/// Deletes every `KUBE-*` chain (the kubelet's; nothing else on these
/// machines makes them) and the rules that jump to them, in every table.
fn remove_kube_chains(exec: &Exec, iptables: &str) -> Result<()> {
    if which::which(iptables).is_err() {
        return Ok(());
    }
    let Ok(saved) = exec.read(&Cmd::new(format!("{iptables}-save"))) else {
        return Ok(());
    };
    for (table, chains, jumps) in kube_chains(&saved) {
        for rule in jumps {
            let mut words = split_rule(&rule);
            words[0] = "-D".into();
            exec.run(&Cmd::new(iptables).args(["-t", &table]).args(words))?;
        }
        for chain in &chains {
            exec.run(&Cmd::new(iptables).args(["-t", &table, "-F", chain]))?;
        }
        for chain in &chains {
            exec.run(&Cmd::new(iptables).args(["-t", &table, "-X", chain]))?;
        }
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

/// Per table of an `iptables-save` dump: its `KUBE-*` chains, and the
/// rules of other chains that jump to one of them.
fn kube_chains(saved: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut tables = Vec::new();
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            tables.push((table.to_owned(), Vec::new(), Vec::new()));
        } else if let (Some(chain), Some((_, chains, _))) =
            (line.strip_prefix(':'), tables.last_mut())
        {
            let name = chain.split_whitespace().next().unwrap_or_default();
            if name.starts_with("KUBE-") {
                chains.push(name.to_owned());
            }
        } else if let (Some(rule), Some((_, _, jumps))) =
            (line.strip_prefix("-A "), tables.last_mut())
        {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let target = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1);
            if !chain.starts_with("KUBE-") && target.is_some_and(|t| t.starts_with("KUBE-")) {
                jumps.push(line.to_owned());
            }
        }
    }
    tables.retain(|(_, chains, _)| !chains.is_empty());
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_chains_and_the_rules_that_jump_to_them_are_found() {
        let saved = "\
# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -j DOCKER
-A KUBE-FIREWALL -m comment --comment \"drop\" -j DROP
COMMIT
*nat
:DOCKER - [0:0]
-A DOCKER -i docker0 -j RETURN
COMMIT
";
        let found = kube_chains(saved);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, "mangle");
        assert_eq!(found[0].1, ["KUBE-KUBELET-CANARY"]);
        assert!(found[0].2.is_empty());
        assert_eq!(found[1].0, "filter");
        assert_eq!(found[1].1, ["KUBE-FIREWALL"]);
        assert_eq!(found[1].2, ["-A INPUT -j KUBE-FIREWALL"]);
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
