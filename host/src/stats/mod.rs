//! Order statistics over raw samples: medians, percentiles and spreads.

pub mod rng;
pub mod significance;

use serde::Serialize;

/// Percentile `p` (0..=100) of `values` by linear interpolation; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// A figure over several samples: its median and spread.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`, or `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        Some(Spread {
            n: values.len(),
            median: percentile(values, 50.0)?,
            p25: percentile(values, 25.0)?,
            p75: percentile(values, 75.0)?,
            min: percentile(values, 0.0)?,
            max: percentile(values, 100.0)?,
        })
    }

    /// The interquartile range as a percentage of the median.
    pub fn iqr_percent(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            100.0 * (self.p75 - self.p25) / self.median
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert!((percentile(&v, 99.0).unwrap() - 3.97).abs() < 1e-9);
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn spread_summarises() {
        let s = Spread::of(&[10.0, 20.0, 30.0, 40.0, 50.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.p25, s.p75, s.min, s.max),
            (5, 30.0, 20.0, 40.0, 10.0, 50.0)
        );
        assert!((s.iqr_percent() - 66.666).abs() < 0.01);
    }
}
