//! `cargo xtask build` on tiny fixture repositories against the real Docker
//! engine, BuildKit and registry: seconds per test.

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;

/// A fixture repository whose one image records the revision it was built
/// from, as the real services do; what it pushes is deleted with it.
fn fixture(image: &str) -> FixtureRepo {
    require_docker();
    let dir = TempDir::new("build");
    let root = dir.path();
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[workspace]\nmembers = []\n\n[workspace.metadata.xtask]\nregistry = \"{}/fixtures\"\nsource = \"https://example.com/fixture\"\n\n[[workspace.metadata.xtask.images]]\nname = \"{image}\"\ndockerfile = \"Dockerfile\"\n",
            registry()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        "ARG BASE_REGISTRY=docker.io/library\nFROM ${BASE_REGISTRY}/debian:bookworm-slim\nARG GIT_REVISION=unknown\nRUN echo \"$GIT_REVISION\" > /revision\nCMD [\"cat\", \"/revision\"]\n",
    )
    .unwrap();
    std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
    std::fs::write(root.join("app.txt"), format!("{}\n", unique("content"))).unwrap();
    init_repo(root);
    commit_all(root, "fixture");
    FixtureRepo::new(dir, &[format!("{}/fixtures/{image}", registry())])
}

/// An image's own revision is the last commit that changed its inputs: a
/// commit elsewhere leaves it where it was, and the build says so. A
/// shallow clone, whose history is cut, is refused before anything is
/// built.
#[test]
fn an_images_inputs_revision_is_the_last_commit_that_changed_them() {
    let image = unique("since");
    let repo = fixture(&image);
    let root = repo.path();
    std::fs::write(
        root.join("Cargo.toml"),
        std::fs::read_to_string(root.join("Cargo.toml")).unwrap() + "inputs = [\"app.txt\"]\n",
    )
    .unwrap();
    std::fs::write(root.join("app.txt"), "the last change to an input\n").unwrap();
    let changed = commit_all(root, "declare the inputs and change one");
    std::fs::write(root.join("notes.txt"), "not an input\n").unwrap();
    let head = commit_all(root, "a commit outside the inputs");

    let run = xtask(root, &["build", "--json"], &[]);
    run.assert_ok();
    let events = parse_events(&run.stdout);
    let built = &events_of(&events, "image_built")[0];
    assert_eq!(built["revision"], head.as_str());
    assert_eq!(built["inputs_revision"], changed.as_str());
    assert!(
        run.stderr
            .contains(&format!("(inputs unchanged since {})", &changed[..12])),
        "{}",
        run.stderr
    );

    std::fs::write(root.join("app.txt"), "changed\n").unwrap();
    let head = commit_all(root, "change an input");
    xtask(root, &["build"], &[]).assert_ok();
    assert_eq!(
        build_file(root)["images"][0]["inputs_revision"],
        head.as_str()
    );

    let shallow = TempDir::new("shallow");
    ok(
        root,
        "git",
        &[
            "clone",
            "--quiet",
            "--depth",
            "1",
            &format!("file://{}", root.display()),
            &shallow.path().display().to_string(),
        ],
    );
    let refused = xtask(shallow.path(), &["build", "--push"], &[]);
    refused.assert_fails(2, "fetch-depth: 0");
    assert!(
        !refused.stderr.contains("docker buildx bake"),
        "{}",
        refused.stderr
    );
}

