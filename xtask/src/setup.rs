//! What a new machine needs before `up` or `test` can run, installed and
//! started by the xtask itself, so a newcomer types two commands: `up`
//! installs only what the local stack needs (a Docker engine and buildx
//! where none is installed, never replacing one that is; the registry;
//! debootstrap for the base-image mirror), `test` the rest (the test
//! cluster's etcd, containerd, CNI plugins and tools; chromium; the pinned
//! linters). Each command is printed like every other; on a terminal it
//! asks first; not as root it stops with the one command to run.
//!
//! Debian 12 takes Docker 26, buildx, containerd 1.7 and etcd 3.5 from
//! trixie through a low-priority pin (so nothing else moves); Debian 13
//! and Ubuntu 24.04 have them in their own archive (a GitHub runner has
//! Docker, buildx, containerd and Chrome already).

use std::{
    io::IsTerminal,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
};

/// Who needs the machine ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `up`: the local stack on Docker.
    Up,
    /// `test` and `ci`: the stack, the test cluster and the linters.
    Test,
}

/// One thing the machine lacks, and the packages that provide it.
#[derive(Debug, PartialEq, Eq)]
struct Missing {
    what: &'static str,
    /// Needed whatever the machine reaches; else only where Docker Hub
    /// cannot be reached (the registry image and base images come from
    /// there otherwise), installed only by root.
    required: bool,
    /// From the distribution's own suites.
    packages: Vec<&'static str>,
    /// On Debian 12, from trixie (pinned low).
    from_trixie: Vec<&'static str>,
}

/// The distribution, from `/etc/os-release`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Distro {
    Bookworm,
    /// Debian 13 or later.
    Debian,
    Ubuntu,
    Other,
}

fn distro() -> Distro {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    distro_of(&text)
}

