//! `cargo xtask deploy`, `status`, `verify` and `rollback` against the real
//! test cluster (`cargo xtask cluster up`: kube-apiserver, etcd, the
//! controllers and a kubelet on containerd), with real images built from
//! fixture commits and pushed to the real registry. Pods really run them,
//! and `imageID` comes from the runtime. Each test has its own namespace;
//! they take turns on the cluster.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::{
    path::Path,
    sync::MutexGuard,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};

/// The app every fixture image runs: ready once it has started, stops on
/// SIGTERM.
const HEALTHY_APP: &str = "trap 'exit 0' TERM\ntouch /tmp/ready\nwhile true; do sleep 1; done\n";
/// Exits at once, as a binary that cannot start would.
const CRASHING_APP: &str = "echo 'the new code crashed on start' >&2\nexit 3\n";
/// Runs, but its readiness probe never passes.
const NEVER_READY_APP: &str = "trap 'exit 0' TERM\nwhile true; do sleep 1; done\n";

/// A deploy whose never-ready rollout waits long enough to be signalled.
const LONG_ROLLOUT: [&str; 7] = [
    "deploy",
    "--poll-interval",
    "0.2",
    "--grace",
    "600",
    "--timeout",
    "600",
];

/// Short waits, so failures show in seconds.
const FAST: &[&str] = &["--poll-interval", "0.2", "--grace", "8", "--timeout", "120"];

