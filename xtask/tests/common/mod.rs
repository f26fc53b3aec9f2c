//! Helpers for the integration tests: temporary git repositories, running
//! the xtask binary, and asking Docker and the registry what really happened.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

#[path = "../../src/registry_delete.rs"]
pub mod registry_delete;

/// The registry the tests push to: `cargo xtask test` sets it; a plain
/// `cargo test` uses the default and fails loudly if nothing answers.
pub fn registry() -> String {
    std::env::var("XTASK_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

/// Panics, with what to do, unless a Docker engine with buildx and the test
/// registry answer. Every test that needs them calls it first, so a machine
/// without Docker fails the suite loudly instead of passing it vacuously or
/// failing somewhere obscure.
pub fn require_docker() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let outcome = CHECKED.get_or_init(|| {
        let engine = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output();
        if !engine.is_ok_and(|o| o.status.success()) {
            return Err("no Docker engine answers".into());
        }
        let buildx = Command::new("docker").args(["buildx", "version"]).output();
        if !buildx.is_ok_and(|o| o.status.success()) {
            return Err("the docker buildx plugin is missing".into());
        }
        match http_get(&registry(), "/v2/") {
            Ok((200, _)) => Ok(()),
            other => Err(format!(
                "the test registry {} does not answer /v2/: {other:?}",
                registry()
            )),
        }
    });
    if let Err(problem) = outcome {
        panic!("{problem}: these tests need a real Docker engine, buildx and registry; run them with `cargo xtask test` (as root on a new machine: `bash .ci/run`)");
    }
}

/// The xtask's cache as it finds it: under `XDG_CACHE_HOME`, else
/// `~/.cache`.
pub fn xtask_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || Path::new(&std::env::var("HOME").unwrap()).join(".cache"),
            PathBuf::from,
        )
        .join("aiq-xtask")
}