fn distro_of(os_release: &str) -> Distro {
    let field = |key: &str| {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    match (field("ID").as_str(), field("VERSION_CODENAME").as_str()) {
        ("debian", "bookworm") => Distro::Bookworm,
        ("debian", _) => Distro::Debian,
        ("ubuntu", _) => Distro::Ubuntu,
        _ => Distro::Other,
    }
}

fn has(tool: &str) -> bool {
    which::which(tool).is_ok()
}

/// What `need` lacks on this machine, checked by command (not by
/// package), so Docker or Chrome from elsewhere counts.
fn missing(exec: &Exec, need: Need, distro: Distro) -> Vec<Missing> {
    let bookworm = distro == Distro::Bookworm;
    let item = |what, packages: &[&'static str], newer: &[&'static str]| Missing {
        what,
        required: true,
        packages: if bookworm {
            packages.to_vec()
        } else {
            packages.iter().chain(newer).copied().collect()
        },
        from_trixie: if bookworm { newer.to_vec() } else { vec![] },
    };
    let mut found = Vec::new();
    let docker = has("dockerd")
        && has("docker")
        && exec.succeeds(&Cmd::new("docker").args(["buildx", "version"]));
    if !docker {
        // Debian 12's docker.io first (it brings runc and iptables from
        // bookworm), then Docker 26 and buildx from trixie.
        found.push(if distro == Distro::Ubuntu {
            item(
                "a Docker engine with buildx",
                &["docker.io", "docker-buildx"],
                &[],
            )
        } else if bookworm {
            item(
                "a Docker engine with buildx",
                &["docker.io"],
                &["docker.io", "docker-cli", "docker-buildx"],
            )
        } else {
            item(
                "a Docker engine with buildx",
                &["docker.io", "docker-cli", "docker-buildx"],
                &[],
            )
        });
    }
    // For `up`, only where Docker Hub cannot be reached: the registry
    // runs as its `registry:2` image and the base images are pulled
    // otherwise.
    let optional = |m: Missing| Missing {
        required: need == Need::Test,
        ..m
    };
    if !has("docker-registry") {
        found.push(optional(item(
            "the Distribution registry",
            &["docker-registry"],
            &[],
        )));
    }
    if !has("debootstrap") {
        found.push(optional(item(
            "debootstrap (the base-image mirror)",
            &["debootstrap"],
            &[],
        )));
    }
    // BuildKit (where moby/buildkit cannot be pulled) and the test cluster
    // are compiled from the Go module proxy; trixie's Go is 1.24.
    if !has("go") {
        found.push(optional(item(
            "Go (compiles BuildKit and the test cluster)",
            &[],
            &["golang-go"],
        )));
    }
    if need == Need::Up {
        return found;
    }
    if !has("chromium") && !has("google-chrome") && distro != Distro::Ubuntu {
        found.push(item("chromium (the page test)", &["chromium"], &[]));
    }
    if !has("etcd") {
        found.push(item(
            "etcd 3.5 (the test cluster's store)",
            &[],
            &["etcd-server"],
        ));
    }
    let containerd = exec
        .read(&Cmd::new("containerd").arg("--version"))
        .is_ok_and(|v| v.contains(" 1.7.") || v.contains(" v1.7."));
    if !containerd {
        found.push(item(
            "containerd 1.7 (the test cluster's runtime)",
            &[],
            &["containerd"],
        ));
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        found.push(item(
            "the CNI plugins",
            &["containernetworking-plugins"],
            &[],
        ));
    }
    for (tool, package) in [
        ("iptables", "iptables"),
        ("ip", "iproute2"),
        ("openssl", "openssl"),
        ("gcc", "gcc"),
    ] {
        if !has(tool) {
            found.push(item(tool, &[package], &[]));
        }
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        found.push(item(
            "static glibc (the pause program)",
            &["libc6-dev"],
            &[],
        ));
    }
    let venv = Path::new("/usr/bin/python3").exists()
        && !exec.succeeds(&Cmd::new("/usr/bin/python3").args(["-c", "import ensurepip"]));
    if venv {
        found.push(item("Python's venv (the linters)", &["python3-venv"], &[]));
    }
    found
}

/// Installs what `need` lacks and starts the Docker engine if none
/// answers.
pub fn ensure(exec: &Exec, need: Need) -> Result<()> {
    let distro = distro();
    let missing = missing(exec, need, distro);
    if !missing.is_empty() {
        install(exec, need, distro, &missing)?;
    }
    start_docker(exec, need)
}

/// The trixie source and its low pin, as `install` writes them.
const TRIXIE_SOURCE: (&str, &str) = (
    "/etc/apt/sources.list.d/trixie.sources",
    "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
);
const TRIXIE_PIN: (&str, &str) = (
    "/etc/apt/preferences.d/trixie-low",
    "Package: *\nPin: release n=trixie\nPin-Priority: 100\n",
);

/// What installs `packages` (and `newer` from trixie) as one shell line,
/// for a user who is not root to run with sudo: the same steps `install`
/// runs.
fn install_line(packages: &[&str], newer: &[&str]) -> String {
    let mut steps = Vec::new();
    if !newer.is_empty() {
        for (path, text) in [TRIXIE_SOURCE, TRIXIE_PIN] {
            steps.push(format!("printf '{}' > {path}", text.replace('\n', "\\n")));
        }
    }
    steps.push("apt-get update".to_owned());
    steps.push(format!(
        "apt-get install -y --no-install-recommends ca-certificates {}",
        packages.join(" ")
    ));
    if !newer.is_empty() {
        steps.push(format!(
            "apt-get install -y --no-install-recommends -t trixie {}",
            newer.join(" ")
        ));
    }
    format!("sudo sh -c \"{}\"", steps.join(" && "))
}

fn install(exec: &Exec, need: Need, distro: Distro, missing: &[Missing]) -> Result<()> {
    let root = crate::exec::is_root();
    // Not as root, what is optional is left to where it is needed.
    let missing: Vec<&Missing> = missing.iter().filter(|m| root || m.required).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|m| m.what).collect();
    if !matches!(distro, Distro::Bookworm | Distro::Debian | Distro::Ubuntu) {
        return Err(refuse(format!(
            "this machine lacks {}, and the xtask installs packages on Debian and Ubuntu only: install them yourself",
            names.join(", ")
        )));
    }
    let mut packages: Vec<&str> = missing.iter().flat_map(|m| m.packages.clone()).collect();
    let mut newer: Vec<&str> = missing.iter().flat_map(|m| m.from_trixie.clone()).collect();
    for list in [&mut packages, &mut newer] {
        list.sort_unstable();
        list.dedup();
    }
    if !root {
        return Err(refuse(format!(
            "this machine lacks {}: install {} as root with `{}`, then run `cargo xtask {}` again",
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" },
            install_line(&packages, &newer),
            if need == Need::Up { "up" } else { "test" }
        )));
    }
    // Docker CE's containerd.io conflicts with Debian's containerd: apt
    // would remove Docker CE to install it.
    let docker_ce = exec
        .read(&Cmd::new("dpkg-query").args([
            "--show",
            "--showformat",
            "${Status}",
            "containerd.io",
        ]))
        .is_ok_and(|s| s.contains("ok installed"));
    if docker_ce && packages.iter().chain(&newer).any(|p| *p == "containerd") {
        return Err(refuse(
            "the test cluster needs containerd 1.7, and this machine has Docker CE's containerd.io, which Debian's containerd would replace (removing Docker CE): install containerd 1.7 from Docker's repository (containerd.io 1.7.x) or run the tests on another machine",
        ));
    }
    if !exec.dry_run && std::io::stdin().is_terminal() && !exec.env.ci() {
        eprint!(
            "This machine lacks {}.\nInstall with apt-get: {}{}? [Y/n] ",
            names.join(", "),
            packages.join(" "),
            if newer.is_empty() {
                String::new()
            } else {
                format!(", and from Debian trixie: {}", newer.join(" "))
            }
        );
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if answer.trim().to_ascii_lowercase().starts_with('n') {
            return Err(refuse("nothing installed"));
        }
    }
    exec.step(format!("install {}", names.join(", ")), || {
        let _frontend = exec.sh.push_env("DEBIAN_FRONTEND", "noninteractive");
        if !newer.is_empty() {
            trixie_pinned_low(exec)?;
        }
        exec.run(&Cmd::new("apt-get").args(["update", "-qq"]))?;
        let apt = |extra: &[&str], list: &[&str]| {
            exec.run(
                &Cmd::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(extra.iter().copied())
                    .args(list.iter().copied()),
            )
        };
        // The distribution's own first (with the certificates apt needs),
        // then only what must be newer from trixie.
        apt(&[], &[&["ca-certificates"], packages.as_slice()].concat())?;
        if !newer.is_empty() {
            apt(&["-t", "trixie"], &newer)?;
        }
        Ok(())
    })
}

