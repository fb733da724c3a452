//! What a measurement leaves behind: the typed row appended to `results/results.tsv`
//! ([`row`]), and the JSON record of every sample under `results/runs/` ([`record`]).

pub mod record;
pub mod row;
