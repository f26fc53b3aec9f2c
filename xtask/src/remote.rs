//! BuildKit as a service: the pinned `buildkitd` reached over mutual TLS
//! through buildx's `remote` driver, as a Deployment in a cluster or as a
//! container on this machine, and the buildx builder that points at it.
//! `up` records what it made; `down` removes exactly that.
//!
//! buildx's `kubernetes` driver would manage the pods itself, but it
//! reaches them through the API server's `pods/exec`, has no host
//! network (the test cluster's pods reach no registry but through the
//! node's loopback) and waits a fixed ~109 s for readiness in the buildx
//! these machines have; the `remote` driver with mutual TLS is also what
//! BuildKit's own `examples/kubernetes` deploy.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    config::Config,
    exec::{Cmd, Exec},
    exit::refuse,
    kube::Kube,
    labels::BUILDER_LABEL as MANAGED,
    pki::{restrict, Pki},
};

/// The Deployment's, the Service's and the pods' name.
const APP: &str = "buildkitd";
/// Where buildkitd listens inside its pod when it is not on the host's
/// network: the Service's port.
const POD_PORT: u16 = 1234;
/// buildkitd's own socket inside the container, for the readiness probe.
const SOCKET: &str = "unix:///run/buildkit/buildkitd.sock";

/// What `up` made, kept beside the client's certificate for `down`.
#[derive(Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// `host:port` buildx connects to.
    pub address: String,
    /// In a cluster: its kube context and namespace.
    pub cluster: Option<(String, String)>,
    /// On this machine: the container.
    pub container: Option<String>,
}

/// `~/.cache/aiq-xtask/builders/NAME`: the certificates and the record,
/// readable by their owner alone.
fn state_dir(env: &crate::env::Env, name: &str) -> Result<PathBuf> {
    Ok(crate::cache::dir(env)?.join("builders").join(name))
}

/// What `up` recorded for `name`, or `None` when it made nothing.
pub fn record(env: &crate::env::Env, name: &str) -> Result<Option<Record>> {
    let path = state_dir(env, name)?.join("builder.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Refuses a builder name that is not a plain file name: it names the
/// directory `down` removes.
pub fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if plain {
        Ok(())
    } else {
        Err(refuse(format!(
            "--name {name:?}: a builder's name is letters, digits, '_', '.' and '-', starting with a letter or digit"
        )))
    }
}

/// The address's host, for the server certificate and `servername`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn is_loopback(address: &str) -> bool {
    host_of(address) == "localhost"
        || address
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
}

/// Refuses what `up` cannot make: a name already in use (by buildx or by
/// an earlier `up` not yet brought down), a loopback address something
/// already listens on, no `openssl` for the certificates.
pub fn preflight(exec: &Exec, name: &str, address: &str) -> Result<()> {
    check_name(name)?;
    check_address(address)?;
    if record(&exec.env, name)?.is_some() {
        return Err(refuse(format!(
            "builder {name} was made by `builder up` and is still recorded: `cargo xtask builder down --name {name}` removes it first"
        )));
    }
    crate::exec::require_tool("openssl", "`builder up` makes the certificates with it")?;
    if exec.succeeds(&crate::builder::inspect(name)) {
        return Err(refuse(format!(
            "a buildx builder named {name} exists: `cargo xtask builder down` removes the one `builder up` made, `docker buildx rm {name}` any other"
        )));
    }
    if let Ok(socket) = address.parse::<SocketAddr>() {
        if socket.ip().is_loopback()
            && TcpStream::connect_timeout(&socket, Duration::from_secs(1)).is_ok()
        {
            return Err(refuse(format!(
                "something already listens on {address}: choose another with --address"
            )));
        }
    }
    Ok(())
}

/// Refuses what `up --in-cluster` cannot make in `kube`'s cluster: more
/// than one pod on the node's network, a namespace that exists.
pub fn preflight_cluster(
    exec: &Exec,
    kube: &Kube,
    namespace: &str,
    replicas: u32,
    address: &str,
) -> Result<()> {
    if is_loopback(address) && replicas != 1 {
        return Err(refuse(format!(
            "--replicas {replicas} on the loopback address {address}: the pods use the node's network and port, so one per node; give a routable --address for more"
        )));
    }
    let existing = exec
        .read(&kube.namespace_json(namespace))
        .with_context(|| format!("looking for namespace {namespace}"))?;
    if !existing.is_empty() {
        return Err(refuse(format!(
            "namespace {namespace} exists: `builder up` makes its own, which `builder down` deletes (`--namespace` names another)"
        )));
    }
    Ok(())
}

