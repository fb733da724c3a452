//! What a measurement leaves behind: the results row appended to `results/results.tsv` and
//! the JSON of every sample under `results/runs/` ([`record`]).

pub mod record;