#[test]
fn fresh_build_pushes_sha_tag_with_labels_and_digest() {
    let image = unique("fresh");
    let repo = fixture(&image);
    let root = repo.path();
    let head = git(root, &["rev-parse", "HEAD"]);
    let short = &head[..12];

    let run = xtask(root, &["build", "--push"], &[]);
    run.assert_ok();
    assert!(
        run.stderr.contains("--no-cache --pull"),
        "fresh by default:\n{}",
        run.stderr
    );

    let file = build_file(root);
    assert_eq!(file["revision"], head);
    let built = &file["images"][0];
    assert_eq!(built["name"], image.as_str());
    // `<12-hex revision>-<8-hex input key>`, the key whole in a label.
    let key = built["key"]
        .as_str()
        .expect("a clean build has an input key");
    assert_eq!(key.len(), 64, "{key}");
    let tag = format!("{short}-{}", &key[..8]);
    assert_eq!(built["tag"], tag.as_str());
    assert_eq!(
        built["reference"],
        format!("{}/fixtures/{image}:{tag}", registry())
    );
    let digest = built["digest"].as_str().expect("a digest after --push");
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(
        run.stderr.contains(digest),
        "digests are printed at the end"
    );

    // The registry serves that digest under its tag and under :latest.
    let repository = format!("fixtures/{image}");
    assert_eq!(registry_digest(&repository, &tag).as_deref(), Some(digest));
    assert_eq!(
        registry_digest(&repository, "latest").as_deref(),
        Some(digest)
    );

    // Labels and the baked-in revision both say HEAD.
    let pinned = format!("{}/{repository}@{digest}", registry());
    ok(root, "docker", &["pull", "--quiet", &pinned]);
    let labels: serde_json::Value = serde_json::from_str(&ok(
        root,
        "docker",
        &[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &pinned,
        ],
    ))
    .unwrap();
    assert_eq!(labels["org.opencontainers.image.revision"], head);
    assert_eq!(labels["org.opencontainers.image.version"], tag.as_str());
    assert_eq!(labels["org.aiq.xtask.input-key"], key);
    assert_eq!(labels["org.opencontainers.image.title"], image.as_str());
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://example.com/fixture"
    );
    let commit_time = git(root, &["show", "-s", "--format=%cI", "HEAD"]);
    let created = labels["org.opencontainers.image.created"].as_str().unwrap();
    assert!(
        commit_time.starts_with(&created[..16]),
        "created {created} is the commit time {commit_time}"
    );
    assert_eq!(ok(root, "docker", &["run", "--rm", &pinned]), head);
}

