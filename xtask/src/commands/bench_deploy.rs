//! `cargo xtask bench --deploy`: commit to live on a real cluster. The
//! seed's script (S: classic fresh builds of both images, `docker push`,
//! `kubectl set image`, `kubectl rollout status`) against `cargo xtask
//! deploy` after a backend-only commit (X1), a frontend-only one (X2), one
//! that changes both (X3) and one that changes neither (X0), alternated,
//! each from a new commit of the bench's clone.

use std::{path::Path, time::Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    commands::bench::{classic_build_args, measure, Measurement},
    config::Config,
    exec::{Cmd, Exec},
    git,
};

/// The files a one-line commit changes, per service.
const BACKEND_FILE: &str = "backend/src/main.rs";
const FRONTEND_FILE: &str = "frontend/app/page.tsx";
/// A file no image reads.
const NEITHER_FILE: &str = "README.md";

/// Each case's longest step over its runs: what dominates it.
pub type LongestSteps = Vec<(&'static str, String)>;

/// What one timed run took, and its longest step.
struct Run {
    seconds: f64,
    longest: (String, f64),
}

/// Runs the deploy benchmark in `clone` against `context`, `rounds` times.
pub fn commit_to_live(
    exec: &Exec,
    config: &Config,
    clone: &Path,
    xtask: &str,
    context: &str,
    rounds: usize,
) -> Result<(Vec<Measurement>, LongestSteps)> {
    let kubectl = crate::kube::Kube::find_kubectl(exec)?;
    let local = crate::registry::ensure_local(exec)?;
    let registry = format!("{local}/bench-deploy");
    let _registry = exec.sh.push_env("XTASK_REGISTRY", &registry);
    let deploy = Cmd::new(xtask).args(["deploy", "--json", "--context", context]);
    let mut change = 0;
    let mut commit = |files: &[&str]| -> Result<String> {
        change += 1;
        for file in files {
            let path = clone.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let comment = if file.ends_with(".md") {
                "<!-- -->"
            } else {
                "//"
            };
            std::fs::write(
                &path,
                format!("{text}\n{comment} bench deploy change {change}\n"),
            )
            .with_context(|| format!("writing {}", path.display()))?;
        }
        exec.run(&Cmd::new("git").args([
            "commit",
            "--quiet",
            "--all",
            "--message",
            &format!("bench: deploy change {change}"),
        ]))?;
        Ok(git::commit(exec, "HEAD")?.sha)
    };
    let timed_deploy = || -> Result<Run> {
        let started = Instant::now();
        let events = exec.read(&deploy)?;
        Ok(Run {
            seconds: started.elapsed().as_secs_f64(),
            longest: longest_step(&events),
        })
    };
    // The seed's script, for a commit that changed both (it builds both
    // whatever changed).
    let seed_script = |sha: &str| -> Result<Run> {
        let mut phases = Vec::new();
        let tag = git::short(sha);
        let refs: Vec<String> = config
            .images
            .iter()
            .map(|image| format!("{registry}/{}:{tag}", image.name))
            .collect();
        let started = Instant::now();
        let phase = Instant::now();
        for (image, reference) in config.images.iter().zip(&refs) {
            exec.run(
                &Cmd::new("docker")
                    .args(["build", "--no-cache", "--pull", "--quiet"])
                    .args(classic_build_args(config, image, sha, reference)),
            )?;
        }
        phases.push((
            "docker build --no-cache --pull".to_owned(),
            phase.elapsed().as_secs_f64(),
        ));
        let phase = Instant::now();
        for reference in &refs {
            exec.run(&Cmd::new("docker").args(["push", "--quiet", reference]))?;
        }
        phases.push(("docker push".to_owned(), phase.elapsed().as_secs_f64()));
        let phase = Instant::now();
        let kube = |args: &[&str]| {
            Cmd::new(&kubectl)
                .args(["--context", context, "--namespace", &config.namespace])
                .args(args.iter().copied())
        };
        for (image, reference) in config.images.iter().zip(&refs) {
            let deployment = format!("deployment/{}", image.name);
            let set = format!("{}={reference}", image.name);
            exec.run(&kube(&["set", "image", &deployment, &set]))?;
        }
        for image in &config.images {
            let deployment = format!("deployment/{}", image.name);
            exec.run(&kube(&["rollout", "status", &deployment, "--timeout=600s"]))?;
        }
        phases.push((
            "kubectl set image + rollout status".to_owned(),
            phase.elapsed().as_secs_f64(),
        ));
        let longest = phases
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or_default();
        Ok(Run {
            seconds: started.elapsed().as_secs_f64(),
            longest,
        })
    };

    // Where every round starts: the clone's HEAD deployed by the xtask.
    exec.step("deploy the clone's HEAD (not timed)", || {
        exec.read(&deploy).map(drop)
    })?;
    let mut runs: [Vec<Run>; 5] = Default::default();
    for round in 1..=rounds {
        exec.step(
            format!("round {round}/{rounds}: S (the seed's script), X1 (backend commit), X2 (frontend), X3 (both), X0 (neither)"),
            || {
                let sha = commit(&[BACKEND_FILE, FRONTEND_FILE])?;
                runs[0].push(seed_script(&sha)?);
                // The xtask's own state again (not timed): S left tags.
                exec.read(&deploy)?;
                commit(&[BACKEND_FILE])?;
                runs[1].push(timed_deploy()?);
                commit(&[FRONTEND_FILE])?;
                runs[2].push(timed_deploy()?);
                commit(&[BACKEND_FILE, FRONTEND_FILE])?;
                runs[3].push(timed_deploy()?);
                commit(&[NEITHER_FILE])?;
                runs[4].push(timed_deploy()?);
                Ok(())
            },
        )?;
    }
    let [s, x1, x2, x3, x0] = runs;
    let deploy_line = deploy.to_string();
    let cases = [
        ("S", "the seed's script after a commit: `docker build --no-cache --pull` of each Dockerfile.classic, `docker push`, `kubectl set image`, `kubectl rollout status`", "docker build && docker push && kubectl set image && kubectl rollout status".to_owned(), s),
        ("X1", "`cargo xtask deploy` after a backend-only commit (the frontend reused)", deploy_line.clone(), x1),
        ("X2", "`cargo xtask deploy` after a frontend-only commit (the backend reused)", deploy_line.clone(), x2),
        ("X3", "`cargo xtask deploy` after a commit that changes both", deploy_line.clone(), x3),
        ("X0", "`cargo xtask deploy` after a commit that changes neither image (both reused)", deploy_line, x0),
    ];
    let mut measurements = Vec::new();
    let mut longest = Vec::new();
    for (name, what, command, case) in cases {
        let slowest = case
            .iter()
            .map(|r| &r.longest)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(step, seconds)| format!("{step} ({seconds:.1} s)"))
            .unwrap_or_default();
        longest.push((name, slowest));
        measurements.push(measure(
            name,
            what,
            command,
            case.iter().map(|r| r.seconds).collect(),
        ));
    }
    Ok((measurements, longest))
}

/// The longest `step_finished` of a `--json` run's events.
fn longest_step(events: &str) -> (String, f64) {
    events
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["event"] == "step_finished")
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["seconds"].as_f64().unwrap_or_default(),
            )
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_longest_step_is_read_from_the_events() {
        let events = "{\"event\":\"step_finished\",\"name\":\"preflight\",\"seconds\":0.5}\nnot json\n{\"event\":\"step_finished\",\"name\":\"build and push (fresh) at x\",\"seconds\":61.2}\n{\"event\":\"result\",\"seconds\":70.0}";
        assert_eq!(
            super::longest_step(events),
            ("build and push (fresh) at x".to_owned(), 61.2)
        );
    }
}