pub fn base_registry() -> String {
    std::env::var("XTASK_BASE_REGISTRY").unwrap_or_else(|_| format!("{}/library", registry()))
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("xtask-{label}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unique word, so each test's images and tags are its own.
pub fn unique(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{label}{}", nanos % 1_000_000_000_000)
}

pub fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

/// Runs a command that must succeed; returns its trimmed stdout.
pub fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run(dir, program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    ok(dir, "git", args)
}

pub fn init_repo(dir: &Path) {
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    git(dir, &["config", "user.email", "tests@example.com"]);
    git(dir, &["config", "user.name", "xtask tests"]);
}

/// `git clone` of the project's HEAD into `dir`, made with `umask`.
pub fn clone_head_into(dir: &Path, umask: &str) {
    clone_into(&project_root(), dir, umask);
}

/// `git clone` of the repository at `source` into `dir`, made with `umask`.
pub fn clone_into(source: &Path, dir: &Path, umask: &str) {
    let script = format!("umask {umask} && git clone --quiet \"$0\" \"$1\"",);
    ok(
        Path::new("."),
        "sh",
        &[
            "-c",
            &script,
            &source.display().to_string(),
            &dir.display().to_string(),
        ],
    );
    git(dir, &["config", "user.email", "tests@example.com"]);
    git(dir, &["config", "user.name", "xtask tests"]);
}

/// `tests/fixtures/aws`: prints the test registry's password, as `aws ecr
/// get-login-password` would (ECR cannot be reached from here).
pub fn fake_aws() -> PathBuf {
    project_root().join("xtask/tests/fixtures/aws")
}

/// The `registry_login` line of `[workspace.metadata.xtask]` that logs in
/// as `ci` with [`fake_aws`]'s password.
pub fn fake_aws_login() -> String {
    format!(
        "registry_login = {{ username = \"ci\", password_command = [\"{}\", \"ecr\", \"get-login-password\"] }}",
        fake_aws().display()
    )
}

/// A clone of the project's HEAD, with a committer set.
pub fn clone_project(label: &str) -> TempDir {
    let clone = TempDir::new(label);
    clone_head_into(clone.path(), "022");
    clone
}

pub fn commit_all(dir: &Path, message: &str) -> String {
    git(dir, &["add", "--all"]);
    git(dir, &["commit", "--quiet", "--message", message]);
    git(dir, &["rev-parse", "HEAD"])
}

/// The result of one xtask run.
pub struct XtaskRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl XtaskRun {
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "xtask failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The run exited with `code` and its stderr says `expected`.
    pub fn assert_fails(&self, code: i32, expected: &str) -> &Self {
        assert_eq!(self.code, code, "stderr:\n{}", self.stderr);
        assert!(
            self.stderr.contains(expected),
            "stderr lacks {expected:?}:\n{}",
            self.stderr
        );
        self
    }
}

/// Runs the xtask binary in `dir` with the tests' registries.
pub fn xtask(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> XtaskRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args)
        .current_dir(dir)
        .env("XTASK_BASE_REGISTRY", base_registry())
        .env_remove("USE_CACHE")
        .env_remove("XTASK_REGISTRY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running the xtask binary");
    XtaskRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `GET http://{addr}{path}` → (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "*/*")
}

/// The `revision` a `/version` endpoint answers.
pub fn revision_at(addr: &str, path: &str) -> String {
    let (status, body) = http_get(addr, path).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    assert_eq!(status, 200, "GET {addr}{path}: {body}");
    let json: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    json["revision"].as_str().unwrap().to_owned()
}

/// The digest the registry serves for `repository:tag`, or None.
pub fn registry_digest(repository: &str, tag: &str) -> Option<String> {
    let reference = format!("{}/{repository}:{tag}", registry());
    let out = run(
        Path::new("."),
        "docker",
        &[
            "buildx",
            "imagetools",
            "inspect",
            &reference,
            "--format",
            "{{json .Manifest}}",
        ],
    );
    if !out.status.success() {
        return None;
    }
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    manifest["digest"].as_str().map(str::to_owned)
}

/// Checks `condition` until it holds, at most `secs` seconds; panics
/// naming `what` after that. For state that tells nobody when it changes
/// (the cluster's objects, a port, a process of the cluster's): what a run
/// prints or its exit is waited for on the event itself (`StderrWatch`).
/// The checks back off (10 ms, doubling up to 1 s): quick to see a change
/// that comes at once, few kubectl calls over a long wait.
pub fn wait_for(what: &str, secs: u64, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut pause = Duration::from_millis(10);
    while !condition() {
        let now = std::time::Instant::now();
        assert!(now < deadline, "{what}: not within {secs}s");
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The stderr of a running xtask, read line by line as it comes, so a test
/// can wait for the moment the run says something (no polling: a condition
/// variable wakes the waiter at each line).
pub struct StderrWatch {
    lines: std::sync::Arc<(std::sync::Mutex<(String, bool)>, std::sync::Condvar)>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrWatch {
    /// Takes `child`'s piped stderr.
    pub fn new(child: &mut std::process::Child) -> StderrWatch {
        use std::io::BufRead;
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = std::sync::Arc::new((
            std::sync::Mutex::new((String::new(), false)),
            std::sync::Condvar::new(),
        ));
        let shared = lines.clone();
        let reader = std::thread::spawn(move || {
            let (text, changed) = &*shared;
            for line in std::io::BufReader::new(stderr).lines() {
                let line = line.unwrap_or_default();
                text.lock().unwrap().0.push_str(&(line + "\n"));
                changed.notify_all();
            }
            text.lock().unwrap().1 = true;
            changed.notify_all();
        });
        StderrWatch { lines, reader }
    }

    /// Waits until the run has printed `needle`, at most `secs`; panics
    /// with what it printed otherwise (or if it ended first).
    pub fn wait_for(&self, needle: &str, secs: u64) {
        let (text, changed) = &*self.lines;
        let (guard, timeout) = changed
            .wait_timeout_while(
                text.lock().unwrap(),
                Duration::from_secs(secs),
                |(seen, ended)| !seen.contains(needle) && !*ended,
            )
            .unwrap();
        assert!(
            !timeout.timed_out() && guard.0.contains(needle),
            "the run did not print {needle:?} within {secs}s:\n{}",
            guard.0
        );
    }

    /// Waits, at most `secs`, for `child` (whose stderr this watches) to
    /// exit: on its exit itself, reported by a thread that waits for it.
    /// Returns its exit code and everything it printed.
    pub fn exit(self, mut child: std::process::Child, secs: u64) -> (Option<i32>, String) {
        let (exited, exit) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = exited.send(child.wait());
        });
        match exit.recv_timeout(Duration::from_secs(secs)) {
            Ok(status) => (status.unwrap().code(), self.finish()),
            Err(_) => {
                let (text, _) = &*self.lines;
                panic!(
                    "the run did not exit within {secs}s:\n{}",
                    text.lock().unwrap().0
                )
            }
        }
    }

    /// Everything the run printed, once its stderr has closed.
    pub fn finish(self) -> String {
        self.reader.join().unwrap();
        let (text, _) = &*self.lines;
        std::mem::take(&mut text.lock().unwrap().0)
    }
}

/// Waits until `addr` answers `path` with 200, up to `secs`.
pub fn wait_http(addr: &str, path: &str, secs: u64) {
    wait_for(&format!("{addr}{path} answers 200"), secs, || {
        matches!(http_get(addr, path), Ok((200, _)))
    });
}

/// The events `docs/json.md` documents: kind, its fields, and which of
/// them may be left out.
pub fn documented_events() -> Vec<(String, Vec<(String, bool)>)> {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md"))
            .unwrap();
    let table = docs
        .split("## Events")
        .nth(1)
        .expect("docs/json.md has no Events section");
    table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|row| {
            let cells: Vec<&str> = row.split(" | ").collect();
            let kind = cells[0].trim_end_matches('`').to_owned();
            let fields = cells[1]
                .split(", ")
                .map(|field| {
                    let name = field.split('`').nth(1).unwrap().to_owned();
                    (name, field.contains("(optional)"))
                })
                .collect();
            (kind, fields)
        })
        .collect()
}

/// Parses `--json` stdout: every line an event, every event of a kind
/// `docs/json.md` documents, with exactly the fields it documents (the
/// optional ones may be missing), and the stream ends with `result`.
pub fn parse_events(stdout: &str) -> Vec<serde_json::Value> {
    let documented = documented_events();
    assert!(documented.len() > 10, "{documented:?}");
    assert!(!stdout.trim().is_empty(), "no events on stdout");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"))
        })
        .collect();
    for event in &events {
        let kind = event["event"]
            .as_str()
            .unwrap_or_else(|| panic!("no `event` field: {event}"));
        assert!(event["time"].is_string(), "no `time`: {event}");
        let (_, fields) = documented
            .iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("undocumented event kind {kind}: {event}"));
        for (field, optional) in fields {
            assert!(
                *optional || event.get(field).is_some(),
                "{kind} event lacks `{field}`: {event}"
            );
        }
        for present in event.as_object().unwrap().keys() {
            assert!(
                present == "event"
                    || present == "time"
                    || fields.iter().any(|(field, _)| field == present),
                "{kind} event has `{present}`, which docs/json.md does not list: {event}"
            );
        }
    }
    let last = events.last().unwrap();
    assert_eq!(last["event"], "result", "the stream ends with its result");
    events
}

