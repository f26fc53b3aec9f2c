//! The real single-node test cluster: Kubernetes built from the Go module
//! proxy (`build.rs`), etcd and containerd from Debian, certificates and
//! configuration generated per start (`files.rs`), every daemon started in
//! the background with its pid and log in one state directory, and a
//! teardown that also clears what a SIGKILLed cluster leaves (`teardown.rs`).
//!
//! The cluster talks only to loopback and its own pods: the apiserver,
//! etcd and the kubelet's health port bind to 127.0.0.1, the node address
//! and the pod range live on the cluster's own bridge, nothing masquerades,
//! pods get no route off the bridge and a resolver on their own loopback.

mod build;
mod files;
mod teardown;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
};

/// One pinned Kubernetes release for every binary. 1.34 is the newest
/// minor whose kubelet still starts on cgroup v1 hosts without
/// `failCgroupV1: false`, and is tested with containerd 1.7 (Debian
/// trixie's); 1.34.4 is its newest patch release on the module proxy.
pub const VERSION: &str = "v1.34.4";
/// The kubeconfig context (and cluster) name `up` writes.
pub const CONTEXT: &str = "aiq-test";
pub const NODE_NAME: &str = "aiq-node";
/// The bridge the CNI plugin puts the pods on.
const BRIDGE: &str = "aiq-cni0";
/// A port-less bridge of its own that holds the node's address (this
/// kernel has no dummy links; the CNI bridge refuses a second address), so
/// the node is off `eth0` and off anything else.
const NODE_LINK: &str = "aiq-node0";
const NODE_IP: &str = "10.213.0.1";
const POD_CIDR: &str = "10.213.1.0/24";
const SERVICE_CIDR: &str = "10.213.128.0/24";
const FIRST_SERVICE_IP: &str = "10.213.128.1";
/// Ports away from the defaults, so a developer's own cluster is not hit.
const API_PORT: u16 = 16443;
/// The cgroup, in every hierarchy, that the kubelet puts its pods under
/// (`cgroupRoot`) and the teardown clears: another node's `kubepods` is
/// not ours to touch.
pub const CGROUP_ROOT: &str = "aiq-test";
const ETCD_CLIENT_PORT: u16 = 12379;
const ETCD_PEER_PORT: u16 = 12380;

/// Where a cluster lives: its binaries (cached by version, outside any
/// clone) and its state (pids, logs, certificates, etcd, containerd).
#[derive(Clone, Debug)]
pub struct Paths {
    pub bin: PathBuf,
    pub state: PathBuf,
}