/// A repository with two images (fxapi, then fxweb) and a kustomize base
/// for them, deployed into a namespace of its own.
struct Fixture {
    repo: TempDir,
    registry: String,
    /// Deleted when the test ends, freeing the node for the next one.
    namespace: Namespace,
    /// What it pushed to the test registry, deleted when it ends.
    _pushed: Pushed,
    _turn: MutexGuard<'static, ()>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(Options::default())
    }

    fn with(options: Options) -> Fixture {
        require_docker();
        require_cluster();
        let turn = cluster_turn();
        let repo = TempDir::new("deploy");
        let root = repo.path();
        let registry = options
            .registry
            .unwrap_or_else(|| format!("{}/{}", common::registry(), unique("deploy")));
        let namespace = unique("fx-");
        std::fs::write(
            root.join("Cargo.toml"),
            format!(
                "[workspace]\nmembers = []\n\n[workspace.metadata.xtask]\nregistry = \"{registry}\"\nnamespace = \"{namespace}\"\ncontext = \"{}\"\nrollout_order = [\"fxapi\", \"fxweb\"]\n{}\n\n[[workspace.metadata.xtask.images]]\nname = \"fxweb\"\ndockerfile = \"Dockerfile\"\n{}\n\n[[workspace.metadata.xtask.images]]\nname = \"fxapi\"\ndockerfile = \"Dockerfile\"\n{}\n",
                options.context.unwrap_or(CLUSTER_CONTEXT),
                options.config,
                options.web_config,
                options.api_config
            ),
        )
        .unwrap();
        // The revision goes into the last layer, so each commit's images
        // differ; the apps come before it. Each deployment runs its own
        // script (`fxapi.sh`, `fxweb.sh`), so a commit can break fxweb alone.
        std::fs::write(
            root.join("Dockerfile"),
            "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/debian:bookworm-slim\nCOPY *.sh /\nARG GIT_REVISION=unknown\nARG API_URL=none\nRUN echo \"$GIT_REVISION $API_URL\" > /revision\n",
        )
        .unwrap();
        std::fs::create_dir(root.join("k8s")).unwrap();
        let mut resources = vec!["workloads.yaml"];
        if options.api_service {
            resources.push("service.yaml");
            std::fs::write(
                root.join("k8s/service.yaml"),
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: fxapi\n  labels:\n    app.kubernetes.io/name: fxapi\nspec:\n  type: LoadBalancer\n  selector:\n    app.kubernetes.io/name: fxapi\n  ports:\n    - port: 80\n",
            )
            .unwrap();
        }
        std::fs::write(
            root.join("k8s/kustomization.yaml"),
            format!(
                "resources:\n{}",
                resources
                    .iter()
                    .map(|r| format!("  - {r}\n"))
                    .collect::<String>()
            ),
        )
        .unwrap();
        std::fs::write(root.join("k8s/workloads.yaml"), workloads("", "")).unwrap();
        std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
        std::fs::write(root.join("fxapi.sh"), HEALTHY_APP).unwrap();
        std::fs::write(root.join("fxweb.sh"), HEALTHY_APP).unwrap();
        std::fs::write(root.join("note.txt"), unique("v")).unwrap();
        init_repo(root);
        commit_all(root, "fixture");
        Fixture {
            repo,
            _pushed: Pushed::at(&registry),
            registry,
            namespace: Namespace(namespace),
            _turn: turn,
        }
    }

    fn root(&self) -> &Path {
        self.repo.path()
    }

    /// Commits a new revision whose fxweb runs `app` (fxapi stays healthy;
    /// both images change).
    fn commit(&self, app: &str) -> String {
        std::fs::write(self.root().join("fxweb.sh"), app).unwrap();
        std::fs::write(self.root().join("note.txt"), unique("v")).unwrap();
        commit_all(self.root(), "next")
    }

    /// Commits fxweb's manifest with `web_container` and `web_pod` added
    /// (see [`workloads`]) and a new note, so both images change too.
    fn commit_manifest(&self, web_container: &str, web_pod: &str) -> String {
        std::fs::write(
            self.root().join("k8s/workloads.yaml"),
            workloads(web_container, web_pod),
        )
        .unwrap();
        self.commit(HEALTHY_APP)
    }

    /// `deploy` with short waits, then `args`.
    fn deploy(&self, args: &[&str]) -> XtaskRun {
        let mut all = vec!["deploy"];
        all.extend_from_slice(FAST);
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Any xtask command against the cluster and this fixture's registry.
    fn run(&self, args: &[&str]) -> XtaskRun {
        xtask(self.root(), args, &[("XTASK_REGISTRY", &self.registry)])
    }

    /// Starts `args` in the background, for tests that signal it.
    fn spawn(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .current_dir(self.root())
            .env("XTASK_BASE_REGISTRY", base_registry())
            .env("XTASK_REGISTRY", &self.registry)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting the xtask binary")
    }

    /// `kubectl --namespace NS ARGS`.
    fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["--namespace", self.namespace.0.as_str()];
        all.extend_from_slice(args);
        kubectl(&all)
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut all = vec!["--namespace", self.namespace.0.as_str()];
        all.extend_from_slice(args);
        kubectl_json(&all)
    }

    /// The image a deployment's pod template names.
    fn image_of(&self, name: &str) -> String {
        self.get(&["get", "deployment", name])["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The ready, not terminating pods of a deployment, with the imageID
    /// the runtime reports for each.
    fn serving(&self, name: &str) -> Vec<(String, String)> {
        serving_pods(&self.namespace.0, &selector(name))
    }

    /// Every pod that serves `name` runs `digest`, as the runtime says.
    fn assert_serving(&self, name: &str, digest: &str) {
        let serving = self.serving(name);
        assert!(!serving.is_empty(), "no pod of {name} serves");
        for (pod, image_id) in &serving {
            assert!(
                image_id.ends_with(digest),
                "{pod} runs {image_id}, not {digest}"
            );
        }
    }

    /// The deploy history entries, oldest first.
    fn history(&self) -> Vec<Value> {
        self.history_in("xtask-deploy-history")
    }

    /// The entries of the history ConfigMap `name`, oldest first.
    fn history_in(&self, name: &str) -> Vec<Value> {
        let map = self.get(&["get", "configmap", name, "--ignore-not-found"]);
        let Some(data) = map["data"].as_object() else {
            return Vec::new();
        };
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort();
        keys.iter()
            .filter_map(|k| serde_json::from_str(data[*k].as_str().unwrap()).ok())
            .collect()
    }

    /// A merge patch of the history ConfigMap, as someone editing it would.
    fn patch_history(&self, patch: &Value) {
        self.kubectl(&[
            "patch",
            "configmap",
            "xtask-deploy-history",
            "--type",
            "merge",
            "--patch",
            &patch.to_string(),
        ]);
    }

    /// A merge patch of the deploy lock's lease, as its holder would write.
    fn patch_lease(&self, patch: &str) {
        self.kubectl(&[
            "patch",
            "lease",
            "xtask-deploy-lock",
            "--type",
            "merge",
            "--patch",
            patch,
        ]);
    }

    fn lease(&self) -> Value {
        self.get(&["get", "lease", "xtask-deploy-lock", "--ignore-not-found"])
    }

    /// The digests of `target/xtask/build.json` (the last build).
    fn digests(&self) -> Value {
        let file = build_file(self.root());
        let mut digests = json!({});
        for image in file["images"].as_array().unwrap() {
            digests[image["name"].as_str().unwrap()] = image["digest"].clone();
        }
        digests
    }

    fn build_file(&self) -> String {
        self.root()
            .join("target/xtask/build.json")
            .display()
            .to_string()
    }

    /// `kubectl get pods` of deployment `name`, printed with `--output`.
    fn pods_of(&self, name: &str, output: &str) -> String {
        self.kubectl(&[
            "get",
            "pods",
            "--selector",
            &selector(name),
            "--output",
            output,
        ])
    }

    /// Writes `k8s/<file>` and makes the kustomization the workloads and
    /// it.
    fn add_manifest(&self, file: &str, yaml: &str) {
        std::fs::write(self.root().join("k8s").join(file), yaml).unwrap();
        std::fs::write(
            self.root().join("k8s/kustomization.yaml"),
            format!("resources:\n  - workloads.yaml\n  - {file}\n"),
        )
        .unwrap();
    }

    /// The field managers (their `managedFields` entries) that own
    /// `spec.<field>` of deployment `name`.
    fn owners(&self, name: &str, field: &str) -> Vec<Value> {
        let deployment = self.get(&["get", "deployment", name, "--show-managed-fields"]);
        deployment["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !m["fieldsV1"]["f:spec"][format!("f:{field}")].is_null())
            .cloned()
            .collect()
    }

    /// The ReplicaSets of a deployment: (name, desired replicas).
    fn replica_sets(&self, name: &str) -> Vec<(String, i64)> {
        let sets = self.get(&["get", "replicasets", "--selector", &selector(name)]);
        sets["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rs| {
                (
                    rs["metadata"]["name"].as_str().unwrap().to_owned(),
                    rs["spec"]["replicas"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    }
}

/// The two Deployments, with `web_container` (YAML at the container's
/// indent) and `web_pod` (at the pod spec's) added to fxweb.
fn workloads(web_container: &str, web_pod: &str) -> String {
    let workload = |name: &str, container: &str, pod: &str| {
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/name: {name}\nspec:\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: {name}\n  template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: {name}\n    spec:\n      terminationGracePeriodSeconds: 5\n      automountServiceAccountToken: false\n      enableServiceLinks: false\n{pod}      containers:\n        - name: {name}\n          image: {name}\n          command: [sh, /{name}.sh]\n          readinessProbe:\n            exec:\n              command: [cat, /tmp/ready]\n            periodSeconds: 1\n{container}")
    };
    format!(
        "{}---\n{}",
        workload("fxapi", "", ""),
        workload("fxweb", web_container, web_pod)
    )
}

#[derive(Default)]
struct Options {
    /// Extra keys for fxweb's `[[images]]` entry.
    web_config: &'static str,
    /// Extra keys for fxapi's `[[images]]` entry.
    api_config: &'static str,
    /// A LoadBalancer Service in front of fxapi.
    api_service: bool,
    /// The context the configuration expects, if not the test cluster's.
    context: Option<&'static str>,
    /// The registry, if not one of its own in the test registry.
    registry: Option<String>,
    /// Extra keys for `[workspace.metadata.xtask]`.
    config: String,
}

fn selector(name: &str) -> String {
    format!("app.kubernetes.io/name={name}")
}

/// The names of the images `events` say were pushed, and reused.
fn pushed_and_reused(events: &[Value]) -> (Vec<String>, Vec<String>) {
    let names = |kind: &str| -> Vec<String> {
        let mut names: Vec<String> = events_of(events, kind)
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    (names("image_pushed"), names("image_reused"))
}

/// Images addressed by their inputs, on the real cluster: each image
/// declares its own inputs (fxapi.sh, fxweb.sh), and a deploy builds only
/// the images whose input key changed; a reused image's pods keep running
/// (same pod UIDs), and what says which revision runs stays exact. Then:
/// a commit that changes no image's inputs (as an xtask-only commit)
/// builds nothing and restarts nothing; `--rebuild` builds both fresh and
/// gets the same digests; a changed build argument rebuilds its image; a
/// base image moved under the same tag (in a base path this test owns)
/// rebuilds both; a revert is built again at the revert's revision.
#[test]
fn a_deploy_builds_only_the_images_whose_inputs_changed() {
    let fx = Fixture::with(Options {
        web_config: "inputs = [\"fxweb.sh\"]",
        api_config: "inputs = [\"fxapi.sh\"]",
        ..Options::default()
    });
    let root = fx.root();
    let base = format!("{}/base", fx.registry);
    let move_base_to = |from: &str| {
        let to = format!("{base}/debian:bookworm-slim");
        ok(
            root,
            "docker",
            &["buildx", "imagetools", "create", "--tag", &to, from],
        );
    };
    move_base_to(&format!("{}/debian:bookworm-slim", base_registry()));
    let run = |args: &[&str]| {
        xtask(
            root,
            args,
            &[
                ("XTASK_REGISTRY", fx.registry.as_str()),
                ("XTASK_BASE_REGISTRY", base.as_str()),
            ],
        )
    };
    let deploy = |args: &[&str]| {
        let mut all = vec!["deploy", "--json"];
        all.extend_from_slice(FAST);
        all.extend_from_slice(args);
        let deployed = run(&all);
        deployed.assert_ok();
        (parse_events(&deployed.stdout), deployed.stderr)
    };
    let uids = |name: &str| pod_uids(&fx.namespace.0, &selector(name));
    let both = vec!["fxapi".to_owned(), "fxweb".to_owned()];
    let (events, _) = deploy(&[]);
    assert_eq!(pushed_and_reused(&events), (both.clone(), vec![]));
    let first = git(root, &["rev-parse", "HEAD"]);
    let first_digests = fx.digests();
    let (api_pods, web_pods) = (uids("fxapi"), uids("fxweb"));

    // fxweb's inputs change: fxapi is reused, its pods untouched.
    std::fs::write(root.join("fxweb.sh"), format!("# two\n{HEALTHY_APP}")).unwrap();
    let second = commit_all(root, "fxweb only");
    let (events, _) = deploy(&[]);
    assert_eq!(
        pushed_and_reused(&events),
        (vec!["fxweb".to_owned()], vec!["fxapi".to_owned()])
    );
    let reused = &events_of(&events, "image_reused")[0];
    assert_eq!(reused["inputs_revision"], first.as_str());
    assert_eq!(reused["digest"], first_digests["fxapi"]);
    assert!(reused["key_parts"]["target"]["args"]["GIT_REVISION"] == first.as_str());
    assert_eq!(
        uids("fxapi"),
        api_pods,
        "a reused image's pods keep running"
    );
    assert_ne!(uids("fxweb"), web_pods);
    fx.assert_serving("fxapi", first_digests["fxapi"].as_str().unwrap());
    let web_digest = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    fx.assert_serving("fxweb", &web_digest);
    for (name, own) in [("fxapi", &first), ("fxweb", &second)] {
        let deployment = fx.get(&["get", "deployment", name]);
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["annotations"]["aiq.dev/revision"],
            own.as_str(),
            "{name}'s pods carry its own revision"
        );
        assert_eq!(
            deployment["metadata"]["annotations"]["aiq.dev/deployed-revision"],
            second.as_str(),
            "{name} says which deploy it was"
        );
    }
    let entry = fx.history().pop().unwrap();
    assert_eq!(entry["revision"], second.as_str());
    assert_eq!(entry["images"]["fxapi"]["revision"], first.as_str());
    assert_eq!(entry["images"]["fxapi"]["reused"], true);
    assert_eq!(entry["images"]["fxweb"]["revision"], second.as_str());
    let verify = run(&["verify"]);
    verify.assert_ok();
    assert!(
        verify.stdout.contains(&format!(
            "(built at {}, inputs unchanged since; deployed at {})",
            &first[..12],
            &second[..12]
        )),
        "{}",
        verify.stdout
    );
    run(&["verify", "--rebuild"]).assert_ok();

    // A commit that changes no image's inputs builds and restarts nothing.
    std::fs::write(root.join("note.txt"), unique("v")).unwrap();
    let third = commit_all(root, "neither image");
    let (web_pods, digests) = (uids("fxweb"), fx.digests());
    let (events, stderr) = deploy(&[]);
    assert_eq!(pushed_and_reused(&events), (vec![], both.clone()));
    assert!(!stderr.contains("docker buildx bake"), "{stderr}");
    assert_eq!(
        (uids("fxapi"), uids("fxweb")),
        (api_pods.clone(), web_pods.clone())
    );
    assert_eq!(fx.digests(), digests);
    let status = run(&["status"]);
    assert_eq!(
        status.stdout.matches("ok (HEAD)").count(),
        2,
        "{}",
        status.stdout
    );
    assert_eq!(
        fx.get(&["get", "deployment", "fxweb"])["metadata"]["annotations"]
            ["aiq.dev/deployed-revision"],
        third.as_str()
    );

    // `--rebuild` builds both fresh: the same digests, so nothing restarts.
    let (events, stderr) = deploy(&["--rebuild"]);
    assert_eq!(pushed_and_reused(&events), (both.clone(), vec![]));
    assert!(stderr.contains("--no-cache --pull"), "{stderr}");
    assert_eq!(
        fx.digests(),
        digests,
        "a fresh build gives the reused digests"
    );
    assert_eq!((uids("fxapi"), uids("fxweb")), (api_pods.clone(), web_pods));

    // A changed build argument (configuration, no input path) is in the key.
    let config = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        config.replace(
            "inputs = [\"fxweb.sh\"]",
            "inputs = [\"fxweb.sh\"]\nbuild_args = { API_URL = \"http://changed\" }",
        ),
    )
    .unwrap();
    commit_all(root, "fxweb's build argument");
    let (events, _) = deploy(&[]);
    assert_eq!(
        pushed_and_reused(&events),
        (vec!["fxweb".to_owned()], vec!["fxapi".to_owned()])
    );
    assert_eq!(uids("fxapi"), api_pods);

    // A base image moved under the same tag, at the same commit: both
    // images are built again on it.
    move_base_to(&format!("{}/node:20-bookworm-slim", base_registry()));
    let (events, _) = deploy(&[]);
    assert_eq!(pushed_and_reused(&events), (both.clone(), vec![]));
    assert_ne!(fx.digests()["fxapi"], first_digests["fxapi"]);

    // A revert to fxweb's first tree is built again, at the revert.
    git(root, &["revert", "--no-edit", &second]);
    let revert = git(root, &["rev-parse", "HEAD"]);
    let (events, _) = deploy(&[]);
    assert_eq!(
        pushed_and_reused(&events),
        (vec!["fxweb".to_owned()], vec!["fxapi".to_owned()])
    );
    assert_eq!(
        events_of(&events, "image_pushed")[0]["inputs_revision"],
        revert.as_str()
    );
    let baked = fx.kubectl(&["exec", "deployment/fxweb", "--", "cat", "/revision"]);
    assert!(baked.starts_with(&revert), "{baked}");
}

#[test]
fn healthy_deploys_run_exactly_the_pushed_digests_and_replace_the_old_revision() {
    let fx = Fixture::new();
    let run = fx.deploy(&[]);
    run.assert_ok();
    let head = git(fx.root(), &["rev-parse", "HEAD"]);
    let digests = fx.digests();
    for name in ["fxapi", "fxweb"] {
        let digest = digests[name].as_str().unwrap();
        assert_eq!(
            fx.image_of(name),
            format!("{}/{name}@{digest}", fx.registry),
            "pinned by digest"
        );
        fx.assert_serving(name, digest);
        assert!(run.stdout.contains(digest), "summary names the digest");
    }
    assert!(
        run.stderr.find("apply and roll out deployment/fxapi done")
            < run.stderr.find("apply and roll out deployment/fxweb done"),
        "fxapi rolls out first: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("seconds  step")
            && run.stderr.contains("  apply and roll out deployment/fxweb"),
        "the summary times each step: {}",
        run.stderr
    );
    let managers = fx.get(&["get", "deployment", "fxweb", "--show-managed-fields"]);
    assert!(
        managers["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "xtask" && m["operation"] == "Apply"),
        "server-side applied by the xtask field manager: {managers}"
    );
    assert_eq!(fx.lease(), Value::Null, "the lock is released");
    let history = fx.history();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["revision"], head);
    assert_eq!(history[0]["result"], "succeeded");
    assert_eq!(history[0]["digests"], digests);
    let rendered =
        std::fs::read_to_string(fx.root().join("target/xtask/deploy/rendered.yaml")).unwrap();
    assert_eq!(
        rendered
            .matches(&format!("aiq.dev/revision: {head}"))
            .count(),
        2,
        "{rendered}"
    );
    let status = fx.run(&["status"]);
    status.assert_ok();
    assert_eq!(
        status.stdout.matches("ok (HEAD)").count(),
        2,
        "{}",
        status.stdout
    );
    fx.run(&["verify"]).assert_ok();

    // A second commit: new digests run, the old ReplicaSet is at 0 and no
    // pod of the old revision serves.
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let second = fx.digests();
    for name in ["fxapi", "fxweb"] {
        let digest = second[name].as_str().unwrap();
        assert_ne!(second[name], digests[name]);
        fx.assert_serving(name, digest);
        let sets = fx.replica_sets(name);
        assert_eq!(sets.len(), 2, "{sets:?}");
        assert_eq!(
            sets.iter().filter(|(_, replicas)| *replicas == 0).count(),
            1,
            "the old ReplicaSet is scaled to 0: {sets:?}"
        );
    }
    fx.run(&["verify"]).assert_ok();

    // A build deployed from its file twice: the second deploy changes
    // nothing (no new ReplicaSet, same generation).
    fx.commit(HEALTHY_APP);
    fx.run(&["build", "--push"]).assert_ok();
    let file = fx.build_file();
    fx.deploy(&["--from", &file]).assert_ok();
    let sets = fx.replica_sets("fxweb");
    let generation = fx.get(&["get", "deployment", "fxweb"])["metadata"]["generation"].clone();
    let again = fx.deploy(&["--from", &file]);
    again.assert_ok();
    assert!(!again.stderr.contains("docker buildx bake"), "no rebuild");
    assert_eq!(fx.replica_sets("fxweb"), sets, "no new ReplicaSet");
    assert_eq!(
        fx.get(&["get", "deployment", "fxweb"])["metadata"]["generation"],
        generation
    );
    fx.assert_serving("fxweb", fx.digests()["fxweb"].as_str().unwrap());
}

/// The run failed on fxweb for `reason`, undid its changes, and the
/// previous digests serve again.
fn assert_failed_and_rolled_back(fx: &Fixture, run: &XtaskRun, reason: &str, previous: &Value) {
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("deployment/fxweb") && run.stderr.contains(reason),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    assert_restored_newest_first(run);
    for name in ["fxapi", "fxweb"] {
        let digest = previous[name].as_str().unwrap();
        assert!(
            fx.image_of(name).ends_with(digest),
            "{name} pins the previous digest again"
        );
        fx.assert_serving(name, digest);
    }
    assert_eq!(fx.lease(), Value::Null, "lock released after a failure");
    assert_eq!(fx.history().pop().unwrap()["result"], "failed, rolled back");
}

/// The rollback applied again what the previous deploy applied, fxweb's
/// objects before fxapi's.
fn assert_restored_newest_first(run: &XtaskRun) {
    let restored = |name: &str| {
        run.stderr
            .find(&format!(
                "deployment/{name}: applying again what the deploy of"
            ))
            .unwrap_or_else(|| panic!("{name} not restored: {}", run.stderr))
    };
    assert!(restored("fxweb") < restored("fxapi"), "{}", run.stderr);
}

/// An apply that fails half-way is rolled back too: fxweb's Deployment is
/// applied, then its PodDisruptionBudget is refused by the API server
/// (`minAvailable: half` is neither a number nor a percentage), so kubectl
/// exits 1 with the Deployment already changed. It counts as changed from
/// before its apply starts, so the rollback returns it to the first build.
#[test]
fn an_apply_that_fails_half_way_is_rolled_back() {
    let (fx, previous) = serving_first_commit();
    fx.add_manifest(
        "budget.yaml",
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: fxweb\n  labels:\n    app.kubernetes.io/name: fxweb\nspec:\n  minAvailable: half\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: fxweb\n",
    );
    fx.commit(HEALTHY_APP);
    let run = fx.deploy(&[]);
    assert_failed_and_rolled_back(&fx, &run, "minAvailable", &previous);
}

/// fxweb's objects for [`restores_every_object`]: a ClusterIP Service
/// and, with `later`, the changes of the deploy that is undone: the
/// Service's port and a field added to it, `revisionHistoryLimit` removed
/// from fxweb's Deployment, and a ConfigMap that did not exist.
fn commit_web_objects(fx: &Fixture, later: bool, app: &str) {
    std::fs::write(fx.root().join("k8s/workloads.yaml"), workloads("", "")).unwrap();
    if !later {
        set_web_spec(fx.root(), "revisionHistoryLimit: 4");
    }
    let labels = "  labels:\n    app.kubernetes.io/name: fxweb\n";
    let (port, added) = if later {
        ("81", "  publishNotReadyAddresses: true\n")
    } else {
        ("80", "")
    };
    let mut objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: fxweb\n{labels}spec:\n{added}  selector:\n    app.kubernetes.io/name: fxweb\n  ports:\n    - port: {port}\n"
    );
    if later {
        objects.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fxweb-settings\n{labels}data:\n  mode: new\n"
        ));
    }
    fx.add_manifest("web-objects.yaml", &objects);
    fx.commit(app);
}

/// The `spec` of every object a deploy touches, by `kind/name`.
fn specs(fx: &Fixture) -> Value {
    let mut specs = json!({});
    for object in ["deployment/fxapi", "deployment/fxweb", "service/fxweb"] {
        specs[object] = fx.get(&["get", object])["spec"].clone();
    }
    specs
}

/// A deploy changes a Service and both Deployments, removes a field and
/// creates a ConfigMap, then fails (`killed`: SIGKILL once fxweb's objects
/// are applied, then `cargo xtask rollback`; otherwise fxweb crashes and
/// the deploy rolls back by itself). Afterwards every object's `spec` is
/// what it was before, the ConfigMap is gone, and the removed field is the
/// xtask's again (a `rollout undo` would restore only pod templates, and
/// hand what it restores to kubectl's rollback manager).
fn restores_every_object(killed: bool) {
    let fx = Fixture::new();
    commit_web_objects(&fx, false, HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let first = fx.digests();
    let recorded = specs(&fx);
    assert_eq!(recorded["deployment/fxweb"]["revisionHistoryLimit"], 4);

    if killed {
        commit_web_objects(&fx, true, NEVER_READY_APP);
        let mut deploy = fx.spawn(&LONG_ROLLOUT);
        let watch = StderrWatch::new(&mut deploy);
        // kubectl's word that it has applied fxweb's Deployment.
        watch.wait_for("deployment.apps/fxweb serverside-applied", 180);
        signal(&deploy, "KILL");
        watch.exit(deploy, 30);
        // Made to look expired rather than waiting its 60 s.
        fx.patch_lease(
            r#"{"spec": {"renewTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 3}}"#,
        );
        let mut undo = vec!["rollback"];
        undo.extend_from_slice(FAST);
        let run = fx.run(&undo);
        run.assert_ok();
        assert_restored_newest_first(&run);
    } else {
        commit_web_objects(&fx, true, CRASHING_APP);
        let run = fx.deploy(&[]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert_crash_named(&run);
        assert_restored_newest_first(&run);
    }

    assert_eq!(specs(&fx), recorded, "every spec as it was");
    assert_eq!(
        fx.kubectl(&["get", "configmap", "fxweb-settings", "--ignore-not-found"]),
        "",
        "what the failed deploy created is deleted"
    );
    let owners = fx.owners("fxweb", "revisionHistoryLimit");
    assert!(
        owners.len() == 1 && owners[0]["manager"] == "xtask" && owners[0]["operation"] == "Apply",
        "revisionHistoryLimit is the xtask's apply's again: {owners:?}"
    );
    for name in ["fxapi", "fxweb"] {
        fx.assert_serving(name, first[name].as_str().unwrap());
    }
}

#[test]
fn a_failed_deploy_returns_every_object_it_touched_to_its_spec_before() {
    restores_every_object(false);
}

#[test]
fn rollback_after_a_killed_deploy_returns_every_object_to_its_spec_before() {
    restores_every_object(true);
}

/// The failure names fxweb's crash: its exit code as the first poll after
/// it saw it (the container's exit, or its restart), or the kubelet's
/// CrashLoopBackOff.
fn assert_crash_named(run: &XtaskRun) {
    let named = [
        "CrashLoopBackOff",
        "container fxweb exited (Error, exit code 3)",
        "container fxweb restarted 1 time(s) (last exit: Error, code 3)",
    ];
    assert!(
        run.stderr.contains("deployment/fxweb: pod fxweb-")
            && named.iter().any(|n| run.stderr.contains(n)),
        "{}",
        run.stderr
    );
}

/// A fixture already serving its first commit; returns its digests.
fn serving_first_commit() -> (Fixture, Value) {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let digests = fx.digests();
    (fx, digests)
}

#[test]
fn a_crash_at_start_fails_fast_names_the_pod_and_rolls_back() {
    let (fx, previous) = serving_first_commit();
    fx.commit(CRASHING_APP);
    let started = Instant::now();
    let run = fx.deploy(&[]);
    assert_failed_and_rolled_back(&fx, &run, "", &previous);
    assert_crash_named(&run);
    assert!(
        run.stderr.contains("the new code crashed on start"),
        "the pod's last log lines: {}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(110),
        "well before --timeout"
    );
}

#[test]
fn a_digest_that_cannot_be_pulled_fails_fast_and_rolls_back() {
    // fxweb's top layer holds a build arg of its own, so it is not also
    // fxapi's (which the node pulls first).
    let fx = Fixture::with(Options {
        web_config: "build_args = { API_URL = \"fxweb-only\" }",
        ..Options::default()
    });
    fx.deploy(&[]).assert_ok();
    let previous = fx.digests();
    fx.commit(HEALTHY_APP);
    fx.run(&["build", "--push"]).assert_ok();
    // The manifest and the image config stay (the deploy's registry and
    // revision-label checks pass) but the layer only this commit has is
    // gone, so the kubelet's pull fails.
    let digest = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    let repository = format!("{}/fxweb", fx.registry.split_once('/').unwrap().1);
    delete_top_layer(&repository, &digest);
    let run = fx.deploy(&["--from", &fx.build_file()]);
    assert!(
        run.stderr.contains("ErrImagePull") || run.stderr.contains("ImagePullBackOff"),
        "{}",
        run.stderr
    );
    assert_failed_and_rolled_back(&fx, &run, "Err", &previous);
}

/// Deletes the top layer of `repository@digest` (an image, or the first
/// image of an index) from the test registry.
fn delete_top_layer(repository: &str, digest: &str) {
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    let fetch = |reference: &str| -> Value {
        let (status, body) = http_request(
            &registry(),
            "GET",
            &format!("/v2/{repository}/manifests/{reference}"),
            accept,
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let mut manifest = fetch(digest);
    if let Some(images) = manifest["manifests"].as_array() {
        let image = images
            .iter()
            .find(|m| m["platform"]["os"] != "unknown")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        manifest = fetch(&image);
    }
    let layer = manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap();
    let (status, body) = http_request(
        &registry(),
        "DELETE",
        &format!("/v2/{repository}/blobs/{layer}"),
        "*/*",
    )
    .unwrap();
    assert_eq!(status, 202, "deleting {layer}: {body}");
}

#[test]
fn readiness_that_never_passes_fails_after_the_grace_window() {
    let (fx, previous) = serving_first_commit();
    fx.commit(NEVER_READY_APP);
    let run = fx.deploy(&[]);
    assert_failed_and_rolled_back(&fx, &run, "readiness still failing after 8s", &previous);
}

#[test]
fn pods_a_quota_refuses_fail_the_deploy_at_once_with_the_api_message() {
    let (fx, previous) = serving_first_commit();
    // Room for the two running pods and no more: the rollout's new pod is
    // refused, so no pod of it ever exists.
    fx.kubectl(&["create", "quota", "two-pods", "--hard=pods=2"]);
    fx.commit(HEALTHY_APP);
    let started = Instant::now();
    // The default --timeout (600 s): the failure must name the condition.
    let run = fx.run(&["deploy", "--poll-interval", "0.5"]);
    run.assert_fails(1, "deployment/fxapi: ReplicaFailure FailedCreate");
    assert!(
        run.stderr.contains("exceeded quota: two-pods"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("--timeout"), "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "failed at once, not at the timeout"
    );
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    fx.assert_serving("fxapi", previous["fxapi"].as_str().unwrap());
}

#[test]
fn a_rollout_past_its_progress_deadline_fails_with_the_condition() {
    let (fx, previous) = serving_first_commit();
    set_web_spec(fx.root(), "progressDeadlineSeconds: 3");
    fx.commit(NEVER_READY_APP);
    // A grace longer than the deadline: the controller's condition decides.
    let run = fx.run(&["deploy", "--poll-interval", "0.2", "--grace", "600"]);
    assert_failed_and_rolled_back(&fx, &run, "Progressing ProgressDeadlineExceeded", &previous);
}

#[test]
fn images_that_can_never_start_fail_at_once() {
    let (fx, previous) = serving_first_commit();
    for (image, policy, reason) in [
        ("Not:A:Valid:Name", "IfNotPresent", "InvalidImageName"),
        (
            "127.0.0.1:5000/never/pulled:1",
            "Never",
            "ErrImageNeverPull",
        ),
    ] {
        fx.commit_manifest(
            "",
            &format!("      initContainers:\n        - name: setup\n          image: {image}\n          imagePullPolicy: {policy}\n"),
        );
        let run = fx.run(&["deploy", "--poll-interval", "0.2", "--grace", "600"]);
        assert_failed_and_rolled_back(
            &fx,
            &run,
            &format!("init container setup: {reason}"),
            &previous,
        );
    }
}

#[test]
fn a_pod_no_node_can_take_fails_after_the_unschedulable_budget() {
    let (fx, previous) = serving_first_commit();
    fx.commit_manifest(
        "          resources:\n            requests:\n              cpu: \"64\"\n",
        "",
    );
    let run = fx.deploy(&["--unschedulable-timeout", "3"]);
    assert!(
        run.stderr.contains("Insufficient cpu"),
        "the scheduler's message: {}",
        run.stderr
    );
    assert_failed_and_rolled_back(&fx, &run, "unschedulable for 3s", &previous);
}

#[test]
fn a_failing_init_container_or_liveness_probe_fails_at_once() {
    let (fx, previous) = serving_first_commit();
    fx.commit_manifest(
        "",
        "      initContainers:\n        - name: migrate\n          image: fxweb\n          command: [sh, -c, 'echo migration failed >&2; exit 4']\n",
    );
    let run = fx.run(&["deploy", "--poll-interval", "0.2", "--grace", "600"]);
    assert_failed_and_rolled_back(
        &fx,
        &run,
        "init container migrate failed (Error, exit code 4)",
        &previous,
    );
    fx.commit_manifest(
        "          livenessProbe:\n            exec:\n              command: [\"false\"]\n            periodSeconds: 1\n            failureThreshold: 1\n",
        "",
    );
    std::fs::write(fx.root().join("fxweb.sh"), NEVER_READY_APP).unwrap();
    commit_all(
        fx.root(),
        "fxweb: never ready, and its liveness probe fails",
    );
    let run = fx.run(&["deploy", "--poll-interval", "0.2", "--grace", "600"]);
    assert!(
        run.stderr.contains("Liveness probe failed"),
        "the pod's events: {}",
        run.stderr
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        [
            "container fxweb exited",
            "container fxweb restarted",
            "CrashLoopBackOff"
        ]
        .iter()
        .any(|n| run.stderr.contains(n)),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    fx.assert_serving("fxweb", previous["fxweb"].as_str().unwrap());
}

/// A deploy that fixes a crash-looping Deployment by its manifest alone
/// (the same build, an environment variable added) succeeds: the rollout's
/// pods are its new ReplicaSet's (by `pod-template-hash`), so the old
/// pods, which run the same digest and still crash, are not judged.
#[test]
fn old_pods_of_the_same_digest_are_not_the_rollouts() {
    let fx = Fixture::new();
    let broken = fx.commit(&format!(
        "[ \"$MODE\" = ok ] || {{ echo 'MODE is not ok' >&2; exit 3; }}\n{HEALTHY_APP}"
    ));
    let run = fx.deploy(&["--no-rollback"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let build = fx.digests();
    wait_for("fxweb's pod crash-loops", 90, || {
        fx.pods_of(
            "fxweb",
            "jsonpath={.items[*].status.containerStatuses[*].state.waiting.reason}",
        )
        .contains("CrashLoopBackOff")
    });
    // The fix is in the manifest; the images are the broken commit's.
    fx.commit_manifest(
        "          env:\n            - name: MODE\n              value: ok\n",
        "",
    );
    fx.deploy(&["--from", &fx.build_file(), "--rev", &broken])
        .assert_ok();
    fx.assert_serving("fxweb", build["fxweb"].as_str().unwrap());
}

#[test]
fn no_rollback_leaves_the_failure_for_inspection() {
    let (fx, previous) = serving_first_commit();
    fx.commit(CRASHING_APP);
    let run = fx.deploy(&["--no-rollback"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_crash_named(&run);
    assert!(!run.stderr.contains("rollout undo"), "{}", run.stderr);
    assert!(!fx
        .image_of("fxweb")
        .ends_with(previous["fxweb"].as_str().unwrap()));
    assert_eq!(
        fx.history().pop().unwrap()["result"],
        "failed, left for inspection (--no-rollback)"
    );
}

#[test]
fn a_rollback_the_cluster_refuses_exits_3_and_says_so() {
    let (fx, previous) = serving_first_commit();
    // An admission policy that forbids going back to the first fxweb build
    // (as a policy banning a revision would): the deploy's apply passes,
    // its rollback's apply of the first build's manifests is denied by the
    // API server.
    let old = previous["fxweb"].as_str().unwrap();
    let name = format!("{}-no-return", fx.namespace.0);
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["apps"], "apiVersions": ["v1"],
                "operations": ["UPDATE"], "resources": ["deployments"],
            }]},
            "validations": [{
                "expression": format!("!object.spec.template.spec.containers.exists(c, c.image.endsWith('{old}'))"),
                "message": "the server is on fire",
            }],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": fx.namespace.0}}},
        },
    });
    let manifests = TempDir::new("policy");
    let file = manifests.path().join("policy.json");
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": [policy, binding]}).to_string(),
    )
    .unwrap();
    kubectl(&["apply", "--filename", &file.display().to_string()]);
    // The policy takes effect once the apiserver has loaded it: until a
    // server-side dry run of an update of fxweb, which pins `old`, is denied.
    wait_for("the admission policy is enforced", 60, || {
        run(
            Path::new("."),
            "kubectl",
            &[
                "--namespace",
                &fx.namespace.0,
                "annotate",
                "deployment/fxweb",
                "--overwrite",
                "--dry-run=server",
                "aiq.dev/policy-probe=1",
            ],
        )
        .stderr
        .windows(b"the server is on fire".len())
        .any(|w| w == b"the server is on fire")
    });
    fx.commit(CRASHING_APP);
    let run = fx.deploy(&[]);
    kubectl(&["delete", "--filename", &file.display().to_string()]);
    assert_crash_named(&run);
    run.assert_fails(3, "ROLLBACK FAILED");
    assert!(
        run.stderr.contains("the server is on fire")
            && run.stderr.contains(&format!(
                "kubectl --namespace {} get deployments",
                fx.namespace.0
            )),
        "{}",
        run.stderr
    );
    assert_eq!(
        fx.history().pop().unwrap()["result"],
        "failed, rollback failed"
    );
}

/// A ValidatingWebhookConfiguration, deleted when dropped (it is
/// cluster-scoped: the namespace's deletion would not take it).
struct Webhook(String);

impl Drop for Webhook {
    fn drop(&mut self) {
        delete_object("validatingwebhookconfiguration", &self.0);
    }
}

/// Pods that cannot be created because an admission webhook timed out
/// (`ReplicaFailure`) get a short budget to clear, since the webhook may
/// answer again (a refusal still fails at once: see the quota and policy
/// tests). The webhook is a listener on loopback that accepts connections
/// and never answers (a fixture: an overloaded webhook cannot be had on
/// demand), for pods of the test's namespace only; it is removed once the
/// deploy says it is waiting for it, and the deploy then succeeds.
#[test]
fn a_webhook_that_timed_out_gets_a_short_budget_to_answer() {
    let fx = Fixture::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Holds every connection open, unanswered, until stopped (the test's
    // own last connection wakes it).
    let holder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                held.push(conn);
            }
        })
    };
    let name = format!("{}-slow", fx.namespace.0);
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "slow.xtask.test",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": fx.namespace.0}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 1,
        }],
    });
    let manifests = TempDir::new("webhook");
    let file = manifests.path().join("webhook.json");
    std::fs::write(&file, config.to_string()).unwrap();
    kubectl(&["apply", "--filename", &file.display().to_string()]);
    let webhook = Webhook(name);
    let mut args = vec!["deploy"];
    args.extend_from_slice(FAST);
    let mut deploy = fx.spawn(&args);
    let watch = StderrWatch::new(&mut deploy);
    // The deploy has seen pods fail on the webhook and rides it out.
    watch.wait_for("waiting up to 30s for the webhook to answer", 120);
    drop(webhook);
    let (code, stderr) = watch.exit(deploy, 300);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    holder.join().unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let digests = fx.digests();
    for name in ["fxapi", "fxweb"] {
        fx.assert_serving(name, digests[name].as_str().unwrap());
    }
}

