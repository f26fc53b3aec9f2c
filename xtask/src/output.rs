//! Where output goes and how it looks: human lines on stderr (colour only on
//! a terminal without `CI` or `NO_COLOR`), results on stdout, and the
//! `--json` event stream.

use std::io::{IsTerminal, Write};

use serde_json::json;

pub const BOLD: &str = "1";
pub const GREEN: &str = "32";
pub const RED: &str = "31";

/// Where output goes and how it looks. Human output is on stderr, with
/// colour only on a terminal without `CI` or `NO_COLOR`. Stdout carries
/// either the human results (dry-run lines, summaries) or, with `--json`,
/// newline-delimited JSON events and nothing else.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
    pub colour: bool,
}

impl Output {
    /// `plain` (asked for by `CI` or `NO_COLOR`): no colour, no live
    /// progress; neither on a stderr that is not a terminal.
    pub fn new(json: bool, plain: bool) -> Output {
        Output {
            json,
            colour: !plain && std::io::stderr().is_terminal(),
        }
    }

    /// One event on stdout, when `--json` asked for them.
    pub fn event(&self, kind: &str, fields: serde_json::Value) {
        if !self.json {
            return;
        }
        let mut event =
            json!({"event": kind, "time": crate::time::rfc3339(crate::time::now_epoch())});
        if let (Some(event), serde_json::Value::Object(fields)) = (event.as_object_mut(), fields) {
            event.extend(fields);
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{event}");
        let _ = stdout.flush();
    }

    /// A result line: stdout for people and scripts, stderr under `--json`
    /// (where the same facts travel as events).
    pub fn result(&self, line: &str) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// A warning: on stderr, and as an event under `--json`.
    pub fn warn(&self, message: &str) {
        eprintln!("{} {message}", self.paint("33", "warning:"));
        self.event("warning", json!({ "message": message }));
    }

    /// A command about to run (echoed on stderr), or printed as the plan by
    /// a dry run (stdout): its argv, and the line shown (which may say more
    /// than argv, such as a daemon's redirections).
    pub fn command_line(&self, argv: &[String], line: &str, dry_run: bool) {
        self.event(
            "command",
            json!({"argv": argv, "line": line, "dry_run": dry_run}),
        );
        if dry_run {
            self.result(&format!("$ {line}"));
        } else {
            eprintln!("{}", self.paint("2", &format!("$ {line}")));
        }
    }

    /// `text` in an ANSI colour when colour is on.
    pub fn paint(&self, colour: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{colour}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

impl Output {
    /// BuildKit's progress style: live where colour is on (a terminal
    /// without `CI` or `NO_COLOR`), plain lines elsewhere.
    pub fn progress_style(&self) -> &'static str {
        if self.colour {
            "auto"
        } else {
            "plain"
        }
    }
}
