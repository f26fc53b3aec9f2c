//! BuildKit's progress read as JSON (`--progress=rawjson`), not scraped
//! from text: shown as it comes, in numbered lines like buildx's `plain`
//! style, and kept per step, so a failed push is told from a failed build
//! by the step that failed (the image exporter's push), never by words
//! that happen to be in a compiler's message.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::{BufRead, Write},
};

use serde::Deserialize;

/// Lines of a failed step kept for its error.
const TAIL: usize = 12;

/// One `SolveStatus` of BuildKit's control API, as buildx prints it.
#[derive(Debug, Default, Deserialize)]
struct SolveStatus {
    #[serde(default)]
    vertexes: Vec<Vertex>,
    #[serde(default)]
    statuses: Vec<VertexStatus>,
    #[serde(default)]
    logs: Vec<VertexLog>,
}

#[derive(Debug, Deserialize)]
struct Vertex {
    digest: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    started: Option<String>,
    #[serde(default)]
    completed: Option<String>,
    #[serde(default)]
    cached: bool,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Deserialize)]
struct VertexStatus {
    vertex: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    completed: Option<String>,
}

#[derive(Debug, Deserialize)]
struct VertexLog {
    vertex: String,
    /// Base64 of the bytes the step wrote.
    #[serde(default)]
    data: String,
}

/// A step of the build that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedStep {
    /// As BuildKit names it: `[web 3/5] RUN cargo build`, `exporting to
    /// image`, ...
    pub name: String,
    pub error: String,
    /// Its last lines of output and progress.
    pub tail: Vec<String>,
}

impl FailedStep {
    /// The export, which pushes the image (when the output says
    /// `push=true`) and the registry cache: a failure there is the
    /// registry's, not the build's.
    pub fn is_push(&self) -> bool {
        self.name.starts_with("exporting ") || self.name.starts_with("pushing")
    }
}

/// What is known of one step while the build runs.
#[derive(Default)]
struct Step {
    number: usize,
    name: String,
    announced: bool,
    /// When it last completed: a step can start again (the exporter
    /// exports, then pushes), and only a new completion is shown.
    completed: Option<String>,
    /// Its progress lines already shown as done (BuildKit sends them again).
    done: HashSet<String>,
    /// Output after its last newline: BuildKit sends output in chunks that
    /// need not end lines (cargo's "   Compiling" and " fixture v0.1.0").
    partial: String,
    tail: VecDeque<String>,
}

impl Step {
    /// Shows `line` as this step's and keeps it for its error.
    fn line(&mut self, line: &str, out: &mut dyn Write) {
        let _ = writeln!(out, "#{} {line}", self.number);
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
    }

    /// Output as it comes: each completed line is shown.
    fn output(&mut self, text: &str, out: &mut dyn Write) {
        self.partial.push_str(text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            self.line(line.trim_end_matches(['\n', '\r']), out);
        }
    }

    /// Output left without a newline when the step ends.
    fn flush(&mut self, out: &mut dyn Write) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(line.trim_end_matches('\r'), out);
        }
    }
}

/// Reads `input` (buildx's stderr with `--progress=rawjson`) to its end,
/// writing plain lines to `out` as they come: `#N name` when a step
/// starts, its output lines, `#N ERROR: ...` or `#N DONE`. Lines that are
/// not part of a JSON object (buildx's own warnings and its final
/// `ERROR:` line) pass through as they are. Returns the steps BuildKit
/// marked with an error.
pub fn follow(input: &mut dyn BufRead, out: &mut dyn Write) -> Vec<FailedStep> {
    let mut steps: HashMap<String, Step> = HashMap::new();
    let mut failed = Vec::new();
    let mut object = String::new();
    for line in input.lines().map_while(Result::ok) {
        // buildx 0.15 and later print each status on one line; older ones
        // as indented JSON, where `{` and `}` alone open and close one.
        if object.is_empty() && line != "{" {
            match serde_json::from_str::<SolveStatus>(&line) {
                Ok(status) if line.starts_with('{') => show(&status, &mut steps, &mut failed, out),
                _ => {
                    let _ = writeln!(out, "{line}");
                }
            }
            continue;
        }
        object.push_str(&line);
        object.push('\n');
        if line != "}" {
            continue;
        }
        match serde_json::from_str::<SolveStatus>(&object) {
            Ok(status) => show(&status, &mut steps, &mut failed, out),
            Err(_) => {
                let _ = out.write_all(object.as_bytes());
            }
        }
        object.clear();
    }
    let _ = out.write_all(object.as_bytes());
    for step in steps.values_mut() {
        step.flush(out);
    }
    failed
}

