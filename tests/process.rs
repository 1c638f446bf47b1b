//! Process-level settings of the real `allotd` (tests/common/daemon.rs), read back from
//! /proc the way an operator would.

mod common;

use common::daemon::Daemon;

#[test]
fn the_daemon_runs_without_transparent_huge_pages() {
    // Goal: allotd turns transparent huge pages off for itself (prctl PR_SET_THP_DISABLE), so
    // no thread stalls zeroing a 2 MiB page inside a page fault while the heap grows. Method:
    // start the daemon and read `THP_enabled` in /proc/<pid>/status (Linux >= 5.0 reports it;
    // a kernel without the line fails here rather than passing unchecked).
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"));
    let status_path = format!("/proc/{}/status", daemon.child.id());
    let status = std::fs::read_to_string(&status_path).expect("reading the daemon's /proc status");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("{status_path} has no THP_enabled line:\n{status}"));
    assert_eq!(thp.trim(), "0", "transparent huge pages are still on for allotd");
    let status = daemon.terminate();
    assert!(status.success(), "allotd did not exit 0 after SIGTERM: {status}");
}