/// The events of one kind.
pub fn events_of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// The context `cargo xtask cluster up` writes into its kubeconfig.
pub const CLUSTER_CONTEXT: &str = "aiq-test";

/// Panics, with what to do, unless the test cluster answers through the
/// `KUBECONFIG` that `cargo xtask test` sets (and its kubectl is first on
/// PATH). Every test that deploys calls it first, so a machine without the
/// cluster fails loudly.
pub fn require_cluster() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let outcome = CHECKED.get_or_init(|| {
        if std::env::var_os("KUBECONFIG").is_none() {
            return Err("KUBECONFIG is not set".into());
        }
        let out = Command::new("kubectl")
            .args([
                "get",
                "node",
                "aiq-node",
                "--request-timeout=10s",
                "--output",
                "json",
            ])
            .output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the test cluster does not answer: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    });
    if let Err(problem) = outcome {
        panic!("{problem}: these tests need the real test cluster; run them with `cargo xtask test` (it runs `cargo xtask cluster up` and sets KUBECONFIG and PATH; as root on a new machine: `bash .ci/run`)");
    }
}

/// Held by each test that uses the shared cluster, so they run one after
/// another (two cores; rollouts timed by their own budgets).
pub fn cluster_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `kubectl ARGS` against the test cluster; stdout, trimmed. Panics on failure.
pub fn kubectl(args: &[&str]) -> String {
    ok(Path::new("."), "kubectl", args)
}

