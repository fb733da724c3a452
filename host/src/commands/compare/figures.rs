//! What a comparison measures and how each figure is called: the [`Figure`]s, one paired
//! log-ratio per [`Pair`] each; a look's [`FigureResult`]s ([`look`]); when measuring may stop
//! ([`measuring_done`]); how a look and the final table read ([`look_line`], [`render`]); and
//! each prompt's own ratio ([`by_prompt`]), which the test pools.

use serde::{Deserialize, Serialize};

use crate::measure::sample::Sample;
use crate::stats::significance::{Better, LookSchedule, Paired, Verdict};
use crate::stats::{percentile, Spread};

/// The figures compared, each as one paired log-ratio per request pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    DecodeTokS,
    PrefillTokS,
    TtftMs,
    PeakRssMib,
    /// The 99th percentile of a request's gaps between tokens: a guard against a change that
    /// decodes faster on average but stalls now and then (a pool that sleeps, a buffer that
    /// grows), which the decode rate averages away.
    ItlP99Ms,
}

/// The independent tests made at each look and their shares of alpha. Prefill rate and time to
/// first token are one test (with the same prompt on both sides, one ratio is the other's
/// inverse). The decode rate, the figure a keep rests on, gets 3/5; each of the three guards
/// 2/15.
pub(crate) const TESTS: [(&str, f64); 4] = [
    ("decode", 0.6),
    ("prefill/TTFT", 2.0 / 15.0),
    ("peak RSS", 2.0 / 15.0),
    ("ITL p99", 2.0 / 15.0),
];

/// The ITL tail's noise band. A request's p99 gap is about its second-longest of 127, so one
/// preempted token moves it: in 20 A/A pairs of variants/current on the 2-vCPU VM
/// (2026-12-02) one pair's log-ratio spread by 0.32 (decode's by 0.043). A 1% band would never
/// let the guard settle and would hold most comparisons to their last look; a tail 10% longer is
/// the smallest stall worth a revert that such a spread can show within the looks.
pub const TAIL_BAND: f64 = 0.10;

impl Figure {
    pub const ALL: [Figure; 5] = [
        Figure::DecodeTokS,
        Figure::PrefillTokS,
        Figure::TtftMs,
        Figure::PeakRssMib,
        Figure::ItlP99Ms,
    ];

    /// The figure's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Figure::DecodeTokS => "decode tok/s",
            Figure::PrefillTokS => "prefill tok/s",
            Figure::TtftMs => "TTFT ms",
            Figure::PeakRssMib => "peak RSS MiB",
            Figure::ItlP99Ms => "ITL p99 ms",
        }
    }

    /// The test (in [`TESTS`]) that decides this figure.
    pub fn test(self) -> &'static str {
        match self {
            Figure::DecodeTokS => TESTS[0].0,
            Figure::PrefillTokS | Figure::TtftMs => TESTS[1].0,
            Figure::PeakRssMib => TESTS[2].0,
            Figure::ItlP99Ms => TESTS[3].0,
        }
    }

    /// Which direction is an improvement.
    pub fn better(self) -> Better {
        match self {
            Figure::DecodeTokS | Figure::PrefillTokS => Better::Higher,
            Figure::TtftMs | Figure::PeakRssMib | Figure::ItlP99Ms => Better::Lower,
        }
    }

    /// How much one pair's log-ratio of this figure counts, relative to the others: its
    /// prompt tokens for prefill and time to first token (a prefill of 1,600 tokens is timed
    /// about ten times as precisely as one of 80), 1 for the rest (every decode is 128
    /// tokens). Fixed by the prompt instance, never by what a variant measured.
    pub fn weight(self, pair: &Pair) -> f64 {
        match self {
            Figure::PrefillTokS | Figure::TtftMs => pair.a.timing.prompt_tokens as f64,
            Figure::DecodeTokS | Figure::PeakRssMib | Figure::ItlP99Ms => 1.0,
        }
    }

    /// The smallest change of this figure worth a verdict, given the protocol's
    /// `noise_threshold`: that threshold, except for the ITL tail, whose band is at least
    /// [`TAIL_BAND`].
    pub fn band(self, noise: f64) -> f64 {
        match self {
            Figure::ItlP99Ms => noise.max(TAIL_BAND),
            _ => noise,
        }
    }

    /// The figure's value in one sample (NaN for an ITL percentile of a request without gaps,
    /// which [`pair_logs`] leaves out).
    pub fn of(self, s: &Sample) -> f64 {
        match self {
            Figure::DecodeTokS => s.timing.decode_tok_s,
            Figure::PrefillTokS => s.timing.prefill_tok_s,
            Figure::TtftMs => s.timing.ttft_ms,
            Figure::PeakRssMib => s.peak_rss_kib as f64 / 1024.0,
            Figure::ItlP99Ms => percentile(&s.timing.itl_ms, 99.0).unwrap_or(f64::NAN),
        }
    }
}