impl Paths {
    pub fn new(env: &crate::env::Env) -> Result<Paths> {
        Ok(Paths {
            bin: crate::cache::dir(env)?
                .join("kubernetes")
                .join(VERSION)
                .join("bin"),
            state: PathBuf::from("/var/lib/aiq-xtask/cluster"),
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.state.join("admin.kubeconfig")
    }

    /// The certificates and keys (0700).
    fn pki_dir(&self) -> PathBuf {
        self.state.join("pki")
    }

    /// Which settings the running daemons were started with.
    fn settings_file(&self) -> PathBuf {
        self.state.join("run/settings")
    }

    fn pki(&self, file: &str) -> String {
        self.pki_dir().join(file).display().to_string()
    }

    fn pid_file(&self, daemon: &str) -> PathBuf {
        self.state.join("run").join(format!("{daemon}.pid"))
    }

    fn log(&self, daemon: &str) -> PathBuf {
        self.state.join("log").join(format!("{daemon}.log"))
    }

    fn containerd_socket(&self) -> String {
        self.state
            .join("containerd/containerd.sock")
            .display()
            .to_string()
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    /// `kubectl --kubeconfig <admin>` of this cluster's own version.
    fn kubectl(&self, args: &[&str]) -> Cmd {
        Cmd::new(self.tool("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig().display().to_string())
            .args(args.iter().copied())
    }
}

/// `PATH` with the cluster's binaries first, so the tests and `ci` run the
/// kubectl that matches the server.
pub fn path_with_tools(env: &crate::env::Env) -> Result<std::ffi::OsString> {
    let path = env.var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(Paths::new(env)?.bin).chain(std::env::split_paths(&path)))
        .context("building PATH")
}

/// The daemons, in start order; stopped in reverse.
const DAEMONS: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
];

/// Whether the cluster `up` started is running: every daemon alive and
/// the node Ready.
fn is_running(exec: &Exec, paths: &Paths) -> bool {
    DAEMONS
        .iter()
        .all(|d| teardown::live_pid(paths, d).is_some())
        && node_ready(exec, paths).unwrap_or(false)
}

/// The daemons' settings (their flags and configuration files), as this
/// xtask writes them: raised with every change, so a cluster an older
/// xtask started is started again rather than found running without them
/// (2: the apiserver allows privileged pods, the kubelet drops images
/// unused for 30 minutes).
const SETTINGS: &str = "2";

/// Whether the running cluster was started with this xtask's settings.
fn current_settings(paths: &Paths) -> bool {
    std::fs::read_to_string(paths.settings_file()).is_ok_and(|s| s == SETTINGS)
}

/// Builds what is missing, starts the cluster (or finds it running) and
/// returns its kubeconfig path.
pub fn up(exec: &Exec) -> Result<PathBuf> {
    let paths = Paths::new(&exec.env)?;
    preflight()?;
    // Before anything runs them: the binaries are the ones built here.
    let cached = build::verified(exec, &paths)?;
    if let Some((pid, cmdline)) = teardown::foreign_node(&paths).first() {
        return Err(refuse(format!(
            "another Kubernetes node runs on this machine (pid {pid}: {cmdline}); the test \
             cluster would share its iptables and cgroups with it: stop it, or run the tests \
             on another machine"
        )));
    }
    if !exec.dry_run && is_running(exec, &paths) {
        if current_settings(&paths) {
            eprintln!("the test cluster is already running");
            return Ok(paths.kubeconfig());
        }
        eprintln!("the test cluster runs with an older xtask's settings: starting it again");
    }
    if !cached {
        exec.step(format!("Kubernetes {VERSION} binaries"), || {
            build::kubernetes(exec, &paths)
        })?;
    }
    let registry = crate::registry::ensure_local(exec)?;
    let pause = exec.step("pause image", || build::pause_image(exec, &registry))?;
    exec.step("clear what an earlier cluster left", || {
        teardown::run(exec, &paths)
    })?;
    exec.step("start the cluster", || {
        start(exec, &paths, &registry, &pause)
    })?;
    Ok(paths.kubeconfig())
}

/// Stops exactly what `up` started and removes its state.
pub fn down(exec: &Exec) -> Result<()> {
    let paths = Paths::new(&exec.env)?;
    exec.step("stop the test cluster", || teardown::run(exec, &paths))
}

/// What the cluster needs from the machine, each named with what installs
/// it, checked before anything is built or started.
pub fn preflight() -> Result<()> {
    let hint = "`cargo xtask test`, run as root, installs it";
    if !crate::exec::is_root() {
        return Err(refuse(
            "the test cluster needs root (it runs a kubelet, containerd and network setup)",
        ));
    }
    for (tool, what) in [
        (
            "go",
            "Go (the Kubernetes binaries are built from the Go module proxy)",
        ),
        ("etcd", "etcd 3.5 (Debian trixie's etcd-server)"),
        ("containerd", "containerd 1.7 (Debian trixie's containerd)"),
        ("runc", "runc"),
        ("openssl", "openssl"),
        ("gcc", "gcc with static glibc (libc6-dev)"),
        ("iptables", "iptables"),
        ("ip", "iproute2"),
    ] {
        if which::which(tool).is_err() {
            return Err(refuse(format!(
                "`{tool}` not found: the test cluster needs {what}; {hint}"
            )));
        }
    }
    if !Path::new(files::CNI_BIN_DIR).join("bridge").exists() {
        return Err(refuse(format!(
            "no CNI plugins in {}: {hint} (containernetworking-plugins)",
            files::CNI_BIN_DIR
        )));
    }
    Ok(())
}

fn start(exec: &Exec, paths: &Paths, registry: &str, pause: &str) -> Result<()> {
    if !exec.dry_run {
        for dir in ["run", "log", "pki"] {
            std::fs::create_dir_all(paths.state.join(dir))
                .with_context(|| format!("creating {}", paths.state.join(dir).display()))?;
        }
        // The keys: root alone reads them.
        crate::pki::restrict(&paths.pki_dir(), 0o700)?;
    }
    files::certificates(exec, paths)?;
    make_cgroup_root(exec)?;
    if !exec.dry_run {
        files::write_configs(paths, registry, pause)?;
    }
    exec.run(&Cmd::new("ip").args(["link", "add", NODE_LINK, "type", "bridge"]))?;
    exec.run(&Cmd::new("ip").args(["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_LINK]))?;
    exec.run(&Cmd::new("ip").args(["link", "set", NODE_LINK, "up"]))?;
    if exec.dry_run {
        for daemon in DAEMONS {
            exec.start_daemon(&files::daemon_command(paths, daemon), &paths.log(daemon))?;
        }
        return Ok(());
    }
    for daemon in DAEMONS {
        let pid = exec.start_daemon(&files::daemon_command(paths, daemon), &paths.log(daemon))?;
        std::fs::write(paths.pid_file(daemon), pid.to_string())?;
        let ready = || ready(exec, paths, daemon);
        wait_for(paths, daemon, pid, Duration::from_secs(90), ready)?;
    }
    let settings = paths.settings_file();
    std::fs::write(&settings, SETTINGS).with_context(|| format!("writing {}", settings.display()))
}

/// The kubelet's `cgroupRoot` in every hierarchy: it must exist before the
/// kubelet starts. A new v1 cpuset cgroup has no CPUs or memory nodes
/// until given its parent's.
fn make_cgroup_root(exec: &Exec) -> Result<()> {
    let dirs = cgroup_roots();
    exec.run(
        &Cmd::new("mkdir")
            .arg("-p")
            .args(dirs.iter().map(|d| d.display().to_string())),
    )?;
    for dir in dirs
        .iter()
        .filter(|d| d.starts_with("/sys/fs/cgroup/cpuset"))
    {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = dir.parent().unwrap_or(dir).join(file);
            if exec.dry_run || !parent.exists() {
                continue;
            }
            let value = std::fs::read_to_string(&parent)
                .with_context(|| format!("reading {}", parent.display()))?;
            std::fs::write(dir.join(file), value.trim())
                .with_context(|| format!("writing {}", dir.join(file).display()))?;
        }
    }
    Ok(())
}

/// [`CGROUP_ROOT`] in each cgroup hierarchy: below every v1 hierarchy
/// mounted under `/sys/fs/cgroup` (its links, such as `cpu` for
/// `cpu,cpuacct`, skipped), or below the one v2 hierarchy.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let top = Path::new("/sys/fs/cgroup");
    if top.join("cgroup.controllers").exists() {
        return vec![top.join(CGROUP_ROOT)];
    }
    let Ok(entries) = std::fs::read_dir(top) else {
        return Vec::new();
    };
    let mut roots: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join(CGROUP_ROOT))
        .collect();
    roots.sort();
    roots
}

/// Whether `daemon` answers, each in its own way.
fn ready(exec: &Exec, paths: &Paths, daemon: &str) -> Result<bool> {
    Ok(match daemon {
        // It takes clients only with the CA's certificates: accepting
        // connections is what it can show; the apiserver's readiness, next,
        // includes etcd's health.
        "etcd" => std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], ETCD_CLIENT_PORT)),
            Duration::from_secs(2),
        )
        .is_ok(),
        "kube-apiserver" => exec.succeeds(&paths.kubectl(&["get", "--raw", "/readyz"])),
        // The ServiceAccount controller runs: pods can be admitted.
        "kube-controller-manager" => exec.succeeds(&paths.kubectl(&[
            "get",
            "serviceaccount",
            "default",
            "--namespace",
            "default",
        ])),
        // No serving port (--secure-port=0): alive is all it can show; the
        // tests' first pod proves it schedules.
        "kube-scheduler" => true,
        "containerd" => Path::new(&paths.containerd_socket()).exists(),
        "kubelet" => node_ready(exec, paths)?,
        _ => bail!("unknown daemon {daemon}"),
    })
}