/// `kubectl ARGS --output json`, parsed.
pub fn kubectl_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--output", "json"]);
    let text = kubectl(&all);
    if text.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {text}"))
}

/// An HTTP request with no body → (status, body). HTTP/1.0, so the
/// answer comes whole, never chunked.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    accept: &str,
) -> std::io::Result<(u16, String)> {
    let (status, body) = http_request_bytes(addr, method, path, accept)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// [`http_request`] for a binary answer (a registry's blob).
pub fn http_request_bytes(
    addr: &str,
    method: &str,
    path: &str,
    accept: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.get(split + 4..).unwrap_or_default().to_vec();
    Ok((status, body))
}

/// The test run's commit: HEAD's backend and frontend with a fresh random
/// string committed into each, so nothing built before can serve them;
/// made once per test run (`cargo xtask test` names the run) in a clone
/// the tests share and clone from.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct RunCommit {
    pub clone: PathBuf,
    pub revision: String,
    /// What the backend's `/api/seed` route answers.
    pub backend_marker: String,
    /// What the frontend's page shows.
    pub page_marker: String,
}

/// The test run's real images: the run's commit built fresh and pushed
/// once per test run, shared by every test that needs the real images:
/// where they went and their digests.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct HeadImages {
    pub clone: PathBuf,
    /// `<registry>/<path>`: the images are `<repository>/<image>`.
    pub repository: String,
    pub revision: String,
    pub digests: std::collections::BTreeMap<String, String>,
    /// What the backend's `/api/seed` route answers.
    pub backend_marker: String,
    /// What the frontend's page shows.
    pub page_marker: String,
}

/// The directory of the run's shared clone and records, and the run's name.
fn run_dir() -> (PathBuf, String) {
    let run = std::env::var("XTASK_TEST_RUN")
        .unwrap_or_else(|_| format!("process-{}", std::process::id()));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("head-images");
    std::fs::create_dir_all(&dir).unwrap();
    (dir, run)
}

