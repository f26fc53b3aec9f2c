//! Registries: the local one that `up`, `mirror` and the tests push to, a
//! minimal HTTP GET for probing registries and services on loopback, what a
//! registry holds under a reference, and logging Docker in to one.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{
    config::{Config, RegistryLogin},
    exec::{require_tool, Cmd, Exec},
    exit::refuse,
};

/// Where `up` and the tests put images when `XTASK_LOCAL_REGISTRY` is not
/// set.
pub const DEFAULT_LOCAL: &str = "127.0.0.1:5000";
const CONTAINER: &str = "aiq-local-registry";
const REGISTRY_IMAGE: &str = "registry:2";

/// `GET http://{addr}{path}`; returns the status code and body. Enough for
/// health probes and the registry API, without an HTTP client dependency.
/// HTTP/1.0, so the answer comes whole, never chunked (Next.js chunks
/// HTTP/1.1 answers).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    http_get_as(addr, path, timeout, None)
}

/// [`http_get`] with `Authorization: Basic <auth>` when given.
fn http_get_as(
    addr: &str,
    path: &str,
    timeout: Duration,
    auth: Option<&str>,
) -> Result<(u16, String)> {
    let socket = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&socket, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let authorization = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{authorization}Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer from {addr}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr} did not answer HTTP"))?;
    Ok((status, body.to_owned()))
}

pub fn answers(addr: &str) -> bool {
    matches!(http_get(addr, "/v2/", Duration::from_secs(2)), Ok((200, _)))
}

/// Whether `repository:tag` exists in the registry at `addr`.
pub fn has_image(addr: &str, repository: &str, tag: &str) -> bool {
    matches!(
        http_get(
            addr,
            &format!("/v2/{repository}/manifests/{tag}"),
            Duration::from_secs(5)
        ),
        Ok((200, _))
    )
}

/// Whether `<registry>/<repository>:<tag>` exists, where `registry` may
/// carry a path (`localhost:5000/team`): asked of its host.
pub fn holds(registry: &str, repository: &str, tag: &str) -> bool {
    has_image(
        host_of(registry),
        &repository_on_host(registry, repository),
        tag,
    )
}

/// `team/<repository>` when the registry is `host:port/team`.
fn repository_on_host(registry: &str, repository: &str) -> String {
    match registry[host_of(registry).len()..].trim_start_matches('/') {
        "" => repository.to_owned(),
        path => format!("{path}/{repository}"),
    }
}

/// The host (and port) of a registry reference such as `localhost:5000/team`.
pub fn host_of(registry: &str) -> &str {
    registry.split('/').next().unwrap_or(registry)
}

/// Checks, before anything is built, that `registry` can take a push: it
/// answers, and, where it wants a login, the one Docker has works. A
/// registry on this machine is asked `/v2/` over plain HTTP (with Docker's
/// stored credentials when it answers 401); any other must accept a
/// connection on its port (its TLS and login are Docker's to check).
pub fn preflight(env: &crate::env::Env, registry: &str) -> Result<()> {
    let host = host_of(registry);
    let local = ["127.", "localhost", "[::1]"]
        .iter()
        .any(|p| host.starts_with(p));
    let addr = if host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else if local {
        format!("{host}:80")
    } else {
        format!("{host}:443")
    };
    let unreachable = |e: anyhow::Error| {
        refuse(format!(
            "the registry {host} does not answer ({e:#}): nothing was built or pushed"
        ))
    };
    if !local {
        let socket = addr
            .to_socket_addrs()
            .map_err(|e| unreachable(e.into()))?
            .next()
            .with_context(|| format!("{addr} resolves to nothing"))?;
        TcpStream::connect_timeout(&socket, Duration::from_secs(5))
            .map_err(|e| unreachable(e.into()))?;
        return Ok(());
    }
    let timeout = Duration::from_secs(5);
    match http_get(&addr, "/v2/", timeout).map_err(unreachable)? {
        (200, _) => Ok(()),
        (401, _) => {
            let Some(auth) = docker_auth(env, host) else {
                return Err(refuse(format!(
                    "the registry {host} wants a login and Docker has none for it: run `docker login {host}`; nothing was built"
                )));
            };
            match http_get_as(&addr, "/v2/", timeout, Some(&auth)).map_err(unreachable)? {
                (200, _) => Ok(()),
                (status, _) => Err(refuse(format!(
                    "the registry {host} refuses Docker's login for it (HTTP {status}): run `docker login {host}` again; nothing was built"
                ))),
            }
        }
        (status, body) => Err(refuse(format!(
            "the registry {host} answers /v2/ with HTTP {status} ({}): nothing was built",
            body.trim()
        ))),
    }
}