#[test]
fn dirty_tree_is_refused_and_nothing_is_built_or_pushed() {
    let image = unique("dirty");
    let repo = fixture(&image);
    let root = repo.path();
    let short = git(root, &["rev-parse", "--short=12", "HEAD"]);
    std::fs::write(root.join("app.txt"), "changed\n").unwrap();

    let run = xtask(root, &["build", "--push"], &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let error = run.stderr.lines().last().unwrap();
    assert!(
        error.contains("uncommitted changes (app.txt)") && error.contains("--allow-dirty"),
        "{error}"
    );
    assert!(
        !run.stderr.contains("docker buildx bake"),
        "nothing may start: {}",
        run.stderr
    );
    assert_eq!(registry_digest(&format!("fixtures/{image}"), &short), None);
    assert!(!root.join("target/xtask/build.json").exists());

    // An untracked file counts as dirty too.
    git(root, &["checkout", "--", "app.txt"]);
    std::fs::write(root.join("new.txt"), "x").unwrap();
    assert_eq!(xtask(root, &["build", "--dry-run"], &[]).code, 2);
}

#[test]
fn allow_dirty_tags_the_build_as_dirty_and_leaves_latest_alone() {
    let image = unique("allowdirty");
    let repo = fixture(&image);
    let root = repo.path();
    let head = git(root, &["rev-parse", "HEAD"]);
    xtask(root, &["build", "--push", "--cache"], &[]).assert_ok();
    let repository = format!("fixtures/{image}");
    let latest = registry_digest(&repository, "latest").expect(":latest pushed by the clean build");

    std::fs::write(root.join("app.txt"), "uncommitted\n").unwrap();
    xtask(root, &["build", "--push", "--allow-dirty", "--cache"], &[]).assert_ok();
    let file = build_file(root);
    let tag = file["images"][0]["tag"].as_str().unwrap().to_owned();
    let (sha, hash) = tag.split_once("-dirty-").expect("a dirty tag");
    assert_eq!(sha, &head[..12]);
    assert_eq!(hash.len(), 8);
    assert_eq!(file["images"][0]["dirty"], true);
    assert!(registry_digest(&repository, &tag).is_some());
    assert_eq!(
        registry_digest(&repository, "latest"),
        Some(latest),
        "a dirty build never moves :latest"
    );

    // The same uncommitted state gives the same tag; another gives another.
    let again = xtask(
        root,
        &["build", "--dry-run", "--allow-dirty", "--cache"],
        &[],
    );
    assert!(again.stdout.contains(&tag), "{}", again.stdout);
    std::fs::write(root.join("app.txt"), "other\n").unwrap();
    let other = xtask(
        root,
        &["build", "--dry-run", "--allow-dirty", "--cache"],
        &[],
    );
    assert!(
        !other.stdout.contains(&tag) && other.stdout.contains("-dirty-"),
        "{}",
        other.stdout
    );
}

#[test]
fn dry_run_prints_quoted_commands_and_runs_nothing() {
    let image = unique("dry");
    let repo = fixture(&image);
    let root = repo.path();
    let short = git(root, &["rev-parse", "--short=12", "HEAD"]);

    let fresh = xtask(root, &["build", "--push", "--dry-run"], &[]);
    fresh.assert_ok();
    // The commit's export, then the bake (the builder exists already:
    // `cargo xtask test` made it).
    let lines: Vec<&str> = fresh.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "three commands: {}", fresh.stdout);
    assert!(
        lines[0].starts_with("$ git -C ") && lines[0].contains(" archive "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("$ tar -x --touch -p -f "),
        "{}",
        lines[1]
    );
    let line = lines[2];
    assert!(line.starts_with("$ docker buildx bake "), "{line}");
    for expected in [
        "--no-cache",
        "--pull",
        "--provenance=false",
        "--builder xtask-buildkit-",
        "push=true,rewrite-timestamp=true",
        &format!("{image}.tags={}/fixtures/{image}:{short}", registry()),
    ] {
        assert!(line.contains(expected), "{expected} missing from {line}");
    }
    // Each line is valid shell; the bake names the file the dry run wrote.
    for line in &lines {
        let check = run(root, "sh", &["-n", "-c", &line[2..]]);
        assert!(check.status.success(), "{line}");
    }
    assert!(root.join("target/xtask/bake.json").exists());
    assert!(
        !root.join("target/xtask/context").exists(),
        "a dry run exports nothing"
    );
    assert_eq!(
        registry_digest(&format!("fixtures/{image}"), &short),
        None,
        "a dry run pushes nothing"
    );

    // Each printed its bake (an error prints none, so absence alone
    // proves nothing): what is absent is absent from a real command.
    let bake_line = |run: &XtaskRun| -> String {
        run.assert_ok();
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with("$ docker buildx bake "))
            .unwrap_or_else(|| panic!("no bake printed: {}", run.stdout));
        assert!(line.contains(&format!("{image}.tags=")), "{line}");
        line.to_owned()
    };
    let cached = bake_line(&xtask(root, &["build", "--cache", "--dry-run"], &[]));
    assert!(
        !cached.contains("--no-cache") && !cached.contains("--pull"),
        "{cached}"
    );
    let env_cached = bake_line(&xtask(
        root,
        &["build", "--dry-run"],
        &[("USE_CACHE", "true")],
    ));
    assert!(
        !env_cached.contains("--no-cache"),
        "USE_CACHE=true means --cache: {env_cached}"
    );
    let no_latest = bake_line(&xtask(root, &["build", "--dry-run", "--no-latest"], &[]));
    assert!(
        !no_latest.contains(":latest") && no_latest.contains(&format!(":{short}")),
        "{no_latest}"
    );
    let env_registry = xtask(
        root,
        &["build", "--dry-run"],
        &[("XTASK_REGISTRY", "ghcr.io/acme")],
    );
    assert!(
        env_registry
            .stdout
            .contains(&format!("ghcr.io/acme/{image}:{short}")),
        "{}",
        env_registry.stdout
    );
    let flag_registry = xtask(
        root,
        &["build", "--dry-run", "--registry", "example.com/x"],
        &[("XTASK_REGISTRY", "ghcr.io/acme")],
    );
    assert!(
        flag_registry
            .stdout
            .contains(&format!("example.com/x/{image}:{short}")),
        "{}",
        flag_registry.stdout
    );
}