#[test]
fn a_pod_outside_the_rollout_serving_another_digest_fails_verification() {
    let (fx, previous) = serving_first_commit();
    // Someone's debugging pod that carries the app's label and runs the
    // first build: it serves, but not what the deploy pushed.
    let old = format!(
        "{}/fxweb@{}",
        fx.registry,
        previous["fxweb"].as_str().unwrap()
    );
    let overrides = json!({"spec": {"containers": [{
        "name": "stray",
        "image": old,
        "command": ["sh", "/fxweb.sh"],
        "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1},
    }]}});
    fx.kubectl(&[
        "run",
        "stray",
        "--image",
        &old,
        "--labels",
        &selector("fxweb"),
        "--overrides",
        &overrides.to_string(),
    ]);
    fx.kubectl(&[
        "wait",
        "pod/stray",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    fx.commit(HEALTHY_APP);
    let run = fx.deploy(&[]);
    assert_failed_and_rolled_back(
        &fx,
        &run,
        &format!("pod stray is ready but runs {old}"),
        &previous,
    );
}

#[test]
fn a_pod_stuck_terminating_is_named_by_status_and_the_deploy_summary() {
    let (fx, _) = serving_first_commit();
    // A finalizer keeps the first revision's pod after it is deleted, as a
    // stuck controller or a lost node would.
    let (old_pod, _) = fx.serving("fxweb").remove(0);
    fx.kubectl(&[
        "patch",
        "pod",
        &old_pod,
        "--type",
        "merge",
        "--patch",
        r#"{"metadata": {"finalizers": ["aiq.dev/hold"]}}"#,
    ]);
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    // Once it is past its deletion time plus its 5 s of grace, status
    // names it.
    let stuck = format!("pod {old_pod} is still terminating past its grace period");
    let mut status = fx.run(&["status"]);
    wait_for("status names the pod stuck terminating", 60, || {
        status = fx.run(&["status"]);
        status.code == 0 && status.stdout.contains(&stuck)
    });
    status.assert_ok();
    let again = fx.deploy(&["--from", &fx.build_file()]);
    again.assert_ok();
    assert!(
        again.stderr.contains(&format!(
            "pod {old_pod} of deployment/fxweb is still terminating past its grace period"
        )),
        "{}",
        again.stderr
    );
    fx.kubectl(&[
        "patch",
        "pod",
        &old_pod,
        "--type",
        "merge",
        "--patch",
        r#"{"metadata": {"finalizers": null}}"#,
    ]);
}

#[test]
fn status_and_verify_compare_the_cluster_with_head() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let verified = fx.run(&["verify"]);
    verified.assert_ok();
    assert!(
        verified.stdout.contains("ok    fxapi") && verified.stdout.contains("ok    fxweb"),
        "{}",
        verified.stdout
    );
    // An entry someone broke by hand is skipped, not fatal.
    fx.patch_history(&json!({"data": {"0-hand-edited": "{not json"}}));
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
    fx.commit(HEALTHY_APP);
    fx.run(&["build", "--push"]).assert_ok();
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
        drift
            .stdout
            .contains("FAIL  deployment/fxweb runs revision")
            && drift.stdout.contains(&format!(
                "not HEAD ({head}, where fxweb's inputs last changed at {head}), whose build is {head_digest}",
                head = &git(fx.root(), &["rev-parse", "HEAD"])[..12]
            )),
        "names the revision that runs, and HEAD's digest from the registry: {}",
        drift.stdout
    );

    // A dirty build running fails verify with its own message.
    let committed = std::fs::read_to_string(fx.root().join("note.txt")).unwrap();
    std::fs::write(fx.root().join("note.txt"), "uncommitted").unwrap();
    fx.deploy(&["--allow-dirty"]).assert_ok();
    std::fs::write(fx.root().join("note.txt"), committed).unwrap();
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
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let first = git(fx.root(), &["rev-parse", "HEAD"]);
    let first_digests = fx.digests();
    let second = fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let second_digests = fx.digests();

    // Without --to: undo what the last deploy changed, newest first.
    let mut undo = vec!["rollback"];
    undo.extend_from_slice(FAST);
    let run = fx.run(&undo);
    run.assert_ok();
    assert_restored_newest_first(&run);
    for name in ["fxapi", "fxweb"] {
        fx.assert_serving(name, first_digests[name].as_str().unwrap());
    }
    let last = fx.history().pop().unwrap();
    assert_eq!(last["kind"], "rollback");
    assert_eq!(last["result"], "succeeded");
    assert_eq!(last["revision"], first, "the entry names what runs now");
    assert_eq!(fx.run(&["verify"]).code, 1, "HEAD is not running any more");

    // A second undo has nothing of a deploy to undo: refused before the
    // lock, so nothing at all is written.
    let entries = fx.history().len();
    let again = fx.run(&undo);
    again.assert_fails(2, "pass --to");
    assert_eq!(fx.history().len(), entries, "no entry written");

    // --to: the recorded digests, applied and verified, nothing built.
    let mut to = undo.clone();
    to.extend_from_slice(&["--to", &second[..10]]);
    let run = fx.run(&to);
    run.assert_ok();
    assert!(!run.stderr.contains("docker buildx bake"), "{}", run.stderr);
    fx.assert_serving("fxweb", second_digests["fxweb"].as_str().unwrap());
    fx.run(&["verify"]).assert_ok();
    assert_eq!(fx.history().pop().unwrap()["kind"], "rollback");

    // A revision that was never built is refused before anything changes.
    let unbuilt = fx.commit(HEALTHY_APP);
    let entries = fx.history().len();
    let mut never = undo.clone();
    never.extend_from_slice(&["--to", &unbuilt]);
    fx.run(&never).assert_fails(2, "not in the registry");
    assert_eq!(fx.history().len(), entries);

    // A revision that is really an option never reaches git as one.
    let written = fx.root().join("target/written-by-git");
    let mut option = undo.clone();
    let to = format!("--to=--output={}", written.display());
    option.push(&to);
    fx.run(&option).assert_fails(2, "is not a git revision");
    assert!(!written.exists(), "git wrote a file");
}

