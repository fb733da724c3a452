//! Measuring one pair of a comparison: two fresh workers, one per side, each warmed up and then
//! timed on the pair's request. [`PairCtx::in_turns`] keeps both alive and lets them take turns
//! on the CPU; [`PairCtx::one_at_a_time`] (a GPU, or `turn_ms` 0) ends each worker before the
//! other side's starts. [`PairSamples`] is what a pair measured, [`WorkerLife`] when each of its
//! workers lived (kept in the record).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::figures::Order;
use super::{CompareArgs, Sides};
use crate::commands::setup::{timed_pair, timed_request, Contender, Planned, Setup};
use crate::measure::sample::Sample;
use crate::supervisor::{Spawn, Worker};

/// When one worker of a comparison lived, in seconds from the start of measuring: from just
/// before it was started until it had ended and been reaped.
#[derive(Debug, Clone, Serialize)]
pub(super) struct WorkerLife {
    /// The pair it answered, counting from 0.
    pair: usize,
    /// `A` or `B`.
    side: char,
    started_s: f64,
    ended_s: f64,
}

/// What one pair of workers measured: the warm-ups (prompt, A, B) and the order they ran in,
/// and the timed samples.
pub(super) struct PairSamples {
    pub(super) warmups: Vec<(String, Sample, Sample)>,
    pub(super) warmup_order: Order,
    pub(super) a: Sample,
    pub(super) b: Sample,
    /// When its two workers lived.
    pub(super) lives: Vec<WorkerLife>,
}

/// What measuring one pair needs besides the request itself.
pub(super) struct PairCtx<'a> {
    /// The pair's number in the comparison, from 0.
    pub(super) pair: usize,
    /// When measuring started.
    pub(super) clock: Instant,
    pub(super) args: &'a CompareArgs,
    pub(super) setup: &'a Setup,
    pub(super) sides: &'a Sides<'a>,
    /// How A and B are named in messages.
    pub(super) names: [&'a str; 2],
    pub(super) bar: &'a indicatif::ProgressBar,
    /// The last look's decode interval, for the progress bar.
    pub(super) interval: &'a str,
    pub(super) label: &'a str,
    pub(super) warmups: &'a [Planned<'a>],
    pub(super) warmup_tokens: u32,
}

