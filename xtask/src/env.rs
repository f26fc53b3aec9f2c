//! The process environment, read once: `main` takes an [`Env`] and passes
//! it down inside `Exec`. Nothing else reads the process's environment
//! (clippy's `disallowed-methods`, in `clippy.toml`, keeps it so), so what
//! a run depends on is listed here.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::PathBuf,
};

/// The environment as the process started with it.
#[derive(Clone, Debug, Default)]
pub struct Env {
    vars: BTreeMap<OsString, OsString>,
}

impl Env {
    /// The process's environment, now.
    #[allow(clippy::disallowed_methods)]
    pub fn capture() -> Env {
        Env {
            vars: std::env::vars_os().collect(),
        }
    }

    /// An environment of these variables alone, for tests.
    #[cfg(test)]
    pub fn of(pairs: &[(&str, &str)]) -> Env {
        Env {
            vars: pairs
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
        }
    }

    /// `key` when set at all, even to nothing (`CI=`, `NO_COLOR=`).
    fn is_set(&self, key: &str) -> bool {
        self.vars.contains_key(OsStr::new(key))
    }

    /// `key`'s value as the OS gives it, when set and not empty: for
    /// values that are paths.
    pub fn var_os(&self, key: &str) -> Option<&OsStr> {
        self.vars
            .get(OsStr::new(key))
            .map(OsString::as_os_str)
            .filter(|v| !v.is_empty())
    }

    /// `key`'s value, when set, not empty and UTF-8.
    pub fn var(&self, key: &str) -> Option<String> {
        self.var_os(key).and_then(OsStr::to_str).map(str::to_owned)
    }

    /// Plain lines, no colour or live progress, asked for by `CI` or
    /// `NO_COLOR`.
    pub fn plain_output(&self) -> bool {
        self.is_set("CI") || self.is_set("NO_COLOR")
    }

    /// `CI` set: a run no one watches, so nothing asks before it acts.
    pub fn ci(&self) -> bool {
        self.is_set("CI")
    }

    /// The cargo that runs us (`cargo xtask` sets CARGO), else the one on
    /// PATH.
    pub fn cargo(&self) -> String {
        self.var("CARGO").unwrap_or_else(|| "cargo".into())
    }

    /// `USE_CACHE=true` (or `1`): the same as `--cache`.
    pub fn use_cache(&self) -> bool {
        self.var("USE_CACHE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }

    /// `GITHUB_RUN_ID`: the CI run a deploy is recorded with.
    pub fn ci_run_id(&self) -> Option<String> {
        self.var("GITHUB_RUN_ID")
    }

    /// `XTASK_LOCAL_REGISTRY`: the local registry `up` and the tests use.
    pub fn local_registry(&self) -> Option<String> {
        self.var("XTASK_LOCAL_REGISTRY")
    }

    /// `XTASK_KUBECTL`: the kubectl to run instead of the one on PATH.
    pub fn kubectl_override(&self) -> Option<String> {
        self.var("XTASK_KUBECTL")
    }

    /// Who runs this, for the lock and the history: in GitHub Actions the
    /// person who started the run (`USER` is the runner's account there);
    /// elsewhere the login.
    pub fn operator(&self) -> String {
        let actor = self
            .var("GITHUB_ACTOR")
            .filter(|_| self.var("GITHUB_ACTIONS").as_deref() == Some("true"));
        actor
            .or_else(|| self.var("USER"))
            .or_else(|| self.var("GITHUB_ACTOR"))
            .unwrap_or_else(|| "unknown".into())
    }

    /// The temporary directory: `TMPDIR`, else `/tmp`.
    pub fn temp_dir(&self) -> PathBuf {
        self.var_os("TMPDIR")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_is_the_github_actor_only_in_github_actions() {
        let env = Env::of(&[("GITHUB_ACTOR", "octocat"), ("USER", "runner")]);
        assert_eq!(env.operator(), "runner");
        let env = Env::of(&[
            ("GITHUB_ACTOR", "octocat"),
            ("GITHUB_ACTIONS", "true"),
            ("USER", "runner"),
        ]);
        assert_eq!(env.operator(), "octocat");
        assert_eq!(Env::of(&[]).operator(), "unknown");
    }

    #[test]
    fn ci_and_no_color_count_when_set_even_empty() {
        assert!(Env::of(&[("NO_COLOR", "")]).plain_output());
        assert!(Env::of(&[("CI", "")]).ci());
        assert!(!Env::of(&[]).plain_output());
        assert!(Env::of(&[("USE_CACHE", "TRUE")]).use_cache());
        assert_eq!(Env::of(&[("CARGO", "")]).cargo(), "cargo");
    }
}
