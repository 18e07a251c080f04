//! Nearest-rank quantiles and medians of a benchmark's samples, one definition for every bench.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

/// The nearest-rank `q` quantile (0 < q ≤ 1) of sorted samples: the smallest sample with at
/// least `q` of all samples at or below it, so every figure reported is one that was measured.
/// NaN when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median, the mean of the two middle samples when their number is even; NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Which of `values` is the median one (the upper of the two middle ones when their number is
/// even), for reporting the rest of that run alongside it; `None` when empty.
pub fn median_index(values: &[f64]) -> Option<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order.get(order.len() / 2).copied()
}

/// Milliseconds of a duration, the unit every latency figure is reported in.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One figure over its samples: how many, the extremes and the nearest-rank quantiles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// The summary of `samples` (any order); every figure NaN (`null` in JSON) when empty.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = samples.into_iter().collect();
        v.sort_by(f64::total_cmp);
        Self {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: quantile(&v, 0.50),
            p90: quantile(&v, 0.90),
            p99: quantile(&v, 0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// The summary of durations, in milliseconds.
    pub fn of_ms<'a>(samples: impl IntoIterator<Item = &'a Duration>) -> Self {
        Self::of(samples.into_iter().copied().map(ms))
    }

    /// The latency shape of the reports: `{"n", "min_ms", "p50_ms", "p90_ms", "p99_ms",
    /// "max_ms"}`, for stats made with [`Stats::of_ms`].
    pub fn ms_json(&self) -> Value {
        json!({
            "n": self.n,
            "min_ms": self.min,
            "p50_ms": self.p50,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "max_ms": self.max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_samples() {
        // 1..=100 in a scrambled order: the q quantile is the sample of rank ceil(q × 100).
        let samples = (0..100).map(|i| f64::from((i * 37) % 100 + 1));
        let s = Stats::of(samples);
        assert_eq!(
            s,
            Stats {
                n: 100,
                min: 1.0,
                p50: 50.0,
                p90: 90.0,
                p99: 99.0,
                max: 100.0,
            }
        );
        // Ten samples: p99 is the largest, p50 the fifth, p90 the ninth.
        let ten = Stats::of((1..=10).rev().map(f64::from));
        assert_eq!((ten.p50, ten.p90, ten.p99, ten.max), (5.0, 9.0, 10.0, 10.0));
        // One sample is every quantile.
        let one = Stats::of([7.5]);
        assert_eq!((one.min, one.p50, one.p99, one.max), (7.5, 7.5, 7.5, 7.5));
    }

    #[test]
    fn quantile_edges_stay_inside_the_samples() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&sorted, 0.0), 1.0);
        assert_eq!(quantile(&sorted, 0.25), 1.0);
        assert_eq!(quantile(&sorted, 0.26), 2.0);
        assert_eq!(quantile(&sorted, 1.0), 4.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn no_samples_give_no_figures() {
        let s = Stats::of([]);
        assert_eq!(s.n, 0);
        assert!(s.min.is_nan() && s.p50.is_nan() && s.max.is_nan());
        // NaN is written as null, not as a number nobody measured.
        assert_eq!(s.ms_json()["p99_ms"], Value::Null);
    }

    #[test]
    fn durations_are_summarised_in_milliseconds() {
        let d: Vec<Duration> = [3, 1, 2].map(Duration::from_secs).to_vec();
        let s = Stats::of_ms(&d);
        assert_eq!((s.min, s.p50, s.max), (1000.0, 2000.0, 3000.0));
        assert_eq!(s.ms_json()["p50_ms"], json!(2000.0));
        assert_eq!(s.ms_json()["n"], json!(3));
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        // The median run of four is the upper middle one: index 0 holds 3.0.
        assert_eq!(median_index(&[3.0, 1.0, 4.0, 2.0]), Some(0));
        assert_eq!(median_index(&[9.0, 1.0, 5.0]), Some(2));
        assert_eq!(median_index(&[]), None);
    }
}
