//! `cargo xtask bench`: times the classic fresh script against the xtask's
//! fresh bake (online and with no network), the host floor, the cached dev
//! loop for each service and the xtask's own overhead, side by side in one
//! run, in a temporary clone of HEAD.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::{
    config::{Config, Overrides},
    deps, docker,
    exec::{Cmd, Exec},
    git,
};

/// Benchmark fresh and cached builds; writes BENCHMARKS.md and target/xtask/bench.json
#[derive(Args, Debug)]
pub struct Bench {
    /// Alternating rounds of the classic script (A) and `cargo xtask build` (B)
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Runs of the cached dev loop (D1, D2), each after a new one-line commit
    #[arg(long, default_value_t = 3)]
    pub cached_runs: usize,
    /// Only the commit-to-live benchmark, on the cluster of this kube context
    /// (the seed's script against `cargo xtask deploy`, --rounds times)
    #[arg(long, value_name = "CONTEXT")]
    pub deploy: Option<String>,
}

#[derive(Serialize)]
pub struct Measurement {
    name: &'static str,
    what: &'static str,
    command: String,
    seconds: Vec<f64>,
    median: f64,
}

impl Bench {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let config = Config::load(exec, &Overrides::default())?;
        exec.sh.change_dir(&config.root);
        docker::preflight(exec)?;
        // The clone holds HEAD whatever the working tree has.
        let rev = git::revision(exec, true)?;
        let work = exec
            .env
            .temp_dir()
            .join(format!("xtask-bench-{}", std::process::id()));
        let clone = work.join("repo");
        let _cleanup = RemoveOnDrop(work.clone());
        exec.run(
            &Cmd::new("git")
                .args(["clone", "--quiet"])
                .arg(config.root.display().to_string())
                .arg(clone.display().to_string()),
        )?;
        let _in_clone = exec.sh.push_dir(&clone);
        exec.run(&Cmd::new("git").args(["config", "user.email", "bench@xtask"]))?;
        exec.run(&Cmd::new("git").args(["config", "user.name", "xtask bench"]))?;
        let xtask = std::env::current_exe()
            .context("locating the xtask binary")?
            .display()
            .to_string();
        let cargo = exec.env.cargo();
        let _registry = exec.sh.push_env("XTASK_REGISTRY", "bench.invalid/aiq");
        let _base = exec
            .sh
            .push_env("XTASK_BASE_REGISTRY", &config.base_registry);
        if let Some(context) = &self.deploy {
            let (results, longest) = super::bench_deploy::commit_to_live(
                exec,
                &config,
                &clone,
                &xtask,
                context,
                self.rounds,
            )?;
            drop(_in_clone);
            return write_deploy_report(exec, &config, &rev, &results, &longest);
        }