/// Debian trixie as a source, pinned below bookworm: only what is asked
/// for with `-t trixie` (and what it needs) comes from there.
fn trixie_pinned_low(exec: &Exec) -> Result<()> {
    for (path, text) in [TRIXIE_SOURCE, TRIXIE_PIN] {
        if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
            continue;
        }
        exec.run(&Cmd::new("cp").args(["/dev/stdin", path]).stdin(text))?;
    }
    Ok(())
}

/// Starts the Docker engine unless one answers: with `systemctl` where
/// systemd runs the machine, else `dockerd` in the background.
fn start_docker(exec: &Exec, need: Need) -> Result<()> {
    let answers =
        || exec.succeeds(&Cmd::new("docker").args(["version", "--format", "{{.Server.Version}}"]));
    if answers() {
        return Ok(());
    }
    let systemd = Path::new("/run/systemd/system").exists();
    if !crate::exec::is_root() {
        return Err(refuse(format!(
            "no Docker engine answers: start it with `{}`, then run `cargo xtask {}` again",
            if systemd {
                "sudo systemctl start docker"
            } else {
                "sudo sh -c 'dockerd >>/var/log/dockerd-xtask.log 2>&1 &'"
            },
            if need == Need::Up { "up" } else { "test" }
        )));
    }
    let log = Path::new("/var/log/dockerd-xtask.log");
    exec.step("start the Docker engine", || {
        limit_docker_build_cache(exec)?;
        if systemd {
            exec.run(&Cmd::new("systemctl").args(["start", "docker"]))?;
        } else {
            exec.start_daemon(&Cmd::new("dockerd"), log)?;
        }
        if exec.dry_run {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if answers() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if systemd {
            bail!("the Docker engine did not answer within 60 s of `systemctl start docker`: see `journalctl -u docker`");
        }
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        bail!(
            "the Docker engine did not answer within 60 s (log {}):\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// Docker's own engine configuration, written only where there is none.
const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// Before the engine starts: Docker's own builder (the xtask builds only
/// the pinned BuildKit's image with it) keeps its cache under the default
/// `build_cache_gb`, as the pinned builder does, through the engine's
/// builder garbage collection. A configuration someone wrote stays as it
/// is.
fn limit_docker_build_cache(exec: &Exec) -> Result<()> {
    if Path::new(DAEMON_JSON).exists() {
        return Ok(());
    }
    let limit = format!("{}GB", crate::config::DEFAULT_BUILD_CACHE_GB);
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "builder": { "gc": { "enabled": true, "defaultKeepStorage": limit } }
    }))?;
    exec.run(&Cmd::new("mkdir").args(["-p", "/etc/docker"]))?;
    exec.run(&Cmd::new("cp").args(["/dev/stdin", DAEMON_JSON]).stdin(json))
}

/// The linters at the versions `.ci/linters.txt` pins, in a virtual
/// environment under the xtask's cache (never pip into a system Python,
/// which Debian and Ubuntu refuse), rebuilt when the pins change.
pub fn linters(exec: &Exec, root: &Path) -> Result<()> {
    let pins = root.join(".ci/linters.txt");
    let wanted =
        std::fs::read_to_string(&pins).with_context(|| format!("reading {}", pins.display()))?;
    let venv = crate::cache::dir(&exec.env)?.join("linters");
    let stamp = venv.join("linters.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    // Debian's own Python where there is one: the one python3-venv serves.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let venv_path = venv.display().to_string();
    exec.step("the pinned linters", || {
        exec.run(&Cmd::new(python).args(["-m", "venv", "--clear", &venv_path]))?;
        exec.run(
            &Cmd::new(venv.join("bin/pip").display().to_string())
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "--requirement",
                ])
                .arg(pins.display().to_string()),
        )?;
        exec.run(
            &Cmd::new("cp")
                .arg(pins.display().to_string())
                .arg(stamp.display().to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_installs_for_a_user_who_is_not_root() {
        let line = install_line(&["docker.io"], &["docker-buildx"]);
        assert!(
            line.starts_with("sudo sh -c \"printf 'Types: deb\\nURIs: "),
            "{line}"
        );
        assert!(
            line.ends_with(" && apt-get update && apt-get install -y --no-install-recommends ca-certificates docker.io && apt-get install -y --no-install-recommends -t trixie docker-buildx\""),
            "{line}"
        );
        assert!(!install_line(&["debootstrap"], &[]).contains("trixie"));
    }

    #[test]
    fn the_distribution_is_read_from_os_release() {
        assert_eq!(
            distro_of("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n"),
            Distro::Bookworm
        );
        assert_eq!(
            distro_of("ID=debian\nVERSION_CODENAME=trixie\n"),
            Distro::Debian
        );
        assert_eq!(
            distro_of("ID=ubuntu\nVERSION_CODENAME=noble\n"),
            Distro::Ubuntu
        );
        assert_eq!(distro_of("ID=fedora\n"), Distro::Other);
    }
}
