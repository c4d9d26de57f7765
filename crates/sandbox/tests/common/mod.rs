//! Running a scenario in a fresh process: a filter or a change of user
//! cannot be undone, so each one runs in a copy of the test binary that
//! runs only the `child` test, with the scenario named in the environment.

#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Output};

const SCENARIO_ENV: &str = "BLKMESH_SANDBOX_SCENARIO";
const DIR_ENV: &str = "BLKMESH_SANDBOX_DIR";
/// Printed by a scenario that got to its end.
pub const DONE: &str = "SCENARIO-DONE";

/// The scenario this process was started for, if it is a child.
pub fn scenario() -> Option<String> {
    std::env::var(SCENARIO_ENV).ok()
}

/// A directory the child may use, made and removed by the parent (a
/// filtered child may not be allowed to list and remove directories).
pub fn dir() -> PathBuf {
    PathBuf::from(std::env::var_os(DIR_ENV).expect("run by common::run"))
}

/// Runs `scenario` in a child and returns what it did.
pub fn run(scenario: &str) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, scenario)
        .env(DIR_ENV, dir.path())
        .env_remove("BLKMESH_SECCOMP")
        .output()
        .expect("start the child")
}

/// Ends a scenario that got to its end.
pub fn done() -> ! {
    println!("{DONE}");
    std::process::exit(0)
}

/// Printed by a scenario right before the call that should kill it.
pub const ARMED: &str = "SCENARIO-ARMED";

/// Says that the filter is in and the forbidden call comes next.
pub fn armed() {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{ARMED}");
    let _ = out.flush();
}

/// No core file for the SIGSYS the scenarios expect.
pub fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; no memory is shared.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    assert_eq!(rc, 0);
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The child ran to its end.
pub fn assert_done(out: &Output) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(DONE),
        "the scenario did not finish:\n{}",
        describe(out)
    );
}

/// The child was killed by seccomp (SIGSYS) before its end.
pub fn assert_killed_by_seccomp(out: &Output) {
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS:\n{}",
        describe(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(ARMED) && !stdout.contains(DONE),
        "killed at the wrong place:\n{}",
        describe(out)
    );
}

/// Whether this process runs as root (the privilege tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails the test (instead of skipping it) when not root: the CI runs as
/// root, so a test that cannot run there must say so, not pass.
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (the CI runs the tests as root); not skipping"
    );
}