#[test]
fn a_first_deploy_that_fails_deletes_what_it_created_and_exits_1() {
    let fx = Fixture::new();
    fx.commit(CRASHING_APP);
    let run = fx.deploy(&[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_crash_named(&run);
    assert!(!run.stderr.contains("ROLLBACK FAILED"), "{}", run.stderr);
    for name in ["fxweb", "fxapi"] {
        assert!(
            run.stderr.contains(&format!(
                "deployment.apps/{name} did not exist before this deploy: deleted"
            )),
            "{}",
            run.stderr
        );
    }
    assert_eq!(fx.kubectl(&["get", "deployments", "--output", "name"]), "");
    assert_eq!(fx.history().pop().unwrap()["result"], "failed, rolled back");
}

/// A history an older xtask wrote keeps no manifests: the rollback then
/// returns each pod template to its recorded revision, which after a
/// `rollout restart` is not the newest but one.
#[test]
fn without_kept_manifests_rollback_returns_to_the_recorded_revision_even_after_a_rollout_restart() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let first = fx.digests();
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    // A restart after the deploy: a newer revision with the same image,
    // which a plain `rollout undo` would undo instead of the deploy.
    fx.kubectl(&["rollout", "restart", "deployment/fxweb"]);
    fx.kubectl(&["rollout", "status", "deployment/fxweb", "--timeout=60s"]);
    fx.patch_history(&json!({"binaryData": null}));
    let mut undo = vec!["rollback"];
    undo.extend_from_slice(FAST);
    let run = fx.run(&undo);
    run.assert_ok();
    assert!(
        run.stderr.contains("no manifests were kept"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("rollout undo deployment/fxweb --to-revision=1"),
        "{}",
        run.stderr
    );
    fx.assert_serving("fxweb", first["fxweb"].as_str().unwrap());
    fx.assert_serving("fxapi", first["fxapi"].as_str().unwrap());
}

#[test]
fn a_rollout_undo_by_hand_shows_as_drift_and_the_next_deploy_takes_the_fields_back() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let first = fx.digests();
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let second = fx.digests();
    fx.kubectl(&["rollout", "undo", "deployment/fxweb"]);
    fx.kubectl(&["rollout", "status", "deployment/fxweb", "--timeout=60s"]);
    fx.assert_serving("fxweb", first["fxweb"].as_str().unwrap());
    let status = fx.run(&["status"]);
    assert!(
        status.stdout.contains("drift (not HEAD)") && status.stdout.contains("ok (HEAD)"),
        "fxweb drifted, fxapi did not: {}",
        status.stdout
    );
    assert_eq!(fx.run(&["verify"]).code, 1);
    // The same build again: server-side apply takes the image field back
    // from kubectl's rollback, on purpose (--force-conflicts).
    fx.deploy(&["--from", &fx.build_file()]).assert_ok();
    fx.assert_serving("fxweb", second["fxweb"].as_str().unwrap());
    fx.run(&["verify"]).assert_ok();
}

fn signal(child: &std::process::Child, name: &str) {
    signal_pid(child.id(), name);
}

fn signal_pid(pid: u32, name: &str) {
    ok(
        Path::new("."),
        "kill",
        &[&format!("-{name}"), &pid.to_string()],
    );
}

#[test]
fn deploys_take_turns_and_an_interrupted_or_killed_one_says_where_it_stopped() {
    let (fx, _) = serving_first_commit();
    let (first, watch) = deploy_until_applying_fxweb(&fx, NEVER_READY_APP, &LONG_ROLLOUT);
    // The holder renews its lease every 15 s.
    wait_for("the holder renews its lease", 30, || {
        let spec = fx.lease()["spec"].clone();
        spec["renewTime"] != spec["acquireTime"]
    });

    // A second deploy meanwhile is refused, naming the holder.
    let second = fx.deploy(&[]);
    second.assert_fails(2, "another deploy holds the lock");
    let holder = fx.lease()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(holder.contains("(pid "), "{holder}");
    assert!(second.stderr.contains(&holder), "{}", second.stderr);
    assert!(
        !second.stderr.contains("docker buildx bake"),
        "nothing built"
    );

    // Ctrl-C: history says where it stopped, the lease is released.
    signal(&first, "INT");
    let (code, stderr) = watch.exit(first, 60);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        !stderr.contains("renewing the deploy lock failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("interrupted during apply deployment/fxweb"),
        "{stderr}"
    );
    assert_eq!(fx.lease(), Value::Null, "the lock was released");
    let entry = fx.history().pop().unwrap();
    assert_eq!(entry["result"], "interrupted");
    assert_eq!(entry["step"], "apply deployment/fxweb");
    assert!(!stderr.contains("rollout undo"), "nothing undone");
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

    // SIGKILL: no handler runs. The entry stays "in progress" and the lease
    // stays until it expires (made to look expired here rather than waiting
    // its 60 s); then status calls the run killed and the next deploy takes
    // the lock over.
    let (killed, watch) = deploy_until_applying_fxweb(&fx, NEVER_READY_APP, &LONG_ROLLOUT);
    signal(&killed, "KILL");
    watch.exit(killed, 30);
    assert_ne!(fx.lease(), Value::Null, "a killed deploy leaves its lock");
    assert!(fx.run(&["status"]).stdout.contains("deploy lock: held by"));
    fx.patch_lease(
        r#"{"spec": {"renewTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 3}}"#,
    );
    let status = fx.run(&["status"]);
    assert!(
        status
            .stdout
            .contains("killed without a result (at: apply deployment/fxweb)"),
        "{}",
        status.stdout
    );
    fx.commit(HEALTHY_APP);
    let next = fx.deploy(&[]);
    next.assert_ok();
    assert!(
        next.stderr.contains("looks expired; watching it for 3s")
            && next.stderr.contains("expired; taking it over")
            && next.stderr.contains("killed without a result"),
        "{}",
        next.stderr
    );
}

#[test]
fn a_lease_that_only_looks_expired_is_not_taken_while_its_holder_renews_it() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    // Another machine's deploy whose clock runs years behind: its renewTime
    // looks long past here, but it keeps renewing.
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "xtask-deploy-lock"},
        "spec": {
            "holderIdentity": "carol@skewed (pid 7)",
            "acquireTime": "2020-01-01T00:00:00.000000Z",
            "renewTime": "2020-01-01T00:00:00.000000Z",
            "leaseDurationSeconds": 4,
        },
    });
    let dir = TempDir::new("lease");
    let file = dir.path().join("lease.json");
    std::fs::write(&file, lease.to_string()).unwrap();
    fx.kubectl(&["create", "--filename", &file.display().to_string()]);
    let mut args = vec!["deploy"];
    args.extend_from_slice(FAST);
    let mut deploy = fx.spawn(&args);
    let watch = StderrWatch::new(&mut deploy);
    // Once the deploy watches the lease, its holder renews it (with its
    // clock, still years behind).
    watch.wait_for("looks expired; watching it for", 60);
    fx.patch_lease(r#"{"spec": {"renewTime": "2020-01-01T00:00:01.000000Z"}}"#);
    let (code, stderr) = watch.exit(deploy, 120);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("it was renewed while this deploy watched it"),
        "{stderr}"
    );
    assert!(stderr.contains("carol@skewed (pid 7)"), "{stderr}");
    assert!(!stderr.contains("docker buildx bake"), "nothing built");
    assert_eq!(fx.lease()["spec"]["holderIdentity"], "carol@skewed (pid 7)");
}