        // A and B, alternated so machine drift hits both. A builds each
        // image alone from its classic Dockerfile, which downloads its
        // dependencies inside the build.
        let classic: Vec<Cmd> = config
            .images
            .iter()
            .map(|image| {
                Cmd::new("docker")
                    .args([
                        "buildx",
                        "build",
                        "--no-cache",
                        "--pull",
                        "--load",
                        "--progress=plain",
                    ])
                    .args(classic_build_args(
                        &config,
                        image,
                        &rev.sha,
                        &format!("bench.invalid/classic/{}:{}", image.name, rev.short()),
                    ))
            })
            .collect();
        let fresh = Cmd::new(&xtask).args(["build", "--no-latest"]);
        // The same fresh build pushed to the local registry, on the pinned
        // BuildKit (P) and on Docker's own builder (Pd): what the pinned
        // builder costs, counting the push it makes straight from BuildKit.
        let local = crate::registry::ensure_local(exec)?;
        let bench_registry = format!("{local}/bench");
        let pushed = |builder: Option<&str>| {
            // `--rebuild`: the registry holds the last round's images under
            // the same input keys, which would be reused instead.
            let cmd = Cmd::new(&xtask).args([
                "build",
                "--push",
                "--rebuild",
                "--no-latest",
                "--registry",
                &bench_registry,
            ]);
            match builder {
                Some(name) => cmd.args(["--builder", name]),
                None => cmd,
            }
        };
        let (pinned, docker_driver) = (pushed(None), pushed(Some("default")));
        let (mut a, mut b, mut p, mut pd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=self.rounds {
            exec.step(
                format!(
                    "round {round}/{}: A (classic, sequential), B (cargo xtask build), P and Pd (pushed, pinned BuildKit and Docker's builder)",
                    self.rounds
                ),
                || {
                    let started = Instant::now();
                    for cmd in &classic {
                        exec.run(cmd)?;
                    }
                    a.push(started.elapsed().as_secs_f64());
                    b.push(timed(exec, &fresh)?);
                    p.push(timed(exec, &pinned)?);
                    pd.push(timed(exec, &docker_driver)?);
                    Ok(())
                },
            )?;
        }

        // B0: the same fresh build refusing any download. Every RUN step
        // has no network anyway (`--network=none`); the xtask itself reads
        // only the registry, for the base images' digests, so it no longer
        // runs in a network namespace of its own (`unshare --net`).
        let offline = Cmd::new(&xtask).args(["build", "--no-latest", "--offline"]);
        let b_offline = vec![timed(exec, &offline)?];

        // C: the floor on the host, dependencies already downloaded: the
        // backend's release compile from an empty target dir, then the
        // frontend's install (from its store, offline) and `next build`.
        let backend = config
            .image_workspaces()
            .into_iter()
            .next()
            .context("no image is its own Cargo workspace")?
            .display()
            .to_string();
        exec.run(&Cmd::new(&cargo).args(["fetch", "--locked", "--manifest-path", &backend]))?;
        let floor_target = work.join("target-floor");
        let compile = Cmd::new(&cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--manifest-path",
                &backend,
                "--target-dir",
            ])
            .arg(floor_target.display().to_string());
        let frontend = deps::npm_stores(exec, &config)?.remove(0);
        let package_dir = clone.join(
            frontend
                .lockfile
                .strip_prefix(&config.root)
                .context("the lockfile is in the repository")?
                .parent()
                .context("the lockfile has a directory")?,
        );
        let install = frontend.install_offline();
        let next_build = Cmd::new("npx").args(["next", "build"]);
        let c = vec![{
            let mut seconds = timed(exec, &compile)?;
            let _in_package = exec.sh.push_dir(&package_dir);
            let _telemetry = exec.sh.push_env("NEXT_TELEMETRY_DISABLED", "1");
            seconds += timed(exec, &install)?;
            seconds += timed(exec, &next_build)?;
            exec.run(&Cmd::new("rm").args(["-rf", "node_modules", ".next"]))?;
            seconds
        }];

        // D: the cached loop after a committed one-line change, in the
        // backend (D1) and in the frontend (D2).
        let cached = Cmd::new(&xtask).args(["build", "--cache", "--no-latest"]);
        exec.run(&cached)?;
        let changed_runs = |file: &str| -> Result<Vec<f64>> {
            let mut runs = Vec::new();
            for run in 1..=self.cached_runs {
                let path = clone.join(file);
                let source = std::fs::read_to_string(&path)?;
                std::fs::write(&path, format!("{source}\n// bench change {run}\n"))?;
                exec.run(&Cmd::new("git").args([
                    "commit",
                    "--quiet",
                    "--all",
                    "--message",
                    &format!("bench: change {file} ({run})"),
                ]))?;
                runs.push(timed(exec, &cached)?);
            }
            Ok(runs)
        };
        let d_backend = changed_runs("backend/src/main.rs")?;
        let d_frontend = changed_runs("frontend/app/page.tsx")?;

        // E: the xtask's own cost.
        let dry = Cmd::new(&xtask).args(["build", "--dry-run"]);
        let mut e_dry = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            exec.read(&dry)?;
            e_dry.push(started.elapsed().as_secs_f64());
        }
        let cold = Cmd::new(&cargo)
            .args(["build", "--locked", "--package", "xtask", "--target-dir"])
            .arg(work.join("target-xtask").display().to_string());
        let e_cold = vec![timed(exec, &cold)?];

        let line = |cmds: &[&Cmd]| {
            cmds.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" && ")
        };
        let results = vec![
            measure(
                "A",
                "classic script: each image `docker buildx build --no-cache --pull` of its Dockerfile.classic (dependencies downloaded in the build), sequentially",
                line(&classic.iter().collect::<Vec<_>>()),
                a,
            ),
            measure(
                "B",
                "`cargo xtask build` (fresh, one bake, dependencies from the stores)",
                fresh.to_string(),
                b,
            ),
            measure(
                "P",
                "`cargo xtask build --push` (fresh) on the pinned BuildKit, pushed to the local registry from BuildKit",
                pinned.to_string(),
                p,
            ),
            measure(
                "Pd",
                "the same build and push on Docker's own builder (`--builder default`, BuildKit 0.13 in dockerd: not reproducible)",
                docker_driver.to_string(),
                pd,
            ),
            measure(
                "B0",
                "B with `--offline`: no download allowed (every build step without network)",
                offline.to_string(),
                b_offline,
            ),
            measure(
                "C",
                "host floor, dependencies downloaded: backend `cargo build --release` from an empty target dir + frontend `npm ci --offline` + `next build`",
                line(&[&compile, &install, &next_build]),
                c,
            ),
            measure(
                "D1",
                "`cargo xtask build --cache` after a committed one-line backend change",
                cached.to_string(),
                d_backend,
            ),
            measure(
                "D2",
                "`cargo xtask build --cache` after a committed one-line frontend change",
                cached.to_string(),
                d_frontend,
            ),
            measure(
                "E1",
                "`cargo xtask build --dry-run`, warm",
                dry.to_string(),
                e_dry,
            ),
            measure(
                "E2",
                "cold compile of the xtask crate (with its dependencies)",
                cold.to_string(),
                e_cold,
            ),
        ];
        drop(_in_clone);
        write_reports(exec, &config, &rev, &results)
    }
}