/// The run's commit, made by the first test that asks.
pub fn run_commit() -> RunCommit {
    let (dir, run) = run_dir();
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    lock.lock().unwrap();
    let record = dir.join(format!("{run}.commit.json"));
    if let Ok(text) = std::fs::read_to_string(&record) {
        return serde_json::from_str(&text).unwrap();
    }
    // An earlier run's clone and records are of no use to this one.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap_or_default();
        if name != "lock" && name != "build.lock" {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
    let clone = dir.join(&run);
    clone_head_into(&clone, "022");
    let backend_marker = add_marker_route(&clone, "/api/seed");
    let page_marker = set_page_marker(&clone);
    let revision = commit_all(&clone, "backend and frontend: this test run's markers");
    let commit = RunCommit {
        clone,
        revision,
        backend_marker,
        page_marker,
    };
    std::fs::write(&record, serde_json::to_string(&commit).unwrap()).unwrap();
    commit
}

/// The run's real images, built by the first test that asks.
pub fn head_images() -> HeadImages {
    require_docker();
    let commit = run_commit();
    let (dir, run) = run_dir();
    let lock = std::fs::File::create(dir.join("build.lock")).unwrap();
    lock.lock().unwrap();
    let record = dir.join(format!("{run}.json"));
    if let Ok(text) = std::fs::read_to_string(&record) {
        return serde_json::from_str(&text).unwrap();
    }
    let RunCommit {
        clone,
        revision,
        backend_marker,
        page_marker,
    } = commit;
    let repository = format!("{}/head", registry());
    let build = xtask(
        &clone,
        &["build", "--push"],
        &[("XTASK_REGISTRY", repository.as_str())],
    );
    build.assert_ok();
    // Fresh, and every step offline with its packages from the dependency
    // stores, checked against the lockfiles.
    assert!(
        build.stderr.contains("--no-cache --pull"),
        "{}",
        build.stderr
    );
    assert!(
        build.stderr.contains("crates match Cargo.lock")
            && build.stderr.contains("packages match package-lock.json"),
        "{}",
        build.stderr
    );
    let digests = build_digests(&clone);
    let path = repository.split_once('/').unwrap().1;
    for image in build_file(&clone)["images"].as_array().unwrap() {
        assert_eq!(image["revision"], revision.as_str());
        // The run's commit changes both images: each one's own revision.
        assert_eq!(image["inputs_revision"], revision.as_str());
        let name = image["name"].as_str().unwrap();
        let tag = image["tag"].as_str().unwrap();
        assert!(tag.starts_with(&revision[..12]), "{tag}");
        assert_eq!(
            registry_digest(&format!("{path}/{name}"), tag).as_deref(),
            Some(digests[name].as_str()),
            "{name}'s tag"
        );
    }
    let head = HeadImages {
        clone,
        repository,
        revision,
        digests,
        backend_marker,
        page_marker,
    };
    std::fs::write(&record, serde_json::to_string(&head).unwrap()).unwrap();
    head
}

/// Adds a backend route at `path` answering a fresh random string, which
/// it returns (uncommitted).
pub fn add_marker_route(root: &Path, path: &str) -> String {
    let main_rs = root.join("backend/src/main.rs");
    let source = std::fs::read_to_string(&main_rs).unwrap();
    let marker = unique("marker-");
    let changed = source.replacen(
        "let app = Router::new()",
        &format!("let app = Router::new().route(\"{path}\", get(|| async {{ \"{marker}\" }}))"),
        1,
    );
    assert_ne!(source, changed);
    std::fs::write(&main_rs, changed).unwrap();
    marker
}

/// Puts a fresh random string into the page component in place of any
/// earlier one, and returns it (uncommitted).
pub fn set_page_marker(root: &Path) -> String {
    let page = root.join("frontend/app/page.tsx");
    let source = std::fs::read_to_string(&page).unwrap();
    let marker = unique("page-marker-");
    let heading = "<h1>Which code is running?</h1>";
    let kept: String = source
        .lines()
        .filter(|line| !line.contains("page-marker-"))
        .map(|line| format!("{line}\n"))
        .collect();
    let changed = kept.replacen(
        heading,
        &format!("{heading}\n      <p className=\"marker\">{marker}</p>"),
        1,
    );
    assert_ne!(kept, changed);
    std::fs::write(&page, changed).unwrap();
    marker
}

/// The `target/xtask/build.json` the last build in `root` wrote.
pub fn build_file(root: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(root.join("target/xtask/build.json")).expect("build.json written");
    serde_json::from_str(&text).unwrap()
}

/// Image name → digest, from the `target/xtask/build.json` a build in
/// `root` wrote.
pub fn build_digests(root: &Path) -> std::collections::BTreeMap<String, String> {
    build_file(root)["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["digest"].as_str().expect("a pushed digest").to_owned(),
            )
        })
        .collect()
}

/// A new builder on the xtask's BuildKit image, restricted to one CPU,
/// removed with its state when dropped.
pub struct OneCpuBuilder(pub String);