#[test]
fn a_deploy_that_loses_its_lock_stops_and_leaves_the_new_holder_alone() {
    let (fx, _) = serving_first_commit();
    let (child, watch) = deploy_until_applying_fxweb(&fx, NEVER_READY_APP, &LONG_ROLLOUT);
    fx.patch_lease(r#"{"spec": {"holderIdentity": "mallory@elsewhere (pid 1)"}}"#);
    let (code, stderr) = watch.exit(child, 120);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("lost the deploy lock: mallory@elsewhere (pid 1) holds it now")
            && stderr.contains("stopped without rolling back"),
        "{stderr}"
    );
    assert!(!stderr.contains("rollout undo"));
    assert_eq!(
        fx.lease()["spec"]["holderIdentity"],
        "mallory@elsewhere (pid 1)",
        "the new holder's lock is not deleted"
    );
    assert_eq!(
        fx.history().pop().unwrap()["result"],
        "failed: lost the deploy lock"
    );
}

/// Resumes a stopped process when dropped, whatever the test's outcome.
struct Stopped(String);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = run(Path::new("."), "kill", &["-CONT", &self.0]);
    }
}

/// Ready only 15 s after it starts: an outage can come while the deploy
/// waits for it.
const SLOW_STARTER: &str =
    "trap 'exit 0' TERM\nsleep 15\ntouch /tmp/ready\nwhile true; do sleep 1; done\n";
const SLOW_STARTER_DEPLOY: [&str; 5] = ["deploy", "--poll-interval", "0.2", "--grace", "60"];

/// Commits `app` for fxweb and starts `deploy` (`args`) in the background;
/// returns it, its stderr watched, once it says it applies fxweb (its
/// history entry says so before).
fn deploy_until_applying_fxweb(
    fx: &Fixture,
    app: &str,
    args: &[&str],
) -> (std::process::Child, StderrWatch) {
    fx.commit(app);
    let mut child = fx.spawn(args);
    let watch = StderrWatch::new(&mut child);
    watch.wait_for("apply and roll out deployment/fxweb", 180);
    (child, watch)
}

#[test]
fn a_passing_api_outage_does_not_end_the_deploy() {
    let (fx, _) = serving_first_commit();
    let (child, watch) = deploy_until_applying_fxweb(&fx, SLOW_STARTER, &SLOW_STARTER_DEPLOY);
    // The outage comes while the deploy waits on fxweb's new pod (ready
    // only after 15 s).
    wait_for("fxweb's new pod exists", 60, || {
        fx.pods_of("fxweb", "name").lines().count() > 1
    });
    // The apiserver stops answering for longer than one read may take.
    let stopped = Stopped(apiserver_pid());
    ok(Path::new("."), "kill", &["-STOP", &stopped.0]);
    // Stopped until a read of the deploy has run out its bound and is
    // retried: an outage longer than one read, which it must ride out.
    watch.wait_for("reading the cluster failed (try 1 of 3), retrying", 60);
    drop(stopped);
    let (code, stderr) = watch.exit(child, 300);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("reading the cluster failed (try 1 of 3), retrying"),
        "{stderr}"
    );
    fx.assert_serving("fxweb", fx.digests()["fxweb"].as_str().unwrap());
}