/// [`preflight`] for a run: a refusal, or in a dry run (which pushes
/// nothing) a warning.
pub fn check(exec: &Exec, registry: &str) -> Result<()> {
    match preflight(&exec.env, registry) {
        Err(e) if exec.dry_run => {
            exec.output.warn(&format!("{e:#}"));
            Ok(())
        }
        other => other,
    }
}

/// The local registry's address: `XTASK_LOCAL_REGISTRY` if set (its host
/// must answer; a path after it is where images go), else one on
/// 127.0.0.1:5000, started if nothing answers there.
pub fn ensure_local(exec: &Exec) -> Result<String> {
    if let Some(addr) = exec.env.local_registry() {
        if !exec.dry_run && !answers(host_of(&addr)) {
            bail!(
                "XTASK_LOCAL_REGISTRY={addr}: {} does not answer /v2/",
                host_of(&addr)
            );
        }
        return Ok(addr);
    }
    if answers(DEFAULT_LOCAL) {
        return Ok(DEFAULT_LOCAL.to_owned());
    }
    start(exec)?;
    if exec.dry_run {
        return Ok(DEFAULT_LOCAL.to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if answers(DEFAULT_LOCAL) {
            return Ok(DEFAULT_LOCAL.to_owned());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "the local registry did not answer on {DEFAULT_LOCAL} within 20 s (log: {})",
        state_dir(&exec.env)?.join("registry.log").display()
    )
}

/// Starts a registry: the `registry:2` container when that image is at hand,
/// else the host's Distribution registry (`docker-registry`, Debian's
/// package), which needs nothing from Docker Hub. A dry run prints the
/// commands and writes nothing.
fn start(exec: &Exec) -> Result<()> {
    let image_here = exec.succeeds(&Cmd::new("docker").args(["image", "inspect", REGISTRY_IMAGE]));
    if image_here || which::which("docker-registry").is_err() {
        remove_container(exec)?;
        return exec.run(&Cmd::new("docker").args([
            "run",
            "--detach",
            "--restart=unless-stopped",
            "--name",
            CONTAINER,
            "--label",
            "org.aiq.xtask.role=registry",
            "--publish",
            "127.0.0.1:5000:5000",
            // The tests delete what they push through the API.
            "--env",
            "REGISTRY_STORAGE_DELETE_ENABLED=true",
            REGISTRY_IMAGE,
        ]));
    }
    let dir = state_dir(&exec.env)?;
    let config = dir.join("config.yml");
    if !exec.dry_run {
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {DEFAULT_LOCAL}\n",
                dir.join("data").display()
            ),
        )?;
    }
    let pid = exec.start_daemon(
        &Cmd::new("docker-registry")
            .arg("serve")
            .arg(config.display().to_string()),
        &dir.join("registry.log"),
    )?;
    if !exec.dry_run {
        std::fs::write(dir.join("registry.pid"), pid.to_string())?;
    }
    Ok(())
}

/// Stops the registry `ensure_local` started, if it did.
pub fn stop(exec: &Exec) -> Result<()> {
    remove_container(exec)?;
    stop_server(exec)
}

