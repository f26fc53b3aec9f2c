//! kubectl: every command line the xtask runs against a cluster is built
//! here, by the private `global` and `cmd`; reads come back through the
//! types in `objects.rs`.

mod autoscale;
mod objects;

pub use autoscale::*;
pub use objects::*;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{
    config::Config,
    exec::{Cmd, Exec},
    exit::refuse,
};

const LOCK_NAME: &str = "xtask-deploy-lock";
/// Tries of a cluster read before its error counts, and the bound on each:
/// together they ride out about 20 s of API trouble.
const READ_TRIES: u32 = 3;
const READ_TIMEOUT_SECS: u32 = 5;
const HISTORY_NAME: &str = "xtask-deploy-history";
const FIELD_MANAGER: &str = "xtask";
/// The bound on each call of the deploy lock.
const LOCK_REQUEST_TIMEOUT: &str = "--request-timeout=10s";
/// The bound on every write (apply, diff, undo, delete, the history): a
/// wedged API server must fail the call, not hang it while the renewer
/// keeps the lock alive.
const WRITE_REQUEST_TIMEOUT: &str = "--request-timeout=60s";
/// The label every workload of the base carries; the deploy selects by it.
const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The label the Deployment controller puts on a ReplicaSet and its pods.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// The controller's revision of a Deployment and of its ReplicaSets.
pub const CONTROLLER_REVISION: &str = "deployment.kubernetes.io/revision";
/// On a pod template: its image's own revision (the last commit that
/// changed the image's inputs), its tag, whether it is a dirty build.
pub const REVISION_ANNOTATION: &str = "aiq.dev/revision";
pub const TAG_ANNOTATION: &str = "aiq.dev/tag";
pub const DIRTY_ANNOTATION: &str = "aiq.dev/dirty";
/// On a Deployment's own metadata: the revision the deploy was of (HEAD)
/// and its tag.
pub const DEPLOYED_REVISION_ANNOTATION: &str = "aiq.dev/deployed-revision";
pub const DEPLOYED_TAG_ANNOTATION: &str = "aiq.dev/deployed-tag";

/// `kubectl kustomize DIR`: renders manifests; needs no cluster.
pub fn kustomize(kubectl: &str, dir: &str) -> Cmd {
    Cmd::new(kubectl).args(["kustomize", dir])
}