/// Which variant answered first in a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Order {
    AB,
    BA,
}

impl Order {
    /// The other order.
    pub fn flipped(self) -> Order {
        match self {
            Order::AB => Order::BA,
            Order::BA => Order::AB,
        }
    }
}

/// The orders of a comparison's pairs: in blocks of two consecutive pairs, one A B and one B A,
/// which of them comes first drawn afresh for every block. Balanced, so that drift in the
/// machine hits both sides alike, and unpredictable. With A first in every even pair (as
/// before 2026-12-05), a worker that knows whether it started first in its pair (its
/// sibling's pid in /proc) and the parity of its pair's index (its prompt's place in the
/// round's fixed order, and the round from how much CPU the supervisor's finished children
/// used) knew which side it was, and could slow itself as the reference.
pub struct PairOrders<F> {
    draw: F,
    first_of_block: Vec<Order>,
}

impl<F: FnMut() -> u64> PairOrders<F> {
    /// Orders whose blocks take one bit of `draw` each (the host passes
    /// [`crate::stats::rng::fresh_seed`]).
    pub fn new(draw: F) -> Self {
        PairOrders {
            draw,
            first_of_block: Vec::new(),
        }
    }

    /// The order of pair `pair` (pairs are asked for in any order; each block is drawn once).
    pub fn of(&mut self, pair: usize) -> Order {
        let block = pair / 2;
        while self.first_of_block.len() <= block {
            let first = if (self.draw)() & 1 == 0 {
                Order::AB
            } else {
                Order::BA
            };
            self.first_of_block.push(first);
        }
        let first = self.first_of_block[block];
        if pair.is_multiple_of(2) {
            first
        } else {
            first.flipped()
        }
    }
}

/// One prompt instance answered by both variants, back to back.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub round: u32,
    pub prompt: String,
    pub order: Order,
    pub a: Sample,
    pub b: Sample,
}

/// One figure's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct FigureResult {
    pub figure: Figure,
    pub better: Better,
    /// Whether a SLOWER here blocks a keep (every figure but the decode rate).
    pub guarded: bool,
    pub a_median: Option<f64>,
    pub b_median: Option<f64>,
    /// At the look's alpha per test: the interval the verdict rests on.
    pub decision: Option<Paired>,
    /// At alpha 0.05, for reading (not for deciding).
    pub at_95: Option<Paired>,
    pub verdict: Verdict,
    /// The decision interval lies inside the noise band: the same within the threshold.
    pub settled: bool,
    /// The chance this figure would end SLOWER at the last look, were the comparison to run
    /// on at its present estimate and spread ([`Paired::chance_slower_at_end`]).
    pub chance_slower_at_end: Option<f64>,
    /// The chance it would end FASTER, on the same assumptions: for the decode rate, whether
    /// a KEEP is still within reach ([`Paired::chance_faster_at_end`]).
    pub chance_faster_at_end: Option<f64>,
}

impl FigureResult {
    /// What the keep rule reads of this figure.
    pub fn call(&self) -> FigureCall {
        FigureCall {
            figure: self.figure,
            verdict: self.verdict,
            settled: self.settled,
            decision: self.decision.as_ref().map(|d| Interval {
                ratio: d.ratio,
                ci: d.ci,
            }),
        }
    }