fn show(
    status: &SolveStatus,
    steps: &mut HashMap<String, Step>,
    failed: &mut Vec<FailedStep>,
    out: &mut dyn Write,
) {
    // Steps start, then their output and progress, then those that ended
    // (one status may carry all three).
    for vertex in &status.vertexes {
        // Numbered in the order steps are first seen.
        let number = steps.len() + 1;
        let step = steps.entry(vertex.digest.clone()).or_insert_with(|| Step {
            number,
            name: vertex.name.clone(),
            ..Step::default()
        });
        if !step.announced && (vertex.started.is_some() || vertex.cached) {
            step.announced = true;
            let _ = writeln!(out, "#{} {}", step.number, step.name);
        }
        if vertex.started.is_some() && vertex.completed.is_none() {
            step.completed = None;
        }
    }
    for log in &status.logs {
        if let Some(step) = steps.get_mut(&log.vertex) {
            let bytes = crate::base64::decode(&log.data).unwrap_or_default();
            step.output(&String::from_utf8_lossy(&bytes), out);
        }
    }
    for progress in &status.statuses {
        if let Some(step) = steps.get_mut(&progress.vertex) {
            if progress.completed.is_some()
                && !progress.id.is_empty()
                && step.done.insert(progress.id.clone())
            {
                step.line(&format!("{} done", progress.id), out);
            }
        }
    }
    for vertex in &status.vertexes {
        let Some(step) = steps.get_mut(&vertex.digest) else {
            continue;
        };
        if vertex.completed.is_none() || vertex.completed == step.completed {
            continue;
        }
        step.completed = vertex.completed.clone();
        step.flush(out);
        let number = step.number;
        if !vertex.error.is_empty() {
            let _ = writeln!(out, "#{number} ERROR: {}", vertex.error);
            failed.push(FailedStep {
                name: step.name.clone(),
                error: vertex.error.clone(),
                tail: step.tail.iter().cloned().collect(),
            });
        } else if vertex.cached {
            let _ = writeln!(out, "#{number} CACHED");
        } else {
            let _ = writeln!(out, "#{number} DONE");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// buildx's `rawjson` for a step that prints two lines and fails, then
    /// its own final line (shortened from a real run).
    const FAILED_RUN: &str = r#"{
  "vertexes": [
    {
      "digest": "sha256:aaa",
      "name": "[internal] load build definition from Dockerfile",
      "started": "2026-11-30T22:12:41.07Z",
      "completed": "2026-11-30T22:12:41.08Z"
    }
  ]
}
{
  "vertexes": [
    {
      "digest": "sha256:bbb",
      "name": "[2/2] RUN echo hello \u0026\u0026 exit 3",
      "started": "2026-11-30T22:12:42Z"
    }
  ]
}
{
  "logs": [
    {
      "vertex": "sha256:bbb",
      "stream": 1,
      "data": "aGVsbG8K",
      "timestamp": "2026-11-30T22:12:42.1Z"
    },
    {
      "vertex": "sha256:bbb",
      "stream": 2,
      "data": "YmFkCg==",
      "timestamp": "2026-11-30T22:12:42.2Z"
    }
  ]
}
{
  "vertexes": [
    {
      "digest": "sha256:bbb",
      "name": "[2/2] RUN echo hello \u0026\u0026 exit 3",
      "started": "2026-11-30T22:12:42Z",
      "completed": "2026-11-30T22:12:42.3Z",
      "error": "process \"/bin/sh -c echo hello \u0026\u0026 exit 3\" did not complete successfully: exit code: 3"
    }
  ]
}
ERROR: failed to solve: process "/bin/sh -c echo hello && exit 3" did not complete successfully: exit code: 3
"#;

    /// What `follow` shows of `input`, and the steps it found failed.
    fn followed(input: &str) -> (String, Vec<FailedStep>) {
        let mut shown = Vec::new();
        let failed = follow(&mut input.as_bytes(), &mut shown);
        (String::from_utf8(shown).unwrap(), failed)
    }

    /// One status (on one line, as buildx 0.15 and later print it) of the
    /// step `digest` named `name`, with `times` (`started`, `completed`,
    /// `error`).
    fn vertex(digest: &str, name: &str, times: serde_json::Value) -> String {
        let mut vertex = serde_json::json!({"digest": digest, "name": name});
        vertex
            .as_object_mut()
            .unwrap()
            .extend(times.as_object().unwrap().clone());
        serde_json::json!({"vertexes": [vertex]}).to_string() + "\n"
    }

    /// One status carrying `text` as output of the step `digest`.
    fn output(digest: &str, text: &[u8]) -> String {
        let data = crate::base64::encode(text);
        serde_json::json!({"logs": [{"vertex": digest, "data": data}]}).to_string() + "\n"
    }

    #[test]
    fn progress_is_shown_in_plain_lines_and_the_failed_step_kept() {
        let (shown, failed) = followed(FAILED_RUN);
        assert_eq!(
            shown,
            "#1 [internal] load build definition from Dockerfile\n#1 DONE\n#2 [2/2] RUN echo hello && exit 3\n#2 hello\n#2 bad\n#2 ERROR: process \"/bin/sh -c echo hello && exit 3\" did not complete successfully: exit code: 3\nERROR: failed to solve: process \"/bin/sh -c echo hello && exit 3\" did not complete successfully: exit code: 3\n"
        );
        assert_eq!(
            failed,
            vec![FailedStep {
                name: "[2/2] RUN echo hello && exit 3".into(),
                error: "process \"/bin/sh -c echo hello && exit 3\" did not complete successfully: exit code: 3".into(),
                tail: vec!["hello".into(), "bad".into()],
            }]
        );
        assert!(!failed[0].is_push());
    }

    /// buildx 0.15 and later print each status on one line.
    #[test]
    fn one_status_per_line_is_read_too() {
        let export = |times| vertex("sha256:e", "exporting to image", times);
        let input = [
            export(serde_json::json!({"started": "1"})),
            export(
                serde_json::json!({"started": "1", "completed": "2", "error": "failed to push r/x:1: unavailable"}),
            ),
            "ERROR: failed to solve: failed to push r/x:1: unavailable\n".to_owned(),
        ]
        .concat();
        let (shown, failed) = followed(&input);
        assert_eq!(
            shown,
            "#1 exporting to image\n#1 ERROR: failed to push r/x:1: unavailable\nERROR: failed to solve: failed to push r/x:1: unavailable\n"
        );
        assert_eq!(failed.len(), 1);
        assert!(failed[0].is_push());
    }

    /// Output comes in chunks that need not end lines; a status that is
    /// sent again is shown once.
    #[test]
    fn output_is_shown_by_whole_lines() {
        let run = |times| vertex("sha256:r", "RUN cargo build", times);
        let status = serde_json::json!({"statuses": [{"id": "copying", "vertex": "sha256:r", "completed": "2"}]})
            .to_string()
            + "\n";
        let input = [
            run(serde_json::json!({"started": "1"})),
            output("sha256:r", b"   Compiling"),
            output("sha256:r", b" fixture v0.1.0\n    Finished"),
            status.clone(),
            status,
            output("sha256:r", b" release"),
            run(serde_json::json!({"started": "1", "completed": "3"})),
        ]
        .concat();
        let (shown, failed) = followed(&input);
        assert!(failed.is_empty());
        assert_eq!(
            shown,
            "#1 RUN cargo build\n#1    Compiling fixture v0.1.0\n#1 copying done\n#1     Finished release\n#1 DONE\n"
        );
    }

    /// The image exporter completes once it has exported, starts again to
    /// push, and fails there (as BuildKit v0.34 reports a push the registry
    /// refuses): that second completion carries the error.
    #[test]
    fn a_push_that_fails_is_the_exporters_second_completion() {
        let export = |times| vertex("sha256:e", "exporting to image", times);
        let input = [
            export(serde_json::json!({"started": "1"})),
            export(serde_json::json!({"started": "1", "completed": "2"})),
            export(serde_json::json!({"started": "3"})),
            output(
                "sha256:e",
                b"error: failed commit on ref: 503 Service Unavailable\n",
            ),
            export(
                serde_json::json!({"started": "3", "completed": "4", "error": "failed to push r/x:1: unavailable"}),
            ),
            "ERROR: failed to solve: failed to push r/x:1: unavailable\n".to_owned(),
        ]
        .concat();
        let (shown, failed) = followed(&input);
        assert_eq!(
            shown,
            "#1 exporting to image\n#1 DONE\n#1 error: failed commit on ref: 503 Service Unavailable\n#1 ERROR: failed to push r/x:1: unavailable\nERROR: failed to solve: failed to push r/x:1: unavailable\n"
        );
        assert_eq!(
            failed,
            vec![FailedStep {
                name: "exporting to image".into(),
                error: "failed to push r/x:1: unavailable".into(),
                tail: vec!["error: failed commit on ref: 503 Service Unavailable".into()],
            }]
        );
        assert!(failed[0].is_push());
    }
}