impl OneCpuBuilder {
    pub fn new() -> OneCpuBuilder {
        let cargo_toml = std::fs::read_to_string(project_root().join("Cargo.toml")).unwrap();
        let version = cargo_toml
            .lines()
            .find_map(|l| l.strip_prefix("buildkit = "))
            .expect("Cargo.toml names the BuildKit version")
            .trim_matches('"');
        let container = format!(
            "buildx_buildkit_xtask-buildkit-{}0",
            version.replace('.', "-")
        );
        let image: String = serde_json::from_str(&ok(
            Path::new("."),
            "docker",
            &["inspect", "--format", "{{json .Config.Image}}", &container],
        ))
        .unwrap();
        let name = unique("onecpu");
        ok(
            Path::new("."),
            "docker",
            &[
                "buildx",
                "create",
                "--name",
                &name,
                "--driver",
                "docker-container",
                "--driver-opt",
                &format!("image={image}"),
                "--driver-opt",
                "network=host",
                "--driver-opt",
                "cpuset-cpus=0",
                "--bootstrap",
            ],
        );
        OneCpuBuilder(name)
    }
}

impl Drop for OneCpuBuilder {
    fn drop(&mut self) {
        let _ = run(
            Path::new("."),
            "docker",
            &["buildx", "rm", "--force", &self.0],
        );
    }
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A blob or manifest of `repository` (`<registry>/<path>`).
fn registry_fetch(repository: &str, kind: &str, digest: &str) -> Vec<u8> {
    let (host, path) = repository.split_once('/').unwrap();
    let url = format!("/v2/{path}/{kind}/{digest}");
    let (status, body) = http_request_bytes(host, "GET", &url, MANIFEST_TYPES)
        .unwrap_or_else(|e| panic!("GET {host}{url}: {e}"));
    assert_eq!(status, 200, "GET {host}{url}");
    body
}

/// Puts the manifest `digest` of `repository` under `tag`, as a push of
/// the same image would.
pub fn put_manifest(repository: &str, digest: &str, tag: &str) {
    let manifest = registry_fetch(repository, "manifests", digest);
    let media_type = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["mediaType"]
        .as_str()
        .unwrap()
        .to_owned();
    let (host, path) = repository.split_once('/').unwrap();
    let mut stream = TcpStream::connect(host).unwrap();
    write!(
        stream,
        "PUT /v2/{path}/manifests/{tag} HTTP/1.0\r\nHost: {host}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
        manifest.len()
    )
    .unwrap();
    stream.write_all(&manifest).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 201") || response.starts_with("HTTP/1.1 201"),
        "{response}"
    );
}

