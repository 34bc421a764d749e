//! Hook latency since start, in a fixed-size log-linear histogram (about 3% precision),
//! so memory does not grow with the number of calls.

const SUB: usize = 32; // buckets per power of two
const GROUPS: usize = 40;

pub struct Latency {
    counts: Vec<u64>,
    pub count: u64,
    pub max_us: u64,
    pub sum_us: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { counts: vec![0; SUB * GROUPS], count: 0, max_us: 0, sum_us: 0 }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let g = 63 - v.leading_zeros() as usize; // v in [2^g, 2^(g+1))
    let shift = g - 5; // SUB = 2^5
    let idx = (g - 4) * SUB + ((v >> shift) as usize - SUB);
    idx.min(SUB * GROUPS - 1)
}

fn bucket_value(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let g = i / SUB + 4;
    let within = (i % SUB) as u64;
    (SUB as u64 + within) << (g - 5)
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        self.counts[bucket(us)] += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    /// The value at quantile q (0..=1), as the low edge of its bucket, capped by the max.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i).min(self.max_us);
            }
        }
        self.max_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_within_precision() {
        let mut l = Latency::default();
        for v in 1..=10_000u64 {
            l.record(v);
        }
        for (q, want) in [(0.5, 5000.0), (0.99, 9900.0)] {
            let got = l.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.04, "q{q}: {got} vs {want}");
        }
        assert_eq!(l.max_us, 10_000);
        assert_eq!(l.quantile(1.0), 10_000u64.min(bucket_value(bucket(10_000))).max(9_728));
        for v in [0u64, 1, 31, 32, 33, 1000, 123_456, u64::MAX / 2] {
            assert!(bucket_value(bucket(v)) <= v);
        }
    }
}
