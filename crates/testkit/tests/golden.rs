//! Golden-output tests in the style of qemu-iotests: each
//! `tests/golden/NNN-name.cmds` is a script of blkmeshctl and blkmesh-io
//! commands run against a fresh cluster; its filtered output must equal
//! `NNN-name.out`. Run with `BLKMESH_GOLDEN_UPDATE=1` to (re)write the
//! expected files after a deliberate change, and review the diff.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};

use blkmesh_testkit::{Cluster, ClusterOptions};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Splits a command line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn parse_size(s: &str) -> u64 {
    let (n, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().expect("size") * mul
}

/// Replaces what differs from run to run: paths, addresses, rates, times.
fn filter(text: &str, dir: &Path) -> String {
    let dir = dir.display().to_string();
    text.lines()
        // qemu-io style rate lines carry timings.
        .filter(|l| !(l.contains(" ops; ") && l.contains("/sec")))
        .map(|l| {
            let l = l.replace(&dir, "$DIR");
            // Process ids in tables.
            l.split(' ')
                .map(|w| {
                    if w.starts_with("http://127.0.0.1:") {
                        "$MANAGER".to_string()
                    } else {
                        w.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .map(|l| l.trim_end().to_string() + "\n")
        .collect()
}

fn run_script(name: &str) {
    let script = std::fs::read_to_string(golden_dir().join(format!("{name}.cmds"))).unwrap();
    let cluster = Cluster::start(ClusterOptions::default().workers(1));
    let dir = cluster.dir().to_path_buf();
    let sock = cluster.run_dir().join("golden.sock");
    let mut out = String::new();
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push_str(&format!("=== {line}\n"));
        let expanded = line
            .replace("$DIR", &dir.display().to_string())
            .replace("$SOCK", &sock.display().to_string());
        let w = words(&expanded);
        let (cmd, args) = w.split_first().expect("command");
        let output = match cmd.as_str() {
            "image" => {
                cluster.sparse_image(&args[0], parse_size(&args[1]));
                continue;
            }
            "ctl" => cluster.ctl(args),
            "io" => {
                // Wait for the export's socket the way a VMM would retry.
                blkmesh_testkit::wait_for_path(&sock, true, std::time::Duration::from_secs(10));
                let mut v: Vec<String> = vec![
                    "--socket".into(),
                    sock.display().to_string(),
                    "--timeout".into(),
                    "20".into(),
                ];
                v.extend(args.iter().cloned());
                cluster.run_tool("blkmesh-io", v)
            }
            other => panic!("{name}: unknown script command {other}"),
        };
        out.push_str(&String::from_utf8_lossy(&output.stdout));
        out.push_str(&String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            out.push_str(&format!("(exit {})\n", output.status.code().unwrap_or(-1)));
        }
    }
    let got = filter(&out, &dir);
    let expected_path = golden_dir().join(format!("{name}.out"));
    if std::env::var_os("BLKMESH_GOLDEN_UPDATE").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    if got != expected {
        let mut diff = String::new();
        for (i, (g, e)) in got.lines().zip(expected.lines()).enumerate() {
            if g != e {
                diff.push_str(&format!(
                    "line {}:\n  expected: {e}\n  got:      {g}\n",
                    i + 1
                ));
            }
        }
        panic!(
            "{name}: output differs from {} ({} vs {} lines)\n{diff}\nfull output:\n{got}",
            expected_path.display(),
            got.lines().count(),
            expected.lines().count()
        );
    }
}

#[test]
fn golden_001_basic_io() {
    run_script("001-basic-io");
}

#[test]
fn golden_002_filters() {
    run_script("002-filters");
}

#[test]
fn golden_003_reopen_resize() {
    run_script("003-reopen-resize");
}

#[test]
fn golden_004_zoned() {
    run_script("004-zoned");
}
