//! Latency percentiles without a histogram library: every sample is kept as
//! microseconds in a `Vec<u32>` and sorted once at the end, which is exact and cheap
//! at the sizes a bench run produces (a million samples is 4 MiB and one sort).

use serde_json::{Value, json};

/// p50, p99, p99.9 and max of a run, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
}

impl Percentiles {
    /// Sorts `samples` in place and reads the percentiles (nearest rank).
    pub fn of(samples: &mut [u32]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let n = samples.len();
            let index = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[index]
        };
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples[samples.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max})
    }

    /// `p50 0.41ms  p99 1.9ms  p99.9 3.2ms  max 12ms`
    pub fn human(&self) -> String {
        format!(
            "p50 {}  p99 {}  p99.9 {}  max {}",
            micros(self.p50),
            micros(self.p99),
            micros(self.p999),
            micros(self.max)
        )
    }
}

/// Saturating microseconds for a sample.
pub fn sample(us: u64) -> u32 {
    u32::try_from(us).unwrap_or(u32::MAX)
}

fn micros(us: u32) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..10_000 => format!("{:.2}ms", f64::from(us) / 1_000.0),
        10_000..1_000_000 => format!("{:.1}ms", f64::from(us) / 1_000.0),
        _ => format!("{:.2}s", f64::from(us) / 1_000_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u32> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (500, 990, 999, 1000));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        assert_eq!(Percentiles::of(&mut [7]).p999, 7);
    }

    #[test]
    fn human_units() {
        assert_eq!(micros(420), "420µs");
        assert_eq!(micros(1_900), "1.90ms");
        assert_eq!(micros(12_345), "12.3ms");
        assert_eq!(micros(2_500_000), "2.50s");
    }
}
