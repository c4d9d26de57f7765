//! The in-guest benchmark end to end, as short as it goes: one boot per
//! target on a 2-queue disk, two one-second workloads, through real QEMU
//! guests, qemu-storage-daemon and blkmesh's own processes. It checks that
//! every cell of the table holds a figure, not what the figures are (the
//! machine is shared; speed lives in the benchmark, not in tests).

use std::process::Command;

use blkmesh_testkit::bin_path;

#[test]
fn the_bench_measures_both_targets_inside_a_guest() {
    let out = Command::new(env!("CARGO_BIN_EXE_blkmesh-guest-bench"))
        .args([
            "--reps",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--queues",
            "2",
            "--idle",
            "1",
        ])
        .args([
            "--workloads",
            "4k-randread-qd2,64k-write-qd1",
            "--image-size",
            "64m",
        ])
        .arg("--blkmesh")
        .arg(bin_path("blkmesh"))
        .output()
        .expect("run blkmesh-guest-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for w in ["4k-randread-qd2", "64k-write-qd1"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {w} |")))
            .unwrap_or_else(|| panic!("no row for {w}:\n{stdout}"));
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 9, "{row}");
        for c in &cells[1..] {
            assert!(
                c.parse::<f64>().is_ok_and(|v| v > 0.0),
                "{w}: {c:?} in {row}"
            );
        }
    }
    // Both targets' CPU with the guest idle: a number for each.
    let idle = stdout
        .lines()
        .find(|l| l.starts_with("Idle (guest up, no I/O)"))
        .unwrap_or_else(|| panic!("no idle line:\n{stdout}"));
    for t in ["qsd", "blkmesh"] {
        let pct = idle
            .split(", ")
            .find_map(|part| part.rsplit(": ").next()?.strip_prefix(&format!("{t} ")))
            .and_then(|v| v.strip_suffix(" %"))
            .unwrap_or_else(|| panic!("no idle figure for {t}: {idle}"));
        assert!(
            pct.parse::<f64>().is_ok_and(|v| v >= 0.0),
            "{t}: {pct:?} in {idle}"
        );
    }
}

#[test]
fn bad_workloads_are_refused_before_anything_starts() {
    let out = Command::new(env!("CARGO_BIN_EXE_blkmesh-guest-bench"))
        .args(["--workloads", "4k-randread-qd0"])
        .output()
        .expect("run blkmesh-guest-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queue depth must be 1 to 256"), "{stderr}");
}

#[test]
fn an_idle_window_out_of_range_is_refused_before_anything_starts() {
    for bad in ["601", "-1", "x"] {
        let out = Command::new(env!("CARGO_BIN_EXE_blkmesh-guest-bench"))
            .arg(format!("--idle={bad}"))
            .output()
            .expect("run blkmesh-guest-bench");
        assert_eq!(out.status.code(), Some(2), "--idle {bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--idle"), "--idle {bad}: {stderr}");
    }
}