/// Why two images differ: their configs' differing fields, and for each
/// layer that differs, the entries (path, mode, owner, size, time) found
/// in one and not the other.
pub fn explain_difference(repo_a: &str, digest_a: &str, repo_b: &str, digest_b: &str) -> String {
    let manifest = |repo: &str, digest: &str| -> serde_json::Value {
        serde_json::from_slice(&registry_fetch(repo, "manifests", digest)).unwrap()
    };
    let (a, b) = (manifest(repo_a, digest_a), manifest(repo_b, digest_b));
    let mut out = Vec::new();
    let config = |repo: &str, m: &serde_json::Value| -> serde_json::Value {
        let digest = m["config"]["digest"].as_str().unwrap();
        serde_json::from_slice(&registry_fetch(repo, "blobs", digest)).unwrap()
    };
    if a["config"]["digest"] != b["config"]["digest"] {
        let (ca, cb) = (config(repo_a, &a), config(repo_b, &b));
        for key in ["created", "config", "history", "rootfs"] {
            if ca[key] != cb[key] {
                let short =
                    |v: &serde_json::Value| v.to_string().chars().take(400).collect::<String>();
                out.push(format!(
                    "  config.{key}: {} != {}",
                    short(&ca[key]),
                    short(&cb[key])
                ));
            }
        }
    }
    let layers = |m: &serde_json::Value| -> Vec<String> {
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    let (la, lb) = (layers(&a), layers(&b));
    if la.len() != lb.len() {
        out.push(format!("  {} layers != {} layers", la.len(), lb.len()));
    }
    let scratch = TempDir::new("layers");
    for (i, (da, db)) in la.iter().zip(&lb).enumerate() {
        if da == db {
            continue;
        }
        let listing = |repo: &str, digest: &str, name: &str| -> Vec<String> {
            let file = scratch.path().join(name);
            std::fs::write(&file, registry_fetch(repo, "blobs", digest)).unwrap();
            let text = ok(
                Path::new("."),
                "tar",
                &["-tvzf", &file.display().to_string(), "--full-time"],
            );
            text.lines().map(str::to_owned).collect()
        };
        let (ea, eb) = (
            listing(repo_a, da, &format!("a{i}")),
            listing(repo_b, db, &format!("b{i}")),
        );
        let only = |x: &[String], y: &[String]| -> Vec<String> {
            x.iter()
                .filter(|e| !y.contains(e))
                .take(15)
                .cloned()
                .collect()
        };
        out.push(format!(
            "  layer {i} ({da} != {db}):\n    only in the first: {:?}\n    only in the second: {:?}",
            only(&ea, &eb),
            only(&eb, &ea)
        ));
        if ea == eb {
            // Same names, modes and sizes: compare the contents.
            let unpack = |name: &str| -> String {
                let dir = scratch.path().join(format!("{name}.d"));
                std::fs::create_dir(&dir).unwrap();
                let file = scratch.path().join(name).display().to_string();
                ok(
                    Path::new("."),
                    "tar",
                    &["-xzf", &file, "-C", &dir.display().to_string()],
                );
                dir.display().to_string()
            };
            let (da, db) = (unpack(&format!("a{i}")), unpack(&format!("b{i}")));
            let diff = run(
                Path::new("."),
                "diff",
                &["-rq", "--no-dereference", &da, &db],
            );
            out.push(format!(
                "    same entries; contents differ:\n{}",
                String::from_utf8_lossy(&diff.stdout)
            ));
        }
    }
    out.join("\n")
}

/// The repositories of the test registry at and under a path that a test
/// pushes to, emptied through the registry's API when the test ends,
/// however it ends, along with the copies Docker pulled of them
/// (`cargo xtask test` then collects the garbage and names anything a
/// test left).
pub struct Pushed(pub String);

impl Pushed {
    /// The guard of `reference`'s repositories when it is in the test
    /// registry (`<registry>/<path>`), and of nothing when it is elsewhere
    /// (a test's own registry, gone with it).
    pub fn at(reference: &str) -> Pushed {
        Pushed(path_in_test_registry(reference))
    }
}

/// `<path>` of `<registry>/<path>` in the test registry, or nothing for a
/// reference elsewhere.
fn path_in_test_registry(reference: &str) -> String {
    reference
        .strip_prefix(&format!("{}/", registry()))
        .unwrap_or_default()
        .to_owned()
}

impl Drop for Pushed {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        if let Err(e) = registry_delete::delete_under(&registry(), &self.0) {
            eprintln!("could not delete the test's images under {}: {e}", self.0);
        }
        remove_copies(&self.0);
    }
}

/// The copies Docker pulled of the test registry's repositories at and
/// under a path, removed when the test ends: for images a test pulls but
/// does not own (the run's shared images).
pub struct Pulled(pub String);

impl Pulled {
    pub fn at(reference: &str) -> Pulled {
        Pulled(path_in_test_registry(reference))
    }
}

impl Drop for Pulled {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            remove_copies(&self.0);
        }
    }
}

/// Removes Docker's copies of the test registry's repositories at and
/// under `path`, by tag or (pulled by digest) by digest.
fn remove_copies(path: &str) {
    let listed = run(
        Path::new("."),
        "docker",
        &[
            "images",
            "--digests",
            "--format",
            "{{.Repository}} {{.Tag}} {{.Digest}}",
        ],
    );
    let prefix = format!("{}/{path}", registry());
    let copies: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (repository, tag, digest) = (fields.next()?, fields.next()?, fields.next()?);
            let rest = repository.strip_prefix(&prefix)?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            Some(if tag != "<none>" {
                format!("{repository}:{tag}")
            } else {
                format!("{repository}@{digest}")
            })
        })
        .collect();
    if !copies.is_empty() {
        let mut args = vec!["image", "rm"];
        args.extend(copies.iter().map(String::as_str));
        let _ = run(Path::new("."), "docker", &args);
    }
}

