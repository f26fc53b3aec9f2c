//! `cargo xtask build`: fresh, git-SHA-tagged, labelled images.

use anyhow::Result;
use clap::Args;

use crate::{
    bake::BuildOptions,
    config::{Config, Overrides},
    docker::{self, BuiltImage},
    exec::Exec,
    git, registry,
};

/// Build the images: fresh (--no-cache --pull) and tagged with the git SHA
#[derive(Args, Debug, Clone, Default)]
pub struct Build {
    /// Images to build (default: all configured)
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    #[command(flatten)]
    pub flags: BuildFlags,
    /// Push to the registry and record digests in target/xtask/build.json
    #[arg(long)]
    pub push: bool,
}

/// Flags shared by every command that builds.
#[derive(Args, Debug, Clone, Default)]
pub struct BuildFlags {
    /// Reuse BuildKit's cache: drops --no-cache and --pull, for the fast dev loop [env: USE_CACHE=true]
    #[arg(long)]
    pub cache: bool,
    /// Build a dirty tree anyway, tagged <sha>-dirty-<hash>; never moves :latest
    #[arg(long)]
    pub allow_dirty: bool,
    /// buildx builder to use, e.g. a remote BuildKit
    #[arg(long, value_name = "NAME")]
    pub builder: Option<String>,
    /// Never download dependencies: the stores for the lockfiles must exist (or cargo's cache must hold the crates)
    #[arg(long)]
    pub offline: bool,
    /// Build every image fresh, even one the registry already holds under its input key
    #[arg(long, conflicts_with = "cache")]
    pub rebuild: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl BuildFlags {
    /// Refuses (exit 2) a `--builder` that cannot be reached: in the
    /// preflight, before anything is built, pushed or applied.
    pub fn check_builder(&self, exec: &Exec) -> Result<()> {
        match &self.builder {
            Some(builder) => crate::builder::reachable(exec, builder),
            None => Ok(()),
        }
    }

    pub fn options(&self, env: &crate::env::Env, config: &Config, push: bool) -> BuildOptions {
        BuildOptions {
            cache: self.cache || env.use_cache(),
            push,
            builder: self.builder.clone(),
            cache_from: config.cache_from.clone(),
            cache_to: config.cache_to.clone(),
            retry: false,
            offline: self.offline,
            digest_only: false,
            pinned_bases: None,
            rebuild: self.rebuild,
        }
    }
}

impl Build {
    pub fn run(self, exec: &Exec) -> Result<()> {
        let (config, images, rev) = exec.step("preflight", || {
            docker::preflight(exec)?;
            let config = Config::load(exec, &self.flags.overrides)?;
            exec.sh.change_dir(&config.root);
            let images = config.with_seed_values(config.select_images(&self.images)?, &exec.output);
            let rev = git::revision(exec, self.flags.allow_dirty)?;
            git::refuse_shallow(exec)?;
            self.flags.check_builder(exec)?;
            Ok((config, images, rev))
        })?;
        let opts = self.flags.options(&exec.env, &config, self.push);
        if self.push {
            registry::login(exec, &config)?;
            registry::check(exec, &config.registry)?;
        }
        let mode = if opts.cache { "cached" } else { "fresh" };
        let (built, inputs) = exec.step(
            format!("build {} ({mode}) at {}", names(&images), rev.tag()),
            || docker::build(exec, &config, &images, &rev, &opts),
        )?;
        if !exec.dry_run {
            docker::write_build_file(&config, &rev, &built, &inputs)?;
            print_summary(&built);
        }
        Ok(())
    }
}

fn names(images: &[crate::config::Image]) -> String {
    images
        .iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_summary(built: &[BuiltImage]) {
    for image in built {
        let digest = image.digest.as_deref().unwrap_or("(not pushed)");
        let since = match &image.inputs_revision {
            Some(since) if *since != image.revision => {
                format!("  (inputs unchanged since {})", git::short(since))
            }
            _ => String::new(),
        };
        let reused = if image.reused { "  reused" } else { "" };
        eprintln!(
            "{}  {}  {digest}{since}{reused}",
            image.name, image.reference
        );
    }
}