/// The label selector of `deployment`'s pods, for `--selector`.
fn selector_of(deployment: &Deployment) -> String {
    let labels = &deployment.spec.selector.match_labels;
    if labels.is_empty() {
        // Only matchExpressions: the label the xtask's manifests carry.
        format!("{NAME_LABEL}={}", deployment.metadata.name)
    } else {
        labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether `object` is applied with deployment `name`: the apply selects
/// by the name label.
pub fn applied_with(object: &serde_json::Value, name: &str) -> bool {
    object["metadata"]["labels"][NAME_LABEL] == name
}

/// `kind.group/name` (`kind/name` in the core group), as `kubectl get
/// --output name` prints an object and as every kubectl verb takes it.
pub fn object_ref(object: &serde_json::Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
    {
        Some((group, _)) => format!("{kind}.{group}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// kubectl bound to one context and namespace.
pub struct Kube<'a> {
    pub exec: &'a Exec<'a>,
    pub kubectl: String,
    pub context: Option<String>,
    pub namespace: String,
    /// The deploy lock's Lease and the history's ConfigMap: one pair per
    /// app, so apps that share a namespace neither wait for nor undo each
    /// other.
    pub lock_name: String,
    pub history_name: String,
}

/// `base-<app>`, or `base` when no app is configured (the names of every
/// earlier version: an upgrade keeps its history, and still locks out an
/// older xtask).
fn app_object(base: &str, app: Option<&str>) -> String {
    match app {
        Some(app) => format!("{base}-{app}"),
        None => base.to_owned(),
    }
}

impl<'a> Kube<'a> {
    /// `XTASK_KUBECTL` if set, else kubectl from the shell's PATH (which
    /// `test` and `ci` start with the test cluster's own kubectl).
    pub fn find_kubectl(exec: &Exec) -> Result<String> {
        if let Some(path) = exec.env.kubectl_override() {
            return Ok(path);
        }
        which::which_in("kubectl", exec.path(), exec.sh.current_dir())
            .map(|p| p.display().to_string())
            .map_err(|_| refuse("`kubectl` not found on PATH: install it (https://kubernetes.io/docs/tasks/tools/)"))
    }

    /// kubectl bound to the configured namespace and the chosen context,
    /// after the wrong-cluster guard: `--context` if given, else the current
    /// context, which must be the one the configuration expects. With
    /// `need_reachable`, an unreachable cluster is refused; otherwise the
    /// second value says whether it answered.
    pub fn connect(
        exec: &'a Exec<'a>,
        config: &Config,
        context: Option<&str>,
        need_reachable: bool,
    ) -> Result<(Kube<'a>, bool)> {
        let kubectl = Kube::find_kubectl(exec)?;
        let context = match context {
            Some(context) => context.to_owned(),
            None => {
                let current = exec
                    .read(&Cmd::new(&kubectl).args(["config", "current-context"]))
                    .map_err(|e| refuse(format!("no current kube context: {e:#}")))?;
                if let Some(expected) = config.context.as_ref().filter(|e| **e != current) {
                    let env = config
                        .environment
                        .as_deref()
                        .map_or(String::new(), |e| format!(" for environment {e}"));
                    return Err(refuse(format!(
                        "the current kube context is {current:?} but the configuration expects {expected:?}{env}: switch context, or pass --context {current} to use it on purpose"
                    )));
                }
                current
            }
        };
        let kube = Kube {
            exec,
            kubectl,
            context: Some(context.clone()),
            namespace: config.namespace.clone(),
            lock_name: app_object(LOCK_NAME, config.app.as_deref()),
            history_name: app_object(HISTORY_NAME, config.app.as_deref()),
        };
        let version = kube.global(&["version", "--output", "json", "--request-timeout", "10s"]);
        match exec.read(&version) {
            Ok(_) => Ok((kube, true)),
            Err(e) if !need_reachable => {
                exec.output
                    .warn(&format!("cluster {context} is not reachable: {e:#}"));
                Ok((kube, false))
            }
            Err(e) => Err(refuse(format!(
                "kube context {context} is not reachable: {e:#}"
            ))),
        }
    }

    /// `kubectl [--context C] ARGS`: for cluster-wide calls. Private: every
    /// command line is a named verb below.
    fn global(&self, args: &[&str]) -> Cmd {
        let mut cmd = Cmd::new(&self.kubectl);
        if let Some(context) = &self.context {
            cmd = cmd.arg("--context").arg(context);
        }
        cmd.args(args.iter().copied())
    }

    /// `kubectl [--context C] --namespace NS ARGS`.
    fn cmd(&self, args: &[&str]) -> Cmd {
        self.global(&["--namespace", &self.namespace])
            .args(args.iter().copied())
    }

    /// The namespace's name if it exists, else nothing (bounded like the
    /// lock's calls).
    pub fn namespace_query(&self) -> Cmd {
        self.get_namespace(&self.namespace, "name")
    }

    /// `kubectl get namespace NAME --ignore-not-found -o OUTPUT`: nothing
    /// when there is none (any other failure, such as a refusal, fails).
    fn get_namespace(&self, name: &str, output: &str) -> Cmd {
        self.global(&[
            "get",
            "namespace",
            name,
            "--ignore-not-found",
            "--output",
            output,
            LOCK_REQUEST_TIMEOUT,
        ])
    }

    pub fn create_namespace(&self) -> Cmd {
        self.global(&[
            "create",
            "namespace",
            &self.namespace,
            WRITE_REQUEST_TIMEOUT,
        ])
    }

    /// `kubectl apply --server-side` of the workloads labelled `name` in
    /// the overlay. Conflicts are forced on purpose: after a `rollout undo`
    /// the image field belongs to kubectl's rollback manager, and the
    /// deploy must take it back.
    pub fn apply(&self, overlay: &str, name: &str) -> Cmd {
        self.server_side("apply", overlay)
            .args(["--selector", &format!("{NAME_LABEL}={name}")])
    }

    /// `kubectl diff --server-side` of the overlay: what an apply would change.
    pub fn diff(&self, overlay: &str) -> Cmd {
        self.server_side("diff", overlay)
    }

    /// `kubectl VERB --server-side` of the overlay, as the deploy's field
    /// manager.
    fn server_side(&self, verb: &str, overlay: &str) -> Cmd {
        self.global(&[
            verb,
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            "--force-conflicts",
            "--kustomize",
            overlay,
            WRITE_REQUEST_TIMEOUT,
        ])
    }

    /// `kubectl apply --server-side` of the objects in `path`, as the
    /// deploy's field manager: a rollback to the manifests an earlier
    /// deploy applied.
    pub fn apply_file(&self, path: &str) -> Cmd {
        self.global(&[
            "apply",
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            "--force-conflicts",
            "--filename",
            path,
            WRITE_REQUEST_TIMEOUT,
        ])
    }

    /// Deletes the objects `refs` (`kind.group/name`), waiting (bounded by
    /// `--timeout`) until they are gone.
    pub fn delete_objects(&self, refs: &[&str]) -> Cmd {
        self.cmd(&["delete"]).args(refs.iter().copied()).args([
            "--ignore-not-found",
            "--timeout=60s",
            WRITE_REQUEST_TIMEOUT,
        ])
    }

    /// The pod template of deployment `name` back to its revision
    /// `revision` (`rollout undo --to-revision`), or with none known, to
    /// the one before (a plain `rollout undo`): the rollback when no
    /// manifests were kept.
    pub fn undo(&self, name: &str, revision: Option<&String>) -> Cmd {
        let deployment = format!("deployment/{name}");
        let cmd = match revision {
            Some(revision) => self.cmd(&[
                "rollout",
                "undo",
                &deployment,
                &format!("--to-revision={revision}"),
            ]),
            None => self.cmd(&["rollout", "undo", &deployment]),
        };
        cmd.arg(WRITE_REQUEST_TIMEOUT)
    }

    /// The same kubectl and context, in namespace `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Kube<'a> {
        Kube {
            exec: self.exec,
            kubectl: self.kubectl.clone(),
            context: self.context.clone(),
            namespace: namespace.to_owned(),
            lock_name: self.lock_name.clone(),
            history_name: self.history_name.clone(),
        }
    }

    /// Namespace `name` as JSON, or nothing when there is none.
    pub fn namespace_json(&self, name: &str) -> Cmd {
        self.get_namespace(name, "json")
    }

    /// `kubectl apply --server-side` of the objects `list` holds (a
    /// `v1/List`), fed on stdin: objects the xtask makes itself (the
    /// in-cluster builder's).
    pub fn apply_objects(&self, list: &serde_json::Value) -> Cmd {
        self.apply_file("-").hidden_stdin(list.to_string())
    }

    /// Waits until deployment `name` has rolled out, up to `timeout`.
    pub fn rollout_status(&self, name: &str, timeout: &str) -> Cmd {
        self.cmd(&[
            "rollout",
            "status",
            &format!("deployment/{name}"),
            &format!("--timeout={timeout}"),
        ])
    }

    /// Deletes the namespace `name` and waits (bounded) until it is gone.
    pub fn delete_namespace(&self, name: &str) -> Cmd {
        self.global(&[
            "delete",
            "namespace",
            name,
            "--ignore-not-found",
            "--timeout=180s",
            WRITE_REQUEST_TIMEOUT,
        ])
    }

    pub fn create_configmap(&self, name: &str) -> Cmd {
        self.cmd(&["create", "configmap", name, WRITE_REQUEST_TIMEOUT])
    }

    /// A JSON merge patch of `kind/name` (a null value deletes a key).
    pub fn merge_patch(&self, kind: &str, name: &str, patch: &serde_json::Value) -> Cmd {
        self.cmd(&[
            "patch",
            kind,
            name,
            "--type",
            "merge",
            WRITE_REQUEST_TIMEOUT,
            "--patch",
            &patch.to_string(),
        ])
    }

    /// The lease `name` as JSON, or nothing when it does not exist.
    pub fn lease_get(&self, name: &str) -> Cmd {
        self.lease_call(&[
            "get",
            "lease",
            name,
            "--ignore-not-found",
            "--output",
            "json",
        ])
    }

    /// Creates (`create`) or, at the resourceVersion it carries, replaces
    /// (`replace`) the lease `lease`; prints it as written.
    pub fn lease_write(&self, verb: &str, lease: &serde_json::Value) -> Cmd {
        self.lease_call(&[verb, "--filename", "-", "--output", "json"])
            .stdin(lease.to_string())
    }

    /// A JSON patch of the lease `name`, printed as written. The patch is
    /// the one word the caller appends, as `--patch`'s value.
    pub fn lease_patch(&self, name: &str) -> Cmd {
        self.cmd(&[
            "patch",
            "lease",
            name,
            "--type",
            "json",
            "--output",
            "json",
            LOCK_REQUEST_TIMEOUT,
            "--patch",
        ])
    }

    /// Deletes the lease `name` only if it is still at `resource_version`
    /// (a delete with a precondition, which kubectl offers only raw).
    pub fn lease_delete_at(&self, name: &str, resource_version: &str) -> Cmd {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{name}",
            self.namespace
        );
        let options = serde_json::json!({
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": resource_version},
        });
        self.global(&[
            "delete",
            "--raw",
            &path,
            "--filename",
            "-",
            LOCK_REQUEST_TIMEOUT,
        ])
        .stdin(options.to_string())
    }

    /// A call of the lock: none may hang, so a deploy notices a lost lock
    /// in time.
    fn lease_call(&self, args: &[&str]) -> Cmd {
        self.cmd(args).arg(LOCK_REQUEST_TIMEOUT)
    }

    /// A read of the cluster that survives a passing API error (a
    /// restarting apiserver, a dropped connection): up to [`READ_TRIES`]
    /// tries in a row, each bounded by `--request-timeout`, then the last
    /// error. One hiccup must not end, and roll back, a deploy.
    fn read(&self, args: &[&str]) -> Result<String> {
        let cmd = self
            .cmd(args)
            .arg(format!("--request-timeout={READ_TIMEOUT_SECS}s"));
        let mut tries = 0;
        loop {
            tries += 1;
            match self.exec.read(&cmd) {
                Ok(out) => return Ok(out),
                Err(e) if tries < READ_TRIES => {
                    self.exec.output.warn(&format!(
                        "reading the cluster failed (try {tries} of {READ_TRIES}), retrying: {e:#}"
                    ));
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The objects of the kustomize base `dir`, as JSON: `kubectl
    /// kustomize` speaks only YAML, so a client-side dry run of `create`
    /// (which asks the API server only for its kinds) turns it into JSON.
    pub fn manifests(&self, dir: &str) -> Result<Vec<serde_json::Value>> {
        let yaml = self.exec.read(&kustomize(&self.kubectl, dir))?;
        self.to_objects(yaml)
            .with_context(|| format!("parsing the objects of {dir}"))
    }

    /// Rendered YAML as JSON objects (see [`Kube::manifests`]).
    pub fn to_objects(&self, yaml: String) -> Result<Vec<serde_json::Value>> {
        let json = self.exec.read(
            &self
                .global(&[
                    "create",
                    "--dry-run=client",
                    "--validate=false",
                    "--output=json",
                    "--filename=-",
                ])
                .arg(format!("--request-timeout={READ_TIMEOUT_SECS}s"))
                .hidden_stdin(yaml),
        )?;
        Ok(serde_json::Deserializer::from_str(&json)
            .into_iter()
            .collect::<Result<_, _>>()?)
    }

    /// Those of the objects `refs` (`kind.group/name`) that exist, as JSON.
    pub fn get_objects(&self, refs: &[String]) -> Result<Vec<serde_json::Value>> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["get"];
        args.extend(refs.iter().map(String::as_str));
        args.extend(["--ignore-not-found", "--output", "json"]);
        let json = self.read(&args)?;
        if json.trim().is_empty() {
            return Ok(Vec::new());
        }
        let read: serde_json::Value =
            serde_json::from_str(&json).context("parsing `kubectl get` of the deploy's objects")?;
        // One object comes back as itself, several as a List.
        Ok(match read["items"].as_array() {
            Some(items) if read["kind"] == "List" => items.clone(),
            _ => vec![read],
        })
    }

    /// `kubectl get KIND NAME -o json`, `None` when it does not exist.
    pub fn get<T: serde::de::DeserializeOwned>(&self, kind: &str, name: &str) -> Result<Option<T>> {
        let json = self.read(&["get", kind, name, "--ignore-not-found", "--output", "json"])?;
        if json.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&json)
            .with_context(|| format!("parsing `kubectl get {kind} {name}`"))
            .map(Some)
    }

    /// The pods of `deployment`, by its own selector: another app's pods
    /// in the namespace may carry the same name label.
    pub fn pods(&self, deployment: &Deployment) -> Result<Vec<Pod>> {
        #[derive(Deserialize)]
        struct List {
            items: Vec<Pod>,
        }
        let selector = selector_of(deployment);
        let json = self.read(&["get", "pods", "--selector", &selector, "--output", "json"])?;
        let list: List = serde_json::from_str(&json).context("parsing `kubectl get pods`")?;
        Ok(list.items)
    }

    /// The `pod-template-hash` of `deployment`'s current ReplicaSet (the
    /// one it owns of its current revision): its pods are the rollout's,
    /// and an older ReplicaSet's are not, even with the same digest. None
    /// until the controller has seen the current generation and made it.
    pub fn template_hash(&self, deployment: &Deployment) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct List {
            items: Vec<ReplicaSet>,
        }
        let Some(revision) = deployment
            .revision()
            .filter(|_| deployment.status.observed_generation >= deployment.metadata.generation)
        else {
            return Ok(None);
        };
        let selector = selector_of(deployment);
        let json = self.read(&[
            "get",
            "replicasets",
            "--selector",
            &selector,
            "--output",
            "json",
        ])?;
        let list: List =
            serde_json::from_str(&json).context("parsing `kubectl get replicasets`")?;
        Ok(list
            .items
            .into_iter()
            .find(|set| {
                let owned = set
                    .metadata
                    .owner_references
                    .iter()
                    .any(|owner| owner.uid == deployment.metadata.uid);
                owned && set.metadata.annotations.get(CONTROLLER_REVISION) == Some(&revision)
            })
            .and_then(|set| set.metadata.labels.get(TEMPLATE_HASH_LABEL).cloned()))
    }

    /// A pod's recent Warning events, oldest first, one `reason: message`
    /// line each, for failure messages.
    pub fn warning_events(&self, pod: &str) -> String {
        #[derive(Deserialize)]
        struct Events {
            items: Vec<Event>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Event {
            #[serde(default)]
            reason: String,
            #[serde(default)]
            message: String,
            #[serde(default)]
            count: Option<i64>,
        }
        let selector = format!("involvedObject.kind=Pod,involvedObject.name={pod},type=Warning");
        let events = self
            .exec
            .read(&self.cmd(&[
                "get",
                "events",
                "--field-selector",
                &selector,
                "--output",
                "json",
                &format!("--request-timeout={READ_TIMEOUT_SECS}s"),
            ]))
            .ok()
            .and_then(|json| serde_json::from_str::<Events>(&json).ok());
        let Some(events) = events.filter(|e| !e.items.is_empty()) else {
            return "(none)".into();
        };
        let lines: Vec<String> = events
            .items
            .iter()
            .rev()
            .take(5)
            .rev()
            .map(|e| match e.count {
                Some(n) if n > 1 => format!("{}: {} (x{n})", e.reason, e.message.trim()),
                _ => format!("{}: {}", e.reason, e.message.trim()),
            })
            .collect();
        lines.join("\n")
    }

    /// The last log lines of a pod's container, for failure messages.
    pub fn logs(&self, pod: &str) -> String {
        self.exec
            .read_all(&self.cmd(&[
                "logs",
                pod,
                "--all-containers",
                "--tail",
                "20",
                &format!("--request-timeout={READ_TIMEOUT_SECS}s"),
            ]))
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    }
}
