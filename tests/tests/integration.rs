//! Tributary's integration tests, in one binary: each module drives the real
//! `tributary` binary over real QUIC and HTTP on loopback, with real files.

#![allow(clippy::unwrap_used)]

mod api;
mod arrow_ipc;
mod bad_input;
mod commands;
mod crash;
mod e2e;
mod golden;
mod interop;
mod limits;
mod metrics;
mod postgres;
mod restart;
mod security;
mod simulate;
mod twin;
mod windows;