#[test]
fn bad_input_gets_one_line_and_exit_2() {
    let image = unique("bad");
    let repo = fixture(&image);
    let root = repo.path();

    let unknown = xtask(root, &["build", "nope", "--dry-run"], &[]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.trim_end().ends_with(&format!(
            "error: unknown image \"nope\"; known images: {image}"
        )),
        "{}",
        unknown.stderr
    );

    let flag = xtask(root, &["build", "--frobnicate"], &[]);
    assert_eq!(flag.code, 2);
    assert!(flag.stderr.contains("--frobnicate"));

    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        manifest.replace("dockerfile =", "dockerfle ="),
    )
    .unwrap();
    let malformed = xtask(root, &["build", "--dry-run", "--allow-dirty"], &[]);
    assert_eq!(malformed.code, 2);
    assert!(
        malformed
            .stderr
            .contains("invalid [workspace.metadata.xtask]")
            && malformed.stderr.contains("dockerfle"),
        "{}",
        malformed.stderr
    );
    assert!(malformed.stdout.is_empty());
}

#[test]
fn missing_docker_is_named_before_anything_starts() {
    let repo = fixture(&unique("nodocker"));
    let root = repo.path();
    // A PATH with git but no docker.
    let bin = TempDir::new("bin");
    let git_path = which_path("git");
    std::os::unix::fs::symlink(git_path, bin.path().join("git")).unwrap();
    let path = bin.path().display().to_string();
    let run = xtask(root, &["build"], &[("PATH", &path)]);
    run.assert_fails(2, "`docker` not found on PATH");
}

fn which_path(program: &str) -> String {
    ok(
        std::path::Path::new("."),
        "sh",
        &["-c", &format!("command -v {program}")],
    )
}