/// A CA, buildkitd's server certificate (for the address's host and the
/// Service's names in `namespace`) and the client's, under `dir` (keys
/// 0600). The CA's key is deleted once it has signed both.
fn certificates(exec: &Exec, dir: &std::path::Path, address: &str, namespace: &str) -> Result<()> {
    let pki = Pki::new(exec, dir.to_owned());
    pki.ca("/CN=aiq-xtask-buildkit-ca")?;
    let host = host_of(address);
    let host_san = if host.parse::<std::net::IpAddr>().is_ok() {
        format!("IP:{host}")
    } else {
        format!("DNS:{host}")
    };
    pki.key("server")?;
    pki.sign(
        "server",
        "/CN=buildkitd",
        &format!(
            "subjectAltName={host_san},DNS:{APP},DNS:{APP}.{namespace},DNS:{APP}.{namespace}.svc\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    pki.key("client")?;
    pki.sign("client", "/CN=aiq-xtask", "extendedKeyUsage=clientAuth\n")?;
    exec.run(&Cmd::new("rm").arg(pki.file("ca.key")))
}

/// buildkitd's arguments: its own socket (the probe's), TCP with mutual
/// TLS on `bind`, the certificates under `certs`, the settings file.
fn buildkitd_args(bind: &str, certs: &str, server: &str, settings: &str) -> Vec<String> {
    [
        "--addr",
        SOCKET,
        "--addr",
        &format!("tcp://{bind}"),
        "--tlscacert",
        &format!("{certs}/ca.crt"),
        "--tlscert",
        &format!("{certs}/{server}.crt"),
        "--tlskey",
        &format!("{certs}/{server}.key"),
        "--config",
        settings,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The objects of the in-cluster builder: its namespace, the server's
/// certificate as a Secret, BuildKit's settings, the Deployment and, for
/// production use, a Service. On a loopback address the pods use the
/// node's network (the test cluster: its registry is on the node's
/// loopback, and no kube-proxy routes a Service), so one pod per node.
fn cluster_objects(
    namespace: &str,
    image: &str,
    replicas: u32,
    address: &str,
    settings: &str,
    secret: [(&str, String); 3],
) -> serde_json::Value {
    let labels = json!({ "app.kubernetes.io/name": APP, MANAGED.0: MANAGED.1 });
    let host_network = is_loopback(address);
    let bind = if host_network {
        address.to_owned()
    } else {
        format!("0.0.0.0:{POD_PORT}")
    };
    let meta = |name: &str| json!({ "name": name, "namespace": namespace, "labels": labels });
    let data: serde_json::Map<String, serde_json::Value> = secret
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(crate::base64::encode(v.as_bytes()))))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            { "apiVersion": "v1", "kind": "Namespace",
              "metadata": { "name": namespace, "labels": labels } },
            { "apiVersion": "v1", "kind": "Secret", "metadata": meta("buildkitd-certs"),
              "type": "Opaque", "data": data },
            { "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("buildkitd-config"),
              "data": { "buildkitd.toml": settings } },
            { "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(APP),
              "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app.kubernetes.io/name": APP } },
                // On the node's network the next pod needs the port the
                // last one holds.
                "strategy": { "type": if host_network { "Recreate" } else { "RollingUpdate" } },
                "template": {
                  "metadata": { "labels": labels },
                  "spec": {
                    "hostNetwork": host_network,
                    "enableServiceLinks": false,
                    "containers": [{
                      "name": APP,
                      "image": image,
                      "args": buildkitd_args(&bind, "/certs", "tls", "/etc/buildkit/buildkitd.toml"),
                      // BuildKit runs its build containers with runc: as
                      // in BuildKit's own Kubernetes examples.
                      "securityContext": { "privileged": true },
                      "readinessProbe": {
                        "exec": { "command": ["buildctl", "--addr", SOCKET, "debug", "workers"] },
                        "periodSeconds": 2, "timeoutSeconds": 10
                      },
                      "volumeMounts": [
                        { "name": "certs", "mountPath": "/certs", "readOnly": true },
                        { "name": "config", "mountPath": "/etc/buildkit", "readOnly": true },
                        { "name": "state", "mountPath": "/var/lib/buildkit" }
                      ]
                    }],
                    "volumes": [
                      { "name": "certs", "secret": { "secretName": "buildkitd-certs", "defaultMode": 0o400 } },
                      { "name": "config", "configMap": { "name": "buildkitd-config" } },
                      { "name": "state", "emptyDir": {} }
                    ]
                  }
                }
              } },
            { "apiVersion": "v1", "kind": "Service", "metadata": meta(APP),
              "spec": {
                "selector": { "app.kubernetes.io/name": APP },
                "ports": [{ "name": "buildkitd", "port": POD_PORT, "targetPort": POD_PORT }]
              } }
        ]
    })
}

