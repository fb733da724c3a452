//! Paired comparison statistics for `host compare`: is B faster than A, slower, or is the
//! difference noise?
//!
//! The input is one log-ratio ln(B / A) per pair of requests (same prompt instance, same round,
//! its two requests taking turns on the machine) and its weight. [`Paired::weighted`] gives the geometric-mean ratio B/A
//! (weighted: a pair's weight says how precisely it is timed) with a Student-t
//! confidence interval, a bootstrap interval as a cross-check, and the two-sided p-value of the
//! paired t-test. [`Paired::verdict`] calls a figure better or worse only when p is below the
//! look's alpha *and* the whole t interval lies beyond the noise threshold; anything else is
//! [`Verdict::Noise`].
//!
//! Repeated looks: a comparison that adds rounds and tests again after each batch would, at a
//! fixed alpha per look, find a difference that is not there far more often than alpha. A
//! [`LookSchedule`] fixes the looks in advance and splits alpha between the figures tested
//! (Bonferroni: the shares sum to one). Each test spends its share over the looks with a
//! Hwang-Shih-DeCani spending function ([`spent`]) at information fraction t = look / looks;
//! its gamma sets how much is spent early (-4 is close to O'Brien-Fleming, almost nothing at
//! the first looks; the default -1 lets a large change stop at look 1 and keeps most of the
//! power for the last). [`spending_boundaries`] turns that into the nominal alpha of each look
//! by integrating the null distribution of the running z-statistic numerically, so the chance
//! of any false verdict over all looks and figures stays at most the stated alpha, whenever the
//! comparison stops. The tests below simulate the choice with the spread measured per pair.
//!
//! A figure can also be *settled* without a verdict: when its whole interval lies inside the
//! noise band, more rounds cannot make it FASTER or SLOWER by more than the threshold
//! ([`Paired::within`]), so `host compare` stops measuring it.

use serde::Serialize;
use statrs::distribution::{Continuous, ContinuousCDF, Normal, StudentsT};

use crate::stats::rng::SplitMix64;

/// Which direction of a figure is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Better {
    /// Rates: decode and prefill tokens per second.
    Higher,
    /// Times and memory: time to first token, peak resident memory.
    Lower,
}

/// The call on one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Verdict {
    /// B is better than A by more than the noise threshold, significantly.
    Faster,
    /// B is worse than A by more than the noise threshold, significantly.
    Slower,
    /// Not decided: no significant difference, or one within the noise threshold.
    Noise,
}

/// Resamples drawn for the bootstrap interval.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// The paired statistics of one figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paired {
    /// Pairs.
    pub n: usize,
    /// Geometric-mean ratio B/A.
    pub ratio: f64,
    /// Student-t confidence interval of the ratio, at the alpha it was computed for.
    pub ci: (f64, f64),
    /// Percentile-bootstrap interval of the ratio, same alpha (a cross-check of `ci`).
    pub ci_bootstrap: (f64, f64),
    /// Two-sided p-value of the paired t-test of "no difference".
    pub p: f64,
    pub alpha: f64,
    /// Standard deviation of the log-ratios (one pair's spread).
    pub sd: f64,
}

impl Paired {
    /// Statistics of `log_ratios` (ln(B/A) per pair) at confidence 1 - `alpha`; `None` with
    /// fewer than two pairs or a non-finite ratio. `seed` fixes the bootstrap's resampling.
    #[cfg(test)]
    pub fn of(log_ratios: &[f64], alpha: f64, seed: u64) -> Option<Paired> {
        Self::weighted(log_ratios, &vec![1.0; log_ratios.len()], alpha, seed)
    }

    /// [`Paired::of`] without the bootstrap (its interval is left at the t interval): for
    /// simulations that make millions of tests.
    #[cfg(test)]
    pub fn t_only(log_ratios: &[f64], alpha: f64) -> Option<Paired> {
        Self::weighted_t_only(log_ratios, &vec![1.0; log_ratios.len()], alpha)
    }

    /// [`Paired::of`] for pairs of unequal precision: pair i's log-ratio has variance
    /// sigma^2 / `weights[i]` (a prefill of 1,600 tokens varies far less than one of 80, so
    /// its prompt tokens are its weight). The mean is weighted, sigma^2 is estimated from the
    /// weighted squares with n - 1 degrees of freedom, and the mean's variance is
    /// sigma^2 / sum(weights): with equal weights, exactly the paired t-test. `sd` is then the
    /// spread of a pair of average weight. `None` also when a weight is not positive.
    pub fn weighted(log_ratios: &[f64], weights: &[f64], alpha: f64, seed: u64) -> Option<Paired> {
        let mut paired = Self::weighted_t_only(log_ratios, weights, alpha)?;
        paired.ci_bootstrap = bootstrap(log_ratios, weights, alpha, seed);
        Some(paired)
    }