#[test]
fn a_base_image_that_cannot_be_pulled_is_named_with_the_fix() {
    let repo = fixture(&unique("nobase"));
    let root = repo.path();
    let run = xtask(
        root,
        &["build"],
        &[(
            "XTASK_BASE_REGISTRY",
            &format!("{}/no-such-mirror", registry()),
        )],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    let error = run.stderr.lines().last().unwrap();
    assert!(
        error.contains("no-such-mirror/debian:bookworm-slim cannot be pulled")
            && error.contains("XTASK_BASE_REGISTRY"),
        "{error}"
    );
}

#[test]
fn build_json_streams_only_documented_events_on_stdout() {
    let image = unique("json");
    let repo = fixture(&image);
    let root = repo.path();
    let run = xtask(root, &["build", "--push", "--json"], &[]);
    run.assert_ok();
    let events = parse_events(&run.stdout);
    let pushed = events_of(&events, "image_pushed");
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0]["digest"], build_file(root)["images"][0]["digest"]);
    let bake = events_of(&events, "command")
        .into_iter()
        .find(|c| {
            c["line"]
                .as_str()
                .unwrap()
                .starts_with("docker buildx bake")
        })
        .expect("the bake command is an event");
    assert_eq!(bake["dry_run"], false);
    assert!(bake["argv"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--no-cache"));
    let finished = events_of(&events, "step_finished");
    assert!(finished
        .iter()
        .all(|s| s["outcome"] == "done" && s["seconds"].is_f64()));
    assert_eq!(finished.len(), events_of(&events, "step_started").len());
    let result = events.last().unwrap();
    assert_eq!(result["ok"], true);
    assert_eq!(result["exit_code"], 0);
    // Human output and BuildKit's progress went to stderr.
    assert!(
        run.stderr.contains("$ docker buildx bake"),
        "{}",
        run.stderr
    );

    // A refusal is a result event too, with its exit code and message.
    std::fs::write(root.join("app.txt"), "dirty").unwrap();
    let refused = xtask(root, &["build", "--json"], &[]);
    assert_eq!(refused.code, 2);
    let events = parse_events(&refused.stdout);
    let result = events.last().unwrap();
    assert_eq!(result["exit_code"], 2);
    assert!(result["error"]
        .as_str()
        .unwrap()
        .contains("uncommitted changes"));
}

/// The flaky-registry fixture in front of the test registry; stopped when
/// dropped.
struct FlakyRegistry {
    child: std::process::Child,
    address: String,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl FlakyRegistry {
    fn start(flags: &[&str]) -> FlakyRegistry {
        use std::io::BufRead;
        let port = free_port();
        let dir = TempDir::new("flaky");
        let log = dir.path().join("requests.log");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flaky-registry");
        let mut child = std::process::Command::new(script)
            .arg(port.to_string())
            .arg(registry())
            .arg(&log)
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the flaky registry");
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        FlakyRegistry {
            child,
            address: format!("127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    /// How many requests matched `method path-fragment status`.
    fn count(&self, method: &str, fragment: &str, status: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let words: Vec<&str> = l.split(' ').collect();
                words[0] == method && words[1].contains(fragment) && words[2] == status
            })
            .count()
    }
}

impl Drop for FlakyRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_registry_hiccup_is_retried_from_this_builds_cache() {
    let image = unique("flaky");
    let repo = fixture(&image);
    let root = repo.path();
    // BuildKit retries a hiccup itself (a 503 answered to its first of four
    // tries, each two PUTs); a registry down for longer than those ~7 s
    // is retried by the xtask, from this build's cache.
    let flaky = FlakyRegistry::start(&["--fail-manifest-puts", "8"]);
    let registry_flag = format!("{}/fixtures", flaky.address);
    let run = xtask(
        root,
        &["build", "--push", "--registry", &registry_flag],
        &[],
    );
    run.assert_ok();
    assert!(
        run.stderr.contains("503 Service Unavailable")
            && run
                .stderr
                .contains("attempt 1 of 3); retrying in 2s from this build's cache"),
        "{}",
        run.stderr
    );
    let bakes: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("$ docker buildx bake"))
        .collect();
    assert_eq!(bakes.len(), 2, "{bakes:?}");
    assert!(
        bakes[0].contains("--no-cache --pull"),
        "the first build is fresh"
    );
    assert!(
        !bakes[1].contains("--no-cache") && bakes[1].contains("--pull"),
        "the retry reuses what was just built, from the same base"
    );
    assert_eq!(flaky.count("PUT", "/manifests/", "503"), 8);
    let file = build_file(root);
    let digest = file["images"][0]["digest"].as_str().unwrap();
    let tag = file["images"][0]["tag"].as_str().unwrap();
    assert_eq!(
        registry_digest(&format!("fixtures/{image}"), tag).as_deref(),
        Some(digest)
    );
}

#[test]
fn immutable_tags_skip_latest_and_refuse_another_build_under_a_sha_tag() {
    let image = unique("immutable");
    let repo = fixture(&image);
    let root = repo.path();
    // The image depends on the build secret, as the frontend's does.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        format!("{dockerfile}RUN --mount=type=secret,id=build_key sha256sum /run/secrets/build_key > /build-key.sum\n"),
    )
    .unwrap();
    commit_all(root, "the image depends on the build secret");
    let flaky = FlakyRegistry::start(&["--immutable"]);
    let registry_flag = format!("{}/fixtures", flaky.address);
    let push = ["build", "--push", "--registry", registry_flag.as_str()];
    xtask(root, &push, &[]).assert_ok();
    let repository = format!("fixtures/{image}");
    let first_latest = registry_digest(&repository, "latest").unwrap();

    // A new commit: :latest exists and cannot move.
    std::fs::write(root.join("app.txt"), "second").unwrap();
    let second = commit_all(root, "second");
    let run = xtask(root, &push, &[]);
    run.assert_ok();
    assert!(
        run.stderr
            .contains("cannot be overwritten because the repository is immutable")
            && run.stderr.contains("pushing again without :latest"),
        "{}",
        run.stderr
    );
    assert_eq!(
        registry_digest(&repository, "latest").unwrap(),
        first_latest
    );
    let (tag, digest) = tag_and_digest(root);
    assert!(tag.starts_with(&second[..12]), "{tag}");
    assert_eq!(
        registry_digest(&repository, &tag).as_deref(),
        Some(digest.as_str()),
        "the tag holds the build recorded in build.json"
    );

    // The same commit with another build secret (which the image depends
    // on) has another input key, so another tag: nothing to overwrite.
    let other_secret = TempDir::new("secret");
    let secret_file = other_secret.path().join("key");
    std::fs::write(&secret_file, [7u8; 32]).unwrap();
    let other = xtask(
        root,
        &push,
        &[("XTASK_BUILD_SECRET", secret_file.to_str().unwrap())],
    );
    other.assert_ok();
    let (other_tag, other_digest) = tag_and_digest(root);
    assert!(other_tag != tag && other_digest != digest, "{other_tag}");
    assert_eq!(
        registry_digest(&repository, &tag).as_deref(),
        Some(digest.as_str()),
        "the first build is untouched"
    );
    // The same inputs again: the image is reused, not built.
    let again = xtask(root, &push, &[]);
    again.assert_ok();
    assert!(
        again.stderr.contains(&format!(
            "reused {}/{repository}:{tag}@{digest}",
            flaky.address
        )) && !again.stderr.contains("docker buildx bake"),
        "{}",
        again.stderr
    );
    assert_eq!(tag_and_digest(root), (tag.clone(), digest.clone()));
    // `--rebuild` builds it anyway: byte for byte the published build.
    let rebuild = [push.as_slice(), &["--rebuild"]].concat();
    let rebuilt = xtask(root, &rebuild, &[]);
    rebuilt.assert_ok();
    assert!(
        rebuilt.stderr.contains("--no-cache --pull") && !rebuilt.stderr.contains("reused"),
        "{}",
        rebuilt.stderr
    );
    assert_eq!(tag_and_digest(root), (tag, digest));

    // An image that is not reproducible (it records random bytes): a
    // rebuild under the same key is another build, refused, the published
    // one untouched.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    std::fs::write(
        root.join("Dockerfile"),
        format!("{dockerfile}RUN head -c 16 /dev/urandom > /nonce\n"),
    )
    .unwrap();
    commit_all(root, "not reproducible");
    xtask(root, &push, &[]).assert_ok();
    let (tag, digest) = tag_and_digest(root);
    xtask(root, &rebuild, &[]).assert_fails(1, "already exists with another build");
    assert_eq!(
        registry_digest(&repository, &tag).as_deref(),
        Some(digest.as_str()),
        "the published build is untouched"
    );
}