    /// FASTER, SLOWER, or SAME (settled inside the noise band).
    pub(crate) fn decided(&self) -> bool {
        self.verdict != Verdict::Noise || self.settled
    }

    /// Shown not SLOWER beyond the noise threshold: the decision interval's bad end lies inside
    /// the band (true of every FASTER and every SAME figure too).
    pub(crate) fn not_worse(&self, noise: f64) -> bool {
        self.decision
            .as_ref()
            .is_some_and(|d| d.not_worse(self.better, self.figure.band(noise)))
    }

    /// Can no longer block a keep, in all likelihood: shown not SLOWER beyond the noise
    /// threshold, or with a chance below `stop_chance` of ending SLOWER at the last look.
    pub(crate) fn cannot_block(&self, noise: f64, stop_chance: f64) -> bool {
        self.not_worse(noise) || self.chance_slower_at_end.is_some_and(|c| c < stop_chance)
    }

    /// Will not end FASTER, in all likelihood: its chance of ending FASTER at the last look is
    /// below `stop_chance` (futility: a KEEP is out of reach).
    pub(crate) fn cannot_win(&self, stop_chance: f64) -> bool {
        self.chance_faster_at_end.is_some_and(|c| c < stop_chance)
    }
}

/// Whether more rounds would, in all likelihood, no longer change what the keep rule
/// ([`crate::commands::compare::keep_rule::decide`]) makes of the timing: a figure is SLOWER (a
/// revert, whatever comes next); or decode is settled, the prefill rate too unless decode is
/// FASTER (prefill alone can win a KEEP: it is settled when decided, or when its chance of
/// ending FASTER is below `futility`), and every guarded figure is shown not SLOWER beyond the
/// noise threshold or has a chance below `stop_chance` of ending SLOWER if all the looks were
/// run ([`FigureResult::cannot_block`]). Decode is settled when it is decided
/// (FASTER, or SAME inside the noise band), or when `futility` bounds both its chance of ending
/// FASTER (no KEEP within reach) and of ending SLOWER: then the answer is NOISE with nothing
/// SLOWER, which the simplicity rule may keep. (`futility` 0 waits for decode to be decided.) A
/// comparison does not go on to pin down a figure that cannot change the outcome.
pub(crate) fn measuring_done(
    figures: &[FigureResult],
    noise: f64,
    stop_chance: f64,
    futility: f64,
) -> bool {
    if figures.iter().any(|f| f.verdict == Verdict::Slower) {
        return true;
    }
    let decode_settled = figures.iter().any(|f| {
        f.figure == Figure::DecodeTokS
            && (f.decided() || (f.cannot_win(futility) && f.cannot_block(noise, futility)))
    });
    // A decode that is not FASTER leaves the prefill rate to win a KEEP: wait until it is
    // decided, or cannot win either.
    let decode_won = figures
        .iter()
        .any(|f| f.figure == Figure::DecodeTokS && f.verdict == Verdict::Faster);
    let prefill_settled = figures
        .iter()
        .filter(|f| f.figure == Figure::PrefillTokS)
        .all(|f| f.decided() || f.cannot_win(futility));
    decode_settled
        && (decode_won || prefill_settled)
        && figures
            .iter()
            .filter(|f| f.guarded)
            .all(|f| f.cannot_block(noise, stop_chance))
}

/// Where a comparison ends if nothing stops it early: the pairs of its last look and the alpha
/// each figure is tested at there.
pub struct Horizon<'a> {
    pub pairs: usize,
    pub alpha: &'a dyn Fn(Figure) -> f64,
}