impl PairCtx<'_> {
    /// Seconds since measuring started.
    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    /// Ends `worker` (side `which`, started at `started_s`) and says when it lived.
    fn end(&self, worker: Worker, which: usize, started_s: f64) -> WorkerLife {
        worker.end();
        WorkerLife {
            pair: self.pair,
            side: ['A', 'B'][which],
            started_s,
            ended_s: self.now(),
        }
    }

    /// A fresh, loaded worker for side `which` (0 = A), and when it was started.
    ///
    /// Fresh workers for every pair. A process keeps its own speed for its whole life (heap
    /// layout, huge pages, where its threads land): workers shared by several pairs would put
    /// one offset into all of them, and the pairs would not be independent. With new
    /// processes per pair the offset is part of each pair's own noise, which the test sees,
    /// and every pair is one observation (see `look`).
    fn spawn(&self, which: usize) -> Result<(Worker, f64)> {
        let lib = [&self.sides.a.lib, &self.sides.b.lib][which];
        let started_s = self.now();
        let worker = Worker::spawn(&Spawn {
            variant: self.names[which],
            lib,
            model: &self.setup.model.path,
            timeout: self.setup.timeout(),
            echo_log: self.args.verbose,
            load: self.setup.load_request(),
            protect: self.sides.protect,
        })?;
        Ok((worker, started_s))
    }

    /// `worker`'s untimed warm-up requests (side `which`): each new process faults in the
    /// weights and starts its threads outside the timed request.
    fn warm_up(&self, worker: &mut Worker, which: usize) -> Result<Vec<Sample>> {
        let wlabel = format!("warm-up for {}", self.label);
        self.bar.set_message(format!("{wlabel}; {}", self.interval));
        let (name, tokens) = (self.names[which], self.warmup_tokens);
        let mut samples = Vec::new();
        for warm in self.warmups {
            samples.push(timed_request(
                self.setup, worker, name, warm, &wlabel, tokens,
            )?);
            self.bar.inc(1);
        }
        Ok(samples)
    }

    /// Pairs the two sides' warm-up samples with their prompts.
    fn warmup_pairs(&self, a: Vec<Sample>, b: Vec<Sample>) -> Vec<(String, Sample, Sample)> {
        let prompts = self.warmups.iter().map(|w| w.instance.prompt.clone());
        prompts.zip(a).zip(b).map(|((p, a), b)| (p, a, b)).collect()
    }

    /// On the CPU: both workers alive, both warmed up, then the two timed requests at once,
    /// taking turns of `turn_ms`, the first as `order` says. Each worker is frozen as soon as
    /// it is loaded and whenever it is not answering, so neither can compute while the other
    /// is measured.
    pub(super) fn in_turns(
        &self,
        planned: &Planned,
        order: Order,
        new_tokens: u32,
        turn_ms: u32,
    ) -> Result<PairSamples> {
        // Started and warmed up in the pair's order too, so that whatever a worker can see of
        // it (its pid against its sibling's, which warm-up ran first) says nothing of its side:
        // with A always first, a variant could tell when it was the reference and slow it.
        let ((mut worker_a, started_a), (mut worker_b, started_b)) = match order {
            Order::AB => {
                let a = self.spawn(0)?;
                (a, self.spawn(1)?)
            }
            Order::BA => {
                let b = self.spawn(1)?;
                (self.spawn(0)?, b)
            }
        };
        let (warm_a, warm_b) = match order {
            Order::AB => {
                let a = self.warm_up(&mut worker_a, 0)?;
                (a, self.warm_up(&mut worker_b, 1)?)
            }
            Order::BA => {
                let b = self.warm_up(&mut worker_b, 1)?;
                (self.warm_up(&mut worker_a, 0)?, b)
            }
        };
        self.bar
            .set_message(format!("{}; {}", self.label, self.interval));
        let (a, b) = timed_pair(
            self.setup,
            Contender {
                worker: &mut worker_a,
                name: self.names[0],
            },
            Contender {
                worker: &mut worker_b,
                name: self.names[1],
            },
            planned,
            self.label,
            new_tokens,
            usize::from(order == Order::BA), // B first in a BA pair
            Duration::from_millis(turn_ms.into()),
        )?;
        let lives = vec![
            self.end(worker_a, 0, started_a),
            self.end(worker_b, 1, started_b),
        ];
        Ok(PairSamples {
            warmups: self.warmup_pairs(warm_a, warm_b),
            warmup_order: order,
            a,
            b,
            lives,
        })
    }

    /// On a GPU (and on the CPU with `turn_ms` 0): never two workers alive at once. The freeze
    /// stops a worker's CPU threads, not the work it queued on the GPU, and without MPS the GPU
    /// time-slices the contexts of two processes: a variant that left a long kernel queued
    /// before each stop would run it during the other side's timed request. So each side
    /// starts, warms up, answers and is ended (reaped, its context and every queued kernel gone
    /// with the process) before the other side starts, in the order `order` says.
    pub(super) fn one_at_a_time(
        &self,
        planned: &Planned,
        order: Order,
        new_tokens: u32,
    ) -> Result<PairSamples> {
        let alone = |which: usize| -> Result<(Vec<Sample>, Sample, WorkerLife)> {
            let (mut worker, started_s) = self.spawn(which)?;
            let warm = self.warm_up(&mut worker, which)?;
            self.bar
                .set_message(format!("{}; {}", self.label, self.interval));
            let (setup, name, label) = (self.setup, self.names[which], self.label);
            let timed = timed_request(setup, &mut worker, name, planned, label, new_tokens)?;
            Ok((warm, timed, self.end(worker, which, started_s)))
        };
        let ((warm_a, a, life_a), (warm_b, b, life_b)) = match order {
            Order::AB => {
                let a = alone(0)?;
                (a, alone(1)?)
            }
            Order::BA => {
                let b = alone(1)?;
                (alone(0)?, b)
            }
        };
        let mut lives = vec![life_a, life_b];
        lives.sort_by(|x, y| x.started_s.total_cmp(&y.started_s));
        Ok(PairSamples {
            warmups: self.warmup_pairs(warm_a, warm_b),
            warmup_order: order,
            a,
            b,
            lives,
        })
    }
}