/// A fixture repository and the registry repositories its builds push
/// to: both gone when it is dropped.
pub struct FixtureRepo {
    dir: TempDir,
    _pushed: Vec<Pushed>,
}

impl FixtureRepo {
    /// `dir`, whose builds push to the repositories at and under each of
    /// `pushes_to` (full references: `<registry>/<path>`).
    pub fn new(dir: TempDir, pushes_to: &[String]) -> FixtureRepo {
        FixtureRepo {
            dir,
            _pushed: pushes_to.iter().map(|r| Pushed::at(r)).collect(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A namespace of the test cluster, deleted (without waiting) when
/// dropped, whatever the test's outcome.
pub struct Namespace(pub String);

impl Namespace {
    /// The guard of a namespace another test may have used before (the
    /// real manifests' own): once an earlier guard's deletion has ended,
    /// since a terminating namespace refuses new objects.
    pub fn reused(name: &str) -> Namespace {
        kubectl(&[
            "wait",
            "--for=delete",
            &format!("namespace/{name}"),
            "--timeout=180s",
        ]);
        Namespace(name.to_owned())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        delete_object("namespace", &self.0);
    }
}

/// `kubectl delete KIND NAME`, without waiting and whatever its outcome:
/// for the guards that clean up after a test.
pub fn delete_object(kind: &str, name: &str) {
    let _ = run(
        Path::new("."),
        "kubectl",
        &["delete", kind, name, "--wait=false", "--ignore-not-found"],
    );
}

/// The UIDs of the pods of `namespace` matching `selector` that are not
/// terminating, sorted: the same UIDs before and after a deploy mean no
/// pod restarted.
pub fn pod_uids(namespace: &str, selector: &str) -> Vec<String> {
    let pods = kubectl_json(&[
        "--namespace",
        namespace,
        "get",
        "pods",
        "--selector",
        selector,
    ]);
    let mut uids: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_owned())
        .collect();
    uids.sort();
    uids
}

/// The pods of `namespace` matching `selector` that serve: Ready and not
/// terminating; each with the imageID the runtime reports for the app's
/// own container (named after the selector's value).
pub fn serving_pods(namespace: &str, selector: &str) -> Vec<(String, String)> {
    let pods = kubectl_json(&[
        "--namespace",
        namespace,
        "get",
        "pods",
        "--selector",
        selector,
    ]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .map(|p| {
            // The app's own container is named after it; a sidecar is not.
            let app = selector.rsplit('=').next().unwrap_or_default();
            let statuses = p["status"]["containerStatuses"].as_array().unwrap();
            let ours = statuses
                .iter()
                .find(|c| c["name"] == app)
                .unwrap_or(&statuses[0]);
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                ours["imageID"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A loopback port nothing listens on (the kernel's pick, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Distribution registry that wants a login (htpasswd: user `ci`,
/// password `s3cret`) on a port of its own; stopped when dropped.
pub struct LoginRegistry {
    child: std::process::Child,
    pub address: String,
    _dir: TempDir,
}

impl LoginRegistry {
    pub fn start() -> LoginRegistry {
        let port = free_port();
        let dir = TempDir::new("login-registry");
        // Distribution reads bcrypt only. Perl's crypt is libcrypt's, which
        // makes it (Python's `crypt` module is gone since 3.13; perl-base is
        // on every Debian and Ubuntu machine).
        let hash = ok(
            dir.path(),
            "perl",
            &[
                "-e",
                r#"print crypt("s3cret", q{$2b$05$abcdefghijklmnopqrstuu})"#,
            ],
        );
        assert!(
            hash.starts_with("$2b$05$"),
            "libcrypt made no bcrypt hash: {hash}"
        );
        std::fs::write(dir.path().join("htpasswd"), format!("ci:{hash}\n")).unwrap();
        let address = format!("127.0.0.1:{port}");
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("data").display(),
                dir.path().join("htpasswd").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        wait_for("the login registry answers /v2/ with 401", 20, || {
            matches!(http_get(&address, "/v2/"), Ok((401, _)))
        });
        LoginRegistry {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for LoginRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