/// One figure's result from its log-ratios and their weights ([`Figure::weight`]), tested at
/// `alpha` by `stats` (the t-test and bootstrap of [`Paired::weighted`], or the t-test alone in
/// simulations).
pub(crate) fn figure_result(
    figure: Figure,
    (logs, weights): (&[f64], &[f64]),
    alpha: f64,
    horizon: &Horizon,
    noise: f64,
    stats: impl Fn(&[f64], &[f64], f64) -> Option<Paired>,
) -> FigureResult {
    let noise = figure.band(noise);
    let decision = stats(logs, weights, alpha);
    let verdict = decision
        .as_ref()
        .map(|d| d.verdict(figure.better(), noise))
        .unwrap_or(Verdict::Noise);
    // A chance of ending one way at the horizon, were the rest to follow today's estimate.
    let at_end = |chance: fn(&Paired, Better, f64, usize, f64) -> f64| {
        decision.as_ref().map(|d| {
            chance(
                d,
                figure.better(),
                noise,
                horizon.pairs,
                (horizon.alpha)(figure),
            )
        })
    };
    FigureResult {
        figure,
        better: figure.better(),
        guarded: figure != Figure::DecodeTokS,
        a_median: None,
        b_median: None,
        settled: decision.as_ref().is_some_and(|d| d.within(noise)),
        chance_slower_at_end: at_end(Paired::chance_slower_at_end),
        chance_faster_at_end: at_end(Paired::chance_faster_at_end),
        at_95: stats(logs, weights, 0.05),
        decision,
        verdict,
    }
}

/// ln(B/A) of `figure` for every pair, in order, with each pair's weight ([`Figure::weight`]):
/// the unit the statistics test. Every pair has its own two fresh workers, so pairs are
/// independent of each other. A pair whose figure is not a positive number on both sides (an
/// ITL percentile of a one-token answer) says nothing about it and is left out.
pub(crate) fn pair_logs(pairs: &[Pair], figure: Figure) -> (Vec<f64>, Vec<f64>) {
    pairs
        .iter()
        .filter_map(|p| {
            let (a, b) = (figure.of(&p.a), figure.of(&p.b));
            let usable = |v: f64| v.is_finite() && v > 0.0;
            (usable(a) && usable(b)).then(|| ((b / a).ln(), figure.weight(p)))
        })
        .unzip()
}

/// One prompt's share of a figure: the geometric mean of B/A over its pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptRatio {
    pub prompt: String,
    pub ratio: f64,
    pub pairs: usize,
}

/// `figure`'s B/A for each prompt (the geometric mean of its pairs' ratios, the pairs
/// [`pair_logs`] would use), the prompts in the order they first appear. The test pools every
/// pair alike, so a change that moves one prompt alone (the long-context one, say) counts a
/// fifth of its size there; here it shows at its own.
pub(crate) fn by_prompt(pairs: &[Pair], figure: Figure) -> Vec<PromptRatio> {
    let mut rows: Vec<(String, f64, usize)> = Vec::new();
    for p in pairs {
        let (logs, _) = pair_logs(std::slice::from_ref(p), figure);
        let Some(log) = logs.first() else { continue };
        match rows.iter_mut().find(|(name, _, _)| *name == p.prompt) {
            Some(row) => {
                row.1 += log;
                row.2 += 1;
            }
            None => rows.push((p.prompt.clone(), *log, 1)),
        }
    }
    rows.into_iter()
        .map(|(prompt, sum, n)| PromptRatio {
            prompt,
            ratio: (sum / n as f64).exp(),
            pairs: n,
        })
        .collect()
}

/// The line that follows the table: `figure`'s B/A prompt by prompt.
pub(crate) fn render_by_prompt(figure: Figure, rows: &[PromptRatio]) -> String {
    let each = rows
        .iter()
        .map(|r| format!("{} {:.3} ({})", r.prompt, r.ratio, r.pairs))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "by prompt: {} B/A (the geometric mean of each prompt's pairs; the test pools them \
         all): {each}",
        figure.name()
    )
}

