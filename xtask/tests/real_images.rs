//! The real `backend` and `frontend` images: the test run's fresh build of
//! HEAD with its markers (shared with provable_builds.rs), driven through
//! the cluster, `up`, new commits, the seed flow, a readiness failure, the
//! page in headless Chromium, and `down`. One test, in phases, so the
//! suite stays short.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;

const PROJECT: &str = "aiqtest";
const FRONTEND_PORT: &str = "13300";
const BACKEND_PORT: &str = "13800";

/// A cached `up` of the test's project on its ports, with `extra` flags and
/// `env` beside the local registry.
fn up(root: &Path, extra: &[&str], env: &[(&str, &str)]) -> XtaskRun {
    let mut args = vec![
        "up",
        "--cache",
        "--project",
        PROJECT,
        "--frontend-port",
        FRONTEND_PORT,
        "--backend-port",
        BACKEND_PORT,
    ];
    args.extend_from_slice(extra);
    let registry = registry();
    let mut all_env = vec![("XTASK_LOCAL_REGISTRY", registry.as_str())];
    all_env.extend_from_slice(env);
    xtask(root, &args, &all_env)
}

fn backend() -> String {
    format!("127.0.0.1:{BACKEND_PORT}")
}

fn frontend() -> String {
    format!("127.0.0.1:{FRONTEND_PORT}")
}

