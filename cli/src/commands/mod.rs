//! The client subcommands of `tributary`.

pub mod device;
pub mod listen;
pub mod send;
pub mod sql;