/// Stops the host's Distribution registry `ensure_local` started, if it
/// did (its data under the cache stays).
pub fn stop_server(exec: &Exec) -> Result<()> {
    let pid_file = state_dir(&exec.env)?.join("registry.pid");
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        return Ok(());
    };
    let pid = pid.trim();
    // The file may outlive the process (a reboot, a new session on the
    // machine): kill only if that pid is still our registry.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("docker-registry") {
        exec.run(&Cmd::new("kill").arg(pid))?;
    }
    if !exec.dry_run {
        std::fs::remove_file(&pid_file)?;
    }
    Ok(())
}

/// Frees what deleted images held in the registry `ensure_local` started
/// from Debian's Distribution server (its data under the cache): removes
/// the repositories left without a tag, then runs the garbage
/// collector, which sweeps every blob no manifest references. The server
/// is stopped first, since the collector must not run beside an upload;
/// the next command that needs it starts it again. Returns the bytes
/// freed, or `None` when there is no such registry.
pub fn collect_garbage(exec: &Exec) -> Result<Option<u64>> {
    let dir = state_dir(&exec.env)?;
    let config = dir.join("config.yml");
    let repositories = dir.join("data/docker/registry/v2/repositories");
    if !config.exists() {
        return Ok(None);
    }
    let before = crate::cache::size_of(&dir.join("data"));
    stop_server(exec)?;
    for repository in repositories_under(&repositories) {
        if !has_a_tag(&repository.join("_manifests")) {
            exec.run(&Cmd::new("rm").args(["-rf", &repository.display().to_string()]))?;
        }
    }
    // No blobs: nothing was ever pushed, nothing to collect. The
    // collector prints a line per blob it marks and sweeps, which no one
    // reads: what it freed is measured instead.
    if dir.join("data/docker/registry/v2/blobs").is_dir() {
        exec.run_capturing(
            &Cmd::new("docker-registry")
                .arg("garbage-collect")
                .arg(config.display().to_string()),
        )?;
    }
    Ok(Some(
        before.saturating_sub(crate::cache::size_of(&dir.join("data"))),
    ))
}

/// Distribution's repositories under its `repositories` directory: each
/// directory that holds `_manifests`.
pub fn repositories_under(root: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        if dir.join("_manifests").is_dir() {
            found.push(dir);
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            todo.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    found.sort();
    found
}

/// Whether a repository's `_manifests` holds a tag. One whose tags were
/// all deleted can hold manifests no tag names (a tag that moved leaves
/// its old one); nothing names them any more, and the repository goes.
fn has_a_tag(manifests: &std::path::Path) -> bool {
    std::fs::read_dir(manifests.join("tags")).is_ok_and(|tags| {
        tags.flatten()
            .any(|tag| tag.path().join("current/link").is_file())
    })
}

/// Removes a stopped or running registry container of ours, if there is one.
fn remove_container(exec: &Exec) -> Result<()> {
    if exec.succeeds(&Cmd::new("docker").args(["container", "inspect", CONTAINER])) {
        exec.run(&Cmd::new("docker").args(["rm", "--force", CONTAINER]))?;
    }
    Ok(())
}

/// Survives `cargo clean` and fresh clones, so base images seeded once are
/// reused.
fn state_dir(env: &crate::env::Env) -> Result<PathBuf> {
    Ok(crate::cache::dir(env)?.join("registry"))
}

/// What a registry holds under a reference: the manifest digest and its
/// image's labels.
#[derive(Debug)]
pub struct Resolved {
    pub digest: String,
    pub labels: BTreeMap<String, String>,
}

impl Resolved {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// The image's revision label.
    pub fn revision(&self) -> Option<&str> {
        self.label("org.opencontainers.image.revision")
    }
}

/// What the registry holds under `reference`: its manifest digest and the
/// labels of its image config (one `imagetools inspect`).
pub fn resolve(exec: &Exec, reference: &str) -> Result<Resolved> {
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Inspected {
        manifest: Descriptor,
        #[serde(default)]
        image: serde_json::Value,
    }
    let json = exec.read(&Cmd::new("docker").args([
        "buildx",
        "imagetools",
        "inspect",
        reference,
        "--format",
        "{{json .}}",
    ]))?;
    let Inspected { manifest, image } = serde_json::from_str(&json)
        .with_context(|| format!("parsing `imagetools inspect` of {reference}"))?;
    // A single image answers its config; an index answers one per platform.
    let config = if image.get("config").is_some() {
        Some(&image)
    } else {
        image.as_object().and_then(|m| m.values().next())
    };
    let labels = config
        .and_then(|c| c["config"]["Labels"].as_object())
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Resolved {
        digest: manifest.digest,
        labels,
    })
}