    /// [`Paired::weighted`] without the bootstrap.
    pub fn weighted_t_only(log_ratios: &[f64], weights: &[f64], alpha: f64) -> Option<Paired> {
        let n = log_ratios.len();
        if n < 2
            || weights.len() != n
            || log_ratios.iter().any(|x| !x.is_finite())
            || weights.iter().any(|w| !(w.is_finite() && *w > 0.0))
        {
            return None;
        }
        let total: f64 = weights.iter().sum();
        let mean = weighted_mean(log_ratios, weights);
        // sigma^2: the variance of a pair of weight 1.
        let sigma2 = log_ratios
            .iter()
            .zip(weights)
            .map(|(x, w)| w * (x - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        let se = (sigma2 / total).sqrt();
        let (ci, p) = if se == 0.0 {
            // Identical ratios: the difference is exactly known.
            (
                (mean.exp(), mean.exp()),
                if mean == 0.0 { 1.0 } else { 0.0 },
            )
        } else {
            let t = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?;
            let q = t_quantile(n - 1, 1.0 - alpha / 2.0)?;
            let p = 2.0 * (1.0 - t.cdf((mean / se).abs()));
            (((mean - q * se).exp(), (mean + q * se).exp()), p)
        };
        Some(Paired {
            n,
            ratio: mean.exp(),
            ci,
            ci_bootstrap: ci,
            p,
            alpha,
            // se = sd / sqrt(n), as for equal weights.
            sd: se * (n as f64).sqrt(),
        })
    }

    /// The chance that this figure ends SLOWER at the comparison's last look (`end_n` pairs,
    /// tested at `end_alpha`) if the pairs still to come follow the present estimate and
    /// spread: stochastic curtailment with the current trend (Lan, Simon and Halperin, 1982).
    /// The final mean is then normal around today's mean with variance
    /// sd^2 (end_n - n) / end_n^2, and SLOWER needs the final interval's good end beyond the
    /// noise band. A figure whose chance is tiny cannot block a keep however long the
    /// comparison runs, so measuring need not wait for it.
    pub fn chance_slower_at_end(
        &self,
        better: Better,
        noise: f64,
        end_n: usize,
        end_alpha: f64,
    ) -> f64 {
        // In "worse is negative" terms.
        let sign = match better {
            Better::Higher => 1.0,
            Better::Lower => -1.0,
        };
        let mean = sign * self.ratio.ln();
        let end_n = end_n.max(self.n);
        let Some(q) = t_quantile(end_n - 1, 1.0 - end_alpha / 2.0) else {
            return 1.0;
        };
        // SLOWER at the end: final mean + q sd / sqrt(end_n) below -ln(1 + noise).
        let bound = -(1.0 + noise).ln() - q * self.sd / (end_n as f64).sqrt();
        let spread = self.sd * ((end_n - self.n) as f64).sqrt() / end_n as f64;
        if spread == 0.0 || !spread.is_finite() {
            return if mean < bound { 1.0 } else { 0.0 };
        }
        Normal::standard().cdf((bound - mean) / spread)
    }

    /// The chance that this figure ends FASTER at the last look, on the same assumptions as
    /// [`Paired::chance_slower_at_end`]: B's better is A's worse.
    pub fn chance_faster_at_end(
        &self,
        better: Better,
        noise: f64,
        end_n: usize,
        end_alpha: f64,
    ) -> f64 {
        let flipped = match better {
            Better::Higher => Better::Lower,
            Better::Lower => Better::Higher,
        };
        self.chance_slower_at_end(flipped, noise, end_n, end_alpha)
    }

    /// Whether the whole interval lies inside the noise band (1/(1+noise), 1+noise): the figure
    /// is the same within the threshold, and more rounds would not change its verdict.
    pub fn within(&self, noise: f64) -> bool {
        self.ci.0 > 1.0 / (1.0 + noise) && self.ci.1 < 1.0 + noise
    }

    /// Whether the interval's bad end lies inside the noise band: B is shown not worse than A
    /// by more than `noise`, in the direction `better` says is good, whatever the other end.
    pub fn not_worse(&self, better: Better, noise: f64) -> bool {
        match better {
            Better::Higher => self.ci.0 > 1.0 / (1.0 + noise),
            Better::Lower => self.ci.1 < 1.0 + noise,
        }
    }

    /// The call for a figure where `better` is the good direction, with `noise` the smallest
    /// relative change worth a verdict (0.01 = 1%).
    pub fn verdict(&self, better: Better, noise: f64) -> Verdict {
        if self.p >= self.alpha {
            return Verdict::Noise;
        }
        let (up, down) = (1.0 + noise, 1.0 / (1.0 + noise));
        let (lo, hi) = self.ci;
        let higher = lo > up;
        let lower = hi < down;
        match (better, higher, lower) {
            (Better::Higher, true, _) | (Better::Lower, _, true) => Verdict::Faster,
            (Better::Higher, _, true) | (Better::Lower, true, _) => Verdict::Slower,
            _ => Verdict::Noise,
        }
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom; `None` for df 0. Remembered
/// per thread: a comparison asks for the same few (its looks' alphas, its pair counts) again
/// and again, and the simulations that justify the protocol ask millions of times.
fn t_quantile(df: usize, p: f64) -> Option<f64> {
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static KNOWN: RefCell<HashMap<(usize, u64), f64>> = RefCell::new(HashMap::new());
    }
    if let Some(q) = KNOWN.with(|k| k.borrow().get(&(df, p.to_bits())).copied()) {
        return Some(q);
    }
    let q = StudentsT::new(0.0, 1.0, df as f64).ok()?.inverse_cdf(p);
    KNOWN.with(|k| k.borrow_mut().insert((df, p.to_bits()), q));
    Some(q)
}

/// sum(w x) / sum(w).
fn weighted_mean(xs: &[f64], weights: &[f64]) -> f64 {
    xs.iter().zip(weights).map(|(x, w)| w * x).sum::<f64>() / weights.iter().sum::<f64>()
}

/// The percentile-bootstrap interval of the (weighted) geometric-mean ratio: pairs resampled
/// with their weights.
fn bootstrap(log_ratios: &[f64], weights: &[f64], alpha: f64, seed: u64) -> (f64, f64) {
    let n = log_ratios.len();
    let mut rng = SplitMix64::new(seed);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let (mut sum, mut total) = (0.0, 0.0);
            for _ in 0..n {
                let i = rng.below(n as u64) as usize;
                sum += weights[i] * log_ratios[i];
                total += weights[i];
            }
            sum / total
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[(q * (BOOTSTRAP_RESAMPLES - 1) as f64).round() as usize].exp();
    (at(alpha / 2.0), at(1.0 - alpha / 2.0))
}

/// Looks fixed in advance: after every `rounds_per_look` rounds, up to `looks` times. Each test
/// has its share of `alpha` and, per look, the nominal alpha that share allows there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LookSchedule {
    /// The chance of any false verdict over every test and look.
    pub alpha: f64,
    pub looks: u32,
    pub rounds_per_look: u32,
    /// How alpha is spent over the looks (for readers of the JSON).
    pub spending: &'static str,
    /// The Hwang-Shih-DeCani spending parameter: -4 spends almost nothing early (close to
    /// O'Brien-Fleming), 0 spends evenly, 1 spends most early (close to Pocock).
    pub gamma: f64,
    /// The independent tests made at each look.
    pub tests: Vec<SpentTest>,
}

/// One test's part of a [`LookSchedule`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpentTest {
    pub name: &'static str,
    /// Its share of the schedule's alpha (the shares sum to one).
    pub share: f64,
    /// The two-sided alpha it is tested at, at each look in order.
    pub nominal: Vec<f64>,
}

/// Named in the JSON's `spending` field.
const SPENDING: &str = "Hwang-Shih-DeCani alpha spending, Bonferroni over tests";

impl LookSchedule {
    /// A schedule of `looks` looks, `rounds_per_look` apart, testing each of `shares` (name,
    /// share of alpha) at every look, spending each share with parameter `gamma` (see
    /// [`spent`]). The shares must be positive and sum to one.
    pub fn new(
        alpha: f64,
        looks: u32,
        rounds_per_look: u32,
        gamma: f64,
        shares: &[(&'static str, f64)],
    ) -> Self {
        debug_assert!((shares.iter().map(|s| s.1).sum::<f64>() - 1.0).abs() < 1e-9);
        LookSchedule {
            alpha,
            looks,
            rounds_per_look,
            spending: SPENDING,
            gamma,
            tests: shares
                .iter()
                .map(|&(name, share)| SpentTest {
                    name,
                    share,
                    nominal: spending_boundaries(alpha * share, looks, gamma),
                })
                .collect(),
        }
    }

    /// The alpha test `name` is made at, at look `look` (1-based); `None` for an unknown test or
    /// a look outside the schedule.
    pub fn alpha_at(&self, name: &str, look: u32) -> Option<f64> {
        let test = self.tests.iter().find(|t| t.name == name)?;
        test.nominal.get(look.checked_sub(1)? as usize).copied()
    }

    /// The most rounds a comparison runs.
    pub fn max_rounds(&self) -> u32 {
        self.looks * self.rounds_per_look
    }

    /// Whether the comparison looks after `rounds` completed rounds.
    pub fn looks_after(&self, rounds: u32) -> bool {
        rounds > 0 && rounds.is_multiple_of(self.rounds_per_look) && rounds <= self.max_rounds()
    }

    /// The look made after `rounds` completed rounds (1-based).
    pub fn look_number(&self, rounds: u32) -> u32 {
        rounds / self.rounds_per_look
    }
}

/// Half-width of the grid the null density is integrated on, in standard deviations.
const GRID_HALF_WIDTH: f64 = 8.0;
/// Grid step of the numerical integration (see the test that halves it).
const GRID_STEP: f64 = 0.02;

/// The share of `alpha` spent by information fraction `t` (0..=1) under the Hwang-Shih-DeCani
/// family: alpha (1 - e^(-gamma t)) / (1 - e^(-gamma)), and alpha t at gamma = 0. Negative
/// gammas keep alpha for the last looks (a small change is found there); positive ones spend it
/// early (a large change stops sooner).
pub fn spent(alpha: f64, gamma: f64, t: f64) -> f64 {
    if gamma.abs() < 1e-9 {
        alpha * t
    } else {
        alpha * (1.0 - (-gamma * t).exp()) / (1.0 - (-gamma).exp())
    }
}

/// The nominal two-sided alpha of each of `looks` equally spaced looks when `alpha` is spent
/// as [`spent`] with parameter `gamma` says.
///
/// Under "no difference" the running statistic Z_k after look k is the sum of k independent
/// standard normal increments divided by sqrt(k). The boundary c_k is chosen so that the chance
/// of first crossing |Z| > c at look k equals the alpha spent between looks k-1 and k. The
/// density of Z_k over the paths that have not crossed yet is carried from look to look on a
/// grid (trapezoid rule). The nominal alpha of look k is then 2 (1 - Phi(c_k)); `host compare`
/// applies it to the paired t-test at that look.
pub fn spending_boundaries(alpha: f64, looks: u32, gamma: f64) -> Vec<f64> {
    boundaries_on_grid(alpha, looks, gamma, GRID_STEP)
}

fn boundaries_on_grid(alpha: f64, looks: u32, gamma: f64, step: f64) -> Vec<f64> {
    let normal = Normal::standard();
    let spent = |t: f64| spent(alpha, gamma, t);
    let points = (2.0 * GRID_HALF_WIDTH / step).round() as usize + 1;
    let grid: Vec<f64> = (0..points)
        .map(|i| -GRID_HALF_WIDTH + i as f64 * step)
        .collect();
    // Density of Z_1 on the grid.
    let mut density: Vec<f64> = grid.iter().map(|&x| normal.pdf(x)).collect();
    let mut nominal = Vec::with_capacity(looks as usize);
    let mut before = 0.0;
    for k in 1..=looks {
        let cumulative = spent(k as f64 / looks as f64);
        let target = (cumulative - before).max(0.0);
        before = cumulative;
        let total = trapezoid(grid.iter().copied().zip(density.iter().copied()));
        let tail = |c: f64| total - trapezoid(inside(&grid, &density, c).into_iter());
        let c = bisect(tail, target);
        nominal.push(2.0 * (1.0 - normal.cdf(c)));
        if k == looks {
            break;
        }
        // Carry the density of the paths still inside [-c, c] to the next look:
        // Z_{k+1} = (sqrt(k) Z_k + e) / sqrt(k+1), e ~ N(0, 1).
        let (now, next) = ((k as f64).sqrt(), ((k + 1) as f64).sqrt());
        let nodes = inside(&grid, &density, c);
        density = grid
            .iter()
            .map(|&y| {
                trapezoid(
                    nodes
                        .iter()
                        .map(|&(x, f)| (x, f * next * normal.pdf(next * y - now * x))),
                )
            })
            .collect();
    }
    nominal
}

/// The nodes of `density` on [-c, c]: the grid points inside, plus both ends interpolated.
fn inside(grid: &[f64], density: &[f64], c: f64) -> Vec<(f64, f64)> {
    let at = |x: f64| -> f64 {
        let step = grid[1] - grid[0];
        let i = (((x - grid[0]) / step).floor() as usize).min(grid.len() - 2);
        let w = (x - grid[i]) / step;
        density[i] * (1.0 - w) + density[i + 1] * w
    };
    let mut nodes = vec![(-c, at(-c))];
    nodes.extend(
        grid.iter()
            .zip(density)
            .filter(|(x, _)| x.abs() < c)
            .map(|(&x, &f)| (x, f)),
    );
    nodes.push((c, at(c)));
    nodes
}

/// The c in [0, GRID_HALF_WIDTH] where the decreasing `tail(c)` equals `target`.
fn bisect(tail: impl Fn(f64) -> f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, GRID_HALF_WIDTH);
    if tail(hi) >= target {
        return hi;
    }
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if tail(mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Trapezoid rule over (x, f(x)) nodes in increasing x.
fn trapezoid(nodes: impl Iterator<Item = (f64, f64)>) -> f64 {
    let mut sum = 0.0;
    let mut last: Option<(f64, f64)> = None;
    for (x, f) in nodes {
        if let Some((x0, f0)) = last {
            sum += (x - x0) * (f + f0) / 2.0;
        }
        last = Some((x, f));
    }
    sum
}

/// A normal deviate (Box-Muller) from the shared PRNG, for the simulations of the tests.
#[cfg(test)]
pub(crate) fn gaussian(rng: &mut SplitMix64) -> f64 {
    let u = |rng: &mut SplitMix64| (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    let (a, b) = (u(rng).max(1e-300), u(rng));
    (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one sequential comparison under `schedule`, testing its "decode" share, the way
    /// `host compare` does: every pair has its own fresh workers, so each of the
    /// `pairs_per_round` pairs of a round is one independent log-ratio (mean `effect`, spread
    /// `sd`, the workers' own offsets included). Returns the verdict and the rounds used.
    fn simulate(
        rng: &mut SplitMix64,
        effect: f64,
        sd: f64,
        pairs_per_round: usize,
        schedule: &LookSchedule,
        better: Better,
    ) -> (Verdict, u32) {
        let mut logs = Vec::new();
        for round in 1..=schedule.max_rounds() {
            logs.extend((0..pairs_per_round).map(|_| effect + sd * gaussian(rng)));
            if schedule.looks_after(round) {
                let alpha = schedule
                    .alpha_at("decode", schedule.look_number(round))
                    .unwrap();
                let p = Paired::t_only(&logs, alpha).unwrap();
                let v = p.verdict(better, 0.01);
                if v != Verdict::Noise {
                    return (v, round);
                }
            }
        }
        (Verdict::Noise, schedule.max_rounds())
    }

    /// Verdicts and rounds of `trials` simulated comparisons of a true ratio `ratio`.
    fn campaign(
        seed: u64,
        trials: usize,
        ratio: f64,
        sd: f64,
        s: &LookSchedule,
    ) -> Vec<(Verdict, u32)> {
        let mut rng = SplitMix64::new(seed);
        (0..trials)
            .map(|_| simulate(&mut rng, ratio.ln(), sd, 5, s, Better::Higher))
            .collect()
    }

    /// The schedule `host compare` uses by default (prompts/protocol.toml), decode tested with
    /// 3/5 of alpha.
    fn schedule() -> LookSchedule {
        let rules = crate::harness::protocol::Protocol::shipped().compare;
        LookSchedule::new(
            rules.alpha,
            rules.looks,
            rules.rounds_per_look,
            rules.spending_gamma,
            &[("decode", 0.6), ("prefill", 0.2), ("rss", 0.2)],
        )
    }

    #[test]
    fn weights_say_how_precisely_each_pair_was_timed() {
        let logs = [0.10, -0.08, 0.02, 0.001, 0.05];
        let plain = Paired::t_only(&logs, 0.05).unwrap();
        // Equal weights, whatever their size, are the plain paired t-test.
        for w in [1.0, 80.0] {
            let same = Paired::weighted_t_only(&logs, &[w; 5], 0.05).unwrap();
            assert!((same.ratio - plain.ratio).abs() < 1e-12, "{same:?}");
            assert!((same.ci.0 - plain.ci.0).abs() < 1e-12 && (same.p - plain.p).abs() < 1e-12);
            assert!((same.sd - plain.sd).abs() < 1e-12);
        }
        // A long prefill (1,680 tokens) among short ones (80) pulls the mean to itself.
        let weights = [80.0, 80.0, 80.0, 80.0, 1680.0];
        let w = Paired::weighted_t_only(&logs, &weights, 0.05).unwrap();
        let mean = logs.iter().zip(weights).map(|(x, w)| x * w).sum::<f64>() / 2000.0;
        assert!((w.ratio.ln() - mean).abs() < 1e-12, "{w:?}");
        assert!((w.ratio.ln() - 0.05).abs() < 0.01, "{w:?}");
        // sigma^2 = sum w (x - mean)^2 / (n - 1); the mean's variance is sigma^2 / sum w.
        let sigma2 = logs
            .iter()
            .zip(weights)
            .map(|(x, wt)| wt * (x - mean).powi(2))
            .sum::<f64>()
            / 4.0;
        let se = (sigma2 / 2000.0).sqrt();
        let q = t_quantile(4, 0.975).unwrap();
        assert!((w.ci.1.ln() - (mean + q * se)).abs() < 1e-12, "{w:?}");
        // Bad weights are refused, like bad ratios.
        assert_eq!(Paired::weighted_t_only(&logs, &[1.0; 4], 0.05), None);
        assert_eq!(
            Paired::weighted_t_only(&logs, &[1.0, 1.0, 0.0, 1.0, 1.0], 0.05),
            None
        );
        assert_eq!(
            Paired::weighted_t_only(&logs, &[1.0, 1.0, f64::NAN, 1.0, 1.0], 0.05),
            None
        );
        // The bootstrap resamples pairs with their weights: the heavy pair dominates it too.
        let boot = Paired::weighted(&logs, &weights, 0.05, 3)
            .unwrap()
            .ci_bootstrap;
        assert!(boot.0 < w.ratio && w.ratio < boot.1, "{boot:?} {w:?}");
    }

    #[test]
    fn a_clear_difference_is_decided_in_both_directions() {
        let faster: Vec<f64> = [1.10f64, 1.12, 1.09, 1.11, 1.10, 1.13]
            .iter()
            .map(|r| r.ln())
            .collect();
        let p = Paired::of(&faster, 0.05, 1).unwrap();
        assert!((p.ratio - 1.108).abs() < 0.002, "{p:?}");
        assert!(p.ci.0 > 1.08 && p.ci.1 < 1.13 && p.p < 0.001, "{p:?}");
        assert!(p.ci_bootstrap.0 > 1.08 && p.ci_bootstrap.1 < 1.13, "{p:?}");
        assert_eq!(p.verdict(Better::Higher, 0.01), Verdict::Faster);
        assert_eq!(p.verdict(Better::Lower, 0.01), Verdict::Slower);
        // Significant but inside the noise threshold: noise.
        assert_eq!(p.verdict(Better::Higher, 0.5), Verdict::Noise);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(Paired::of(&[0.1], 0.05, 1), None, "one pair");
        assert_eq!(Paired::of(&[0.1, f64::NAN], 0.05, 1), None);
        let same = Paired::of(&[0.0, 0.0, 0.0], 0.05, 1).unwrap();
        assert_eq!((same.ratio, same.ci, same.p), (1.0, (1.0, 1.0), 1.0));
        assert_eq!(same.verdict(Better::Higher, 0.01), Verdict::Noise);
        assert!(same.within(0.01), "an exactly known ratio of 1 is settled");
        let wide = Paired::of(&[-0.05, 0.05, 0.0], 0.05, 1).unwrap();
        assert!(!wide.within(0.01), "{wide:?}");
        assert!(!wide.not_worse(Better::Higher, 0.01) && !wide.not_worse(Better::Lower, 0.01));
        // 5% up, give or take 1%: not worse for a rate, worse for a time.
        let up = Paired::of(&[0.04, 0.05, 0.06], 0.05, 1).unwrap();
        assert!(up.not_worse(Better::Higher, 0.01), "{up:?}");
        assert!(!up.not_worse(Better::Lower, 0.01), "{up:?}");
    }

    #[test]
    fn the_chance_of_ending_slower_follows_the_trend() {
        let figure = |ratio: f64, n: usize| {
            let logs: Vec<f64> = (0..n)
                .map(|i| ratio.ln() + if i % 2 == 0 { 0.1 } else { -0.1 })
                .collect();
            Paired::t_only(&logs, 0.01).unwrap()
        };
        let chance = |p: &Paired, better| p.chance_slower_at_end(better, 0.01, 60, 0.005);
        // Ahead, or level: almost no chance of ending SLOWER.
        assert!(chance(&figure(1.05, 20), Better::Higher) < 1e-6);
        assert!(chance(&figure(1.0, 20), Better::Higher) < 0.01);
        // Well behind with 40 pairs to go: it would almost surely end SLOWER.
        assert!(chance(&figure(0.85, 20), Better::Higher) > 0.99);
        // A time or a memory figure: higher is worse.
        assert!(chance(&figure(1.15, 20), Better::Lower) > 0.99);
        assert!(chance(&figure(0.95, 20), Better::Lower) < 1e-6);
        // Nothing left to run: the chance is the final verdict itself.
        let done = figure(0.85, 60);
        assert_eq!(chance(&done, Better::Higher), 1.0);
        assert_eq!(done.verdict(Better::Higher, 0.01), Verdict::Slower);
        assert_eq!(chance(&figure(1.0, 60), Better::Higher), 0.0);
    }

    #[test]
    fn one_look_spends_all_of_alpha() {
        let one = spending_boundaries(0.05, 1, -4.0);
        assert_eq!(one.len(), 1);
        assert!((one[0] - 0.05).abs() < 1e-4, "{one:?}");
    }

    #[test]
    fn the_boundaries_spend_alpha_late_and_exactly() {
        let alpha = 0.03;
        let nominal = spending_boundaries(alpha, 6, -4.0);
        eprintln!("nominal alpha per look: {nominal:.5?}");
        assert_eq!(nominal.len(), 6);
        // The first look's boundary is known in closed form: alpha(1/6) itself.
        let normal = Normal::standard();
        let first = spent(alpha, -4.0, 1.0 / 6.0);
        assert!(
            (nominal[0] - first).abs() < 1e-3 * first + 1e-12,
            "{nominal:?} vs {first}"
        );
        // Later looks get more, the last most, but never the whole alpha.
        assert!(nominal.windows(2).all(|w| w[0] < w[1]), "{nominal:?}");
        assert!(
            nominal[5] > alpha / 2.0 && nominal[5] < alpha,
            "{nominal:?}"
        );
        // Halving the grid step moves no boundary by more than 1%.
        let fine = boundaries_on_grid(alpha, 6, -4.0, GRID_STEP / 2.0);
        for (a, b) in nominal.iter().zip(&fine).skip(1) {
            assert!((a - b).abs() < 0.01 * b, "{nominal:?} vs {fine:?}");
        }
        // Brownian paths under the null cross some boundary with probability alpha.
        let mut rng = SplitMix64::new(3);
        let paths = 200_000;
        let bounds: Vec<f64> = nominal
            .iter()
            .map(|a| normal.inverse_cdf(1.0 - a / 2.0))
            .collect();
        let crossed = (0..paths)
            .filter(|_| {
                let mut sum = 0.0;
                bounds.iter().enumerate().any(|(k, c)| {
                    sum += gaussian(&mut rng);
                    (sum / ((k + 1) as f64).sqrt()).abs() > *c
                })
            })
            .count();
        let rate = crossed as f64 / paths as f64;
        // Three standard errors of a proportion near 0.03 over 200,000 paths: 0.0011.
        assert!((rate - alpha).abs() < 0.0012, "null crossing rate {rate}");
    }

    #[test]
    fn the_schedule_splits_alpha_and_looks_at_fixed_rounds() {
        let s = LookSchedule::new(
            0.05,
            6,
            2,
            -1.0,
            &[("decode", 0.6), ("prefill", 0.2), ("rss", 0.2)],
        );
        assert_eq!(s.max_rounds(), 12);
        let looks: Vec<u32> = (0..=14).filter(|&r| s.looks_after(r)).collect();
        assert_eq!(looks, [2, 4, 6, 8, 10, 12]);
        assert_eq!(s.look_number(12), 6);
        let decode = s.alpha_at("decode", 6).unwrap();
        let rss = s.alpha_at("rss", 6).unwrap();
        assert!(decode > 2.5 * rss && decode < 0.03, "{decode} {rss}");
        assert_eq!(s.alpha_at("decode", 7), None);
        assert_eq!(s.alpha_at("decode", 0), None);
        assert_eq!(s.alpha_at("nothing", 1), None);
    }

    /// Spread of one pair's decode log-ratio on the 2-vCPU VM, the pair's requests taking
    /// turns (30 A/A pairs, 2026-12-02).
    const PAIR_SD: f64 = 0.016;
    /// The spread when they ran one after the other (10% per request pair plus 3% from the
    /// two fresh workers' own speed offsets): a harder case for the error rates.
    const SEQUENTIAL_SD: f64 = 0.104;

    #[test]
    fn a_a_comparisons_are_noise_at_least_95_percent_of_the_time() {
        // 2,000 comparisons of a variant with itself, 5 pairs per round, every look, with the
        // spread of requests one after the other (with turns, false verdicts are rarer still).
        let trials = 2000;
        let s = schedule();
        let false_verdicts = campaign(7, trials, 1.0, SEQUENTIAL_SD, &s)
            .iter()
            .filter(|r| r.0 != Verdict::Noise)
            .count();
        let rate = false_verdicts as f64 / trials as f64;
        // Decode is tested with 3/5 of alpha.
        assert!(rate <= 0.03, "false-verdict rate {rate}");
        // Looking at 0.05 each time would not have held it: the spending is what keeps the
        // rate down.
        let naive = LookSchedule {
            tests: vec![SpentTest {
                name: "decode",
                share: 1.0,
                nominal: vec![0.05; s.looks as usize],
            }],
            ..schedule()
        };
        let naive_rate = campaign(7, trials, 1.0, SEQUENTIAL_SD, &naive)
            .iter()
            .filter(|r| r.0 != Verdict::Noise)
            .count() as f64
            / trials as f64;
        eprintln!(
            "A/A false-verdict rate: {rate} with the schedule, {naive_rate} at 0.05 per look"
        );
        assert!(naive_rate > rate, "{naive_rate} vs {rate}");
    }

    /// The median and 90th percentile of the rounds to a verdict, and the share decided right.
    fn summary(runs: &[(Verdict, u32)], right: Verdict) -> (u32, u32, f64) {
        let mut rounds: Vec<u32> = runs.iter().map(|r| r.1).collect();
        rounds.sort();
        let found = runs.iter().filter(|r| r.0 == right).count();
        (
            rounds[rounds.len() / 2],
            rounds[rounds.len() * 9 / 10],
            found as f64 / runs.len() as f64,
        )
    }

    #[test]
    fn large_changes_stop_at_the_first_looks() {
        // The measured spread, the default schedule. Rounds to a decode verdict, median and
        // 90th percentile, and the power; printed for program.md and README.
        let s = schedule();
        for (ratio, right, median_at_most, power_at_least) in [
            (1.10, Verdict::Faster, 1, 0.99),
            (0.90, Verdict::Slower, 1, 0.99),
            (1.05, Verdict::Faster, 2, 0.99),
            (0.95, Verdict::Slower, 2, 0.99),
            (1.02, Verdict::Faster, 12, 0.8),
        ] {
            let (median, p90, power) = summary(&campaign(13, 1000, ratio, PAIR_SD, &s), right);
            eprintln!(
                "B/A {ratio}: power {power:.3}, rounds to a verdict median {median}, p90 {p90}"
            );
            assert!(
                median <= median_at_most,
                "B/A {ratio}: median {median} rounds"
            );
            assert!(power >= power_at_least, "B/A {ratio}: power {power}");
        }
        // O'Brien-Fleming-type spending (gamma -4) needs more rounds for a 10% change, at the
        // spread of requests one after the other.
        let late = LookSchedule::new(
            0.05,
            s.looks,
            s.rounds_per_look,
            -4.0,
            &[("decode", 0.6), ("prefill", 0.2), ("rss", 0.2)],
        );
        let (obf, _, _) = summary(
            &campaign(13, 1000, 1.10, SEQUENTIAL_SD, &late),
            Verdict::Faster,
        );
        let (hsd, _, _) = summary(
            &campaign(13, 1000, 1.10, SEQUENTIAL_SD, &s),
            Verdict::Faster,
        );
        assert!(obf > hsd, "gamma -4: {obf} rounds, gamma -1: {hsd}");
    }

    #[test]
    fn the_screens_error_rates() {
        // `host compare --screen`: 4 pairs a round (the short prompts, 32 tokens), 3 looks of
        // one round. Spread as measured in 12 A/A screens on the 2-vCPU VM (144 pairs): 0.112
        // per pair for decode. Printed for program.md.
        let s = LookSchedule::new(
            0.05,
            3,
            1,
            -1.0,
            &[("decode", 0.6), ("prefill", 0.2), ("rss", 0.2)],
        );
        let mut rng = SplitMix64::new(23);
        let rate = |rng: &mut SplitMix64, ratio: f64, right: Verdict| {
            let runs: Vec<(Verdict, u32)> = (0..2000)
                .map(|_| simulate(rng, f64::ln(ratio), 0.112, 4, &s, Better::Higher))
                .collect();
            summary(&runs, right)
        };
        let (_, _, false_rate) = rate(&mut rng, 1.0, Verdict::Faster);
        let (_, _, false_slower) = rate(&mut rng, 1.0, Verdict::Slower);
        let mut found = Vec::new();
        for ratio in [1.10, 1.20, 1.30, 0.80] {
            let right = if ratio > 1.0 {
                Verdict::Faster
            } else {
                Verdict::Slower
            };
            let (median, _, power) = rate(&mut rng, ratio, right);
            eprintln!("screen, B/A {ratio}: found {power:.3}, median rounds {median}");
            found.push(power);
        }
        eprintln!("screen, A/A: false FASTER {false_rate:.4}, false SLOWER {false_slower:.4}");
        assert!(
            false_rate + false_slower <= 0.03,
            "{false_rate} {false_slower}"
        );
        // A screen finds large changes only.
        assert!(found[0] < 0.7 && found[2] > 0.95, "{found:?}");
    }
}
