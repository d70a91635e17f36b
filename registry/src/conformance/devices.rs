//! Devices, keys and tokens on every backend.

#[allow(unused_imports)]
use super::*;

conformance!();