/// Names of this project's containers, optionally only those of a revision.
fn project_containers(revision: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "ps".to_owned(),
        "--all".into(),
        "--format".into(),
        "{{.Names}}".into(),
        "--filter".into(),
        format!("label=org.aiq.xtask.project={PROJECT}"),
    ];
    if let Some(rev) = revision {
        args.extend([
            "--filter".into(),
            format!("label=org.aiq.xtask.revision={rev}"),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(Path::new("."), "docker", &args)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The label of the containers this test starts by hand.
const STARTED_HERE: &str = "org.aiq.test=real-images";

/// Removes every container this test started by hand when dropped, so a
/// failed phase leaves none behind (and an earlier failed run's are gone
/// when it is created).
struct StartedHere;

impl StartedHere {
    fn new() -> StartedHere {
        StartedHere.remove_all();
        StartedHere
    }

    fn remove_all(&self) {
        let ids = ok(
            Path::new("."),
            "docker",
            &[
                "ps",
                "--all",
                "--quiet",
                "--filter",
                &format!("label={STARTED_HERE}"),
            ],
        );
        for id in ids.lines() {
            let _ = run(Path::new("."), "docker", &["rm", "--force", id]);
        }
    }
}

impl Drop for StartedHere {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// `docker run --detach` of `image` with `args`; with `port`, publishes it
/// on an ephemeral loopback port and waits for `/readyz` there. Returns the
/// container id and that address.
fn run_ready(args: &[&str], image: &str, port: Option<u16>) -> (String, Option<String>) {
    let publish = port.map(|p| format!("127.0.0.1::{p}"));
    let mut all = vec!["run", "--detach", "--label", STARTED_HERE];
    all.extend_from_slice(args);
    if let Some(publish) = &publish {
        all.extend(["--publish", publish]);
    }
    all.push(image);
    let id = ok(Path::new("."), "docker", &all);
    let addr = port.map(|p| {
        let addr = ok(
            Path::new("."),
            "docker",
            &["port", &id, &format!("{p}/tcp")],
        )
        .lines()
        .next()
        .unwrap()
        .to_owned();
        wait_http(&addr, "/readyz", 20);
        addr
    });
    (id, addr)
}

/// Loads `url` in headless Chromium, returns the DOM after scripts ran and
/// keeps a screenshot under target/test-artifacts/.
fn browse(url: &str, screenshot: &str) -> String {
    let profile = TempDir::new("chromium");
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ];
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let mut args: Vec<&str> = flags.to_vec();
    args.push(&user_data);
    let browser = browser();
    let dom = ok(
        Path::new("."),
        &browser,
        &[&args[..], &["--dump-dom", url]].concat(),
    );
    let artifacts = project_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = format!("--screenshot={}", artifacts.join(screenshot).display());
    ok(
        Path::new("."),
        &browser,
        &[&args[..], &["--window-size=900,500", &shot, url]].concat(),
    );
    assert!(
        artifacts.join(screenshot).exists(),
        "screenshot {screenshot} kept"
    );
    dom
}

/// Debian's `chromium`, or what `XTASK_CHROMIUM` names (e.g. google-chrome
/// on a GitHub runner). Never skipped: a missing browser fails the test.
fn browser() -> String {
    if let Ok(path) = std::env::var("XTASK_CHROMIUM") {
        return path;
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| run(Path::new("."), "sh", &["-c", &format!("command -v {name}")]).status.success())
        .expect("no Chromium found: install Debian's `chromium` (`cargo xtask test` as root does) or set XTASK_CHROMIUM")
        .to_owned()
}

fn page_state(dom: &str) -> &str {
    let at = dom
        .find("id=\"state\" data-state=\"")
        .expect("the page has a state")
        + "id=\"state\" data-state=\"".len();
    &dom[at..at + dom[at..].find('"').unwrap()]
}

/// The namespace the real manifests deploy to.
const NAMESPACE: &str = "aiq-agent";

/// The files under the image's `/app/.next` that hold `marker`.
fn next_output_holding(image: &str, marker: &str) -> String {
    ok(
        Path::new("."),
        "docker",
        &[
            "run",
            "--rm",
            "--entrypoint",
            "grep",
            image,
            "-r",
            "-l",
            "-F",
            marker,
            "/app/.next",
        ],
    )
}

/// `kubectl exec` of `command` in `pod` of the real manifests' namespace.
fn exec_in(pod: &str, command: &[&str]) -> String {
    let mut args = vec!["--namespace", NAMESPACE, "exec", pod, "--"];
    args.extend_from_slice(command);
    kubectl(&args)
}

/// Every ready frontend pod has `marker` in its `.next` output and serves
/// it on `/`, and no longer serves `stale` (the previous commit's marker).
fn assert_page_marker_running(marker: &str, stale: Option<&str>) {
    let ready = serving_pods(NAMESPACE, "app.kubernetes.io/name=aiq-frontend");
    assert_eq!(ready.len(), 2, "{ready:?}");
    for (pod, _) in &ready {
        let files = exec_in(pod, &["grep", "-r", "-l", "-F", marker, "/app/.next"]);
        assert!(!files.is_empty(), "{pod}'s .next output lacks {marker}");
        let ip = kubectl(&[
            "--namespace",
            NAMESPACE,
            "get",
            "pod",
            pod,
            "--output",
            "jsonpath={.status.podIP}",
        ]);
        let (status, page) = http_get(&format!("{ip}:3000"), "/").unwrap();
        assert_eq!(status, 200, "{pod}: {page}");
        assert!(
            page.contains(marker),
            "{pod} serves a page without {marker}"
        );
        if let Some(stale) = stale {
            assert!(!page.contains(stale), "{pod} still serves {stale}");
        }
    }
}

/// The UIDs of `app`'s pods in the real manifests' namespace that are not
/// terminating, sorted.
fn app_pod_uids(app: &str) -> Vec<String> {
    pod_uids(NAMESPACE, &format!("app.kubernetes.io/name={app}"))
}

/// Every ready backend pod's binary holds `marker` (`kubectl exec ... grep`).
fn assert_marker_running(marker: &str) {
    let ready = serving_pods(NAMESPACE, "app.kubernetes.io/name=aiq-agent");
    assert_eq!(ready.len(), 2, "{ready:?}");
    for (pod, _) in &ready {
        let found = exec_in(
            pod,
            &["grep", "--count", marker, "/usr/local/bin/aiq-agent"],
        );
        assert_ne!(found, "0", "{pod} runs a binary without {marker}");
    }
}

#[test]
fn real_images_build_fresh_run_by_digest_and_never_serve_stale_code() {
    let head = head_images();
    let _started_here = StartedHere::new();
    // The test's own clone of the run's commit, for the commits it adds.
    let clone = TempDir::new("real");
    clone_into(&head.clone, clone.path(), "022");
    let root = clone.path();
    let head_env = [("XTASK_REGISTRY", head.repository.as_str())];
    let registry_path = format!("{}/realtest", registry());
    let env = [("XTASK_REGISTRY", registry_path.as_str())];
    // What this test pushes and pulls goes when it ends: its own builds,
    // `up`'s images (the local registry's top level, where `up` puts
    // them), and its copies of the run's shared images (whose tags
    // `cargo xtask test` deletes once every test is done).
    let _pushed = [
        Pushed::at(&registry_path),
        Pushed::at(&format!("{}/aiq-agent", registry())),
        Pushed::at(&format!("{}/aiq-frontend", registry())),
    ];
    let _pulled = Pulled::at(&head.repository);
    // The seed's manual check, automated: the random string the run
    // committed into the backend's source must be in the binary the
    // cluster runs, and the one in a page component in the frontend's
    // .next output and in the page it serves.
    let seed_marker = head.backend_marker.clone();
    let page_marker = head.page_marker.clone();
    let first = head.revision.clone();

    // Phase 1: the run's fresh build of both images (`head_images` checked
    // that it was fresh, offline and tagged with the commit); labels and
    // /version say that commit.
    let mut old_backend = String::new();
    let mut first_frontend = String::new();
    for (name, digest) in &head.digests {
        let pinned = format!("{}/{name}@{digest}", head.repository);
        ok(root, "docker", &["pull", "--quiet", &pinned]);
        let label = ok(
            root,
            "docker",
            &[
                "image",
                "inspect",
                "--format",
                "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
                &pinned,
            ],
        );
        assert_eq!(label, first, "{name} revision label");
        if name == "aiq-agent" {
            old_backend = pinned;
        } else {
            first_frontend = pinned;
        }
    }
    let files = next_output_holding(&first_frontend, &page_marker);
    assert!(
        files.contains("/app/.next/server/"),
        "the marker is in the server output: {files}"
    );
    let (container, addr) = run_ready(
        &["--read-only", "--env", "BACKEND_URL=http://127.0.0.1:9"],
        &first_frontend,
        Some(3000),
    );
    let addr = addr.unwrap();
    let (_, page) = http_get(&addr, "/").unwrap();
    let frontend_version = revision_at(&addr, "/version");
    let (unreachable, reason) = http_get(&addr, "/backend/version").unwrap();
    ok(root, "docker", &["rm", "--force", &container]);
    assert!(page.contains(&page_marker), "{page}");
    assert_eq!(frontend_version, first);
    assert_eq!(unreachable, 502, "{reason}");
    assert!(
        reason.contains("http://127.0.0.1:9 unreachable"),
        "{reason}"
    );
    let (container, addr) = run_ready(&[], &old_backend, Some(8000));
    let addr = addr.unwrap();
    let version: serde_json::Value =
        serde_json::from_str(&http_get(&addr, "/version").unwrap().1).unwrap();
    ok(root, "docker", &["rm", "--force", &container]);
    assert_eq!(version["revision"], first);
    assert_eq!(version["service"], "aiq-agent");
    assert_eq!(version["dirty"], false);

    // Phase 1b: that fresh build deployed to the real cluster: every pod
    // runs the pushed digests, and the running binary holds the marker.
    require_cluster();
    let _turn = cluster_turn();
    let _namespace = Namespace::reused(NAMESPACE);
    let head_build = head.clone.join("target/xtask/build.json");
    let deploy = xtask(
        root,
        &[
            "deploy",
            "--from",
            head_build.to_str().unwrap(),
            "--context",
            CLUSTER_CONTEXT,
        ],
        &head_env,
    );
    deploy.assert_ok();
    assert_marker_running(&seed_marker);
    assert_page_marker_running(&page_marker, None);
    xtask(root, &["verify", "--context", CLUSTER_CONTEXT], &head_env).assert_ok();

    // Phase 1c: deploy only what changed, on the real images. A
    // frontend-only commit on the run's commit (in a clone of its own):
    // the backend is reused (not built; its pods keep running), the
    // frontend is built fresh, every frontend pod serves the new page, and
    // `verify` and a rebuild of the frontend from its commit agree. Then a
    // commit that changes neither image, then a backend-only one.
    let reuse = TempDir::new("reuse");
    clone_into(&head.clone, reuse.path(), "022");
    let reuse_root = reuse.path();
    let backend_pods = app_pod_uids("aiq-agent");
    let frontend_marker = set_page_marker(reuse_root);
    let frontend_only = commit_all(reuse_root, "frontend only");
    let deploy_json = ["deploy", "--json", "--context", CLUSTER_CONTEXT];
    let deployed = xtask(reuse_root, &deploy_json, &head_env);
    deployed.assert_ok();
    assert!(
        deployed.stderr.contains("--no-cache --pull"),
        "{}",
        deployed.stderr
    );
    let events = parse_events(&deployed.stdout);
    let reused = events_of(&events, "image_reused");
    let pushed = events_of(&events, "image_pushed");
    assert_eq!((reused.len(), pushed.len()), (1, 1), "{}", deployed.stderr);
    assert_eq!(reused[0]["name"], "aiq-agent");
    assert_eq!(reused[0]["digest"], head.digests["aiq-agent"].as_str());
    assert_eq!(reused[0]["inputs_revision"], first.as_str());
    assert_eq!(pushed[0]["name"], "aiq-frontend");
    assert_eq!(pushed[0]["inputs_revision"], frontend_only.as_str());
    assert_eq!(
        app_pod_uids("aiq-agent"),
        backend_pods,
        "the backend's pods keep running"
    );
    assert_marker_running(&seed_marker);
    assert_page_marker_running(&frontend_marker, Some(&page_marker));
    let verify_here = ["verify", "--context", CLUSTER_CONTEXT];
    xtask(reuse_root, &verify_here, &head_env).assert_ok();
    xtask(
        reuse_root,
        &[
            "verify",
            "--rebuild",
            "aiq-frontend",
            "--context",
            CLUSTER_CONTEXT,
        ],
        &head_env,
    )
    .assert_ok();
    // A commit that changes neither image's inputs (the xtask's code, as
    // most commits do): nothing is built, no pod restarts.
    let frontend_pods = app_pod_uids("aiq-frontend");
    let main_rs = reuse_root.join("xtask/src/main.rs");
    let code = std::fs::read_to_string(&main_rs).unwrap();
    std::fs::write(&main_rs, format!("{code}// {}\n", unique("xtask-only"))).unwrap();
    commit_all(reuse_root, "xtask only");
    let deployed = xtask(reuse_root, &deploy_json, &head_env);
    deployed.assert_ok();
    let events = parse_events(&deployed.stdout);
    assert_eq!(events_of(&events, "image_reused").len(), 2);
    assert!(events_of(&events, "image_pushed").is_empty());
    assert!(
        !deployed.stderr.contains("docker buildx bake"),
        "{}",
        deployed.stderr
    );
    assert_eq!(
        (app_pod_uids("aiq-agent"), app_pod_uids("aiq-frontend")),
        (backend_pods, frontend_pods.clone()),
        "no pod restarted"
    );
    xtask(reuse_root, &verify_here, &head_env).assert_ok();
    // A backend-only commit: the reverse. The frontend is reused, the
    // backend built fresh, and every backend pod runs the new code.
    let backend_marker = add_marker_route(reuse_root, "/api/reuse");
    let backend_only = commit_all(reuse_root, "backend only");
    let deployed = xtask(reuse_root, &deploy_json, &head_env);
    deployed.assert_ok();
    let events = parse_events(&deployed.stdout);
    let reused = events_of(&events, "image_reused");
    let pushed = events_of(&events, "image_pushed");
    assert_eq!((reused.len(), pushed.len()), (1, 1), "{}", deployed.stderr);
    assert_eq!(reused[0]["name"], "aiq-frontend");
    assert_eq!(reused[0]["inputs_revision"], frontend_only.as_str());
    assert_eq!(pushed[0]["name"], "aiq-agent");
    assert_eq!(pushed[0]["inputs_revision"], backend_only.as_str());
    assert_eq!(
        app_pod_uids("aiq-frontend"),
        frontend_pods,
        "the frontend's pods keep running"
    );
    assert_marker_running(&backend_marker);
    xtask(reuse_root, &verify_here, &head_env).assert_ok();
    xtask(
        reuse_root,
        &[
            "verify",
            "--rebuild",
            "aiq-agent",
            "--context",
            CLUSTER_CONTEXT,
        ],
        &head_env,
    )
    .assert_ok();

    // Phase 2: `up` runs the stack; both answer HEAD and the page says
    // "match". The configured base registry cannot be reached (no Docker
    // Hub here), so `up` takes the base images from the local mirror.
    let _ = xtask(root, &["down", "--project", PROJECT], &[]);
    let unreachable_bases = format!("127.0.0.1:{}/library", free_port());
    let started = up(root, &[], &[("XTASK_BASE_REGISTRY", &unreachable_bases)]);
    started.assert_ok();
    assert!(
        started.stderr.contains(&format!(
            "base images cannot be pulled from {unreachable_bases}; using the local mirror {}/library",
            registry()
        )),
        "{}",
        started.stderr
    );
    assert!(
        started
            .stdout
            .contains(&format!("frontend  http://127.0.0.1:{FRONTEND_PORT}")),
        "{}",
        started.stdout
    );
    assert!(started.stdout.contains(&first));
    assert_eq!(revision_at(&backend(), "/version"), first);
    assert_eq!(revision_at(&frontend(), "/version"), first);
    assert_eq!(revision_at(&frontend(), "/backend/version"), first);
    let dom = browse(&format!("http://{}/", frontend()), "page-match.png");
    assert_eq!(page_state(&dom), "match", "{dom}");
    assert!(dom.matches(&first).count() >= 2, "both revisions shown");

    // Phase 3: a one-line change to each service, committed; a cached `up`
    // serves it.
    let marker = add_marker_route(root, "/api/marker");
    let second_page_marker = set_page_marker(root);
    let second = commit_all(root, "backend and frontend: new markers");
    let json = up(root, &["--json"], &[]);
    json.assert_ok();
    let events = parse_events(&json.stdout);
    let stack = events_of(&events, "stack_up");
    assert_eq!(stack[0]["revision"], second.as_str());
    assert_eq!(stack[0]["backend"], format!("http://{}", backend()));
    assert_eq!(revision_at(&backend(), "/version"), second);
    let (status, body) = http_get(&frontend(), "/api/marker").unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, marker.as_str()),
        "the new code serves, through the frontend's proxy"
    );
    let (_, page) = http_get(&frontend(), "/").unwrap();
    assert!(
        page.contains(&second_page_marker) && !page.contains(&page_marker),
        "the cached build serves the new page: {page}"
    );
    assert!(
        project_containers(Some(&first)).is_empty(),
        "no container of the old revision is left"
    );
    // The same commit deployed by a cached build: the cluster runs it.
    let cached = xtask(
        root,
        &["deploy", "--cache", "--context", CLUSTER_CONTEXT],
        &env,
    );
    cached.assert_ok();
    assert!(!cached.stderr.contains("--no-cache"), "{}", cached.stderr);
    assert_marker_running(&marker);
    assert_page_marker_running(&second_page_marker, Some(&page_marker));
    xtask(root, &["verify", "--context", CLUSTER_CONTEXT], &env).assert_ok();

    // Phase 4: the new frontend in front of the old backend says "differ".
    let network = format!("{PROJECT}-net");
    let new_frontend = ok(
        root,
        "docker",
        &[
            "ps",
            "--filter",
            &format!("label=org.aiq.xtask.revision={second}"),
            "--filter",
            "label=org.aiq.xtask.component=aiq-frontend",
            "--format",
            "{{.Image}}",
        ],
    );
    let (old, _) = run_ready(
        &["--network", &network, "--network-alias", "old-backend"],
        &old_backend,
        None,
    );
    let (mixed, mixed_addr) = run_ready(
        &[
            "--network",
            &network,
            "--env",
            "BACKEND_URL=http://old-backend:8000",
        ],
        &new_frontend,
        Some(3000),
    );
    let mixed_addr = mixed_addr.unwrap();
    wait_http(&mixed_addr, "/backend/version", 20);
    let dom = browse(&format!("http://{mixed_addr}/"), "page-differ.png");
    // SIGTERM: the frontend drains, not ready but alive, before it exits.
    ok(root, "docker", &["kill", "--signal", "TERM", &mixed]);
    let readiness = http_get(&mixed_addr, "/readyz").unwrap();
    let liveness = http_get(&mixed_addr, "/healthz").unwrap();
    ok(root, "docker", &["rm", "--force", &old, &mixed]);
    assert_eq!(page_state(&dom), "differ", "{dom}");
    assert_eq!(readiness, (503, "draining".to_owned()));
    assert_eq!(liveness.0, 200);

    // Phase 4b: the seed flow. An environment that knows the backend's
    // public address bakes it into the frontend as NEXT_PUBLIC_BACKEND_URL,
    // and the page asks the backend there, not through the frontend's proxy
    // (which points nowhere here).
    let cargo_toml = root.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&cargo_toml).unwrap();
    let seeded = manifest.replacen(
        "lockfile = \"frontend/package-lock.json\"",
        "lockfile = \"frontend/package-lock.json\"\nseed = { build_arg = \"NEXT_PUBLIC_BACKEND_URL\", service = \"aiq-agent\" }",
        1,
    ) + &format!(
        "\n[workspace.metadata.xtask.environments.seeded]\nseed_args = {{ NEXT_PUBLIC_BACKEND_URL = \"http://{}\" }}\n",
        backend()
    );
    assert_ne!(manifest, seeded);
    std::fs::write(&cargo_toml, seeded).unwrap();
    commit_all(root, "a seeded environment");
    xtask(
        root,
        &[
            "build",
            "--cache",
            "--push",
            "--env",
            "seeded",
            "aiq-frontend",
        ],
        &env,
    )
    .assert_ok();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("target/xtask/build.json")).unwrap(),
    )
    .unwrap();
    let seeded_frontend = format!(
        "{registry_path}/aiq-frontend@{}",
        file["images"][0]["digest"].as_str().unwrap()
    );
    let (seeded, seeded_addr) = run_ready(
        &["--env", "BACKEND_URL=http://127.0.0.1:9"],
        &seeded_frontend,
        Some(3000),
    );
    let dom = browse(
        &format!("http://{}/", seeded_addr.unwrap()),
        "page-seeded.png",
    );
    ok(root, "docker", &["rm", "--force", &seeded]);
    assert!(
        dom.contains(&format!("http://{}/version", backend())),
        "the page names the baked address: {dom}"
    );
    assert!(
        dom.contains(&format!("id=\"backend-revision\">{second}<")),
        "the backend answered at its public address: {dom}"
    );
    // The seeded environment's commit changed only the configuration, no
    // input of either image: the frontend's own revision is still the
    // backend's.
    assert!(
        dom.contains(&format!("id=\"frontend-revision\">{second}<")),
        "{dom}"
    );
    assert_eq!(page_state(&dom), "match", "{dom}");

    // Phase 5: a backend that never becomes ready is refused; the previous
    // revision keeps serving on the same ports.
    let lib_rs = root.join("backend/src/lib.rs");
    let lib = std::fs::read_to_string(&lib_rs).unwrap();
    let broken = lib.replacen(
        "(StatusCode::OK, \"ready\")",
        "(StatusCode::SERVICE_UNAVAILABLE, \"broken on purpose\")",
        1,
    );
    assert_ne!(lib, broken);
    std::fs::write(&lib_rs, broken).unwrap();
    let third = commit_all(root, "backend: break readiness");
    let failed = up(root, &["--ready-timeout", "5"], &[]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(
        failed.stderr.contains("failed readiness")
            && failed
                .stderr
                .contains("/readyz answered 503 broken on purpose"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("last log lines"),
        "{}",
        failed.stderr
    );
    assert_eq!(revision_at(&backend(), "/version"), second);
    assert_eq!(revision_at(&frontend(), "/backend/version"), second);
    assert!(
        project_containers(Some(&third)).is_empty(),
        "the failed revision's containers are removed"
    );

    // Phase 6: `down` leaves nothing of the project behind, twice over.
    xtask(root, &["down", "--project", PROJECT], &[]).assert_ok();
    xtask(root, &["down", "--project", PROJECT], &[]).assert_ok();
    assert!(project_containers(None).is_empty());
    let networks = ok(
        root,
        "docker",
        &[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            &format!("label=org.aiq.xtask.project={PROJECT}"),
        ],
    );
    assert!(networks.is_empty(), "{networks}");
}
