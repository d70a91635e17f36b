//! The binary's own surface: help, version, and argument errors. (Having an
//! integration test here also makes `cargo test --workspace` build the
//! `tributary` binary that the suite in `tests/` drives.)

use std::process::Command;

fn tributary(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .output()
        .expect("run tributary")
}

#[test]
fn help_lists_every_command() {
    let out = tributary(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["serve", "sql", "query", "device", "send", "listen"] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
}

#[test]
fn version_prints_the_package_version() {
    let out = tributary(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn errors_are_one_line_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = tributary(&[
        "query",
        "SELECT 1",
        "--data-dir",
        &dir.path().display().to_string(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("not a Tributary data directory"),
        "{stderr}"
    );

    let out = tributary(&[
        "sql",
        "SELECT 1",
        "--data-dir",
        &dir.path().display().to_string(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no admin token"), "{stderr}");
}