/// The figures at one look, each tested at the alpha `alpha(figure)` gives it.
pub(crate) fn look(
    pairs: &[Pair],
    alpha: impl Fn(Figure) -> f64,
    horizon: &Horizon,
    noise: f64,
    seed: u64,
) -> Vec<FigureResult> {
    Figure::ALL
        .iter()
        .map(|&figure| {
            let a: Vec<f64> = pairs.iter().map(|p| figure.of(&p.a)).collect();
            let b: Vec<f64> = pairs.iter().map(|p| figure.of(&p.b)).collect();
            let (logs, weights) = pair_logs(pairs, figure);
            FigureResult {
                a_median: Spread::of(&a).map(|s| s.median),
                b_median: Spread::of(&b).map(|s| s.median),
                ..figure_result(
                    figure,
                    (&logs, &weights),
                    alpha(figure),
                    horizon,
                    noise,
                    |l, w, a| Paired::weighted(l, w, a, seed),
                )
            }
        })
        .collect()
}

/// What the keep rule reads of one figure: the fields of a [`FigureResult`] of the same names,
/// so that the figures of a comparison's record deserialize into it and `host keep` can apply
/// the rule again to what was recorded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FigureCall {
    /// Which figure.
    pub figure: Figure,
    /// FASTER, SLOWER or NOISE.
    pub verdict: Verdict,
    /// The decision interval lies inside the noise band.
    pub settled: bool,
    /// The ratio and interval the verdict rests on, for the reasons in words.
    pub decision: Option<Interval>,
}

/// A ratio B/A and its decision interval.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Interval {
    /// Geometric-mean ratio B/A.
    pub ratio: f64,
    /// Its interval at the look's alpha.
    pub ci: (f64, f64),
}

impl FigureCall {
    /// "+5.2% [+3.1%, +7.4%]": the decision interval in words.
    pub fn change(&self) -> String {
        let pct = |r: f64| format!("{:+.1}%", (r - 1.0) * 100.0);
        match &self.decision {
            Some(d) => format!("{} [{}, {}]", pct(d.ratio), pct(d.ci.0), pct(d.ci.1)),
            None => "no pairs".into(),
        }
    }
}