/// Deploys the pinned BuildKit into `namespace` of `kube`'s cluster, then
/// the buildx builder `name` on `address`.
#[allow(clippy::too_many_arguments)]
pub fn up_in_cluster(
    exec: &Exec,
    config: &Config,
    kube: &Kube,
    name: &str,
    namespace: &str,
    replicas: u32,
    address: &str,
    image: Option<&str>,
) -> Result<()> {
    // On a loopback address the nodes pull from this machine's registry;
    // elsewhere, from wherever `--image` says (the official image by
    // default).
    let image = match image {
        Some(image) => image.to_owned(),
        None if is_loopback(address) => crate::builder::local_image(exec, config)?,
        None => crate::builder::official_image(&config.buildkit),
    };
    // Recorded first: whatever `up` makes from here, `down` removes.
    let dir = state_dir(&exec.env, name)?;
    save(
        exec,
        &Record {
            name: name.to_owned(),
            address: address.to_owned(),
            cluster: Some((
                kube.context.clone().unwrap_or_default(),
                namespace.to_owned(),
            )),
            container: None,
        },
    )?;
    certificates(exec, &dir, address, namespace)?;
    let read = |file: &str| -> Result<String> {
        if exec.dry_run {
            return Ok(String::new());
        }
        std::fs::read_to_string(dir.join(file))
            .with_context(|| format!("reading {}", dir.join(file).display()))
    };
    let objects = cluster_objects(
        namespace,
        &image,
        replicas,
        address,
        &crate::builder::buildkitd_config(config.build_cache_gb),
        [
            ("ca.crt", read("ca.crt")?),
            ("tls.crt", read("server.crt")?),
            ("tls.key", read("server.key")?),
        ],
    );
    exec.run(&kube.apply_objects(&objects))
        .with_context(|| format!("applying the builder's objects in namespace {namespace}"))?;
    // The server's key lives in the Secret.
    exec.run(&Cmd::new("rm").arg(dir.join("server.key").display().to_string()))?;
    exec.run(&kube.in_namespace(namespace).rollout_status(APP, "180s"))
        .with_context(|| {
            format!(
                "BuildKit in namespace {namespace} did not become ready (on a loopback --address its nodes must be this machine, pulling from its registry); `cargo xtask builder down --name {name}` removes what was made"
            )
        })?;
    create_builder(exec, name, address)
}

/// Starts the pinned BuildKit in a container on this machine (the host's
/// network, so it reaches the local registry), then the buildx builder.
pub fn up_local(exec: &Exec, config: &Config, name: &str, address: &str) -> Result<()> {
    let image = crate::builder::local_image(exec, config)?;
    let dir = state_dir(&exec.env, name)?;
    let container = format!("xtask-buildkitd-{name}");
    // Recorded first: whatever `up` makes from here, `down` removes.
    save(
        exec,
        &Record {
            name: name.to_owned(),
            address: address.to_owned(),
            cluster: None,
            container: Some(container.clone()),
        },
    )?;
    certificates(exec, &dir, address, "local")?;
    let settings = dir.join("buildkitd.toml");
    if !exec.dry_run {
        std::fs::write(
            &settings,
            crate::builder::buildkitd_config(config.build_cache_gb),
        )
        .with_context(|| format!("writing {}", settings.display()))?;
    }
    exec.run(
        &Cmd::new("docker")
            .args(["run", "--detach", "--name", &container, "--privileged"])
            .args(["--network", "host", "--restart", "unless-stopped"])
            .args(["--label", &format!("{}={}", MANAGED.0, MANAGED.1)])
            .args(["--volume", &format!("{}:/certs:ro", dir.display())])
            .arg(image)
            .args(buildkitd_args(
                address,
                "/certs",
                "server",
                "/certs/buildkitd.toml",
            )),
    )?;
    create_builder(exec, name, address)
}

