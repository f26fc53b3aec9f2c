//! `cargo xtask deploy` against a fake cluster (tests/fixtures/fake-kubectl:
//! it records every argv and plays scripted states) with real images built
//! and pushed to the real registry. Every kubectl line recorded here is then
//! replayed through the real kubectl to prove its flags exist.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use common::*;
use serde_json::{json, Value};

const CONTEXT: &str = "test-cluster";

fn fake_kubectl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-kubectl")
}

/// A repository with two images and a kustomize base for them.
struct Fixture {
    repo: TempDir,
    cluster: TempDir,
    registry: String,
}

impl Fixture {
    fn new(scenario: Value) -> Fixture {
        Fixture::with_web_config(scenario, "")
    }

    /// `web_config`: extra keys for fxweb's `[[images]]` entry.
    fn with_web_config(scenario: Value, web_config: &str) -> Fixture {
        require_docker();
        let repo = TempDir::new("deploy");
        let root = repo.path();
        let registry = format!("{}/{}", common::registry(), unique("deploy"));
        std::fs::write(
            root.join("Cargo.toml"),
            format!(
                "[workspace]\nmembers = []\n\n[workspace.metadata.xtask]\nregistry = \"{registry}\"\nnamespace = \"fx\"\ncontext = \"{CONTEXT}\"\nrollout_order = [\"fxapi\", \"fxweb\"]\n\n[[workspace.metadata.xtask.images]]\nname = \"fxweb\"\ndockerfile = \"Dockerfile\"\n{web_config}\n\n[[workspace.metadata.xtask.images]]\nname = \"fxapi\"\ndockerfile = \"Dockerfile\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("Dockerfile"),
            "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/debian:bookworm-slim\nARG GIT_REVISION=unknown\nARG API_URL=none\nRUN echo \"$GIT_REVISION $API_URL\" > /revision\n",
        )
        .unwrap();
        std::fs::create_dir(root.join("k8s")).unwrap();
        std::fs::write(
            root.join("k8s/kustomization.yaml"),
            "resources:\n  - workloads.yaml\n",
        )
        .unwrap();
        let workload = |name: &str| {
            format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/name: {name}\nspec:\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: {name}\n  template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: {name}\n    spec:\n      containers:\n        - name: {name}\n          image: {name}\n")
        };
        std::fs::write(
            root.join("k8s/workloads.yaml"),
            format!("{}---\n{}", workload("fxapi"), workload("fxweb")),
        )
        .unwrap();
        std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
        std::fs::write(root.join("app.txt"), unique("v")).unwrap();
        init_repo(root);
        commit_all(root, "fixture");
        let cluster = TempDir::new("cluster");
        let mut scenario = scenario;
        if scenario.get("context").is_none() {
            scenario["context"] = json!(CONTEXT);
        }
        std::fs::write(cluster.path().join("scenario.json"), scenario.to_string()).unwrap();
        Fixture {
            repo,
            cluster,
            registry,
        }
    }

    /// A cluster already running the old digests, where the new `fxweb`
    /// behaves as `behaviour` says.
    fn failing(behaviour: &str) -> Fixture {
        Fixture::new(json!({
            "existing": existing(),
            "behaviour": {"fxweb": behaviour},
            "namespaces": ["fx"],
        }))
    }

    fn root(&self) -> &Path {
        self.repo.path()
    }

    /// `deploy` with short waits, then `args`.
    fn xtask(&self, args: &[&str]) -> XtaskRun {
        let mut all = vec!["deploy"];
        all.extend_from_slice(FAST);
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Any xtask command against this fixture's cluster and registry.
    fn run(&self, args: &[&str]) -> XtaskRun {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        xtask(self.root(), args, &env)
    }

    fn env(&self) -> [(&'static str, String); 3] {
        [
            ("XTASK_KUBECTL", fake_kubectl().display().to_string()),
            ("FAKE_KUBE_DIR", self.cluster.path().display().to_string()),
            ("XTASK_REGISTRY", self.registry.clone()),
        ]
    }

    /// Starts `args` in the background, for tests that signal it.
    fn spawn(&self, args: &[&str]) -> std::process::Child {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(args)
            .current_dir(self.root())
            .env("XTASK_BASE_REGISTRY", base_registry())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd.spawn().expect("starting the xtask binary")
    }

    /// Rewrites the fake cluster's state.
    fn edit_state(&self, edit: impl FnOnce(&mut Value)) {
        let mut state = self.state();
        edit(&mut state);
        std::fs::write(self.cluster.path().join("state.json"), state.to_string()).unwrap();
    }

    /// The history entries, oldest first.
    fn history(&self) -> Vec<Value> {
        let state = self.state();
        let Some(map) = state["configmaps"]["xtask-deploy-history"].as_object() else {
            return Vec::new();
        };
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        keys.iter()
            .map(|k| serde_json::from_str(map[*k].as_str().unwrap()).unwrap())
            .collect()
    }

    fn image_of(&self, name: &str) -> String {
        self.state()["deployments"][name]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn calls(&self) -> Vec<Vec<String>> {
        let text =
            std::fs::read_to_string(self.cluster.path().join("calls.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn state(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.cluster.path().join("state.json")).unwrap(),
        )
        .unwrap()
    }

    /// Index of the first call containing all `words`, in order of calls.
    fn call_index(&self, words: &[&str]) -> Option<usize> {
        self.calls()
            .iter()
            .position(|argv| words.iter().all(|w| argv.iter().any(|a| a == w)))
    }

    fn digests(&self) -> Value {
        let file: Value = serde_json::from_str(
            &std::fs::read_to_string(self.root().join("target/xtask/build.json")).unwrap(),
        )
        .unwrap();
        let mut digests = json!({});
        for image in file["images"].as_array().unwrap() {
            digests[image["name"].as_str().unwrap()] = image["digest"].clone();
        }
        digests
    }
}

/// Short waits, so failures show in seconds.
const FAST: &[&str] = &["--poll-interval", "0.1", "--grace", "2", "--timeout", "60"];

fn selector(name: &str) -> String {
    format!("app.kubernetes.io/name={name}")
}

#[test]
fn healthy_deploy_pins_digests_applies_in_order_verifies_and_records() {
    let fx = Fixture::new(json!({}));
    let run = fx.xtask(&[]);
    run.assert_ok();
    let head = git(fx.root(), &["rev-parse", "HEAD"]);
    let digests = fx.digests();
    let state = fx.state();
    for name in ["fxapi", "fxweb"] {
        let image = state["deployments"][name]["image"].as_str().unwrap();
        assert_eq!(
            image,
            format!("{}/{name}@{}", fx.registry, digests[name].as_str().unwrap()),
            "pinned by digest"
        );
        assert!(
            run.stdout.contains(digests[name].as_str().unwrap()),
            "summary names the digest"
        );
    }
    let lock = fx
        .call_index(&["create", "--filename", "-"])
        .expect("lock taken");
    let api = fx
        .call_index(&["apply", "--server-side", &selector("fxapi")])
        .expect("fxapi applied");
    let web = fx
        .call_index(&["apply", "--server-side", &selector("fxweb")])
        .expect("fxweb applied");
    let release = fx.call_index(&["delete", "lease"]).expect("lock released");
    assert!(
        lock < api && api < web && web < release,
        "lock, backend, frontend, release: {:?}",
        fx.calls()
    );
    assert!(
        fx.calls()[api].iter().any(|a| a == "--field-manager")
            && fx.calls()[api].iter().any(|a| a == "xtask")
    );
    assert!(fx.calls().iter().all(|c| !c.contains(&"undo".to_owned())));
    assert!(
        run.stderr.contains("seconds  step")
            && run.stderr.contains("  apply and roll out deployment/fxweb"),
        "the summary times each step: {}",
        run.stderr
    );
    assert_eq!(state["lease"], Value::Null);
    let history = &state["configmaps"]["xtask-deploy-history"];
    let entry: Value = serde_json::from_str(
        history
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(entry["revision"], head);
    assert_eq!(entry["result"], "succeeded");
    assert_eq!(entry["digests"], digests);

    // The rendered overlay stamps the revision on every pod template.
    let rendered =
        std::fs::read_to_string(fx.root().join("target/xtask/deploy/rendered.yaml")).unwrap();
    assert_eq!(
        rendered
            .matches(&format!("aiq.dev/revision: {head}"))
            .count(),
        2,
        "{rendered}"
    );
    assert!(!rendered.contains(":latest"));
}

fn assert_failed_and_rolled_back(fx: &Fixture, run: &XtaskRun, reason: &str) {
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("deployment/fxweb") && run.stderr.contains(reason),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    let undo_web = fx
        .call_index(&["rollout", "undo", "deployment/fxweb"])
        .expect("fxweb undone");
    let undo_api = fx
        .call_index(&["rollout", "undo", "deployment/fxapi"])
        .expect("fxapi undone");
    assert!(undo_web < undo_api, "undo in reverse order");
    let state = fx.state();
    for name in ["fxapi", "fxweb"] {
        assert_eq!(
            state["deployments"][name]["image"],
            format!("registry/{name}@sha256:old"),
            "the previous version serves again"
        );
    }
    assert_eq!(state["lease"], Value::Null, "lock released after a failure");
    let history = state["configmaps"]["xtask-deploy-history"]
        .as_object()
        .unwrap();
    assert!(history
        .values()
        .any(|v| v.as_str().unwrap().contains("failed, rolled back")));
}

fn existing() -> Value {
    json!({"fxapi": "sha256:old", "fxweb": "sha256:old"})
}

#[test]
fn crash_loop_fails_fast_names_the_pod_and_rolls_back() {
    let fx = Fixture::failing("crashloop");
    let started = Instant::now();
    let run = fx.xtask(&[]);
    assert_failed_and_rolled_back(&fx, &run, "CrashLoopBackOff");
    assert!(
        run.stderr.contains("the new code crashed on start"),
        "log lines: {}",
        run.stderr
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "failed well before --timeout"
    );
}

#[test]
fn image_pull_errors_fail_fast_and_roll_back() {
    let fx = Fixture::failing("imagepull");
    let run = fx.xtask(&[]);
    assert_failed_and_rolled_back(&fx, &run, "ImagePullBackOff");
}

#[test]
fn readiness_that_never_passes_fails_after_the_grace_window() {
    let fx = Fixture::failing("never-ready");
    let run = fx.xtask(&[]);
    assert_failed_and_rolled_back(&fx, &run, "readiness still failing after 2s");
}

#[test]
fn an_old_pod_still_ready_fails_verification() {
    let fx = Fixture::failing("old-pod-ready");
    let run = fx.xtask(&[]);
    assert_failed_and_rolled_back(&fx, &run, "is ready but runs registry/fxweb@sha256:old");
}

#[test]
fn a_failed_rollback_exits_3_and_says_so() {
    let fx = Fixture::new(
        json!({"existing": existing(), "behaviour": {"fxweb": "crashloop"}, "undo_fails": true, "namespaces": ["fx"]}),
    );
    let run = fx.xtask(&[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("ROLLBACK FAILED") && run.stderr.contains("the server is on fire"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("kubectl --namespace fx get deployments"),
        "{}",
        run.stderr
    );
}

#[test]
fn no_rollback_leaves_the_failure_for_inspection() {
    let fx = Fixture::failing("crashloop");
    let run = fx.xtask(&["--no-rollback"]);
    assert_eq!(run.code, 1);
    assert_eq!(fx.call_index(&["rollout", "undo"]), None);
    assert!(run.stderr.contains("CrashLoopBackOff"));
}

#[test]
fn a_held_lock_refuses_with_the_holder_and_changes_nothing() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let fresh = time_string(now - 5);
    let lease = json!({"metadata": {"name": "xtask-deploy-lock", "resourceVersion": "7"}, "spec": {"holderIdentity": "alice@laptop", "acquireTime": time_string(now - 100), "renewTime": fresh, "leaseDurationSeconds": 60}});
    let fx = Fixture::new(json!({"lease": lease, "namespaces": ["fx"]}));
    let run = fx.xtask(&[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("alice@laptop") && run.stderr.contains("another deploy holds the lock"),
        "{}",
        run.stderr
    );
    assert_eq!(fx.call_index(&["apply"]), None);
    assert!(
        !run.stderr.contains("docker buildx bake"),
        "nothing built after a refused lock"
    );
    assert_eq!(
        fx.state()["lease"]["spec"]["holderIdentity"],
        "alice@laptop",
        "the holder's lock is untouched"
    );
}

#[test]
fn an_expired_lock_is_taken_over_atomically() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lease = json!({"metadata": {"name": "xtask-deploy-lock", "resourceVersion": "7"}, "spec": {"holderIdentity": "bob@ci", "acquireTime": time_string(now - 600), "renewTime": time_string(now - 300), "leaseDurationSeconds": 60}});
    let fx = Fixture::new(json!({"lease": lease, "namespaces": ["fx"]}));
    let run = fx.xtask(&[]);
    run.assert_ok();
    assert!(fx.call_index(&["replace", "--filename", "-"]).is_some());
    assert!(run.stderr.contains("bob@ci expired"));
}

#[test]
fn the_wrong_cluster_is_refused_unless_named() {
    let fx = Fixture::new(json!({"context": "prod-cluster", "contexts": ["prod-cluster"]}));
    let run = fx.xtask(&[]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("current kube context is \"prod-cluster\" but the configuration expects \"test-cluster\""), "{}", run.stderr);
    assert_eq!(
        fx.calls().len(),
        1,
        "only the context was read: {:?}",
        fx.calls()
    );
    fx.xtask(&["--context", "prod-cluster"]).assert_ok();
    assert!(fx
        .calls()
        .iter()
        .filter(|c| c.contains(&"apply".to_owned()))
        .all(|c| c.contains(&"prod-cluster".to_owned())));
}

#[test]
fn an_unreachable_cluster_is_refused_before_anything_is_built() {
    let fx = Fixture::new(json!({"reachable": false}));
    let run = fx.xtask(&[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("is not reachable") && run.stderr.contains("connection refused"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("docker buildx bake"));
}

#[test]
fn dry_run_prints_the_plan_manifests_and_diff_without_side_effects() {
    let fx = Fixture::new(json!({"namespaces": ["fx"]}));
    let run = fx.xtask(&["--dry-run"]);
    run.assert_ok();
    let out = &run.stdout;
    assert!(
        out.contains("$ docker buildx bake") && out.contains("--no-cache --pull"),
        "{out}"
    );
    assert!(
        out.contains("--server-side --field-manager xtask --force-conflicts --kustomize"),
        "{out}"
    );
    assert!(
        out.contains("@sha256:<fxapi-digest-after-push>"),
        "placeholders for digests: {out}"
    );
    assert!(out.contains("# kubectl diff --server-side"), "{out}");
    for line in out.lines() {
        assert!(
            line.starts_with("$ ") || line.starts_with('#'),
            "every line is a command or a comment: {line}"
        );
    }
    assert_eq!(fx.call_index(&["apply"]), None, "nothing applied");
    assert_eq!(fx.call_index(&["create"]), None, "no lock taken");

    let offline = Fixture::new(json!({"reachable": false}));
    let plan = offline.xtask(&["--dry-run"]);
    plan.assert_ok();
    assert!(
        plan.stdout.contains("is not reachable") && plan.stdout.contains("$ "),
        "{}",
        plan.stdout
    );
}

#[test]
fn deploy_from_a_build_file_checks_revision_and_registry() {
    let fx = Fixture::new(json!({"namespaces": ["fx"]}));
    let env = [("XTASK_REGISTRY", fx.registry.as_str())];
    xtask(fx.root(), &["build", "--push"], &env).assert_ok();
    let file = fx
        .root()
        .join("target/xtask/build.json")
        .display()
        .to_string();
    let run = fx.xtask(&["--from", &file]);
    run.assert_ok();
    assert!(
        !run.stderr.contains("docker buildx bake"),
        "no rebuild: {}",
        run.stderr
    );

    // A new commit makes the file stale.
    std::fs::write(fx.root().join("app.txt"), "next").unwrap();
    commit_all(fx.root(), "next");
    let stale = fx.xtask(&["--from", &file]);
    assert_eq!(stale.code, 2);
    assert!(stale.stderr.contains("pass --rev"), "{}", stale.stderr);
    let old_rev: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    fx.xtask(&[
        "--from",
        &file,
        "--rev",
        old_rev["revision"].as_str().unwrap(),
    ])
    .assert_ok();

    // A digest the registry does not have is refused.
    let forged = std::fs::read_to_string(&file).unwrap().replace(
        old_rev["images"][0]["digest"].as_str().unwrap(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    );
    std::fs::write(&file, forged).unwrap();
    let missing = fx.xtask(&[
        "--from",
        &file,
        "--rev",
        old_rev["revision"].as_str().unwrap(),
    ]);
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("is not in the registry"),
        "{}",
        missing.stderr
    );

    // A file without one of the configured images is refused too.
    let mut partial = old_rev.clone();
    partial["images"].as_array_mut().unwrap().pop();
    std::fs::write(&file, partial.to_string()).unwrap();
    let calls = fx.calls().len();
    let incomplete = fx.xtask(&[
        "--from",
        &file,
        "--rev",
        old_rev["revision"].as_str().unwrap(),
    ]);
    incomplete.assert_fails(2, "has no image");
    assert!(
        fx.calls()[calls..]
            .iter()
            .all(|c| !c.contains(&"create".to_owned())),
        "refused before the lock"
    );
}

#[test]
fn status_and_verify_compare_the_cluster_with_head() {
    let fx = Fixture::new(json!({"existing": existing(), "namespaces": ["fx"]}));
    fx.xtask(&[]).assert_ok();
    let verified = fx.run(&["verify"]);
    verified.assert_ok();
    assert!(
        verified.stdout.contains("ok    fxapi") && verified.stdout.contains("ok    fxweb"),
        "{}",
        verified.stdout
    );
    // An entry someone broke by hand is skipped, not fatal.
    fx.edit_state(|state| {
        state["configmaps"]["xtask-deploy-history"]["0-hand-edited"] = json!("{not json");
    });
    let status = fx.run(&["status"]);
    status.assert_ok();
    assert!(
        status
            .stderr
            .contains("skipping deploy history entry 0-hand-edited"),
        "{}",
        status.stderr
    );
    assert_eq!(
        status.stdout.matches("ok (HEAD)").count(),
        2,
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("succeeded") && status.stdout.contains("deploy lock: free"));

    // A new commit, built and pushed but not deployed: drift.
    std::fs::write(fx.root().join("app.txt"), "next").unwrap();
    commit_all(fx.root(), "next");
    xtask(
        fx.root(),
        &["build", "--push"],
        &[("XTASK_REGISTRY", &fx.registry)],
    )
    .assert_ok();
    let head_digest = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    let status = fx.run(&["status"]);
    assert_eq!(
        status.stdout.matches("drift (not HEAD)").count(),
        2,
        "{}",
        status.stdout
    );
    let drift = fx.run(&["verify"]);
    assert_eq!(drift.code, 1, "{}", drift.stderr);
    assert!(
        drift.stdout.contains("FAIL  deployment/fxweb pins")
            && drift.stdout.contains(&format!("not HEAD's {head_digest}")),
        "resolved HEAD's digest from the registry: {}",
        drift.stdout
    );

    // A dirty build running fails verify with its own message.
    std::fs::write(fx.root().join("app.txt"), "uncommitted").unwrap();
    fx.xtask(&["--allow-dirty"]).assert_ok();
    std::fs::write(fx.root().join("app.txt"), "next").unwrap();
    let dirty = fx.run(&["verify"]);
    assert_eq!(dirty.code, 1);
    assert!(
        dirty.stderr.contains("runs a dirty build"),
        "{}",
        dirty.stderr
    );
    assert!(fx
        .run(&["status"])
        .stdout
        .contains("dirty (an uncommitted build)"));
}

#[test]
fn rollback_undoes_the_last_deploy_and_to_redeploys_recorded_digests() {
    let fx = Fixture::new(json!({"namespaces": ["fx"]}));
    fx.xtask(&[]).assert_ok();
    let first = git(fx.root(), &["rev-parse", "HEAD"]);
    let first_image = fx.image_of("fxweb");
    std::fs::write(fx.root().join("app.txt"), "second").unwrap();
    let second = commit_all(fx.root(), "second");
    fx.xtask(&[]).assert_ok();
    let second_image = fx.image_of("fxweb");
    assert_ne!(first_image, second_image);

    // Without --to: undo what the last deploy changed, newest first.
    let mut undo = vec!["rollback"];
    undo.extend_from_slice(FAST);
    let run = fx.run(&undo);
    run.assert_ok();
    assert_eq!(fx.image_of("fxweb"), first_image);
    let web = fx
        .call_index(&["rollout", "undo", "deployment/fxweb"])
        .unwrap();
    let api = fx
        .call_index(&["rollout", "undo", "deployment/fxapi"])
        .unwrap();
    assert!(web < api);
    let last = fx.history().pop().unwrap();
    assert_eq!(last["kind"], "rollback");
    assert_eq!(last["result"], "succeeded");
    assert_eq!(last["revision"], first, "the entry names what runs now");
    assert_eq!(fx.run(&["verify"]).code, 1, "HEAD is not running any more");

    // A second undo has nothing of a deploy to undo: refused before the
    // lock, so nothing at all is written.
    let calls = fx.calls().len();
    let again = fx.run(&undo);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("pass --to"), "{}", again.stderr);
    assert!(
        fx.calls()[calls..]
            .iter()
            .all(|c| !c.contains(&"create".to_owned())),
        "no lock taken: {:?}",
        &fx.calls()[calls..]
    );

    // --to: the recorded digests, applied and verified, nothing built.
    let mut to = undo.clone();
    to.extend_from_slice(&["--to", &second[..10]]);
    let run = fx.run(&to);
    run.assert_ok();
    assert!(!run.stderr.contains("docker buildx bake"), "{}", run.stderr);
    assert_eq!(fx.image_of("fxweb"), second_image);
    fx.run(&["verify"]).assert_ok();
    assert_eq!(fx.history().pop().unwrap()["kind"], "rollback");

    // A revision that was never built is refused before anything changes.
    std::fs::write(fx.root().join("app.txt"), "never built").unwrap();
    let unbuilt = commit_all(fx.root(), "never built");
    let calls = fx.calls().len();
    let mut never = undo.clone();
    never.extend_from_slice(&["--to", &unbuilt]);
    let refused = fx.run(&never);
    refused.assert_fails(2, "not in the registry");
    assert!(fx.calls()[calls..]
        .iter()
        .all(|c| !c.contains(&"apply".to_owned())));
}

/// Waits until the fake cluster has recorded a call with all `words`
/// after its first `after` calls.
fn wait_for_call(fx: &Fixture, after: usize, words: &[&str]) {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let seen = || {
        fx.calls()
            .iter()
            .skip(after)
            .any(|argv| words.iter().all(|w| argv.iter().any(|a| a == w)))
    };
    while !seen() {
        assert!(
            Instant::now() < deadline,
            "no call {words:?}: {:?}",
            fx.calls()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn signal(child: &std::process::Child, name: &str) {
    ok(
        Path::new("."),
        "kill",
        &[&format!("-{name}"), &child.id().to_string()],
    );
}

#[test]
fn an_interrupted_deploy_records_where_it_stopped_and_frees_the_lock() {
    let fx = Fixture::failing("never-ready");
    let mut args = vec!["deploy", "--poll-interval", "0.1", "--grace", "600"];
    args.push("--timeout");
    args.push("600");
    let child = fx.spawn(&args);
    wait_for_call(&fx, 0, &["apply", &selector("fxweb")]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted during apply deployment/fxweb")
            && stderr.contains("fxapi, fxweb"),
        "{stderr}"
    );
    let state = fx.state();
    assert_eq!(state["lease"], Value::Null, "the lock was released");
    let entry = fx.history().pop().unwrap();
    assert_eq!(entry["result"], "interrupted");
    assert_eq!(entry["step"], "apply deployment/fxweb");
    assert_eq!(entry["changed"], json!(["fxapi", "fxweb"]));
    assert_eq!(fx.call_index(&["rollout", "undo"]), None, "nothing undone");
    let status = fx.run(&["status"]);
    status.assert_ok();
    assert!(
        status
            .stdout
            .contains("interrupted (at: apply deployment/fxweb)")
            && status.stderr.contains("did not finish"),
        "{}\n{}",
        status.stdout,
        status.stderr
    );

    // SIGKILL: no handler runs. The entry stays "in progress" and the lock
    // stays until it expires; then status calls it killed and the next
    // deploy takes the lock over and says what the killed one had got to.
    std::fs::write(fx.root().join("app.txt"), "again").unwrap();
    commit_all(fx.root(), "again");
    let before = fx.calls().len();
    let child = fx.spawn(&args);
    wait_for_call(&fx, before, &["apply", &selector("fxweb")]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&child, "KILL");
    child.wait_with_output().unwrap();
    assert_ne!(
        fx.state()["lease"],
        Value::Null,
        "a killed deploy leaves its lock"
    );
    assert!(fx.run(&["status"]).stdout.contains("deploy lock: held by"));
    fx.edit_state(|state| {
        state["lease"]["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    });
    let status = fx.run(&["status"]);
    assert!(
        status
            .stdout
            .contains("killed without a result (at: apply deployment/fxweb)"),
        "{}",
        status.stdout
    );
    let next = fx.xtask(&["--no-rollback"]);
    assert!(
        next.stderr.contains("expired; taking it over")
            && next.stderr.contains("the previous run did not finish")
            && next.stderr.contains("killed without a result"),
        "{}",
        next.stderr
    );
}

#[test]
fn a_deploy_that_loses_its_lock_stops_and_leaves_the_new_holder_alone() {
    let fx = Fixture::failing("never-ready");
    let child = fx.spawn(&["deploy", "--poll-interval", "0.2", "--grace", "60"]);
    wait_for_call(&fx, 0, &["apply", &selector("fxweb")]);
    let ours = fx.state()["lease"]["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        ours.contains("(pid "),
        "holders are told apart by pid: {ours}"
    );
    fx.edit_state(|state| {
        state["lease"]["spec"]["holderIdentity"] = json!("mallory@elsewhere (pid 1)");
    });
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lost the deploy lock: mallory@elsewhere (pid 1) holds it now")
            && stderr.contains("stopped without rolling back"),
        "{stderr}"
    );
    assert_eq!(fx.call_index(&["rollout", "undo"]), None);
    assert_eq!(
        fx.state()["lease"]["spec"]["holderIdentity"],
        "mallory@elsewhere (pid 1)",
        "the new holder's lock is not deleted"
    );
    assert_eq!(
        fx.history().pop().unwrap()["result"],
        "failed: lost the deploy lock"
    );
}

const SEEDED_WEB: &str = "seed = { build_arg = \"API_URL\", service = \"fxapi\" }";

#[test]
fn a_seeded_image_is_built_once_its_service_has_an_address() {
    // The LoadBalancer takes a few reads to get its address.
    let fx = Fixture::with_web_config(json!({"namespaces": ["fx"], "lb_after": 3}), SEEDED_WEB);
    let run = fx.xtask(&[]);
    run.assert_ok();
    let err = &run.stderr;
    let api = err
        .find("apply and roll out deployment/fxapi done")
        .unwrap();
    let waited = err
        .find("service/fxapi: waiting for a LoadBalancer address")
        .unwrap();
    let seeded = err
        .find("build and push fxweb with API_URL=http://fxapi.elb.example")
        .unwrap_or_else(|| panic!("{err}"));
    let web = err.find("apply and roll out deployment/fxweb").unwrap();
    assert!(api < waited && waited < seeded && seeded < web, "{err}");
    let bake = std::fs::read_to_string(fx.root().join("target/xtask/bake.json")).unwrap();
    assert!(bake.contains("http://fxapi.elb.example"), "{bake}");
    let reads = fx
        .calls()
        .iter()
        .filter(|c| c.contains(&"service".to_owned()))
        .count();
    assert_eq!(reads, 4, "polled until the address came");
    assert_eq!(
        fx.image_of("fxweb"),
        format!(
            "{}/fxweb@{}",
            fx.registry,
            fx.digests()["fxweb"].as_str().unwrap()
        ),
        "the seeded build's digest is what runs"
    );
    assert_eq!(
        fx.history().pop().unwrap()["digests"],
        fx.digests(),
        "and what the history records"
    );

    // Built ahead (--from), the value must come from the configuration.
    let file = fx
        .root()
        .join("target/xtask/build.json")
        .display()
        .to_string();
    let refused = fx.xtask(&["--from", &file]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("seed_args.API_URL") && refused.stderr.contains("fxapi"),
        "{}",
        refused.stderr
    );
    let plan = fx.xtask(&["--dry-run"]);
    plan.assert_ok();
    assert!(
        plan.stdout
            .contains("# then build and push fxweb with API_URL= the address of service fxapi"),
        "{}",
        plan.stdout
    );
}

#[test]
fn a_seed_service_that_never_gets_an_address_fails_within_its_bound() {
    let fx = Fixture::with_web_config(
        json!({"existing": existing(), "namespaces": ["fx"], "lb_after": 1000}),
        SEEDED_WEB,
    );
    let run = fx.xtask(&["--seed-timeout", "1"]);
    run.assert_fails(1, "service/fxapi has no external address after 1s");
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    assert_eq!(fx.image_of("fxapi"), "registry/fxapi@sha256:old");
}

#[test]
fn deploy_and_status_json_stream_only_documented_events() {
    let fx = Fixture::new(json!({"namespaces": ["fx"]}));
    let plan = fx.xtask(&["--dry-run", "--json"]);
    plan.assert_ok();
    let events = parse_events(&plan.stdout);
    let commands = events_of(&events, "command");
    assert!(commands.iter().all(|c| c["dry_run"] == true));
    assert!(commands
        .iter()
        .any(|c| c["line"].as_str().unwrap().contains("apply --server-side")));
    assert!(events_of(&events, "manifests")[0]["yaml"]
        .as_str()
        .unwrap()
        .contains("aiq.dev/revision"));
    assert_eq!(events_of(&events, "diff").len(), 1);

    let run = fx.xtask(&["--json"]);
    run.assert_ok();
    let events = parse_events(&run.stdout);
    let digests = fx.digests();
    let verified = events_of(&events, "verified");
    assert_eq!(verified.len(), 2);
    for v in verified {
        assert_eq!(v["digest"], digests[v["deployment"].as_str().unwrap()]);
    }
    assert_eq!(events_of(&events, "image_pushed").len(), 2);
    assert!(!events_of(&events, "rollout").is_empty());

    let status = fx.run(&["status", "--json"]);
    status.assert_ok();
    let events = parse_events(&status.stdout);
    let components = events_of(&events, "component");
    assert_eq!(components.len(), 2);
    assert!(components.iter().all(|c| c["state"] == "ok (HEAD)"));
    assert_eq!(events_of(&events, "history").len(), 1);
    let verify = fx.run(&["verify", "--json"]);
    verify.assert_ok();
    assert!(events_of(&parse_events(&verify.stdout), "verified")
        .iter()
        .all(|v| v["ok"] == true));
}

fn time_string(epoch: i64) -> String {
    ok(
        Path::new("."),
        "date",
        &["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"],
    )
}

/// Every kubectl line the deploy emits, in the scenarios above, is accepted
/// by the real kubectl: run against an unreachable server, it must fail to
/// connect, never on a flag or usage error.
#[test]
fn real_kubectl_accepts_every_emitted_command_line() {
    // A failed-and-rolled-back run; a first deploy over an expired lock,
    // a second one, status, verify, both rollbacks; the seed flow; dry
    // runs: together every verb the xtask emits.
    // A rollout that stays unready past one lock renewal (every 15 s),
    // run meanwhile.
    let slow = Fixture::failing("never-ready");
    let renewing = slow.spawn(&["deploy", "--poll-interval", "0.5", "--grace", "17"]);
    let ok_run = Fixture::failing("crashloop");
    ok_run.xtask(&[]);
    let expired = json!({"metadata": {"name": "xtask-deploy-lock", "resourceVersion": "7"}, "spec": {"holderIdentity": "bob@ci", "renewTime": "2020-01-01T00:00:00Z", "leaseDurationSeconds": 60}});
    let fresh = Fixture::new(json!({ "lease": expired }));
    fresh.xtask(&[]).assert_ok();
    let first = git(fresh.root(), &["rev-parse", "HEAD"]);
    std::fs::write(fresh.root().join("app.txt"), "second").unwrap();
    commit_all(fresh.root(), "second");
    fresh.xtask(&[]).assert_ok();
    fresh.run(&["status"]).assert_ok();
    fresh.run(&["verify"]).assert_ok();
    fresh.run(&["rollback"]).assert_ok();
    fresh.run(&["rollback", "--to", &first]).assert_ok();
    let seeded = Fixture::with_web_config(json!({"lb_after": 1}), SEEDED_WEB);
    seeded.xtask(&[]).assert_ok();
    let dry = Fixture::new(json!({"namespaces": ["fx"]}));
    dry.xtask(&["--dry-run"]).assert_ok();
    dry.run(&["rollback", "--dry-run", "--to", "HEAD"]);
    let slow_run = renewing.wait_with_output().unwrap();
    assert_eq!(
        slow_run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&slow_run.stderr)
    );
    let real = which("kubectl");
    let kubeconfig = TempDir::new("kubeconfig");
    let config_path = kubeconfig.path().join("config");
    std::fs::write(
        &config_path,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: nowhere\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: {CONTEXT}\n  context:\n    cluster: nowhere\n    user: nobody\ncurrent-context: {CONTEXT}\nusers:\n- name: nobody\n  user:\n    token: not-a-real-token\n"),
    )
    .unwrap();
    let lease = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"xtask-deploy-lock"},"spec":{"holderIdentity":"x"}}"#;
    let mut checked = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for fx in [&ok_run, &fresh, &seeded, &dry, &slow] {
        for argv in fx.calls() {
            // The verb: the first word after the global `--context C` and
            // `--namespace NS` pairs.
            let mut words = argv.iter().map(String::as_str);
            let verb = loop {
                match words.next() {
                    Some("--context" | "--namespace") => {
                        words.next();
                    }
                    other => break other.unwrap_or_default(),
                }
            };
            // Local-only verbs never reach a server.
            if verb == "config" || verb == "kustomize" {
                continue;
            }
            let flags: Vec<&str> = argv
                .iter()
                .filter(|a| a.starts_with("--"))
                .map(String::as_str)
                .collect();
            let kind = argv.get(argv.iter().position(|a| a == verb).unwrap() + 1);
            distinct.insert(format!(
                "{verb} {} {}",
                kind.map_or("", |k| k.as_str()),
                flags.join(" ")
            ));
            let mut child = std::process::Command::new(&real)
                .args(&argv)
                .arg("--request-timeout=5s")
                .env("KUBECONFIG", &config_path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(lease.as_bytes());
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("connection refused")
                    || stderr.contains("was refused")
                    || stderr.contains("Unable to connect to the server")
                    || stderr.contains("dial tcp 127.0.0.1:1"),
                "real kubectl rejected {argv:?} for another reason than the connection:\n{stderr}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "replayed {checked} lines");
    for shape in [
        "apply", "rollout", "create", "replace", "patch", "delete", "get", "diff", "logs",
        "version",
    ] {
        assert!(
            distinct.iter().any(|d| d.starts_with(shape)),
            "no `{shape}` line was replayed: {distinct:?}"
        );
    }
    for kind in [
        "get service",
        "get configmap",
        "get lease",
        "patch lease",
        "patch configmap",
    ] {
        assert!(
            distinct.iter().any(|d| d.starts_with(kind)),
            "no `{kind}` line was replayed: {distinct:?}"
        );
    }
}

fn which(program: &str) -> String {
    ok(
        Path::new("."),
        "sh",
        &["-c", &format!("command -v {program}")],
    )
}
