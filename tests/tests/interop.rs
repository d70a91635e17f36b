//! Interoperability with a client written from docs/protocol.md alone:
//! tests/interop/ is a Python client on aioquic, written by someone who had
//! read the document and security.md but none of our code. It decodes the
//! document's test vectors and drives a real server through a scenario
//! (events of every JSON form, rejections, PING, commands, twins, renewal,
//! oversized frames, HELLO timeout, idempotent resends, wrong ALPN,
//! enrollment groups), checking every answer against the document.
//!
//! Needs a Python with aioquic: `TRIBUTARY_TEST_PYTHON` names it (`.ci/run`
//! makes a virtual environment), else `python3` is tried. Without one the
//! test is skipped, or fails when `TRIBUTARY_REQUIRE_INTEROP=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tributary_tests::Server;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Python that has aioquic, if there is one.
fn python() -> Option<String> {
    let candidates = std::env::var("TRIBUTARY_TEST_PYTHON")
        .ok()
        .into_iter()
        .chain(["python3".to_string()]);
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import aioquic"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    if std::env::var("TRIBUTARY_REQUIRE_INTEROP").as_deref() == Ok("1") {
        panic!("TRIBUTARY_REQUIRE_INTEROP=1 but no Python with aioquic: set TRIBUTARY_TEST_PYTHON");
    }
    eprintln!("skipped: no Python with aioquic (set TRIBUTARY_TEST_PYTHON)");
    None
}

/// Runs check.py with `args`; returns its JSON summary, failing the test
/// with everything it printed unless it passed.
fn check(python: &str, args: &[&str]) -> Value {
    let script = repo().join("tests/interop/check.py");
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .expect("run check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check.py {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary not JSON ({e}): {stdout}"))
}

#[test]
fn the_protocol_document_is_enough_to_write_a_client() {
    let Some(python) = python() else { return };
    let doc = repo().join("docs/protocol.md");
    let vectors = check(&python, &["--vectors", doc.to_str().unwrap()]);
    assert!(vectors["passed"].as_u64().unwrap_or(0) > 25, "{vectors}");

    let server = Server::start();
    let data_dir = server.data_dir.to_str().unwrap().to_string();
    let summary = check(
        &python,
        &[
            "--data-dir",
            &data_dir,
            "--create-stream",
            "--device",
            "interop-1",
            "--extended",
            "--strict",
        ],
    );
    assert_eq!(summary["failed"], 0, "{summary}");
}
