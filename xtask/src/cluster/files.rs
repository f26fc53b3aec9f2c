//! What the cluster's daemons are given: certificates and keys made for
//! each start (nothing secret is committed), the admin kubeconfig,
//! containerd's and the kubelet's configuration, the CNI network, and each
//! daemon's command line.

use anyhow::{Context, Result};
use serde_json::json;

use super::{
    Paths, API_PORT, BRIDGE, CGROUP_ROOT, CONTEXT, ETCD_CLIENT_PORT, ETCD_PEER_PORT,
    FIRST_SERVICE_IP, NODE_IP, NODE_NAME, POD_CIDR, SERVICE_CIDR,
};
use crate::{
    exec::{Cmd, Exec},
    pki::{restrict, Pki},
};

/// Where Debian's containernetworking-plugins installs the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A CA; the apiserver's serving certificate (loopback, the node address,
/// the first service address and the in-cluster names); etcd's (serving
/// its clients and its one peer, on loopback) and the apiserver's client
/// certificate for it; one admin client certificate in `system:masters`
/// that every component and the tests use; the service-account signing key
/// pair. The keys are readable by root alone.
pub fn certificates(exec: &Exec, paths: &Paths) -> Result<()> {
    let pki = Pki::new(exec, paths.pki_dir());
    pki.ca("/CN=aiq-test-ca")?;
    for key in ["apiserver", "etcd", "apiserver-etcd-client", "admin", "sa"] {
        pki.key(key)?;
    }
    exec.run(&Cmd::new("openssl").args([
        "rsa",
        "-in",
        &pki.file("sa.key"),
        "-pubout",
        "-out",
        &pki.file("sa.pub"),
    ]))?;
    let sans = format!(
        "subjectAltName=IP:127.0.0.1,IP:{NODE_IP},IP:{FIRST_SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
    );
    pki.sign("apiserver", "/CN=kube-apiserver", &sans)?;
    pki.sign(
        "etcd",
        "/CN=aiq-test-etcd",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    pki.sign(
        "apiserver-etcd-client",
        "/CN=kube-apiserver-etcd-client",
        "extendedKeyUsage=clientAuth\n",
    )?;
    pki.sign(
        "admin",
        "/O=system:masters/CN=aiq-test-admin",
        "extendedKeyUsage=clientAuth\n",
    )
}

/// Every configuration file the daemons read.
pub fn write_configs(paths: &Paths, registry: &str, pause: &str) -> Result<()> {
    let state = |p: &str| paths.state.join(p).display().to_string();
    let write = |relative: &str, text: String| -> Result<()> {
        let path = paths.state.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {
            "server": format!("https://127.0.0.1:{API_PORT}"),
            "certificate-authority": paths.pki("ca.crt"),
        }}],
        "users": [{"name": "aiq-test-admin", "user": {
            "client-certificate": paths.pki("admin.crt"),
            "client-key": paths.pki("admin.key"),
        }}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": "aiq-test-admin"}}],
        "current-context": CONTEXT,
    });
    write(
        "admin.kubeconfig",
        serde_json::to_string_pretty(&kubeconfig)?,
    )?;
    restrict(&paths.kubeconfig(), 0o600)?;

    // containerd 1.7's config format; the registry over plain HTTP through
    // its hosts.toml (once `config_path` is set, localhost is not implicitly
    // plain HTTP any more).
    let containerd = format!(
        r#"version = 2
root = "{root}"
state = "{run}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  # These machines withhold CAP_SYS_RESOURCE even from root, so runc cannot
  # lower a process's OOM score (the kubelet asks -998 for sandboxes):
  # keep every score at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        root = state("containerd/root"),
        run = state("containerd/state"),
        socket = paths.containerd_socket(),
        opt = state("containerd/opt"),
        cni_conf = state("cni/net.d"),
        certs = state("containerd/certs.d"),
    );
    write("containerd/config.toml", containerd)?;
    // containerd keys hosts by registry host: a path is the repository's.
    let host = crate::registry::host_of(registry);
    write(
        &format!("containerd/certs.d/{host}/hosts.toml"),
        format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;

    // A bridge and host-local addresses, no masquerading and no route but
    // the cluster's own range: a pod reaches nothing off this machine.
    let cni = json!({
        "cniVersion": "1.0.0",
        "name": "aiq-test",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR}]],
                "routes": [{"dst": "10.213.0.0/16"}],
                "dataDir": state("cni/ipam"),
            },
        }],
    });
    write(
        "cni/net.d/10-aiq-test.conflist",
        serde_json::to_string_pretty(&cni)?,
    )?;

    // Pods resolve through their own loopback, where nothing answers: no
    // query leaves the machine.
    write(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions ndots:1\n".into(),
    )?;

    let kubelet = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": paths.pki("ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": format!("unix://{}", paths.containerd_socket()),
        "cgroupDriver": "cgroupfs",
        // Pods under a root of its own, which the teardown alone clears.
        "cgroupRoot": format!("/{CGROUP_ROOT}"),
        "failSwapOn": false,
        "failCgroupV1": false,
        "resolvConf": state("resolv.conf"),
        // A test node never evicts or collects images under disk pressure
        // (as kind does): the tests' images stay put.
        "evictionHard": {"nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%"},
        "imageGCHighThresholdPercent": 100,
        // But an image no container has used for half an hour goes (the
        // kubelet looks every 5 minutes), so a node that runs the tests
        // again and again holds about one run's images, not every run's.
        "imageMaximumGCAge": "30m",
        "serializeImagePulls": false,
    });
    write(
        "kubelet/config.json",
        serde_json::to_string_pretty(&kubelet)?,
    )?;
    Ok(())
}

