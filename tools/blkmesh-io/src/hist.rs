//! Latency histogram with log-linear buckets (HDR-style): 64 linear
//! sub-buckets per power of two, so any value is within 1/64 (~1.6%) of
//! its bucket's bounds. Recording is an index computation and an increment.

use std::time::Duration;

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values up to 2^42 ns (~73 minutes) are recorded exactly as bucketed;
/// larger ones land in the last bucket.
const MAX_EXP: u32 = 42 - SUB_BITS;
const BUCKETS: usize = ((MAX_EXP + 2) as usize) * SUB as usize;

/// Nanosecond latency histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

fn index(ns: u64) -> usize {
    if ns < 2 * SUB {
        return ns as usize;
    }
    let exp = (63 - ns.leading_zeros() - SUB_BITS).min(MAX_EXP);
    let sub = ((ns >> exp) - SUB).min(SUB - 1);
    ((exp as u64 + 1) * SUB + sub) as usize
}

/// Upper bound (inclusive) of bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let exp = i / SUB - 1;
    let sub = i % SUB;
    ((SUB + sub + 1) << exp) - 1
}

impl Histogram {
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1) in nanoseconds: the upper bound of
    /// the bucket holding it, clamped to the exact maximum.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }

    pub fn min_ns(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min_ns
        }
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = None;
        for ns in (0..5000u64).chain([1 << 20, (1 << 30) + 12345, 1 << 41]) {
            let i = index(ns);
            assert!(upper(i) >= ns, "ns {ns} above bucket {i}");
            if i > 0 {
                assert!(upper(i - 1) < ns, "ns {ns} belongs below bucket {i}");
            }
            // Relative bucket width below 1/64.
            assert!((upper(i) - ns) as f64 <= ns as f64 / 64.0 + 1.0);
            if let Some(p) = prev {
                assert!(i >= p);
            }
            prev = Some(i);
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_match_sorted_values() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile_ns(0.5) as f64 / 1000.0;
        let p99 = h.quantile_ns(0.99) as f64 / 1000.0;
        assert!((p50 - 500.0).abs() <= 500.0 / 64.0 + 1.0, "{p50}");
        assert!((p99 - 990.0).abs() <= 990.0 / 64.0 + 1.0, "{p99}");
        assert_eq!(h.quantile_ns(1.0), 1_000_000);
        assert_eq!(h.min_ns(), 1000);
        assert!((h.mean_ns() - 500_500.0).abs() < 1.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(20));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.min_ns(), 10_000);
        assert_eq!(a.max_ns(), 20_000);
        assert_eq!(Histogram::default().quantile_ns(0.5), 0);
    }
}
