//! One file per subcommand, and the flags several of them share.

pub mod bench;
mod bench_deploy;
pub mod build;
pub mod builder;
pub mod ci;
pub mod clean;
pub mod cluster;
pub mod cluster_flags;
pub mod deploy;
pub mod down;
pub mod local;
pub mod mirror;
pub mod rollback;
pub mod status;
pub mod test;
pub mod up;
pub mod verify;