/// The command line of one daemon.
pub fn daemon_command(paths: &Paths, daemon: &str) -> Cmd {
    let state = |p: &str| paths.state.join(p).display().to_string();
    let kubeconfig = paths.kubeconfig().display().to_string();
    // TLS both ways, clients and peer alike: only a certificate the
    // cluster's CA signed (root alone reads its keys) reaches the store.
    let etcd = format!("https://127.0.0.1:{ETCD_CLIENT_PORT}");
    let peer = format!("https://127.0.0.1:{ETCD_PEER_PORT}");
    match daemon {
        "etcd" => Cmd::new("etcd").args([
            "--name=aiq-test".to_owned(),
            format!("--cert-file={}", paths.pki("etcd.crt")),
            format!("--key-file={}", paths.pki("etcd.key")),
            format!("--trusted-ca-file={}", paths.pki("ca.crt")),
            "--client-cert-auth".to_owned(),
            format!("--peer-cert-file={}", paths.pki("etcd.crt")),
            format!("--peer-key-file={}", paths.pki("etcd.key")),
            format!("--peer-trusted-ca-file={}", paths.pki("ca.crt")),
            "--peer-client-cert-auth".to_owned(),
            format!("--data-dir={}", state("etcd")),
            format!("--listen-client-urls={etcd}"),
            format!("--advertise-client-urls={etcd}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=aiq-test={peer}"),
            // A throwaway store: durability costs seconds per test for nothing.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ]),
        "kube-apiserver" => Cmd::new(paths.tool(daemon)).args([
            format!("--etcd-servers={etcd}"),
            format!("--etcd-cafile={}", paths.pki("ca.crt")),
            format!("--etcd-certfile={}", paths.pki("apiserver-etcd-client.crt")),
            format!("--etcd-keyfile={}", paths.pki("apiserver-etcd-client.key")),
            // No anonymous requests, not even for /healthz or /version.
            "--anonymous-auth=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--secure-port={API_PORT}"),
            format!("--advertise-address={NODE_IP}"),
            format!("--tls-cert-file={}", paths.pki("apiserver.crt")),
            format!("--tls-private-key-file={}", paths.pki("apiserver.key")),
            format!("--client-ca-file={}", paths.pki("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
            format!("--service-account-key-file={}", paths.pki("sa.pub")),
            format!("--service-account-signing-key-file={}", paths.pki("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".to_owned(),
            // So `kubectl logs` and `exec` reach the kubelet, by its address:
            // its name would be a DNS query off the machine.
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
            format!("--kubelet-client-certificate={}", paths.pki("admin.crt")),
            format!("--kubelet-client-key={}", paths.pki("admin.key")),
            "--profiling=false".to_owned(),
            // The in-cluster BuildKit (`cargo xtask builder up --in-cluster`)
            // runs privileged, as BuildKit's own Kubernetes examples do.
            "--allow-privileged=true".to_owned(),
        ]),
        "kube-controller-manager" => Cmd::new(paths.tool(daemon)).args([
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_owned(),
            format!("--service-account-private-key-file={}", paths.pki("sa.key")),
            format!("--root-ca-file={}", paths.pki("ca.crt")),
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=0".to_owned(),
            "--profiling=false".to_owned(),
        ]),
        "kube-scheduler" => Cmd::new(paths.tool(daemon)).args([
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=0".to_owned(),
            "--profiling=false".to_owned(),
        ]),
        "containerd" => {
            Cmd::new("containerd").args(["--config".to_owned(), state("containerd/config.toml")])
        }
        "kubelet" => Cmd::new(paths.tool(daemon)).args([
            format!("--config={}", state("kubelet/config.json")),
            format!("--kubeconfig={kubeconfig}"),
            format!("--root-dir={}", state("kubelet")),
            format!("--node-ip={NODE_IP}"),
            format!("--hostname-override={NODE_NAME}"),
        ]),
        other => unreachable!("no daemon {other}"),
    }
}
