//! The client subcommands of `tributary`.

pub mod admin;
pub mod command;
pub mod device;
pub mod group;
pub mod listen;
pub mod send;
pub mod simulate;
pub mod sql;
