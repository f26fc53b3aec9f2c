//! One file per subcommand.

pub mod bench;
pub mod build;
pub mod ci;
pub mod cluster;
pub mod deploy;
pub mod down;
pub mod local;
pub mod mirror;
pub mod rollback;
pub mod status;
pub mod test;
pub mod up;
pub mod verify;