/// Writes the record into the builder's directory, made 0700 first: the
/// keys that follow are its owner's alone.
fn save(exec: &Exec, record: &Record) -> Result<()> {
    if exec.dry_run {
        return Ok(());
    }
    let dir = state_dir(&exec.env, &record.name)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    restrict(&dir, 0o700)?;
    let path = dir.join("builder.json");
    std::fs::write(&path, serde_json::to_string_pretty(record)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `docker buildx create --driver remote` with the client's certificate,
/// then a bootstrap that waits until BuildKit answers over mutual TLS.
fn create_builder(exec: &Exec, name: &str, address: &str) -> Result<()> {
    let dir = state_dir(&exec.env, name)?;
    let file = |f: &str| dir.join(f).display().to_string();
    exec.run(
        &Cmd::new("docker")
            .args(["buildx", "create", "--name", name, "--driver", "remote"])
            .args(["--driver-opt", &format!("cacert={}", file("ca.crt"))])
            .args(["--driver-opt", &format!("cert={}", file("client.crt"))])
            .args(["--driver-opt", &format!("key={}", file("client.key"))])
            .args(["--driver-opt", &format!("servername={}", host_of(address))])
            .arg(format!("tcp://{address}")),
    )?;
    exec.run(&crate::builder::bootstrap(name))
}

/// Removes what `up` made for `name`: the cluster's namespace (and with it
/// every object in it) or the container, the buildx builder, the
/// certificates. What is already gone is skipped; a namespace without
/// `up`'s label is not `up`'s, and stays.
pub fn down(exec: &Exec, kube: Option<&Kube>, record: &Record) -> Result<()> {
    if let (Some((_, namespace)), Some(kube)) = (&record.cluster, kube) {
        let found = exec
            .read(&kube.namespace_json(namespace))
            .with_context(|| format!("looking for namespace {namespace}"))?;
        if !found.is_empty() {
            let object: serde_json::Value = serde_json::from_str(&found)
                .with_context(|| format!("parsing namespace {namespace}"))?;
            if object["metadata"]["labels"][MANAGED.0] == MANAGED.1 {
                exec.run(&kube.delete_namespace(namespace))?;
            } else {
                exec.output.warn(&format!(
                    "namespace {namespace} lacks the label {}={}: not made by `builder up`, so it stays",
                    MANAGED.0, MANAGED.1
                ));
            }
        }
    }
    if let Some(container) = &record.container {
        if exec.succeeds(&Cmd::new("docker").args(["container", "inspect", container])) {
            exec.run(&Cmd::new("docker").args(["rm", "--force", "--volumes", container]))?;
        }
    }
    if exec.succeeds(&crate::builder::inspect(&record.name)) {
        exec.run(&Cmd::new("docker").args(["buildx", "rm", "--force", &record.name]))?;
    }
    let dir = state_dir(&exec.env, &record.name)?;
    if dir.exists() {
        exec.run(&Cmd::new("rm").args(["-rf", &dir.display().to_string()]))?;
    }
    Ok(())
}

/// Refuses an `address` that is not `HOST:PORT`.
fn check_address(address: &str) -> Result<()> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(refuse(format!("--address {address:?} is not HOST:PORT"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_address_puts_one_pod_on_the_nodes_network_and_names_every_image() {
        let secret = [
            ("ca.crt", "CA".to_owned()),
            ("tls.crt", "CRT".to_owned()),
            ("tls.key", "KEY".to_owned()),
        ];
        let list = cluster_objects(
            "b",
            "127.0.0.1:5000/xtask/buildkit:v1",
            1,
            "127.0.0.1:1234",
            "",
            secret.clone(),
        );
        let items = list["items"].as_array().unwrap();
        let pod = &items[3]["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(
            pod["containers"][0]["image"],
            "127.0.0.1:5000/xtask/buildkit:v1"
        );
        let args = pod["containers"][0]["args"].to_string();
        assert!(args.contains("tcp://127.0.0.1:1234"), "{args}");
        assert_eq!(items[1]["data"]["tls.key"], crate::base64::encode(b"KEY"));
        let routed = cluster_objects("b", "i", 3, "10.0.0.5:1234", "", secret);
        let pod = &routed["items"][3]["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], false);
        assert!(pod["containers"][0]["args"]
            .to_string()
            .contains("tcp://0.0.0.0:1234"));
        assert!(check_address("127.0.0.1:1234").is_ok() && check_address("nope").is_err());
    }
}