fn timed(exec: &Exec, cmd: &Cmd) -> Result<f64> {
    let started = Instant::now();
    exec.run(cmd)?;
    Ok(started.elapsed().as_secs_f64())
}

pub fn measure(
    name: &'static str,
    what: &'static str,
    command: String,
    seconds: Vec<f64>,
) -> Measurement {
    Measurement {
        name,
        what,
        command,
        median: median(&seconds),
        seconds,
    }
}

/// The median of the measurement `name` (NaN if it was not taken).
fn median_of(results: &[Measurement], name: &str) -> f64 {
    results
        .iter()
        .find(|m| m.name == name)
        .map_or(f64::NAN, |m| m.median)
}

/// The seed's build of `image` from its classic Dockerfile, as `docker`
/// arguments after the build verb and its own flags: the file, the build
/// args, the tag and the context.
pub fn classic_build_args(
    config: &Config,
    image: &crate::config::Image,
    sha: &str,
    tag: &str,
) -> Vec<String> {
    vec![
        "--file".to_owned(),
        image
            .dockerfile
            .with_extension("classic")
            .display()
            .to_string(),
        "--build-arg".to_owned(),
        format!("BASE_REGISTRY={}", config.base_registry),
        "--build-arg".to_owned(),
        format!("GIT_REVISION={sha}"),
        "--tag".to_owned(),
        tag.to_owned(),
        image.context.display().to_string(),
    ]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn write_reports(
    exec: &Exec,
    config: &Config,
    rev: &git::Revision,
    results: &[Measurement],
) -> Result<()> {
    let get = |name: &str| median_of(results, name);
    let ratios = [
        (
            "B/A",
            get("B") / get("A"),
            0.5,
            "fresh xtask build vs the classic script",
        ),
        (
            "P/Pd",
            get("P") / get("Pd"),
            1.10,
            "pinned BuildKit vs Docker's builder, fresh build and push",
        ),
        (
            "B/C",
            get("B") / get("C"),
            1.15,
            "fresh xtask build vs the host floor",
        ),
        (
            "D1/B",
            get("D1") / get("B"),
            0.25,
            "cached dev loop, backend change, vs fresh build",
        ),
        (
            "D2/B",
            get("D2") / get("B"),
            0.25,
            "cached dev loop, frontend change, vs fresh build",
        ),
    ];
    let absolute = [
        ("E1", get("E1"), 0.5, "warm dry run, seconds"),
        ("E2", get("E2"), 30.0, "cold xtask compile, seconds"),
    ];
    let machine = machine_description(exec);
    let date = exec.read(&Cmd::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;

    let json = serde_json::json!({
        "date": date, "machine": machine, "revision": rev.sha, "measurements": results,
        "ratios": ratios.iter().map(|(n, v, t, _)| serde_json::json!({"name": n, "value": v, "target": t, "met": v <= t})).collect::<Vec<_>>(),
    });
    let out = config.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;

    let mut md = String::from("# Benchmarks\n\nWritten by `cargo xtask bench`; do not edit by hand. Raw timings and command lines: `target/xtask/bench.json`.\n\n");
    md += &format!(
        "- date: {date}\n- machine: {machine}\n- revision: `{}`\n\n",
        rev.sha
    );
    md += "| | what | runs (s) | median (s) |\n| --- | --- | --- | --- |\n";
    for m in results {
        let runs: Vec<String> = m.seconds.iter().map(|s| format!("{s:.2}")).collect();
        md += &format!(
            "| {} | {} | {} | {:.2} |\n",
            m.name,
            m.what,
            runs.join(", "),
            m.median
        );
    }
    md += "\n| target | value | limit | met |\n| --- | --- | --- | --- |\n";
    for (name, value, limit, what) in ratios.iter().chain(absolute.iter()) {
        md += &format!(
            "| {name} ({what}) | {value:.2} | {limit} | {} |\n",
            if value <= limit { "yes" } else { "**no**" }
        );
    }
    // A failed B0 stops the bench before this report is written.
    md += "| B0 (fresh build with no downloads) | built | must build | yes |\n";
    let path = config.root.join("BENCHMARKS.md");
    // The commit-to-live section is `bench --deploy`'s: kept as it is.
    if let Some(section) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(DEPLOY_SECTION).map(|at| old[at..].to_owned()))
    {
        md += "\n";
        md += &section;
    }
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    for (name, value, limit, what) in ratios.iter().chain(absolute.iter()) {
        eprintln!("{name:<4} {value:>7.2}  (target <= {limit}: {what})");
    }
    eprintln!(
        "wrote {} and {}",
        path.display(),
        out.join("bench.json").display()
    );
    Ok(())
}

/// The heading of `bench --deploy`'s section of BENCHMARKS.md.
const DEPLOY_SECTION: &str = "## Commit to live";

/// Writes `bench --deploy`'s section of BENCHMARKS.md (replacing the one
/// there) and `target/xtask/bench-deploy.json`.
fn write_deploy_report(
    exec: &Exec,
    config: &Config,
    rev: &git::Revision,
    results: &[Measurement],
    longest: &[(&'static str, String)],
) -> Result<()> {
    let get = |name: &str| median_of(results, name);
    let ratios = [
        ("X2/S", get("X2") / get("S"), 0.5, "frontend-only commit"),
        ("X1/S", get("X1") / get("S"), 0.65, "backend-only commit"),
        ("X3/S", get("X3") / get("S"), 0.9, "commit changing both"),
        (
            "X0/S",
            get("X0") / get("S"),
            0.15,
            "commit changing neither",
        ),
    ];
    let machine = machine_description(exec);
    let date = exec.read(&Cmd::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    let out = config.out_dir();
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "date": date, "machine": machine, "revision": rev.sha, "measurements": results,
        "ratios": ratios.iter().map(|(n, v, t, _)| serde_json::json!({"name": n, "value": v, "target": t, "met": v <= t})).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("bench-deploy.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let mut md = format!("{DEPLOY_SECTION} (`cargo xtask bench --deploy CONTEXT`)\n\nFrom a new commit to every new pod ready (and, for the xtask, verified), on the real test cluster, alternated. Raw timings: `target/xtask/bench-deploy.json`.\n\n- date: {date}\n- machine: {machine}\n- revision: `{}`\n\n", rev.sha);
    md += "| | what | runs (s) | median (s) | longest step |\n| --- | --- | --- | --- | --- |\n";
    for m in results {
        let runs: Vec<String> = m.seconds.iter().map(|s| format!("{s:.1}")).collect();
        let step = longest
            .iter()
            .find(|(name, _)| *name == m.name)
            .map_or("", |(_, step)| step.as_str());
        md += &format!(
            "| {} | {} | {} | {:.1} | {step} |\n",
            m.name,
            m.what,
            runs.join(", "),
            m.median
        );
    }
    md += "\n| target | value | limit | met |\n| --- | --- | --- | --- |\n";
    for (name, value, limit, what) in &ratios {
        md += &format!(
            "| {name} ({what}) | {value:.2} | {limit} | {} |\n",
            if value <= limit { "yes" } else { "**no**" }
        );
    }
    let path = config.root.join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let kept = old
        .find(DEPLOY_SECTION)
        .map_or(old.as_str(), |at| &old[..at]);
    let kept = kept.trim_end();
    let whole = if kept.is_empty() {
        format!("# Benchmarks\n\n{md}")
    } else {
        format!("{kept}\n\n{md}")
    };
    std::fs::write(&path, whole).with_context(|| format!("writing {}", path.display()))?;
    for (name, value, limit, what) in &ratios {
        eprintln!("{name:<5} {value:>6.2}  (target <= {limit}: {what})");
    }
    eprintln!(
        "wrote {} and {}",
        path.display(),
        out.join("bench-deploy.json").display()
    );
    Ok(())
}

fn machine_description(exec: &Exec) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    let docker = exec
        .read(&Cmd::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {memory}, Docker engine {docker}")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
