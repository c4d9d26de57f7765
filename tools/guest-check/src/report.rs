//! The console line format between the guest and the host test.
//!
//! The guest writes plain lines on the serial console, where kernel
//! messages may end up on the same line, so the parser looks for each
//! marker anywhere in a line:
//!
//! ```text
//! BLKMESH-GUEST: start uptime_ms=3120
//! GEOMETRY size=67108864 logical_block_size=512 ... hw_queues=2
//! CHECK geometry ok
//! CHECK discard FAIL offset 9437184: expected zeroes
//! LOOP thread=0 rounds=12 ops=960 p50_us=900 p99_us=4100 max_us=412000 stalls_ms=380,412
//! BLKMESH-GUEST-VERDICT: FAIL 1 checks failed
//! ```

use std::collections::BTreeMap;

/// First line of the check program, with the guest's uptime.
pub const START: &str = "BLKMESH-GUEST: start";
pub const GEOMETRY: &str = "GEOMETRY ";
pub const CHECK: &str = "CHECK ";
pub const LOOP: &str = "LOOP ";
/// The last line of a run.
pub const VERDICT: &str = "BLKMESH-GUEST-VERDICT: ";

/// One `CHECK` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// The rest of the line: the reason of a failure, details of a success.
    pub detail: String,
}

/// The final verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// `n` checks failed (as the guest counted them).
    Fail(u32),
}

/// Everything the guest reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Guest uptime when the check program started (boot time), if printed.
    pub start_uptime_ms: Option<u64>,
    pub geometry: BTreeMap<String, String>,
    pub checks: Vec<Check>,
    /// Loop rounds completed per thread (`[0, 0]` without loop mode).
    pub loop_rounds: [u64; 2],
    /// Per loop thread: `ops`, `p50_us`, `p99_us`, `max_us` of its reads
    /// and writes (empty without loop mode).
    pub loop_latency: [BTreeMap<String, u64>; 2],
    /// Per loop thread: the requests that took 50 ms or more, in ms, in
    /// the order they happened (the stalls failures cost).
    pub loop_stalls_ms: [Vec<u64>; 2],
    /// `None` until the verdict line was printed.
    pub verdict: Option<Verdict>,
}

impl Report {
    /// Parses console text (complete or not yet).
    pub fn parse(console: &str) -> Report {
        let mut r = Report::default();
        for line in console.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(rest) = after(line, START) {
                r.start_uptime_ms = kv(rest)
                    .find(|(k, _)| *k == "uptime_ms")
                    .and_then(|(_, v)| v.parse().ok());
            } else if let Some(rest) = after(line, VERDICT) {
                r.verdict = Some(if rest.trim() == "PASS" {
                    Verdict::Pass
                } else {
                    let n = rest
                        .trim()
                        .strip_prefix("FAIL")
                        .and_then(|s| s.split_whitespace().next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(1);
                    Verdict::Fail(n)
                });
            } else if let Some(rest) = after(line, GEOMETRY) {
                for (k, v) in kv(rest) {
                    r.geometry.insert(k.to_string(), v.to_string());
                }
            } else if let Some(rest) = after(line, LOOP) {
                let mut t = None;
                let mut n = None;
                let mut lat = BTreeMap::new();
                let mut stalls = Vec::new();
                for (k, v) in kv(rest) {
                    match k {
                        "thread" => t = v.parse::<usize>().ok(),
                        "rounds" => n = v.parse::<u64>().ok(),
                        "stalls_ms" => {
                            stalls = v.split(',').filter_map(|x| x.parse().ok()).collect()
                        }
                        _ => {
                            if let Ok(v) = v.parse::<u64>() {
                                lat.insert(k.to_string(), v);
                            }
                        }
                    }
                }
                if let (Some(t @ 0..=1), Some(n)) = (t, n) {
                    r.loop_rounds[t] = n;
                    r.loop_latency[t] = lat;
                    r.loop_stalls_ms[t] = stalls;
                }
            } else if let Some(rest) = after(line, CHECK) {
                let mut it = rest.splitn(3, ' ');
                let (Some(name), Some(status)) = (it.next(), it.next()) else {
                    continue;
                };
                let detail = it.next().unwrap_or("").to_string();
                r.checks.push(Check {
                    name: name.to_string(),
                    ok: status == "ok",
                    detail,
                });
            }
        }
        r
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }
}

/// The text after `marker` when the line contains it.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// `key=value` pairs separated by spaces.
fn kv(s: &str) -> impl Iterator<Item = (&str, &str)> {
    s.split_whitespace().filter_map(|p| p.split_once('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_run_with_kernel_noise() {
        let text = "[    1.2] virtio_blk virtio0: [vda] 131072 512-byte logical blocks\n\
                    BLKMESH-GUEST: start uptime_ms=4100\r\n\
                    GEOMETRY size=67108864 logical_block_size=512 hw_queues=2\n\
                    CHECK geometry ok\n\
                    [    9.9] random: crng initCHECK discard FAIL offset 9437184: expected zeroes\n\
                    LOOP thread=1 rounds=7 ops=56 p50_us=800 p99_us=9000 max_us=410000 stalls_ms=60,410\n\
                    BLKMESH-GUEST-VERDICT: FAIL 1 checks failed\n";
        let r = Report::parse(text);
        assert_eq!(r.start_uptime_ms, Some(4100));
        assert_eq!(r.geometry["size"], "67108864");
        assert_eq!(r.geometry["hw_queues"], "2");
        assert_eq!(r.checks.len(), 2);
        assert!(r.checks[0].ok);
        let bad: Vec<_> = r.failures().collect();
        assert_eq!(bad[0].name, "discard");
        assert_eq!(bad[0].detail, "offset 9437184: expected zeroes");
        assert_eq!(r.loop_rounds, [0, 7]);
        assert_eq!(r.loop_latency[1]["max_us"], 410000);
        assert_eq!(r.loop_latency[1]["ops"], 56);
        assert!(r.loop_latency[0].is_empty());
        assert_eq!(r.loop_stalls_ms, [vec![], vec![60, 410]]);
        assert_eq!(r.verdict, Some(Verdict::Fail(1)));
    }

    #[test]
    fn verdict_absent_until_printed_and_pass_parses() {
        assert_eq!(Report::parse("CHECK geometry ok\n").verdict, None);
        assert_eq!(
            Report::parse("BLKMESH-GUEST-VERDICT: PASS\n").verdict,
            Some(Verdict::Pass)
        );
    }
}
