//! A newcomer's first command on a machine whose Docker engine is not
//! running: `cargo xtask up` starts it (printing the command, as every
//! command is printed) and the stack comes up. A binary of its own, since
//! it stops the engine every other test uses; a guard starts it again
//! whatever the test's outcome. Where the engine has no configuration of
//! someone else's, `up` writes one that keeps Docker's own build cache
//! under the default limit, and the engine starts with it.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

const PROJECT: &str = "enginetest";

fn engine_answers() -> bool {
    run(
        Path::new("."),
        "docker",
        &["version", "--format", "{{.Server.Version}}"],
    )
    .status
    .success()
}

fn systemd() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// Stops the engine the way its service manager would: `systemctl stop`
/// (its socket too, which would start it again) where systemd runs the
/// machine, else SIGTERM to the pid it recorded; then waits until it is
/// gone.
fn stop_engine() {
    if systemd() {
        ok(
            Path::new("."),
            "systemctl",
            &["stop", "docker.socket", "docker"],
        );
        wait_for("the Docker engine has stopped", 60, || !engine_answers());
        return;
    }
    let pid = std::fs::read_to_string("/var/run/docker.pid")
        .expect("the engine's pid file")
        .trim()
        .to_owned();
    ok(Path::new("."), "kill", &["-TERM", &pid]);
    // Exited: gone, or a zombie its parent (here, often PID 1 after `up`
    // started it and exited) has not reaped yet.
    let exited = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    wait_for("the Docker engine has stopped", 60, || {
        exited() && !engine_answers()
    });
}

/// Starts the engine again if the test left it stopped, and removes the
/// test's stack.
struct EngineBack;

impl Drop for EngineBack {
    fn drop(&mut self) {
        if !engine_answers() {
            if systemd() {
                let _ = run(Path::new("."), "systemctl", &["start", "docker"]);
            } else {
                // In the background, outliving the test, as `up` starts it.
                let _ = run(
                    Path::new("/"),
                    "sh",
                    &["-c", "nohup dockerd >>/var/log/dockerd-xtask.log 2>&1 &"],
                );
            }
            wait_for("the Docker engine answers again", 60, engine_answers);
        }
        let _ = xtask(&project_root(), &["down", "--project", PROJECT], &[]);
    }
}

const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// The engine configuration `up` writes where there is none.
fn written_by_the_xtask() -> serde_json::Value {
    serde_json::json!({"builder": {"gc": {"enabled": true, "defaultKeepStorage": "10GB"}}})
}

#[test]
fn up_starts_a_stopped_docker_engine_and_the_stack_comes_up() {
    require_docker();
    // The run's images of HEAD: `up` of the same commit into the same
    // repository finds them by their input keys and builds nothing.
    let head = head_images();
    let _pulled = Pulled::at(&head.repository);
    let _back = EngineBack;
    // A configuration someone else wrote is theirs; the xtask's own is
    // removed, so `up` writes it again.
    let ours = std::fs::read_to_string(DAEMON_JSON).map_or(true, |text| {
        serde_json::from_str::<serde_json::Value>(&text).ok() == Some(written_by_the_xtask())
    });
    stop_engine();
    if ours {
        let _ = std::fs::remove_file(DAEMON_JSON);
    }

    let backend_port = free_port().to_string();
    let frontend_port = free_port().to_string();
    let up = xtask(
        &head.clone,
        &[
            "up",
            "--project",
            PROJECT,
            "--backend-port",
            &backend_port,
            "--frontend-port",
            &frontend_port,
        ],
        &[("XTASK_LOCAL_REGISTRY", head.repository.as_str())],
    );
    up.assert_ok();
    let started = if systemd() {
        "$ systemctl start docker"
    } else {
        "$ dockerd"
    };
    assert!(
        up.stderr.contains("start the Docker engine") && up.stderr.contains(started),
        "{}",
        up.stderr
    );
    assert!(engine_answers());
    if ours {
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(DAEMON_JSON).unwrap()).unwrap();
        assert_eq!(written, written_by_the_xtask(), "{}", up.stderr);
    }
    let backend = format!("127.0.0.1:{backend_port}");
    let frontend = format!("127.0.0.1:{frontend_port}");
    assert_eq!(revision_at(&backend, "/version"), head.revision);
    assert_eq!(revision_at(&frontend, "/version"), head.revision);
    xtask(&project_root(), &["down", "--project", PROJECT], &[]).assert_ok();
}