/// The pid of the test cluster's API server.
fn apiserver_pid() -> String {
    let state = Path::new(&std::env::var("KUBECONFIG").unwrap())
        .parent()
        .unwrap()
        .to_owned();
    std::fs::read_to_string(state.join("run/kube-apiserver.pid"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits until the node is Ready with no taint again (the node controller
/// marks it unreachable once the API server is back and its heartbeats
/// are old), so the next test finds the cluster as it was.
fn wait_for_node_ready() {
    wait_for("the node is Ready and untainted again", 180, || {
        let nodes = kubectl_json(&["get", "nodes"]);
        nodes["items"].as_array().unwrap().iter().all(|node| {
            let ready = node["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            ready && node["spec"]["taints"].is_null()
        })
    });
}

/// The API server frozen (SIGSTOP) mid-rollout for longer than the deploy
/// lock's lease, then resumed. The deploy cannot finish, roll back or keep
/// its lock meanwhile: it must end with a clear error, never exit 0, within
/// the bounds the README states (reads give up after about 20 s, a write
/// after 60 s), and leave a true record: `status` does not call fxweb
/// current and the history entry says the deploy failed.
#[test]
fn an_api_server_frozen_past_the_lease_ends_the_deploy_with_a_true_record() {
    let (fx, _) = serving_first_commit();
    let (child, watch) = deploy_until_applying_fxweb(&fx, NEVER_READY_APP, &LONG_ROLLOUT);
    watch.wait_for("deployment/fxweb: 1 of 1 updated", 60);
    let lease = fx.lease()["spec"].clone();
    let renewed = ok(
        Path::new("."),
        "date",
        &["-d", lease["renewTime"].as_str().unwrap(), "+%s"],
    );
    let expires = renewed.parse::<u64>().unwrap() + lease["leaseDurationSeconds"].as_u64().unwrap();
    let stopped = Stopped(apiserver_pid());
    ok(Path::new("."), "kill", &["-STOP", &stopped.0]);
    wait_for("the deploy lock's lease has expired", 120, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > expires + 1
    });
    drop(stopped);
    let (code, stderr) = watch.exit(child, 150);
    assert!(matches!(code, Some(1) | Some(3)), "{code:?}: {stderr}");
    assert!(
        stderr.contains("reading the cluster failed (try 2 of 3)")
            && stderr.contains("error: deploy of")
            && stderr.contains("Unable to connect to the server"),
        "{stderr}"
    );
    wait_for_node_ready();
    let last = fx.history().pop().unwrap();
    assert!(
        last["result"].as_str().unwrap().starts_with("failed"),
        "{last}"
    );
    let status = fx.run(&["status"]);
    status.assert_ok();
    assert!(
        !status
            .stdout
            .lines()
            .any(|l| l.starts_with("fxweb") && l.contains("ok (HEAD)")),
        "{}",
        status.stdout
    );
}

/// The API server killed (SIGKILL) mid-rollout and started again from its
/// own command line, as a supervisor would restart it (not `cluster up`,
/// which would make a new cluster). The deploy rides out the restart or
/// fails cleanly; if it says it succeeded, the record, `status` and the
/// pods agree.
#[test]
fn an_api_server_killed_and_restarted_mid_rollout_never_leaves_a_wrong_record() {
    let (fx, _) = serving_first_commit();
    // The restart comes while the deploy waits for the slow starter.
    let (child, watch) = deploy_until_applying_fxweb(&fx, SLOW_STARTER, &SLOW_STARTER_DEPLOY);
    watch.wait_for("deployment/fxweb: 1 of 1 updated", 60);

    let pid = apiserver_pid();
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8(arg.to_vec()).unwrap())
        .collect();
    // Its address, from the kubeconfig (JSON, as `cluster up` writes it).
    let kubeconfig: Value = serde_json::from_str(
        &std::fs::read_to_string(std::env::var("KUBECONFIG").unwrap()).unwrap(),
    )
    .unwrap();
    let address = kubeconfig["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap()
        .trim_start_matches("https://")
        .to_owned();
    ok(Path::new("."), "kill", &["-KILL", &pid]);
    // Gone once nothing listens on its port any more: its threads may
    // still hold the socket after the main one has exited.
    wait_for("the API server's port is free", 60, || {
        std::net::TcpStream::connect(&address).is_err()
    });
    let state = Path::new(&std::env::var("KUBECONFIG").unwrap())
        .parent()
        .unwrap()
        .to_owned();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(state.join("log/kube-apiserver.log"))
        .unwrap();
    use std::os::unix::process::CommandExt;
    // It outlives this test, as the cluster's daemon it replaces: never
    // waited for here (`cluster down` stops it by its pid file).
    #[allow(clippy::zombie_processes)]
    let restarted = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("starting the API server again");
    std::fs::write(
        state.join("run/kube-apiserver.pid"),
        restarted.id().to_string(),
    )
    .unwrap();
    wait_for("the API server answers again", 120, || {
        run(Path::new("."), "kubectl", &["get", "--raw", "/readyz"])
            .status
            .success()
    });

    let (code, stderr) = watch.exit(child, 300);
    eprintln!("the deploy ended with {code:?}");
    wait_for_node_ready();
    let last = fx.history().pop().unwrap();
    let status = fx.run(&["status"]);
    status.assert_ok();
    match code {
        Some(0) => {
            assert_eq!(last["result"], "succeeded", "{stderr}");
            for name in ["fxapi", "fxweb"] {
                fx.assert_serving(name, fx.digests()[name].as_str().unwrap());
            }
            fx.run(&["verify"]).assert_ok();
        }
        Some(1) | Some(3) => {
            assert!(
                last["result"].as_str().unwrap().starts_with("failed"),
                "{last}"
            );
        }
        other => panic!("the deploy ended with {other:?}: {stderr}"),
    }
}

const SEEDED_WEB: &str = "seed = { build_arg = \"API_URL\", service = \"fxapi\" }";

/// Sets the LoadBalancer address of `service/fxapi` once it exists, as a
/// cloud controller would (there is none on the test cluster).
fn assign_load_balancer(namespace: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // As a cloud would, once the Service exists and the deployment
        // behind it has rolled out, so the deploy asks a few times first.
        wait_for("deployment/fxapi is available", 300, || {
            kubectl_json(&[
                "--namespace",
                &namespace,
                "get",
                "deployment",
                "fxapi",
                "--ignore-not-found",
            ])["status"]["availableReplicas"]
                .as_i64()
                .unwrap_or(0)
                > 0
                && !kubectl(&[
                    "--namespace",
                    &namespace,
                    "get",
                    "service",
                    "fxapi",
                    "--ignore-not-found",
                    "--output",
                    "name",
                ])
                .is_empty()
        });
        kubectl(&[
            "--namespace",
            &namespace,
            "patch",
            "service",
            "fxapi",
            "--subresource=status",
            "--type",
            "merge",
            "--patch",
            r#"{"status": {"loadBalancer": {"ingress": [{"hostname": "fxapi.elb.example"}]}}}"#,
        ]);
    })
}

#[test]
fn a_seeded_image_is_built_once_its_service_has_an_address() {
    let fx = Fixture::with(Options {
        web_config: SEEDED_WEB,
        api_service: true,
        ..Options::default()
    });
    let assigner = assign_load_balancer(fx.namespace.0.clone());
    let run = fx.deploy(&[]);
    assigner.join().unwrap();
    run.assert_ok();
    let err = &run.stderr;
    let api = err
        .find("apply and roll out deployment/fxapi done")
        .unwrap();
    // Whether the deploy polled before the address came depends on how
    // long fxapi's rollout took; that it read the address before building
    // does not.
    let waited = err
        .find("service/fxapi is at fxapi.elb.example")
        .unwrap_or_else(|| panic!("{err}"));
    let seeded = err
        .find("build and push fxweb with API_URL=http://fxapi.elb.example")
        .unwrap_or_else(|| panic!("{err}"));
    let web = err.find("apply and roll out deployment/fxweb").unwrap();
    assert!(api < waited && waited < seeded && seeded < web, "{err}");
    let digest = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    fx.assert_serving("fxweb", &digest);
    let pod = &fx.serving("fxweb")[0].0;
    assert_eq!(
        fx.kubectl(&["exec", pod, "--", "cat", "/revision"]),
        format!(
            "{} http://fxapi.elb.example",
            git(fx.root(), &["rev-parse", "HEAD"])
        ),
        "the running image was built with the address"
    );
    assert_eq!(fx.history().pop().unwrap()["digests"], fx.digests());

    // Built ahead (--from), the value must come from the configuration.
    let refused = fx.deploy(&["--from", &fx.build_file()]);
    refused.assert_fails(2, "seed_args.API_URL");
    let plan = fx.deploy(&["--dry-run"]);
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
    let fx = Fixture::with(Options {
        web_config: SEEDED_WEB,
        api_service: true,
        ..Options::default()
    });
    // A first deploy with an address, then a second whose wait runs out.
    let assigner = assign_load_balancer(fx.namespace.0.clone());
    fx.deploy(&[]).assert_ok();
    assigner.join().unwrap();
    let previous = fx.digests();
    fx.kubectl(&[
        "patch",
        "service",
        "fxapi",
        "--subresource=status",
        "--type",
        "merge",
        "--patch",
        r#"{"status": {"loadBalancer": {"ingress": null}}}"#,
    ]);
    fx.commit(HEALTHY_APP);
    let run = fx.deploy(&["--seed-timeout", "2"]);
    run.assert_fails(1, "service/fxapi has no external address after 2s");
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    fx.assert_serving("fxapi", previous["fxapi"].as_str().unwrap());
}

#[test]
fn the_wrong_cluster_is_refused_unless_named() {
    let fx = Fixture::with(Options {
        context: Some("prod-cluster"),
        ..Options::default()
    });
    let run = fx.deploy(&[]);
    run.assert_fails(
        2,
        "current kube context is \"aiq-test\" but the configuration expects \"prod-cluster\"",
    );
    assert!(!run.stderr.contains("docker buildx bake"));
    assert!(fx.history().is_empty(), "nothing written");
    fx.deploy(&["--context", CLUSTER_CONTEXT]).assert_ok();
    fx.assert_serving("fxweb", fx.digests()["fxweb"].as_str().unwrap());
}

#[test]
fn an_unreachable_cluster_is_refused_before_anything_is_built() {
    let fx = Fixture::new();
    // The test cluster's kubeconfig with its server moved to a closed port.
    let config = TempDir::new("kubeconfig");
    let path = config.path().join("config");
    let original = std::fs::read_to_string(std::env::var("KUBECONFIG").unwrap()).unwrap();
    std::fs::write(&path, original.replace(":16443", ":1")).unwrap();
    let path = path.display().to_string();
    let env = [
        ("XTASK_REGISTRY", fx.registry.as_str()),
        ("KUBECONFIG", path.as_str()),
    ];
    let run = xtask(fx.root(), &["deploy"], &env);
    run.assert_fails(2, "is not reachable");
    assert!(run.stderr.contains("was refused"), "{}", run.stderr);
    assert!(!run.stderr.contains("docker buildx bake"));
    let plan = xtask(fx.root(), &["deploy", "--dry-run"], &env);
    plan.assert_ok();
    assert!(
        plan.stdout.contains("is not reachable") && plan.stdout.contains("$ "),
        "{}",
        plan.stdout
    );
}

#[test]
fn dry_run_prints_the_plan_manifests_and_diff_without_side_effects() {
    let fx = Fixture::new();
    let run = fx.deploy(&["--dry-run"]);
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
    assert!(out.contains("@sha256:<fxapi-digest-after-push>"), "{out}");
    assert!(out.contains("# kubectl diff --server-side"), "{out}");
    for line in out.lines() {
        assert!(
            line.starts_with("$ ") || line.starts_with('#'),
            "every line is a command or a comment: {line}"
        );
    }
    assert_eq!(
        kubectl(&[
            "get",
            "namespace",
            &fx.namespace.0,
            "--ignore-not-found",
            "--output",
            "name"
        ]),
        "",
        "nothing created, not even the namespace"
    );
}

#[test]
fn deploy_from_a_build_file_checks_revision_and_registry() {
    let fx = Fixture::new();
    fx.run(&["build", "--push"]).assert_ok();
    let file = fx.build_file();
    let run = fx.deploy(&["--from", &file]);
    run.assert_ok();
    assert!(
        !run.stderr.contains("docker buildx bake"),
        "no rebuild: {}",
        run.stderr
    );
    fx.assert_serving("fxweb", fx.digests()["fxweb"].as_str().unwrap());

    // A new commit makes the file stale.
    fx.commit(HEALTHY_APP);
    fx.deploy(&["--from", &file]).assert_fails(2, "pass --rev");
    let old: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let old_rev = old["revision"].as_str().unwrap();
    fx.deploy(&["--from", &file, "--rev", old_rev]).assert_ok();

    // A digest the registry does not have is refused.
    let forged = std::fs::read_to_string(&file).unwrap().replace(
        old["images"][0]["digest"].as_str().unwrap(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    );
    std::fs::write(&file, forged).unwrap();
    fx.deploy(&["--from", &file, "--rev", old_rev])
        .assert_fails(2, "is not in the registry");

    // A file without one of the configured images is refused too, before
    // the lock.
    let mut partial = old.clone();
    partial["images"].as_array_mut().unwrap().pop();
    std::fs::write(&file, partial.to_string()).unwrap();
    let entries = fx.history().len();
    fx.deploy(&["--from", &file, "--rev", old_rev])
        .assert_fails(2, "has no image");
    assert_eq!(fx.history().len(), entries);
}

#[test]
fn deploy_from_a_build_file_logs_in_before_it_reads_the_registry() {
    // A registry that wants a login, whose password a command prints (as
    // `aws ecr get-login-password` does; tests/fixtures/aws stands in for
    // it, since ECR is not reachable from here).
    let login = LoginRegistry::start();
    let fx = Fixture::with(Options {
        registry: Some(format!("{}/team", login.address)),
        config: fake_aws_login(),
        ..Options::default()
    });
    let built_with = TempDir::new("docker-config");
    let config = built_with.path().display().to_string();
    let registry = format!("{}/team", login.address);
    let env = [
        ("XTASK_REGISTRY", registry.as_str()),
        ("DOCKER_CONFIG", config.as_str()),
    ];
    xtask(fx.root(), &["build", "--push"], &env).assert_ok();
    // A fresh CI runner: an empty Docker config.
    let runner = TempDir::new("docker-config");
    let config = runner.path().display().to_string();
    let env = [
        ("XTASK_REGISTRY", registry.as_str()),
        ("DOCKER_CONFIG", config.as_str()),
    ];
    let mut args = vec!["deploy", "--from", "target/xtask/build.json"];
    args.extend_from_slice(FAST);
    let run = xtask(fx.root(), &args, &env);
    assert!(
        !run.stderr.contains("is not in the registry"),
        "{}",
        run.stderr
    );
    let logged_in = run
        .stderr
        .find(&format!(
            "docker login --username ci --password-stdin {}",
            login.address
        ))
        .unwrap_or_else(|| panic!("no login: {}", run.stderr));
    let locked = run
        .stderr
        .find("lock namespace")
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(
        logged_in < locked,
        "logged in during preflight: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("s3cret"), "the password never shows");
    // The node itself has no login for that registry (a cluster would need
    // an imagePullSecret): the pull is refused and the deploy undone.
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("ErrImagePull") || run.stderr.contains("ImagePullBackOff"),
        "{}",
        run.stderr
    );
}

#[test]
fn deploy_and_status_json_stream_only_documented_events() {
    let fx = Fixture::new();
    let plan = fx.deploy(&["--dry-run", "--json"]);
    plan.assert_ok();
    let events = parse_events(&plan.stdout);
    assert!(events_of(&events, "command")
        .iter()
        .all(|c| c["dry_run"] == true));
    assert!(events_of(&events, "manifests")[0]["yaml"]
        .as_str()
        .unwrap()
        .contains("aiq.dev/revision"));
    assert_eq!(events_of(&events, "diff").len(), 1);

    let run = fx.deploy(&["--json"]);
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

/// `deploy --from` an older build: the pods and the history say the build
/// file's revision, never HEAD's, so `status` shows drift and `verify`
/// names what runs. A file for another registry, or whose revision is not
/// the one its images are labelled with, is refused before anything is
/// applied.
#[test]
fn deploy_from_an_older_build_is_recorded_as_that_revision_never_as_head() {
    let fx = Fixture::new();
    fx.run(&["build", "--push"]).assert_ok();
    let older = git(fx.root(), &["rev-parse", "HEAD"]);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.build_file()).unwrap()).unwrap();
    let older_file = fx.root().join("target/older.json");
    std::fs::write(&older_file, file.to_string()).unwrap();
    let older_file = older_file.to_str().unwrap();
    let newer = fx.commit(HEALTHY_APP);

    let mut foreign = file.clone();
    foreign["images"][0]["reference"] = json!("elsewhere.example/team/fxweb:0123456789ab");
    let foreign_file = fx.root().join("target/foreign.json");
    std::fs::write(&foreign_file, foreign.to_string()).unwrap();
    fx.deploy(&["--from", foreign_file.to_str().unwrap(), "--rev", &older])
        .assert_fails(2, "not under this environment's registry");
    let mut mislabelled = file.clone();
    mislabelled["revision"] = json!(newer);
    let mislabelled_file = fx.root().join("target/mislabelled.json");
    std::fs::write(&mislabelled_file, mislabelled.to_string()).unwrap();
    fx.deploy(&["--from", mislabelled_file.to_str().unwrap()])
        .assert_fails(
            2,
            &format!(
                "says its inputs last changed at {older}, but at {} they last changed at {newer}",
                &newer[..12]
            ),
        );
    assert!(
        fx.kubectl(&["get", "deployments", "--output", "name"])
            .is_empty(),
        "nothing applied after a refused build file"
    );

    fx.deploy(&["--from", older_file, "--rev", &older])
        .assert_ok();
    for name in ["fxapi", "fxweb"] {
        let stamped = fx.get(&["get", "deployment", name])["spec"]["template"]["metadata"]
            ["annotations"]["aiq.dev/revision"]
            .clone();
        assert_eq!(stamped, json!(older), "{name} says the revision it runs");
    }
    assert_eq!(fx.history().pop().unwrap()["revision"], json!(older));
    let status = fx.run(&["status"]);
    assert_eq!(
        status.stdout.matches("drift (not HEAD)").count(),
        2,
        "{}",
        status.stdout
    );
    let verify = fx.run(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.stderr);
    assert!(
        verify.stdout.contains(&format!(
            "FAIL  deployment/fxweb runs revision {older} ({}-",
            &older[..12],
        )) && verify
            .stdout
            .contains(&format!("not HEAD ({}, where", &newer[..12])),
        "{}",
        verify.stdout
    );
}

/// `verify --rebuild` on the real cluster: after a deploy it rebuilds the
/// running revision fresh, from that commit's tree and the base digests
/// recorded for it, and passes with the digests the pods run. Then a build
/// that lies (the commit plus an uncommitted change, pushed under the
/// clean SHA tag, recorded as that revision and rolled out): plain
/// `verify` passes, since every record agrees, and `verify --rebuild`
/// fails, naming the deployment. (The real images' reproducibility is
/// provable_builds.rs's; a fixture's rebuild takes seconds.)
#[test]
fn verify_rebuild_passes_after_a_deploy_and_catches_a_build_that_lies() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.build_file()).unwrap()).unwrap();
    let deployed = build_digests(fx.root());
    let honest = fx.run(&["verify", "--rebuild", "--json"]);
    honest.assert_ok();
    assert!(honest.stderr.contains("--no-cache"), "{}", honest.stderr);
    let verified: std::collections::BTreeMap<String, String> =
        events_of(&parse_events(&honest.stdout), "verified")
            .into_iter()
            .map(|e| {
                (
                    e["deployment"].as_str().unwrap().to_owned(),
                    e["expected"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
    assert_eq!(verified, deployed, "the rebuild gives the running digests");

    // The lie: HEAD plus an uncommitted change, built (cached: it need not
    // be fresh to lie), its manifest put under the clean SHA tag, and a
    // build file that records it as HEAD's clean build.
    let script = fx.root().join("fxweb.sh");
    std::fs::write(&script, format!("# not committed\n{HEALTHY_APP}")).unwrap();
    fx.run(&["build", "fxweb", "--push", "--cache", "--allow-dirty"])
        .assert_ok();
    let lie = build_digests(fx.root())["fxweb"].clone();
    assert_ne!(lie, deployed["fxweb"]);
    git(fx.root(), &["checkout", "--", "fxweb.sh"]);
    let mut lying = file.clone();
    for image in lying["images"].as_array_mut().unwrap() {
        if image["name"] == "fxweb" {
            put_manifest(
                &format!("{}/fxweb", fx.registry),
                &lie,
                image["tag"].as_str().unwrap(),
            );
            image["digest"] = json!(lie);
            // The lie carries no input key label, so its file names none.
            image.as_object_mut().unwrap().remove("key");
        }
    }
    let lying_file = fx.root().join("target/lying-build.json");
    std::fs::write(&lying_file, lying.to_string()).unwrap();
    fx.deploy(&["--from", lying_file.to_str().unwrap()])
        .assert_ok();
    fx.assert_serving("fxweb", &lie);
    fx.run(&["verify"]).assert_ok();
    // Only the image that lies is rebuilt (fxapi was checked above).
    let caught = fx.run(&["verify", "--rebuild", "fxweb"]);
    caught.assert_fails(1, "deployment/fxweb runs");
    assert!(caught.stderr.contains(&lie), "{}", caught.stderr);
    let bake = caught
        .stderr
        .lines()
        .find(|l| l.starts_with("$ docker buildx bake"))
        .unwrap_or_default();
    assert!(
        bake.ends_with(" fxweb") && !caught.stdout.contains("fxapi"),
        "only fxweb is rebuilt and judged: {}",
        caught.stderr
    );
}

/// `verify` and `rollback` log in to the registry before they read it, as
/// `deploy` does (a fresh CI runner has no ECR login). Dry runs show the
/// login as its one pipeline line, before the reads that then fail.
#[test]
fn verify_and_rollback_log_in_before_they_read_the_registry() {
    let fx = Fixture::with(Options {
        config: fake_aws_login(),
        ..Options::default()
    });
    let host = fx.registry.split('/').next().unwrap().to_owned();
    let pipeline = format!(
        "$ {} ecr get-login-password | docker login --username ci --password-stdin {host}",
        fake_aws().display()
    );
    let verify = fx.run(&["verify", "--dry-run"]);
    assert_eq!(verify.code, 1, "{}", verify.stderr);
    assert_eq!(
        verify.stdout.lines().next(),
        Some(pipeline.as_str()),
        "{}",
        verify.stdout
    );
    assert!(
        verify
            .stdout
            .contains("FAIL  deployment/fxweb does not exist"),
        "{}",
        verify.stdout
    );
    let head = git(fx.root(), &["rev-parse", "HEAD"]);
    let rollback = fx.run(&["rollback", "--dry-run", "--to", &head]);
    assert_eq!(rollback.code, 2, "{}", rollback.stderr);
    assert_eq!(
        rollback.stdout.lines().next(),
        Some(pipeline.as_str()),
        "{}",
        rollback.stdout
    );
    assert!(
        rollback.stderr.contains("is not in the registry"),
        "{}",
        rollback.stderr
    );
}

/// A paused Deployment never rolls out: the deploy refuses it before
/// anything is built (exit 2, with the fix), whether someone paused it by
/// hand or the manifests say `paused: true`, and the running version keeps
/// serving.
#[test]
fn a_paused_deployment_is_refused_before_anything_is_built() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let serving = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    fx.kubectl(&["rollout", "pause", "deployment/fxweb"]);
    fx.commit(HEALTHY_APP);
    let by_hand = fx.deploy(&[]);
    by_hand.assert_fails(2, "kubectl rollout resume deployment/fxweb");
    assert!(
        !by_hand.stderr.contains("docker buildx bake"),
        "nothing built: {}",
        by_hand.stderr
    );
    fx.assert_serving("fxweb", &serving);
    fx.kubectl(&["rollout", "resume", "deployment/fxweb"]);

    set_web_spec(fx.root(), "paused: true");
    commit_all(fx.root(), "fxweb paused in its manifest");
    let in_manifest = fx.deploy(&[]);
    in_manifest.assert_fails(2, "deployment/fxweb is paused in k8s (spec.paused: true)");
    assert!(!in_manifest.stderr.contains("docker buildx bake"));
    fx.assert_serving("fxweb", &serving);
}

/// Adds `line` to fxweb's Deployment `spec` in the fixture's manifests.
fn set_web_spec(root: &Path, line: &str) {
    let path = root.join("k8s/workloads.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let web = manifest.find("name: fxweb").unwrap();
    let spec = web + manifest[web..].find("spec:\n  selector:").unwrap();
    let changed = format!(
        "{}spec:\n  {line}\n  selector:{}",
        &manifest[..spec],
        &manifest[spec + "spec:\n  selector:".len()..]
    );
    std::fs::write(path, changed).unwrap();
}

/// A Deployment scaled to zero on purpose deploys: it rolls out with no
/// pods, and the deploy says there are none to verify.
#[test]
fn a_deployment_scaled_to_zero_deploys_with_no_pods_to_verify() {
    let fx = Fixture::new();
    set_web_spec(fx.root(), "replicas: 0");
    commit_all(fx.root(), "fxweb scaled to zero");
    let run = fx.deploy(&[]);
    run.assert_ok();
    assert!(
        run.stderr
            .contains("deployment/fxweb: replicas: 0, so no pods to verify"),
        "{}",
        run.stderr
    );
    assert!(fx.serving("fxweb").is_empty());
    fx.assert_serving("fxapi", fx.digests()["fxapi"].as_str().unwrap());
    fx.run(&["verify"]).assert_ok();
}

/// A pod with containers the xtask did not build (a log shipper listed
/// before the app's own container, as an injected proxy would be, and an
/// init container) deploys, verifies and reports HEAD: the app's container
/// is the one named after its image; the others are listed by `status` and
/// never compared with the xtask's digests.
#[test]
fn sidecars_and_init_containers_are_listed_never_judged() {
    let fx = Fixture::new();
    let other = format!("{}/debian:bookworm-slim", base_registry());
    let path = fx.root().join("k8s/workloads.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let web = manifest.find("name: fxweb").unwrap();
    let containers = format!(
        "      initContainers:\n        - name: setup\n          image: {other}\n          command: [\"true\"]\n      containers:\n        - name: log-shipper\n          image: {other}\n          command: [sh, -c, \"trap 'exit 0' TERM; while true; do sleep 1; done\"]\n"
    );
    let changed = format!(
        "{}{}",
        &manifest[..web],
        manifest[web..].replacen("      containers:\n", &containers, 1)
    );
    std::fs::write(&path, changed).unwrap();
    fx.commit(HEALTHY_APP);
    let run = fx.deploy(&[]);
    run.assert_ok();
    let digests = fx.digests();
    fx.assert_serving("fxweb", digests["fxweb"].as_str().unwrap());
    let status = fx.run(&["status"]);
    status.assert_ok();
    let fxweb = status
        .stdout
        .lines()
        .find(|l| l.starts_with("fxweb "))
        .unwrap_or_default();
    assert!(fxweb.ends_with("ok (HEAD)"), "{}", status.stdout);
    for listed in [
        format!("also runs log-shipper ({other})"),
        format!("also runs setup (init, {other})"),
    ] {
        assert!(
            status.stdout.contains(&listed),
            "{listed}: {}",
            status.stdout
        );
    }
    fx.run(&["verify"]).assert_ok();
}

/// Two apps in one namespace, each with its own `app`: they deploy at the
/// same time (neither waits for the other's lock), each keeps its own
/// history, and rolling one back leaves the other as it was.
#[test]
fn two_apps_share_a_namespace_without_touching_each_other() {
    let fx = Fixture::with(Options {
        config: "app = \"alpha\"".into(),
        ..Options::default()
    });
    // The second app: the same fixture under other names (fbapi, fbweb),
    // in the same namespace, with the same name label values nowhere.
    let beta = TempDir::new("deploy-beta");
    let renamed = |text: String| {
        text.replace("fxapi", "fbapi")
            .replace("fxweb", "fbweb")
            .replace("alpha", "beta")
    };
    std::fs::create_dir(beta.path().join("k8s")).unwrap();
    for file in [
        "Cargo.toml",
        "Dockerfile",
        ".gitignore",
        "note.txt",
        "k8s/kustomization.yaml",
        "k8s/workloads.yaml",
    ] {
        let text = std::fs::read_to_string(fx.root().join(file)).unwrap();
        std::fs::write(beta.path().join(file), renamed(text)).unwrap();
    }
    for script in ["fbapi.sh", "fbweb.sh"] {
        std::fs::write(beta.path().join(script), HEALTHY_APP).unwrap();
    }
    init_repo(beta.path());
    commit_all(beta.path(), "beta");
    let deploy = |root: &Path| {
        let mut args = vec!["deploy"];
        args.extend_from_slice(FAST);
        xtask(root, &args, &[("XTASK_REGISTRY", fx.registry.as_str())])
    };
    let (alpha_run, beta_run) = std::thread::scope(|s| {
        let alpha = s.spawn(|| deploy(fx.root()));
        let beta = s.spawn(|| deploy(beta.path()));
        (alpha.join().unwrap(), beta.join().unwrap())
    });
    // One lock for both would refuse one of them ("another deploy holds
    // the lock").
    alpha_run.assert_ok();
    beta_run.assert_ok();
    let entries = |app: &str| fx.history_in(&format!("xtask-deploy-history-{app}")).len();
    assert_eq!((entries("alpha"), entries("beta")), (1, 1));
    assert_eq!(
        fx.get(&[
            "get",
            "configmap",
            "xtask-deploy-history",
            "--ignore-not-found"
        ]),
        Value::Null,
        "no shared history"
    );
    assert_eq!(
        fx.get(&["get", "leases"])["items"],
        json!([]),
        "both locks released"
    );
    let beta_before = fx.get(&["get", "deployments", "fbapi", "fbweb"]);
    let first = fx.digests();

    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let mut undo = vec!["rollback"];
    undo.extend_from_slice(FAST);
    fx.run(&undo).assert_ok();
    for name in ["fxapi", "fxweb"] {
        fx.assert_serving(name, first[name].as_str().unwrap());
    }
    let beta_after = fx.get(&["get", "deployments", "fbapi", "fbweb"]);
    for (before, after) in beta_before["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(beta_after["items"].as_array().unwrap())
    {
        assert_eq!(
            before["metadata"]["generation"], after["metadata"]["generation"],
            "{} untouched",
            before["metadata"]["name"]
        );
    }
    assert_eq!((entries("alpha"), entries("beta")), (3, 1));
}

/// History entries sort in the order the runs held the lock, not by each
/// writer's clock: after an entry written by a machine whose clock ran
/// years ahead, the next deploy's entry still comes last.
#[test]
fn a_writer_whose_clock_ran_ahead_does_not_reorder_the_history() {
    let fx = Fixture::new();
    fx.deploy(&[]).assert_ok();
    let map = fx.get(&["get", "configmap", "xtask-deploy-history"]);
    let (key, value) = map["data"].as_object().unwrap().iter().next().unwrap();
    // The same entry, as a writer whose clock said 2100 would have keyed it.
    let ahead = format!("4102444800-{}", key.split_once('-').unwrap().1);
    let patch = json!({"data": {key.as_str(): null, ahead.as_str(): value}});
    fx.patch_history(&patch);
    let head = fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    let history = fx.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["revision"], head, "the newest deploy sorts last");
}

/// An autoscaler for fxweb (CPU-based: with no metrics server here it
/// never scales by itself, and 2 or 3 replicas are within its bounds).
const WEB_AUTOSCALER: &str = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: fxweb\n  labels:\n    app.kubernetes.io/name: fxweb\nspec:\n  scaleTargetRef:\n    apiVersion: apps/v1\n    kind: Deployment\n    name: fxweb\n  minReplicas: 1\n  maxReplicas: 5\n  metrics:\n    - type: Resource\n      resource:\n        name: cpu\n        target:\n          type: Utilization\n          averageUtilization: 80\n";

/// A Deployment a HorizontalPodAutoscaler scales keeps the count the
/// autoscaler owns: the deploy leaves `spec.replicas` to it. Twice: the
/// autoscaler arrives, with `replicas` removed from the manifest as the
/// Kubernetes docs advise, before it has written the count (which must not
/// drop to the default 1); then it has written the count (through the
/// scale subresource, as `kubectl scale` does here for it), and a manifest
/// that says `replicas: 2` again must not reset it.
#[test]
fn an_autoscaled_deployment_keeps_the_replica_count_its_autoscaler_owns() {
    let fx = Fixture::new();
    let replicas =
        |fx: &Fixture| fx.get(&["get", "deployment", "fxweb"])["spec"]["replicas"].clone();
    set_web_spec(fx.root(), "replicas: 2");
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    assert_eq!(replicas(&fx), 2);

    std::fs::write(fx.root().join("k8s/workloads.yaml"), workloads("", "")).unwrap();
    fx.add_manifest("autoscaler.yaml", WEB_AUTOSCALER);
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    assert_eq!(
        replicas(&fx),
        2,
        "not reset to 1 when the field left the apply"
    );
    let owners = fx.owners("fxweb", "replicas");
    assert!(
        owners.len() == 1 && owners[0]["manager"] == "handover-to-hpa",
        "{owners:?}"
    );

    fx.kubectl(&["scale", "deployment", "fxweb", "--replicas=3"]);
    set_web_spec(fx.root(), "replicas: 2");
    fx.commit(HEALTHY_APP);
    fx.deploy(&[]).assert_ok();
    assert_eq!(replicas(&fx), 3, "the autoscaler's count stays");
    let digest = fx.digests()["fxweb"].as_str().unwrap().to_owned();
    fx.assert_serving("fxweb", &digest);
    assert_eq!(fx.serving("fxweb").len(), 3);
}

/// Ready only after 14 s, longer than the tests' 8-s grace.
const SLOW_APP: &str =
    "trap 'exit 0' TERM\nsleep 14\ntouch /tmp/ready\nwhile true; do sleep 1; done\n";

/// A container with a startup probe gets the time the kubelet gives it
/// (`initialDelaySeconds + failureThreshold × periodSeconds`), not just the
/// deploy's grace: a slow starter the kubelet would still wait for is not
/// failed and rolled back.
#[test]
fn a_slow_starter_gets_the_time_its_startup_probe_gives_it() {
    let fx = Fixture::new();
    fx.commit_manifest(
        "          startupProbe:\n            exec:\n              command: [cat, /tmp/ready]\n            periodSeconds: 1\n            failureThreshold: 40\n",
        "",
    );
    fx.commit(SLOW_APP);
    let run = fx.deploy(&[]);
    run.assert_ok();
    assert!(
        !run.stderr.contains("readiness still failing"),
        "{}",
        run.stderr
    );
    fx.assert_serving("fxweb", fx.digests()["fxweb"].as_str().unwrap());
}

/// A cancelled GitHub job sends SIGINT, SIGTERM about 7.5 s later and
/// SIGKILL 2.5 s after that (each only to a process still running). The
/// deploy must record `interrupted` and release its lock inside that
/// window, and a second signal that lands while it does so (here SIGTERM
/// right after SIGINT, as a quicker canceller or a person pressing Ctrl-C
/// twice would send it) must not cut that short.
#[test]
fn a_cancelled_github_job_still_records_the_interrupt_and_releases_the_lock() {
    let (fx, _) = serving_first_commit();
    let args = LONG_ROLLOUT;
    for second_after in [Duration::from_millis(7500), Duration::from_millis(30)] {
        let (mut run, watch) = deploy_until_applying_fxweb(&fx, NEVER_READY_APP, &args);
        let pid = run.id();
        // The run's exit, told to the schedule below as it happens.
        let (exit_tx, exited) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = run.wait().unwrap();
            let _ = exit_tx.send(());
            status
        });
        let started = Instant::now();
        signal_pid(pid, "INT");
        let schedule = [
            (second_after, "TERM"),
            (second_after + Duration::from_millis(2500), "KILL"),
        ];
        let mut sent = vec!["INT"];
        for (at, name) in schedule {
            // The next signal when it is due, unless the run ends first.
            if exited
                .recv_timeout(at.saturating_sub(started.elapsed()))
                .is_ok()
            {
                break;
            }
            signal_pid(pid, name);
            sent.push(name);
        }
        let status = waiter.join().unwrap();
        let stderr = watch.finish();
        assert_eq!(status.code(), Some(130), "signals sent: {sent:?}\n{stderr}");
        assert!(
            !sent.contains(&"KILL"),
            "it outlived the window: {sent:?}\n{stderr}"
        );
        assert_eq!(fx.lease(), Value::Null, "the lock was released ({sent:?})");
        let entry = fx.history().pop().unwrap();
        assert_eq!(entry["result"], "interrupted", "{sent:?}\n{stderr}");
    }
}

/// `cargo xtask builder down --name NAME` when dropped, whatever the test's
/// outcome: a builder `builder up` made is removed with everything it made.
struct BuilderDown(String);

impl Drop for BuilderDown {
    fn drop(&mut self) {
        let _ = xtask(
            &project_root(),
            &[
                "builder",
                "down",
                "--name",
                &self.0,
                "--context",
                CLUSTER_CONTEXT,
            ],
            &[],
        );
    }
}

/// A buildx builder made by hand, removed when dropped.
struct HandMadeBuilder(String);

impl Drop for HandMadeBuilder {
    fn drop(&mut self) {
        let _ = run(
            Path::new("."),
            "docker",
            &["buildx", "rm", "--force", &self.0],
        );
    }
}

/// The tags of `<fixture registry>/<image>` in the test registry.
fn tags_of(fx: &Fixture, image: &str) -> Vec<String> {
    let path = fx.registry.split_once('/').unwrap().1;
    common::registry_delete::tags(&registry(), &format!("{path}/{image}")).unwrap()
}

/// BuildKit as a service in the cluster: `builder up --in-cluster` runs the
/// pinned BuildKit as a Deployment (images from the local registry only)
/// reached over mutual TLS; the run's commit built on it gives the digests
/// the local builder gave; `deploy --builder` deploys and verifies; a
/// builder that does not answer is refused before anything is built; a
/// builder pod killed mid-build fails the deploy naming the builder, with
/// nothing pushed and the lock released, and the next deploy on the
/// replaced pod succeeds; `builder down` leaves nothing.
#[test]
fn the_in_cluster_builder_builds_what_the_local_one_does_deploys_and_leaves_nothing() {
    let head = head_images();
    let fx = Fixture::new();
    let name = unique("incluster");
    let namespace = unique("buildkit-");
    let address = format!("127.0.0.1:{}", free_port());
    let _down = BuilderDown(name.clone());
    let up = fx.run(&[
        "builder",
        "up",
        "--in-cluster",
        "--name",
        &name,
        "--namespace",
        &namespace,
        "--address",
        &address,
    ]);
    up.assert_ok();
    assert_eq!(up.stdout.trim(), format!("BUILDER={name}"), "{}", up.stderr);
    let pods = kubectl_json(&["--namespace", &namespace, "get", "pods", "--output", "json"]);
    let images: Vec<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|pod| {
            let spec = &pod["spec"];
            [&spec["containers"], &spec["initContainers"]]
                .into_iter()
                .filter_map(|list| list.as_array())
                .flatten()
                .filter_map(|c| c["image"].as_str())
        })
        .collect();
    assert!(
        !images.is_empty()
            && images
                .iter()
                .all(|i| i.starts_with(&format!("{}/", registry()))),
        "every image from the local registry: {images:?}"
    );
    // The client's key is root's alone; the server's key is only in the
    // Secret, and the CA's is gone.
    let dir = xtask_cache().join(format!("builders/{name}"));
    let mode = |file: &str| ok(&dir, "stat", &["-c", "%a", file]);
    assert_eq!(
        (mode("."), mode("client.key")),
        ("700".into(), "600".into())
    );
    assert!(!dir.join("server.key").exists() && !dir.join("ca.key").exists());

    // The run's commit, built fresh on the in-cluster builder: the digests
    // the local builder gave.
    let clone = TempDir::new("incluster");
    clone_into(&head.clone, clone.path(), "022");
    let repository = format!("{}/{}", registry(), unique("incluster"));
    let _pushed = Pushed::at(&repository);
    let built = xtask(
        clone.path(),
        &["build", "--push", "--builder", &name],
        &[("XTASK_REGISTRY", &repository)],
    );
    built.assert_ok();
    assert!(
        built.stderr.contains(&format!("--builder {name}"))
            && built.stderr.contains("--no-cache --pull"),
        "{}",
        built.stderr
    );
    let digests = build_digests(clone.path());
    assert_eq!(digests, head.digests, "the in-cluster builder's digests");
    eprintln!("digests from both builders: {digests:?}");

    // Deployed with it, and verified.
    fx.deploy(&["--builder", &name]).assert_ok();
    let deployed = fx.digests();
    fx.assert_serving("fxweb", deployed["fxweb"].as_str().unwrap());
    fx.run(&["verify"]).assert_ok();

    // A builder that does not answer: refused before anything is built or
    // applied.
    let closed = HandMadeBuilder(unique("closed"));
    ok(
        Path::new("."),
        "docker",
        &[
            "buildx",
            "create",
            "--name",
            &closed.0,
            "--driver",
            "remote",
            &format!("tcp://127.0.0.1:{}", free_port()),
        ],
    );
    fx.commit(HEALTHY_APP);
    let image_before = fx.image_of("fxweb");
    let refused = fx.deploy(&["--builder", &closed.0]);
    refused.assert_fails(2, &format!("builder {} cannot be reached", closed.0));
    assert!(
        !refused.stderr.contains("buildx bake"),
        "{}",
        refused.stderr
    );
    assert_eq!(fx.image_of("fxweb"), image_before);
    assert_eq!(fx.lease(), Value::Null, "refused before the lock");

    // The builder's pod killed mid-build (a step that takes a while in
    // both images): exit 1 naming the builder, nothing pushed, the lock
    // released; the Deployment replaces the pod and the next deploy works.
    let dockerfile = fx.root().join("Dockerfile");
    let slow = std::fs::read_to_string(&dockerfile).unwrap() + "RUN sleep 25 && touch /slow\n";
    std::fs::write(&dockerfile, slow).unwrap();
    commit_all(fx.root(), "a slow step");
    let tags_before = (tags_of(&fx, "fxapi"), tags_of(&fx, "fxweb"));
    let mut args = vec!["deploy"];
    args.extend_from_slice(FAST);
    args.extend_from_slice(&["--builder", &name]);
    let mut child = fx.spawn(&args);
    let watch = StderrWatch::new(&mut child);
    watch.wait_for("sleep 25", 180);
    kubectl(&[
        "--namespace",
        &namespace,
        "delete",
        "pod",
        "--selector",
        "app.kubernetes.io/name=buildkitd",
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    let (code, stderr) = watch.exit(child, 180);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("building on builder {name}")),
        "{stderr}"
    );
    assert_eq!(
        (tags_of(&fx, "fxapi"), tags_of(&fx, "fxweb")),
        tags_before,
        "nothing pushed"
    );
    assert_eq!(fx.lease(), Value::Null, "the lock is released");
    kubectl(&[
        "--namespace",
        &namespace,
        "rollout",
        "status",
        "deployment/buildkitd",
        "--timeout=180s",
    ]);
    fx.deploy(&["--builder", &name]).assert_ok();

    // A registry cache the two builders share: each exports to a ref of
    // its own (`{builder}`) and imports both. The in-cluster builder's pod
    // is new (its own cache empty): what it does not run, it took from
    // the local builder's export.
    let shared = TempDir::new("shared-cache");
    let root = shared.path();
    let u = unique("shared");
    let cache = format!("{}/cache/{u}", registry());
    let images = format!("{}/{u}", registry());
    let _shared_pushed = (Pushed::at(&cache), Pushed::at(&images));
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[workspace]\nmembers = []\n\n[workspace.metadata.xtask]\nregistry = \"{images}\"\npush_latest = false\ncache_from = [\"type=registry,ref={cache}:xtask-buildkit-v0-34-2\", \"type=registry,ref={cache}:{name}\"]\ncache_to = [\"type=registry,ref={cache}:{{builder}},mode=max\"]\n\n[[workspace.metadata.xtask.images]]\nname = \"shared\"\ndockerfile = \"Dockerfile\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        // `u` in each step: no earlier run's cache has them.
        format!("ARG BASE_REGISTRY=docker.io/library\nFROM ${{BASE_REGISTRY}}/debian:bookworm-slim\nRUN echo ran-the-slow-step {u} && sleep 3 && echo slow > /slow\nCOPY app.txt /app.txt\nRUN echo ran-the-copy-step {u} && cat /app.txt > /served\n"),
    )
    .unwrap();
    std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
    std::fs::write(root.join("app.txt"), "one\n").unwrap();
    init_repo(root);
    commit_all(root, "shared cache");
    // A step ran when it printed its marker (its header line names it too).
    let ran = |stderr: &str, marker: &str| {
        stderr
            .lines()
            .any(|l| l.contains(marker) && !l.contains("RUN echo"))
    };
    let cached = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.ends_with(" CACHED"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let local = xtask(root, &["build", "--push", "--cache"], &[]);
    local.assert_ok();
    assert!(ran(&local.stderr, "ran-the-slow-step"), "{}", local.stderr);
    let local_digests = build_digests(root);
    let remote = xtask(
        root,
        &["build", "--push", "--cache", "--builder", &name],
        &[],
    );
    remote.assert_ok();
    assert!(
        !ran(&remote.stderr, "ran-the-slow-step") && !ran(&remote.stderr, "ran-the-copy-step"),
        "the in-cluster builder ran a step the local one had cached: {}",
        remote.stderr
    );
    assert_eq!(build_digests(root), local_digests, "the same image");
    std::fs::write(root.join("app.txt"), "two\n").unwrap();
    commit_all(root, "the next commit");
    let next = xtask(
        root,
        &["build", "--push", "--cache", "--builder", &name],
        &[],
    );
    next.assert_ok();
    assert!(
        !ran(&next.stderr, "ran-the-slow-step") && ran(&next.stderr, "ran-the-copy-step"),
        "only what the commit changed runs: {}",
        next.stderr
    );
    eprintln!(
        "shared cache: CACHED steps of the same commit on the other builder:\n{}\nof the next commit:\n{}",
        cached(&remote.stderr),
        cached(&next.stderr)
    );

    // A dry run of `builder down` removes nothing; `builder down` removes
    // exactly what `up` made, and names the cache ref it keeps.
    let planned = xtask(
        root,
        &["builder", "down", "--name", &name, "--dry-run"],
        &[],
    );
    planned.assert_ok();
    assert!(
        planned
            .stdout
            .contains(&format!("delete namespace {namespace}")),
        "{}",
        planned.stdout
    );
    assert_eq!(
        kubectl(&["get", "namespace", &namespace, "--output", "name"]),
        format!("namespace/{namespace}")
    );
    assert!(
        run(Path::new("."), "docker", &["buildx", "inspect", &name])
            .status
            .success()
            && dir.join("client.key").exists(),
        "a dry run removed the builder"
    );
    let down = xtask(root, &["builder", "down", "--name", &name], &[]);
    down.assert_ok();
    assert!(
        down.stdout.contains(&format!("{cache}:{name}")),
        "{}",
        down.stdout
    );
    assert_eq!(
        kubectl(&["get", "namespace", &namespace, "--ignore-not-found"]),
        ""
    );
    assert!(
        !run(Path::new("."), "docker", &["buildx", "inspect", &name])
            .status
            .success()
    );
    assert!(!dir.exists(), "the certificates are gone");
}