/// How to log in to `config.registry`: the configured `registry_login`,
/// else for an ECR registry `aws ecr get-login-password --region R` as
/// user `AWS`; none for others (Docker's stored login is used).
fn registry_login(config: &Config) -> Option<RegistryLogin> {
    if let Some(login) = &config.registry_login {
        return Some(login.clone());
    }
    let host = host_of(&config.registry);
    let parts: Vec<&str> = host.split('.').collect();
    let is_ecr = parts.len() == 6
        && parts[1] == "dkr"
        && parts[2] == "ecr"
        && host.ends_with(".amazonaws.com");
    is_ecr.then(|| RegistryLogin {
        username: "AWS".into(),
        password_command: ["aws", "ecr", "get-login-password", "--region", parts[3]]
            .map(String::from)
            .to_vec(),
    })
}

/// Logs Docker in to the registry when it needs a login (see
/// [`registry_login`]): the password goes from the command's stdout to
/// `docker login --password-stdin`, never into a command line or a log.
/// Run before anything reads the registry: a fresh CI runner has no login.
pub fn login(exec: &Exec, config: &Config) -> Result<()> {
    let Some(login) = registry_login(config) else {
        return Ok(());
    };
    let host = host_of(&config.registry);
    let (program, args) = login
        .password_command
        .split_first()
        .ok_or_else(|| refuse("registry_login.password_command is empty"))?;
    require_tool(program, &format!("registry_login runs `{program}`"))?;
    let password_command = Cmd::new(program).args(args);
    let docker_login = Cmd::new("docker").args([
        "login",
        "--username",
        &login.username,
        "--password-stdin",
        host,
    ]);
    exec.pipe(&password_command, &docker_login)
        .map_err(|e| refuse(format!("logging in to {host} failed: {e:#}")))
}

/// The `auth` (base64 `user:password`) Docker stored for `host` in its
/// config file (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`),
/// if it stored one there rather than in a credential helper.
fn docker_auth(env: &crate::env::Env, host: &str) -> Option<String> {
    let dir = env.var_os("DOCKER_CONFIG").map(PathBuf::from).or_else(|| {
        env.var_os("HOME")
            .map(|home| PathBuf::from(home).join(".docker"))
    })?;
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config["auths"][host]["auth"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_with_a_path_is_probed_at_its_host() {
        assert_eq!(host_of("localhost:5000/team"), "localhost:5000");
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            host_of("123456789012.dkr.ecr.eu-west-1.amazonaws.com/aiq"),
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            repository_on_host("localhost:5000/team", "xtask/pause"),
            "team/xtask/pause"
        );
        assert_eq!(
            repository_on_host("127.0.0.1:5000", "xtask/pause"),
            "xtask/pause"
        );
    }

    #[test]
    fn ecr_registries_log_in_with_aws_and_a_configured_login_wins() {
        let mut c = Config::example();
        assert_eq!(registry_login(&c), None, "ghcr.io: Docker's stored login");
        c.registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/aiq".into();
        let ecr = registry_login(&c).unwrap();
        assert_eq!(ecr.username, "AWS");
        assert_eq!(
            ecr.password_command,
            ["aws", "ecr", "get-login-password", "--region", "eu-west-1"]
        );
        let configured = RegistryLogin {
            username: "oauth2accesstoken".into(),
            password_command: vec!["gcloud".into(), "auth".into(), "print-access-token".into()],
        };
        c.registry_login = Some(configured.clone());
        assert_eq!(registry_login(&c), Some(configured));
    }
}