/// Polls `check` until it holds; fails early, with the log's last lines,
/// if the daemon (`pid`) died.
fn wait_for(
    paths: &Paths,
    daemon: &str,
    pid: u32,
    within: Duration,
    check: impl Fn() -> Result<bool>,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if check()? {
            eprintln!("{daemon} ready in {:.1}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        let dead = !teardown::alive(pid);
        if dead || started.elapsed() > within {
            let log = std::fs::read_to_string(paths.log(daemon)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{daemon} {} (log {}):\n{}",
                if dead {
                    "exited".to_owned()
                } else {
                    format!("not ready within {}s", within.as_secs())
                },
                paths.log(daemon).display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The node is registered and its Ready condition is True.
fn node_ready(exec: &Exec, paths: &Paths) -> Result<bool> {
    #[derive(Deserialize)]
    struct Node {
        status: NodeStatus,
    }
    #[derive(Deserialize)]
    struct NodeStatus {
        #[serde(default)]
        conditions: Vec<crate::kube::Condition>,
    }
    let Ok(json) = exec.read(&paths.kubectl(&[
        "get",
        "node",
        NODE_NAME,
        "--ignore-not-found",
        "--output",
        "json",
    ])) else {
        return Ok(false);
    };
    if json.trim().is_empty() {
        return Ok(false);
    }
    let node: Node = serde_json::from_str(&json).context("parsing `kubectl get node`")?;
    Ok(node
        .status
        .conditions
        .iter()
        .any(|c| c.r#type == "Ready" && c.status == "True"))
}