/// One look in a line: each figure's running B/A, its decision interval (at the look's alpha)
/// and its verdict so far, so that "almost decided" and "hopeless" read differently.
pub(crate) fn look_line(
    figures: &[FigureResult],
    look: u32,
    looks: u32,
    rounds: u32,
    noise: f64,
) -> String {
    let figures = figures
        .iter()
        .map(|f| match &f.decision {
            Some(d) => {
                // A guard not shown within the band: how likely it is to end SLOWER, which
                // is what lets a comparison stop without it (see `measuring_done`).
                // Undecided decode: how likely a KEEP still is (futility stops it when unlikely).
                let chance = match (f.chance_slower_at_end, f.chance_faster_at_end) {
                    (Some(c), _)
                        if f.guarded && f.verdict == Verdict::Noise && !f.not_worse(noise) =>
                    {
                        format!(" (ends SLOWER: {:.1}%)", c * 100.0)
                    }
                    (_, Some(c)) if !f.guarded && f.verdict == Verdict::Noise && !f.settled => {
                        format!(" (ends FASTER: {:.1}%)", c * 100.0)
                    }
                    _ => String::new(),
                };
                format!(
                    "{} {:.3} [{:.3}, {:.3}] {}{chance}",
                    f.figure.name(),
                    d.ratio,
                    d.ci.0,
                    d.ci.1,
                    verdict_word(f)
                )
            }
            None => format!("{} - {}", f.figure.name(), verdict_word(f)),
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!("look {look}/{looks} after {rounds} rounds, B/A [decision interval]: {figures}")
}

/// "FASTER", "SLOWER", "NOISE" or "SAME" (NOISE, settled inside the noise band).
pub(crate) fn verdict_word(f: &FigureResult) -> &'static str {
    match f.verdict {
        Verdict::Faster => "FASTER",
        Verdict::Slower => "SLOWER",
        Verdict::Noise if f.settled => "SAME",
        Verdict::Noise => "NOISE",
    }
}

/// The table of figures.
pub(crate) fn render(
    figures: &[FigureResult],
    a: &str,
    b: &str,
    schedule: &LookSchedule,
    look: u32,
    noise: f64,
) -> String {
    let num = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let ci = |c: (f64, f64)| format!("[{:.3}, {:.3}]", c.0, c.1);
    let mut out = format!(
        "A = {a}\nB = {b}\n{:<14} {:>10} {:>10} {:>7} {:>17} {:>17} {:>17} {:>9}  verdict\n",
        "figure", "A median", "B median", "B/A", "95% CI", "bootstrap 95%", "decision CI", "p"
    );
    for f in figures {
        let (ratio, c95, boot, dec, p) = match (&f.at_95, &f.decision) {
            (Some(w), Some(d)) => (
                format!("{:.3}", w.ratio),
                ci(w.ci),
                ci(w.ci_bootstrap),
                ci(d.ci),
                format!("{:.2e}", w.p),
            ),
            _ => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{:<14} {:>10} {:>10} {:>7} {:>17} {:>17} {:>17} {:>9}  {}\n",
            f.figure.name(),
            num(f.a_median),
            num(f.b_median),
            ratio,
            c95,
            boot,
            dec,
            p,
            verdict_word(f)
        ));
    }
    let alphas = schedule
        .tests
        .iter()
        .map(|t| {
            let at = schedule.alpha_at(t.name, look).unwrap_or(f64::NAN);
            format!("{} {at:.1e}", t.name)
        })
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!(
        "A verdict needs p below the look's alpha ({alphas} at look {look} of {}) and the whole \
         decision interval, at that alpha, beyond ±{:.1}% (±{:.0}% for {}, a tail statistic); \
         SAME = the interval lies inside that band. Alpha {} is split over the tests and spent \
         over the looks (Hwang-Shih-DeCani, gamma {}), so any false verdict has at most that \
         chance.",
        schedule.looks,
        noise * 100.0,
        Figure::ItlP99Ms.band(noise) * 100.0,
        Figure::ItlP99Ms.name(),
        schedule.alpha,
        schedule.gamma,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the strongest worker there is: it knows its pair's index exactly and whether it
    /// started first, and guesses its side by the old rule (A first in every even pair). Each
    /// block of two pairs is one A B and one B A, whatever the draw; the guess is right about
    /// as often as a coin's over a thousand blocks, where the old order made it always right.
    #[test]
    fn a_worker_that_knows_its_pair_cannot_tell_its_side() {
        let guess_is_a =
            |pair: usize, started_first: bool| started_first == (pair.is_multiple_of(2));
        let right = |order: Order, pair: usize| {
            // The worker that started first: A in an A B pair.
            let a_first = order == Order::AB;
            usize::from(guess_is_a(pair, a_first))
        };
        let pairs = 2000;
        let old: usize = (0..pairs)
            .map(|p: usize| {
                let order = if p.is_multiple_of(2) {
                    Order::AB
                } else {
                    Order::BA
                };
                right(order, p)
            })
            .sum();
        assert_eq!(old, pairs, "the old order gave every worker its side");
        let mut orders = PairOrders::new(crate::stats::rng::fresh_seed);
        let drawn: Vec<Order> = (0..pairs).map(|p| orders.of(p)).collect();
        for block in drawn.chunks(2) {
            assert_eq!(block[1], block[0].flipped(), "each block is balanced");
        }
        let now: usize = drawn.iter().enumerate().map(|(p, &o)| right(o, p)).sum();
        assert!(
            (800..=1200).contains(&now),
            "the old rule guessed {now} of {pairs} sides right"
        );
    }

    /// A block is drawn once, whichever of its pairs is asked for first, and takes one draw.
    #[test]
    fn each_block_is_drawn_once() {
        let mut draws = [1u64, 0, 1].into_iter();
        let mut orders = PairOrders::new(|| draws.next().expect("one draw a block"));
        assert_eq!(orders.of(5), Order::AB, "block 2: draw 1, an odd pair");
        assert_eq!(orders.of(0), Order::BA, "block 0: draw 1");
        assert_eq!(orders.of(3), Order::BA, "block 1: draw 0, an odd pair");
        assert_eq!(orders.of(4), Order::BA);
        assert_eq!(orders.of(1), Order::AB);
    }
}