/// The tag and digest `build.json` records for the fixture's image.
fn tag_and_digest(root: &std::path::Path) -> (String, String) {
    let file = build_file(root);
    let image = &file["images"][0];
    (
        image["tag"].as_str().unwrap().to_owned(),
        image["digest"].as_str().unwrap().to_owned(),
    )
}

/// Runs the xtask on a pseudo-terminal (util-linux `script`), as a person
/// at a terminal would; returns what the terminal showed.
fn on_terminal(root: &std::path::Path, args: &str, env: &[(&str, &str)]) -> String {
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_xtask"));
    let mut cmd = std::process::Command::new("script");
    cmd.args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .current_dir(root)
        .env_remove("CI")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running script(1)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn colour_only_on_a_terminal_without_ci_or_no_color() {
    let repo = fixture(&unique("colour"));
    let root = repo.path();
    let escape = "\u{1b}[";
    let terminal = on_terminal(root, "build --dry-run", &[]);
    assert!(
        terminal.contains(&format!("{escape}1m[1] preflight")),
        "bold step lines on a terminal: {terminal:?}"
    );
    for (key, value) in [("NO_COLOR", "1"), ("CI", "true")] {
        let plain = on_terminal(root, "build --dry-run", &[(key, value)]);
        assert!(plain.contains("[1] preflight"), "{plain:?}");
        assert!(!plain.contains(escape), "{key} set: plain lines: {plain:?}");
        assert!(
            plain.contains("--progress=plain"),
            "BuildKit plain too: {plain:?}"
        );
    }
    // Not a terminal: plain, whatever the environment.
    let piped = xtask(root, &["build", "--dry-run"], &[]);
    assert!(!piped.stderr.contains(escape) && !piped.stdout.contains(escape));
    assert!(piped.stdout.contains("--progress=plain"));
}

#[test]
fn a_registry_that_is_down_or_wants_a_login_is_refused_before_anything_is_built() {
    let repo = fixture(&unique("login"));
    let root = repo.path();
    // Nothing listens: refused at once, nothing built.
    let closed = free_port();
    let started = std::time::Instant::now();
    let down = xtask(
        root,
        &[
            "build",
            "--push",
            "--registry",
            &format!("127.0.0.1:{closed}/team"),
        ],
        &[],
    );
    down.assert_fails(
        2,
        &format!("the registry 127.0.0.1:{closed} does not answer"),
    );
    assert!(
        !down.stderr.contains("docker buildx bake"),
        "{}",
        down.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // A registry that wants a login, from an empty Docker config: refused;
    // with a wrong password: refused; with the right one: pushed.
    let login = LoginRegistry::start();
    let registry_flag = format!("{}/team", login.address);
    let docker_config = TempDir::new("docker-config");
    let config_dir = docker_config.path().display().to_string();
    let env = [("DOCKER_CONFIG", config_dir.as_str())];
    let build = || {
        xtask(
            root,
            &["build", "--push", "--registry", &registry_flag],
            &env,
        )
    };
    let none = build();
    none.assert_fails(2, "wants a login and Docker has none for it");
    assert!(
        !none.stderr.contains("docker buildx bake"),
        "{}",
        none.stderr
    );
    let auths = |password: &str| {
        let token = ok(
            root,
            "sh",
            &["-c", &format!("printf '%s' 'ci:{password}' | base64")],
        );
        serde_json::json!({"auths": {login.address.clone(): {"auth": token}}}).to_string()
    };
    std::fs::write(docker_config.path().join("config.json"), auths("wrong")).unwrap();
    build().assert_fails(2, "refuses Docker's login for it (HTTP 401)");
    std::fs::write(docker_config.path().join("config.json"), auths("s3cret")).unwrap();
    build().assert_ok();
}

#[test]
fn a_registry_login_is_one_echoed_pipeline_that_never_shows_the_password() {
    let repo = fixture(&unique("pipe"));
    let root = repo.path();
    let aws = fake_aws();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let with_login = manifest.replacen("source = ", &format!("{}\nsource = ", fake_aws_login()), 1);
    std::fs::write(root.join("Cargo.toml"), with_login).unwrap();
    commit_all(root, "log in with a password command");
    let login = LoginRegistry::start();
    let registry_flag = format!("{}/team", login.address);
    let docker_config = TempDir::new("docker-config");
    let config_dir = docker_config.path().display().to_string();
    let env = [("DOCKER_CONFIG", config_dir.as_str())];
    let pipeline = format!(
        "{} ecr get-login-password | docker login --username ci --password-stdin {}",
        aws.display(),
        login.address
    );

    // A dry run prints the pipeline as one command, with its event.
    let dry = xtask(
        root,
        &[
            "build",
            "--push",
            "--dry-run",
            "--json",
            "--registry",
            &registry_flag,
        ],
        &env,
    );
    dry.assert_ok();
    let events = parse_events(&dry.stdout);
    let commands = events_of(&events, "command");
    let piped = commands
        .iter()
        .find(|c| c["line"] == pipeline.as_str())
        .unwrap_or_else(|| panic!("no login command event: {}", dry.stdout));
    assert_eq!(piped["dry_run"], true);
    assert!(piped["argv"].as_array().unwrap().iter().any(|a| a == "|"));

    // For real: echoed once on stderr, logged in, pushed; the password is
    // nowhere in the output.
    let real = xtask(
        root,
        &["build", "--push", "--registry", &registry_flag],
        &env,
    );
    real.assert_ok();
    assert_eq!(
        real.stderr.matches(&format!("$ {pipeline}")).count(),
        1,
        "{}",
        real.stderr
    );
    assert!(!real.stderr.contains("s3cret") && !real.stdout.contains("s3cret"));
}

#[test]
fn a_dry_run_shows_the_local_registry_start_as_a_command() {
    let repo = fixture(&unique("registry-start"));
    // A network namespace of its own: nothing answers on 127.0.0.1:5000
    // there, so the local registry would be started; Docker still answers
    // on its socket.
    let out = run(
        repo.path(),
        "unshare",
        &[
            "--net",
            env!("CARGO_BIN_EXE_xtask"),
            "mirror",
            "--dry-run",
            "--json",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = parse_events(&stdout);
    let start = events_of(&events, "command")
        .into_iter()
        .find(|c| {
            let argv = c["argv"].as_array().unwrap();
            argv[0] == "docker-registry" || argv.iter().any(|a| a == "registry:2")
        })
        .unwrap_or_else(|| panic!("no registry start among the commands: {stdout}"));
    assert_eq!(start["dry_run"], true);
    assert!(
        start["line"]
            .as_str()
            .unwrap()
            .starts_with(start["argv"][0].as_str().unwrap()),
        "{start}"
    );
}

/// The pinned builder's BuildKit collects its own garbage under the
/// configured size (`build_cache_gb`, 10 by default): asked of BuildKit
/// itself, whose workers report the policies they run.
#[test]
fn the_pinned_builder_keeps_its_build_cache_under_the_configured_size() {
    require_docker();
    let container = "buildx_buildkit_xtask-buildkit-v0-34-20";
    let workers = ok(
        std::path::Path::new("."),
        "docker",
        &[
            "exec",
            container,
            "buildctl",
            "debug",
            "workers",
            "--format",
            "{{json .}}",
        ],
    );
    // One JSON array of workers, each with the policies it collects by.
    let workers_json: serde_json::Value = serde_json::from_str(&workers).unwrap();
    let limits: Vec<i64> = workers_json
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["gcPolicy"].as_array().cloned().unwrap_or_default())
        .map(|p| p["maxUsedSpace"].as_i64().unwrap_or(0))
        .collect();
    // "10GB" as BuildKit reads it (binary units); unconfigured, it would
    // allow 60 % of this disk.
    let configured = [10 << 30, 10_000_000_000];
    let largest = limits.iter().copied().max().unwrap_or(0);
    assert!(
        configured.contains(&largest),
        "GC policies' max used space: {limits:?} ({workers})"
    );
}

/// `builder up` without `--in-cluster`: the pinned BuildKit in a container
/// of its own reached over mutual TLS, a buildx `remote` builder for it;
/// a build on it gives the pinned builder's digest; `builder down`
/// removes the container, the builder and the certificates.
#[test]
fn a_local_builder_over_mutual_tls_gives_the_pinned_builders_digest_and_goes_away() {
    let image = unique("tls");
    let repo = fixture(&image);
    let root = repo.path();
    let name = unique("localbk");
    let address = format!("127.0.0.1:{}", free_port());
    let down = || xtask(root, &["builder", "down", "--name", &name], &[]);
    struct Down<F: Fn() -> XtaskRun>(F);
    impl<F: Fn() -> XtaskRun> Drop for Down<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _down = Down(down);
    let up = xtask(
        root,
        &["builder", "up", "--name", &name, "--address", &address],
        &[],
    );
    up.assert_ok();
    assert_eq!(up.stdout.trim(), format!("BUILDER={name}"), "{}", up.stderr);
    let dir = xtask_cache().join(format!("builders/{name}"));
    // A name still recorded, and one that is not a file name, are refused.
    xtask(root, &["builder", "up", "--name", &name], &[]).assert_fails(2, "still recorded");
    xtask(root, &["builder", "down", "--name", ".."], &[]).assert_fails(2, "--name \"..\"");
    // Without the client's certificate buildkitd refuses: a builder that
    // trusts its CA but has no certificate of its own cannot start.
    let stranger = unique("nocert");
    ok(
        root,
        "docker",
        &[
            "buildx",
            "create",
            "--name",
            &stranger,
            "--driver",
            "remote",
            "--driver-opt",
            &format!("cacert={}", dir.join("ca.crt").display()),
            "--driver-opt",
            "servername=127.0.0.1",
            &format!("tcp://{address}"),
        ],
    );
    let refused = run(
        root,
        "timeout",
        &[
            "60",
            "docker",
            "buildx",
            "inspect",
            "--bootstrap",
            &stranger,
        ],
    );
    let _ = run(root, "docker", &["buildx", "rm", "--force", &stranger]);
    assert!(
        !refused.status.success(),
        "a client without a certificate reached buildkitd"
    );

    xtask(root, &["build", "--push"], &[]).assert_ok();
    let pinned = build_digests(root);
    std::fs::remove_file(root.join("target/xtask/build.json")).unwrap();
    let remote = xtask(
        root,
        &["build", "--push", "--rebuild", "--builder", &name],
        &[],
    );
    remote.assert_ok();
    assert!(
        remote.stderr.contains(&format!("--builder {name}")),
        "{}",
        remote.stderr
    );
    assert_eq!(
        build_digests(root),
        pinned,
        "the same image on both builders"
    );

    let container = format!("xtask-buildkitd-{name}");
    assert!(dir.join("client.key").exists());
    xtask(root, &["builder", "down", "--name", &name], &[]).assert_ok();
    let gone = |args: &[&str]| !run(root, "docker", args).status.success();
    assert!(gone(&["container", "inspect", &container]));
    assert!(gone(&["buildx", "inspect", &name]));
    assert!(!dir.exists());
}
