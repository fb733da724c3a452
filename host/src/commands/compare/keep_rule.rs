//! The keep rule, in one place: what a comparison's figures, B's quality gates and the
//! roofline check come to ([`decide`]). `host compare` applies it to what it measured, and
//! `host keep` applies it again to the comparison's record before it commits anything.

use serde::{Deserialize, Serialize};

use crate::commands::compare::figures::{Figure, FigureCall};
use crate::ledger::row::Verdict as RowVerdict;
use crate::quality::GateFailure;
use crate::stats::significance::Verdict;

/// The comparison's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// B is faster at decoding or at prefill, worse at nothing, and passes every gate: commit it.
    Keep,
    /// B is slower somewhere, fails a gate, or is suspect: throw it away.
    Revert,
    /// Nothing was decided either way.
    Noise,
}

/// The rule on a synthetic model written from a seed, whose weights a variant could regenerate
/// instead of reading (so its gates could be passed by work no real model allows): REVERT when
/// anything is SLOWER, NOISE otherwise. Never KEEP, since nothing was gated.
pub fn decide_synthetic(figures: &[FigureCall]) -> (Outcome, Vec<String>) {
    let slower: Vec<String> = figures
        .iter()
        .filter(|f| f.verdict == Verdict::Slower)
        .map(|f| format!("{} is SLOWER ({})", f.figure.name(), f.change()))
        .collect();
    if !slower.is_empty() {
        return (Outcome::Revert, slower);
    }
    let mut why = vec![
        "synthetic model written from a seed: the quality gates were skipped, so nothing can \
         be kept (a file written without --seed is gated)"
            .to_string(),
    ];
    if let Some(d) = figures
        .iter()
        .find(|f| f.figure == Figure::DecodeTokS && f.verdict == Verdict::Faster)
    {
        why.push(format!("decode is FASTER ({})", d.change()));
    }
    (Outcome::Noise, why)
}

/// The keep rule: KEEP only when a speed figure is FASTER (the decode rate, or the prefill
/// rate), nothing is SLOWER, B passes every gate (`gate_failures` is `Some` and empty) and is
/// not `suspect`; REVERT when anything is SLOWER, a gate fails, B was not gated or B is
/// suspect; NOISE otherwise. Returns the outcome and the reasons, in words.
///
/// A prefill win counts on its own: a blocked GEMM can make prompts twice as fast and leave
/// decode as it was, and such a change must be keepable. It can be trusted because no two
/// requests share an opening a variant could compute untimed: each prompt starts with its own
/// nonce ([`crate::harness::prompts::with_nonce`]). It costs little certainty: prefill is
/// tested at its own share of alpha, so a change that does nothing is kept by a false FASTER
/// of either figure with at most the sum of their shares (0.03 + 0.01 of the default 0.05).
pub fn decide(
    figures: &[FigureCall],
    gate_failures: Option<&[GateFailure]>,
    suspect: Option<&str>,
) -> (Outcome, Vec<String>) {
    let mut against = Vec::new();
    if let Some(why) = suspect {
        against.push(why.to_string());
    }
    for f in figures.iter().filter(|f| f.verdict == Verdict::Slower) {
        against.push(format!("{} is SLOWER ({})", f.figure.name(), f.change()));
    }
    match gate_failures {
        Some(failures) if !failures.is_empty() => against.push(format!(
            "B fails {} quality gate(s): {}",
            failures.len(),
            failures
                .iter()
                .map(|f| format!("{} {}", f.prompt, f.gate))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(_) => {}
        None if suspect.is_none() => against.push("B was not gated".into()),
        None => {}
    }
    if !against.is_empty() {
        return (Outcome::Revert, against);
    }
    let decode = figures.iter().find(|f| f.figure == Figure::DecodeTokS);
    let prefill = figures
        .iter()
        .find(|f| f.figure == Figure::PrefillTokS && f.verdict == Verdict::Faster);
    match (decode, prefill) {
        (Some(d), _) if d.verdict == Verdict::Faster => (
            Outcome::Keep,
            vec![format!(
                "decode is FASTER ({}), no guarded figure is SLOWER, every gate passes",
                d.change()
            )],
        ),
        (Some(d), Some(p)) => (
            Outcome::Keep,
            vec![format!(
                "prefill is FASTER ({}), decode is not SLOWER ({}), no guarded figure is \
                 SLOWER, every gate passes",
                p.change(),
                d.change()
            )],
        ),
        (Some(d), None) if d.settled => (
            Outcome::Noise,
            vec![format!(
                "decode is the same within the noise threshold ({}); nothing is SLOWER",
                d.change()
            )],
        ),
        _ => (
            Outcome::Noise,
            vec![
                "decode and prefill rates undecided: no significant difference beyond the \
                 noise threshold"
                    .into(),
            ],
        ),
    }
}

impl Outcome {
    /// The verdict as recorded and printed: a screen's is a `SCREEN-` one, which `host keep`
    /// refuses and `host plot` leaves out.
    pub fn recorded(self, screen: bool) -> RowVerdict {
        match (self, screen) {
            (Outcome::Keep, false) => RowVerdict::Keep,
            (Outcome::Revert, false) => RowVerdict::Revert,
            (Outcome::Noise, false) => RowVerdict::Noise,
            (Outcome::Keep, true) => RowVerdict::ScreenKeep,
            (Outcome::Revert, true) => RowVerdict::ScreenRevert,
            (Outcome::Noise, true) => RowVerdict::ScreenNoise,
        }
    }

    /// The process exit status: 0 KEEP, 3 NOISE, 4 REVERT (1 is an error, 2 a usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Keep => 0,
            Outcome::Noise => 3,
            Outcome::Revert => 4,
        }
    }
}
