//! The benchmark prompts: templates in `prompts/*.toml` whose parameters are drawn per request.
//!
//! A [`PromptSet`] holds the [`PromptSpec`]s of a directory, validated on load (an error names the
//! file and the field). [`PromptSpec::draw`] makes a [`PromptInstance`] from a seed, the round and
//! the prompt's name, so the same (seed, round) always gives the same text, two variants in one
//! round get the same instance, and no output can be memoised from an earlier request. Each
//! prompt carries its sanity [`Check`]s; their expected values come from the drawn parameters.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::harness::expr::Expr;
use crate::stats::rng::SplitMix64;

/// Why the prompts could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}: no prompt files (*.toml other than protocol.toml)")]
    Empty(PathBuf),
}

/// One option of a `choice` or `sample` parameter: its text plus what checks need of it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct OptionEntry {
    /// What `{param}` becomes in the template.
    pub text: String,
    /// Words a good answer about this option mentions (for `keywords` checks).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Further named strings, reachable as `{param.field}`.
    #[serde(flatten)]
    pub fields: BTreeMap<String, String>,
}

/// A template parameter and how it is drawn.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawParam")]
pub enum Param {
    /// A whole number in `min..=max`, a multiple of `step` away from `min`.
    Int {
        name: String,
        min: i64,
        max: i64,
        #[serde(default = "one")]
        step: i64,
    },
    /// One of `options`.
    Choice {
        name: String,
        options: Vec<OptionEntry>,
    },
    /// `count` distinct options in random order, joined by `separator`.
    Sample {
        name: String,
        count: usize,
        separator: String,
        options: Vec<OptionEntry>,
    },
}

/// A parameter table as written: one flat struct, so a type error points at the exact key
/// (an internally tagged enum would only point at the table).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    kind: String,
    name: String,
    min: Option<i64>,
    max: Option<i64>,
    step: Option<i64>,
    count: Option<usize>,
    separator: Option<String>,
    options: Option<Vec<OptionEntry>>,
}

impl TryFrom<RawParam> for Param {
    type Error = String;
    fn try_from(r: RawParam) -> Result<Self, String> {
        let name = r.name;
        let need = |field: &str, kind: &str| {
            format!("parameter {name:?} of kind {kind:?} needs `{field}`")
        };
        let unused = |present: bool, field: &str, kind: &str| {
            if present {
                Err(format!(
                    "parameter {name:?}: `{field}` does not apply to kind {kind:?}"
                ))
            } else {
                Ok(())
            }
        };
        match r.kind.as_str() {
            "int" => {
                unused(r.options.is_some(), "options", "int")?;
                unused(
                    r.count.is_some() || r.separator.is_some(),
                    "count/separator",
                    "int",
                )?;
                Ok(Param::Int {
                    min: r.min.ok_or_else(|| need("min", "int"))?,
                    max: r.max.ok_or_else(|| need("max", "int"))?,
                    step: r.step.unwrap_or(1),
                    name,
                })
            }
            "choice" => {
                unused(
                    r.min.is_some() || r.max.is_some() || r.step.is_some(),
                    "min/max/step",
                    "choice",
                )?;
                unused(
                    r.count.is_some() || r.separator.is_some(),
                    "count/separator",
                    "choice",
                )?;
                Ok(Param::Choice {
                    options: r.options.ok_or_else(|| need("options", "choice"))?,
                    name,
                })
            }
            "sample" => {
                unused(
                    r.min.is_some() || r.max.is_some() || r.step.is_some(),
                    "min/max/step",
                    "sample",
                )?;
                Ok(Param::Sample {
                    count: r.count.ok_or_else(|| need("count", "sample"))?,
                    separator: r.separator.unwrap_or_else(|| "\n\n".into()),
                    options: r.options.ok_or_else(|| need("options", "sample"))?,
                    name,
                })
            }
            other => Err(format!(
                "parameter {name:?}: unknown kind {other:?} (int, choice or sample)"
            )),
        }
    }
}

/// A check table as written (see [`RawParam`] for why it is flat).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    kind: String,
    from: Option<String>,
    min: Option<usize>,
    expr: Option<String>,
    tolerance: Option<f64>,
    patterns: Option<Vec<String>>,
}

impl TryFrom<RawCheck> for Check {
    type Error = String;
    fn try_from(r: RawCheck) -> Result<Self, String> {
        let kind = r.kind.clone();
        let need = |field: &str| format!("a check of kind {kind:?} needs `{field}`");
        let fields = [
            ("from", r.from.is_some()),
            ("min", r.min.is_some()),
            ("expr", r.expr.is_some()),
            ("tolerance", r.tolerance.is_some()),
            ("patterns", r.patterns.is_some()),
        ];
        let allowed: &[&str] = match kind.as_str() {
            "keywords" => &["from", "min"],
            "number" => &["expr", "tolerance"],
            "contains" => &["patterns"],
            "lines" => &["min"],
            other => {
                return Err(format!(
                    "unknown check kind {other:?} (keywords, number, contains or lines)"
                ))
            }
        };
        if let Some((field, _)) = fields
            .iter()
            .find(|(f, present)| *present && !allowed.contains(f))
        {
            return Err(format!(
                "`{field}` does not apply to a check of kind {kind:?}"
            ));
        }
        Ok(match kind.as_str() {
            "keywords" => Check::Keywords {
                from: r.from.ok_or_else(|| need("from"))?,
                min: r.min.ok_or_else(|| need("min"))?,
            },
            "number" => Check::Number {
                expr: r.expr.ok_or_else(|| need("expr"))?,
                tolerance: r.tolerance.ok_or_else(|| need("tolerance"))?,
            },
            "contains" => Check::Contains {
                patterns: r.patterns.ok_or_else(|| need("patterns"))?,
            },
            _ => Check::Lines {
                min: r.min.ok_or_else(|| need("min"))?,
            },
        })
    }
}

impl Param {
    /// How many values this parameter can take (an ordered sample of k of n: n!/(n-k)!).
    fn choices(&self) -> f64 {
        match self {
            Param::Int { min, max, step, .. } => ((max - min) / step + 1) as f64,
            Param::Choice { options, .. } => options.len() as f64,
            Param::Sample { options, count, .. } => {
                let n = options.len();
                (n + 1 - count..=n).map(|k| k as f64).product()
            }
        }
    }

    fn name(&self) -> &str {
        match self {
            Param::Int { name, .. } | Param::Choice { name, .. } | Param::Sample { name, .. } => {
                name
            }
        }
    }
}

/// A sanity check on the output text (read up to the first end-of-sequence token).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "RawCheck", tag = "kind", rename_all = "snake_case")]
pub enum Check {
    /// At least `min` of the keywords of the drawn option(s) of `from` appear (any case).
    Keywords { from: String, min: usize },
    /// Some number in the output is within `tolerance` of `expr`, computed from int parameters.
    Number { expr: String, tolerance: f64 },
    /// Every pattern appears verbatim, after `{param}` substitution.
    Contains { patterns: Vec<String> },
    /// The output has at least `min` non-empty lines.
    Lines { min: usize },
}

/// One prompt file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// Short name, used in tables and results.
    pub name: String,
    /// What this prompt exercises.
    pub about: String,
    /// The user's message, with `{param}` and `{param.field}` placeholders.
    pub template: String,
    #[serde(default)]
    pub params: Vec<Param>,
    /// Parameters drawn once per comparison (from its seed alone) and the same in all of its
    /// requests, where [`Sharing::PerRun`] allows it; the others are drawn per request. One
    /// long document under several questions is still a fresh instance in every request, and
    /// the oracle, which scores the answers one after another, computes the document once.
    #[serde(default)]
    pub shared: Vec<String>,
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// The drawn value of one parameter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrawnValue {
    pub text: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
}

/// One concrete request text and the values it was drawn with.
#[derive(Debug, Clone, Serialize)]
pub struct PromptInstance {
    pub prompt: String,
    pub user_text: String,
    /// Drawn for every request, shared parameters or not: the prompt begins with it
    /// ([`with_nonce`]), so no two requests share an opening.
    pub nonce: String,
    pub values: BTreeMap<String, DrawnValue>,
}

/// A request's prompt text: its nonce on a line of its own, then the rendered chat.
///
/// A variant could compute the KV cache of any text that every prompt starts with while it is
/// not timed (at load, or in its warm-up request) and answer that part of each timed prefill
/// from it; a chat template starts every prompt alike (`<|im_start|>system\n...`). The cache of
/// a position depends on every token before it, so with the nonce first no two requests share
/// an opening that could be cached, the template's included. What is left: a variant may
/// precompute the first token for each of the few values a nonce starts with, one token of a
/// prompt, about 0.25% of a round's prompt tokens, under the 1% noise threshold.
pub fn with_nonce(nonce: &str, chat: &str) -> String {
    format!("{nonce}\n{chat}")
}

/// The outcome of one check on one output.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

/// All prompts of a directory, in file-name order.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub prompts: Vec<PromptSpec>,
}

impl PromptSet {
    /// Keeps only the prompts named in `names` (all when it is empty); an unknown name is an
    /// error that lists the known ones.
    pub fn select(mut self, names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Ok(self);
        }
        for name in names {
            if !self.prompts.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = self.prompts.iter().map(|p| p.name.as_str()).collect();
                return Err(format!(
                    "{name:?}: no such prompt (prompts/ has {})",
                    known.join(", ")
                ));
            }
        }
        self.prompts.retain(|p| names.contains(&p.name));
        Ok(self)
    }

    /// Loads and validates every `*.toml` in `dir` except `protocol.toml`.
    pub fn load(dir: &Path) -> Result<Self, PromptError> {
        let read_err = |source| PromptError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .filter(|p| p.file_name().is_some_and(|n| n != "protocol.toml"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(PromptError::Empty(dir.to_path_buf()));
        }
        let prompts = files
            .iter()
            .map(|p| PromptSpec::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in prompts.iter().enumerate() {
            if let Some(b) = prompts[..i].iter().find(|b| b.name == a.name) {
                return Err(PromptError::Invalid {
                    path: files[i].clone(),
                    message: format!(
                        "name {:?} is already used by another prompt file ({})",
                        b.name,
                        dir.display()
                    ),
                });
            }
        }
        Ok(PromptSet { prompts })
    }
}

impl PromptSpec {
    /// Loads one prompt file and checks it is usable.
    pub fn load(path: &Path) -> Result<Self, PromptError> {
        let text = fs::read_to_string(path).map_err(|source| PromptError::Read {
            path: path.into(),
            source,
        })?;
        let invalid = |message: String| PromptError::Invalid {
            path: path.into(),
            message,
        };
        let spec: PromptSpec =
            toml::from_str(&text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
        spec.validate().map_err(invalid)?;
        Ok(spec)
    }

    fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name() == name)
    }

    fn validate(&self) -> Result<(), String> {
        for (i, p) in self.params.iter().enumerate() {
            let at = format!("params[{i}] ({:?})", p.name());
            if self.params[..i].iter().any(|q| q.name() == p.name()) {
                return Err(format!("{at}: the name is used twice"));
            }
            match p {
                Param::Int { min, max, step, .. } if min > max || *step <= 0 => {
                    return Err(format!(
                        "{at}: needs min <= max and step > 0 (min {min}, max {max}, step {step})"
                    ))
                }
                Param::Choice { options, .. } if options.is_empty() => {
                    return Err(format!("{at}: options is empty"))
                }
                Param::Sample { options, count, .. } if *count == 0 || *count > options.len() => {
                    return Err(format!(
                        "{at}: count {count} must be between 1 and the {} options",
                        options.len()
                    ))
                }
                _ => {}
            }
        }
        for (i, name) in self.shared.iter().enumerate() {
            if self.param(name).is_none() {
                return Err(format!("shared[{i}]: {name:?} is not a parameter"));
            }
        }
        if !self.params.is_empty() && self.params.iter().all(|p| self.is_shared(p)) {
            return Err(
                "shared: every parameter is shared, so every request of a run would be the \
                 same instance; leave at least one parameter to be drawn per request"
                    .into(),
            );
        }
        for placeholder in placeholders(&self.template) {
            self.check_placeholder(&placeholder)
                .map_err(|m| format!("template: {m}"))?;
        }
        for (i, check) in self.checks.iter().enumerate() {
            let at = format!("checks[{i}]");
            match check {
                Check::Keywords { from, min } => {
                    match self.param(from) {
                        Some(Param::Choice { options, .. } | Param::Sample { options, .. }) => {
                            if let Some(o) = options.iter().find(|o| o.keywords.len() < *min) {
                                return Err(format!("{at}: needs {min} keywords but option {:?} of {from:?} has fewer", o.text));
                            }
                        }
                        _ => {
                            return Err(format!(
                                "{at}: from = {from:?} must name a choice or sample parameter"
                            ))
                        }
                    }
                }
                Check::Number { expr, tolerance } => {
                    let parsed =
                        Expr::parse(expr).map_err(|m| format!("{at}: expr {expr:?}: {m}"))?;
                    for var in parsed.variables() {
                        if !matches!(self.param(&var), Some(Param::Int { .. })) {
                            return Err(format!(
                                "{at}: expr uses {var:?}, which is not an int parameter"
                            ));
                        }
                    }
                    if !tolerance.is_finite() || *tolerance < 0.0 {
                        return Err(format!("{at}: tolerance must be >= 0"));
                    }
                }
                Check::Contains { patterns } => {
                    for p in patterns {
                        for placeholder in placeholders(p) {
                            self.check_placeholder(&placeholder)
                                .map_err(|m| format!("{at}: {m}"))?;
                        }
                    }
                }
                Check::Lines { .. } => {}
            }
        }
        Ok(())
    }

    fn check_placeholder(&self, placeholder: &str) -> Result<(), String> {
        let (name, field) = split_placeholder(placeholder);
        let param = self
            .param(name)
            .ok_or_else(|| format!("{{{placeholder}}} names no parameter"))?;
        if let Some(field) = field {
            let options = match param {
                Param::Choice { options, .. } => options,
                _ => {
                    return Err(format!(
                        "{{{placeholder}}}: only choice parameters have fields"
                    ))
                }
            };
            if let Some(o) = options.iter().find(|o| !o.fields.contains_key(field)) {
                return Err(format!(
                    "{{{placeholder}}}: option {:?} has no field {field:?}",
                    o.text
                ));
            }
        }
        Ok(())
    }

    fn is_shared(&self, p: &Param) -> bool {
        self.shared.iter().any(|s| s == p.name())
    }

    /// How many distinct instances this prompt can draw over all runs: the product of its
    /// parameters' choices (an ordered sample of k of n counts n!/(n-k)!). A float: it can be
    /// huge.
    pub fn space_size(&self) -> f64 {
        self.params.iter().map(Param::choices).product()
    }

    /// How many distinct instances one run or comparison can draw: the shared parameters are
    /// fixed in it, so only the others count.
    pub fn run_space_size(&self) -> f64 {
        self.params
            .iter()
            .filter(|p| !self.is_shared(p))
            .map(Param::choices)
            .product()
    }

    /// Draws an instance for (`seed`, `stream`) whose text is not in `used` (and records it):
    /// no two requests of a run or a comparison share an instance, so nothing can be answered
    /// from a memo of an earlier one. A repeat is redrawn on a stream derived from `stream`;
    /// an error says the parameter space is too small when it keeps repeating.
    pub fn draw_unique(
        &self,
        seed: u64,
        stream: u64,
        sharing: Sharing,
        used: &mut std::collections::HashSet<String>,
    ) -> Result<PromptInstance, String> {
        for attempt in 0..1000u64 {
            let redraw = stream ^ attempt.wrapping_mul(0xD1B5_4A32_D192_ED03);
            let instance = self.draw(seed, redraw, sharing);
            if used.insert(instance.user_text.clone()) {
                return Ok(instance);
            }
        }
        let space = match sharing {
            Sharing::PerRun => self.run_space_size(),
            Sharing::PerRequest => self.space_size(),
        };
        Err(format!(
            "prompt {:?}: 1000 draws in a row repeated earlier instances; its parameters allow \
             only {space} distinct ones in a run",
            self.name,
        ))
    }

    /// Draws this prompt's parameters for (`seed`, `round`) and fills the template; with
    /// [`Sharing::PerRun`] the shared parameters are drawn for `seed` alone.
    pub fn draw(&self, seed: u64, round: u64, sharing: Sharing) -> PromptInstance {
        let mut per_request = request_rng(seed, round, &self.name);
        let mut per_run = request_rng(seed, SHARED_STREAM, &self.name);
        let mut values = BTreeMap::new();
        for p in &self.params {
            let rng = match sharing == Sharing::PerRun && self.is_shared(p) {
                true => &mut per_run,
                false => &mut per_request,
            };
            let value = match p {
                Param::Int { min, max, step, .. } => {
                    let n = rng.below(((max - min) / step + 1) as u64) as i64;
                    let v = min + n * step;
                    DrawnValue {
                        text: v.to_string(),
                        keywords: vec![],
                        fields: BTreeMap::new(),
                        number: Some(v),
                    }
                }
                Param::Choice { options, .. } => {
                    let o = &options[rng.below(options.len() as u64) as usize];
                    DrawnValue {
                        text: o.text.clone(),
                        keywords: o.keywords.clone(),
                        fields: o.fields.clone(),
                        number: None,
                    }
                }
                Param::Sample {
                    options,
                    count,
                    separator,
                    ..
                } => {
                    let mut order: Vec<usize> = (0..options.len()).collect();
                    for i in 0..*count {
                        let j = i + rng.below((order.len() - i) as u64) as usize;
                        order.swap(i, j);
                    }
                    let picked = &order[..*count];
                    DrawnValue {
                        text: picked
                            .iter()
                            .map(|&i| options[i].text.trim())
                            .collect::<Vec<_>>()
                            .join(separator),
                        keywords: picked
                            .iter()
                            .flat_map(|&i| options[i].keywords.clone())
                            .collect(),
                        fields: BTreeMap::new(),
                        number: None,
                    }
                }
            };
            values.insert(p.name().to_string(), value);
        }
        let user_text = substitute(&self.template, &values);
        // Drawn last, so the parameters are what they were before nonces existed; 8 hex digits
        // (4.3e9 values) whose first one already differs between two requests 15 times in 16.
        let nonce = format!("{:08x}", per_request.next() >> 32);
        PromptInstance {
            prompt: self.name.clone(),
            user_text,
            nonce,
            values,
        }
    }

    /// Runs every check on `output` (already cut at the first end-of-sequence token).
    pub fn evaluate(&self, instance: &PromptInstance, output: &str) -> Vec<CheckOutcome> {
        self.checks
            .iter()
            .map(|c| evaluate_check(c, instance, output))
            .collect()
    }
}

fn evaluate_check(check: &Check, instance: &PromptInstance, output: &str) -> CheckOutcome {
    let lower = output.to_lowercase();
    let (name, passed, detail) = match check {
        Check::Keywords { from, min } => {
            let keywords = instance
                .values
                .get(from)
                .map(|v| v.keywords.as_slice())
                .unwrap_or(&[]);
            let found: Vec<&String> = keywords
                .iter()
                .filter(|k| lower.contains(&k.to_lowercase()))
                .collect();
            (
                format!("keywords({from})"),
                found.len() >= *min,
                format!(
                    "{} of {} keywords (need {min}): {:?}",
                    found.len(),
                    keywords.len(),
                    found
                ),
            )
        }
        Check::Number { expr, tolerance } => {
            let vars: BTreeMap<String, f64> = instance
                .values
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.number? as f64)))
                .collect();
            match Expr::parse(expr).and_then(|e| e.eval(&vars)) {
                Ok(expected) => {
                    let numbers = numbers_in(output);
                    let hit = numbers.iter().any(|n| (n - expected).abs() <= *tolerance);
                    (
                        "number".into(),
                        hit,
                        format!(
                            "expected {expected:.2} ± {tolerance}, found {:?}",
                            &numbers[..numbers.len().min(12)]
                        ),
                    )
                }
                Err(e) => (
                    "number".into(),
                    false,
                    format!("cannot evaluate {expr:?}: {e}"),
                ),
            }
        }
        Check::Contains { patterns } => {
            let wanted: Vec<String> = patterns
                .iter()
                .map(|p| substitute(p, &instance.values))
                .collect();
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|p| !output.contains(p.as_str()))
                .collect();
            (
                "contains".into(),
                missing.is_empty(),
                format!("missing {missing:?}"),
            )
        }
        Check::Lines { min } => {
            let n = output.lines().filter(|l| !l.trim().is_empty()).count();
            (
                "lines".into(),
                n >= *min,
                format!("{n} non-empty lines (need {min})"),
            )
        }
    };
    CheckOutcome {
        check: name,
        passed,
        detail,
    }
}

/// Every number written in `text` (`1,200` and `57.5` included).
fn numbers_in(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, out: &mut Vec<f64>| {
        let trimmed = current.trim_end_matches(['.', ',']).replace(',', "");
        if let Ok(v) = trimmed.parse() {
            out.push(v);
        }
        current.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (!current.is_empty() && (c == '.' || c == ',')) {
            current.push(c);
        } else {
            flush(&mut current, &mut out);
        }
    }
    flush(&mut current, &mut out);
    out
}

/// The `{...}` placeholders of a template, in order.
fn placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        match rest[start..].find('}') {
            Some(len) => {
                out.push(rest[start + 1..start + len].to_string());
                rest = &rest[start + len + 1..];
            }
            None => break,
        }
    }
    out
}

fn split_placeholder(placeholder: &str) -> (&str, Option<&str>) {
    match placeholder.split_once('.') {
        Some((name, field)) => (name, Some(field)),
        None => (placeholder, None),
    }
}

fn substitute(template: &str, values: &BTreeMap<String, DrawnValue>) -> String {
    let mut out = template.to_string();
    for placeholder in placeholders(template) {
        let (name, field) = split_placeholder(&placeholder);
        let value = values.get(name).and_then(|v| match field {
            None => Some(v.text.clone()),
            Some(f) => v.fields.get(f).cloned(),
        });
        if let Some(value) = value {
            out = out.replacen(&format!("{{{placeholder}}}"), &value, 1);
        }
    }
    out
}

/// Whether the requests of a run may hold the same values of the prompts' `shared` parameters.
/// Only requests that each go to a process of their own may: a comparison's timed pairs. A
/// process that answers several requests (`host run`'s worker; a pair's worker, warm-up first)
/// could otherwise keep the shared document's KV cache from one request for the next, and
/// prefill only the rest. The oracle reuses it on purpose, to score cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Shared parameters drawn once for the run's seed.
    PerRun,
    /// Every parameter drawn for each request.
    PerRequest,
}

/// The stream the shared parameters are drawn from: no round's (rounds count up from 0,
/// warm-ups down from `u64::MAX`).
const SHARED_STREAM: u64 = 1 << 63;

/// The stream one request of `prompt` draws from (`round`; or [`SHARED_STREAM`]): SplitMix64
/// started at the first 8 bytes of SHA-256 over the seed, the round and the prompt's name.
///
/// A request shows the variant 32 bits of one of its stream's outputs (the nonce), and SplitMix64
/// gives its state away to 2^32 tries at the rest. Through SHA-256 that state says nothing about
/// the seed, so nothing about any other request: a variant cannot know a prompt, nonce
/// included, before it arrives, and so cannot prefill it untimed.
fn request_rng(seed: u64, round: u64, prompt: &str) -> SplitMix64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"autoinfer request stream\0")
        .chain_update(seed.to_le_bytes())
        .chain_update(round.to_le_bytes())
        .chain_update(prompt.as_bytes())
        .finalize();
    let mut state = [0u8; 8];
    state.copy_from_slice(&digest[..8]);
    SplitMix64::new(u64::from_le_bytes(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<PromptSpec, String> {
        let spec: PromptSpec = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        spec.validate()?;
        Ok(spec)
    }

    const TRAIN: &str = r#"
        name = "reasoning"
        about = "test"
        template = "Out at {a} km/h, back at {b} km/h."
        [[params]]
        kind = "int"
        name = "a"
        min = 40
        max = 120
        step = 10
        [[params]]
        kind = "int"
        name = "b"
        min = 40
        max = 120
        step = 10
        [[checks]]
        kind = "number"
        expr = "2 * a * b / (a + b)"
        tolerance = 0.5
    "#;

    #[test]
    fn select_keeps_the_named_prompts_and_refuses_unknown_ones() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        let all = PromptSet::load(&dir).unwrap();
        assert_eq!(all.prompts.len(), 5);
        let two = all
            .clone()
            .select(&["reasoning".into(), "code".into()])
            .unwrap();
        let names: Vec<&str> = two.prompts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["code", "reasoning"], "prompt order is kept");
        assert_eq!(all.clone().select(&[]).unwrap().prompts.len(), 5);
        let err = all.select(&["poem".into()]).unwrap_err();
        assert!(
            err.contains("\"poem\"") && err.contains("creative"),
            "{err}"
        );
    }

    #[test]
    fn unique_draws_never_repeat_and_a_small_space_is_named() {
        let train = spec(TRAIN).unwrap();
        assert_eq!(train.space_size(), 81.0);
        let mut used = std::collections::HashSet::new();
        let texts: Vec<String> = (0..81)
            .map(|i| {
                train
                    .draw_unique(7, i, Sharing::PerRun, &mut used)
                    .unwrap()
                    .user_text
            })
            .collect();
        let distinct: std::collections::HashSet<&String> = texts.iter().collect();
        assert_eq!(
            distinct.len(),
            81,
            "every instance of the space, none twice"
        );
        let err = train
            .draw_unique(7, 81, Sharing::PerRun, &mut used)
            .unwrap_err();
        assert!(err.contains("reasoning") && err.contains("81"), "{err}");
    }

    /// The real prompts: each one's space is large enough that even drawing without the
    /// no-repeat rule, the longest comparison (12 rounds, each with a warm-up) would repeat an
    /// instance with a probability under 0.3% (birthday bound n^2 / 2N for n = 24 draws). A
    /// prompt with shared parameters draws its per-request ones without repeats in a run (at
    /// least 24 of them), and its shared ones from a space too large to know in advance.
    #[test]
    fn the_prompts_have_large_parameter_spaces() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        for p in PromptSet::load(&dir).unwrap().prompts {
            let n = 24.0;
            if p.shared.is_empty() {
                let odds = n * n / (2.0 * p.space_size());
                assert!(
                    odds < 0.003,
                    "prompt {:?}: {} instances; a repeat in {n} draws has odds {odds:.4}",
                    p.name,
                    p.space_size()
                );
            } else {
                assert!(p.run_space_size() >= n, "prompt {:?}", p.name);
                let shared = p.space_size() / p.run_space_size();
                assert!(shared > 1e9, "prompt {:?}: {shared} shared draws", p.name);
            }
        }
    }

    #[test]
    fn shared_parameters_hold_for_a_seed_and_change_with_it() {
        let text = TRAIN.replace(
            "template = \"Out at {a} km/h, back at {b} km/h.\"",
            "template = \"Out at {a} km/h, back at {b} km/h.\"\nshared = [\"a\"]",
        );
        let train = spec(&text).unwrap();
        assert_eq!((train.space_size(), train.run_space_size()), (81.0, 9.0));
        let a_of = |seed, round| {
            train.draw(seed, round, Sharing::PerRun).values["a"]
                .text
                .clone()
        };
        let b_of = |seed, round| {
            train.draw(seed, round, Sharing::PerRun).values["b"]
                .text
                .clone()
        };
        let rounds: std::collections::HashSet<String> = (0..50).map(|r| a_of(11, r)).collect();
        assert_eq!(
            rounds.len(),
            1,
            "the shared parameter is the same in every round"
        );
        let bs: std::collections::HashSet<String> = (0..50).map(|r| b_of(11, r)).collect();
        assert!(bs.len() > 1, "the other one is drawn per round");
        let seeds: std::collections::HashSet<String> = (0..50).map(|s| a_of(s, 0)).collect();
        assert!(
            seeds.len() > 1,
            "the shared parameter changes with the seed"
        );
        // Drawn per request (a process answering several), nothing is shared.
        let alone: std::collections::HashSet<String> = (0..50)
            .map(|r| {
                train.draw(11, r, Sharing::PerRequest).values["a"]
                    .text
                    .clone()
            })
            .collect();
        assert!(
            alone.len() > 1,
            "per request, the shared parameter varies too"
        );
        // a run can draw 9 distinct instances, and the error for the tenth says so
        let mut used = std::collections::HashSet::new();
        for i in 0..9 {
            train
                .draw_unique(11, i, Sharing::PerRun, &mut used)
                .unwrap();
        }
        let err = train
            .draw_unique(11, 9, Sharing::PerRun, &mut used)
            .unwrap_err();
        assert!(err.contains("9 distinct ones in a run"), "{err}");
    }

    #[test]
    fn shared_names_must_be_parameters_and_not_all_of_them() {
        let with = |shared: &str| {
            spec(&TRAIN.replace(
                "template = \"Out at {a} km/h, back at {b} km/h.\"",
                &format!(
                    "template = \"Out at {{a}} km/h, back at {{b}} km/h.\"\nshared = {shared}"
                ),
            ))
        };
        let err = with("[\"speed\"]").unwrap_err();
        assert!(
            err.contains("shared[0]") && err.contains("\"speed\""),
            "{err}"
        );
        let err = with("[\"a\", \"b\"]").unwrap_err();
        assert!(err.contains("every parameter is shared"), "{err}");
        assert!(with("[\"b\"]").is_ok());
    }

    #[test]
    fn draws_are_seeded_per_round_and_in_range() {
        let s = spec(TRAIN).unwrap();
        let (first, again) = (s.draw(7, 0, Sharing::PerRun), s.draw(7, 0, Sharing::PerRun));
        assert_eq!(
            (&first.user_text, &first.nonce),
            (&again.user_text, &again.nonce),
            "same seed and round, same text and nonce"
        );
        let texts: std::collections::BTreeSet<String> = (0..20)
            .map(|r| s.draw(7, r, Sharing::PerRun).user_text)
            .collect();
        assert!(
            texts.len() > 10,
            "rounds must draw different instances: {texts:?}"
        );
        for r in 0..50 {
            let v = s.draw(1, r, Sharing::PerRun).values["a"].number.unwrap();
            assert!((40..=120).contains(&v) && v % 10 == 0, "{v}");
        }
    }

    /// The `predict` attack. A variant sees its request's nonce, the top 32 bits of one output
    /// of that request's stream, and can find the other 32 (checking each guess against the
    /// values the prompt shows) in 2^32 tries: a minute of CPU in an untimed warm-up. Were a
    /// stream's state an invertible function of (seed, round, prompt), as it was until
    /// 2026-12-05 (xor and multiply), that state would give the seed, and with it every later
    /// request's prompt, nonce included, to prefill before it arrives: a prefill KEEP for
    /// nothing. Here the attacker is handed a stream's state (the 2^32 tries done) and undoes
    /// that mixing; it must learn nothing about the next round.
    #[test]
    fn one_requests_stream_reveals_no_other_requests_prompt() {
        const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
        const FNV_PRIME: u64 = 0x100_0000_01B3;
        // The inverse of the FNV prime modulo 2^64 (Newton's iteration).
        let mut inverse = FNV_PRIME;
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(FNV_PRIME.wrapping_mul(inverse)));
        }
        assert_eq!(FNV_PRIME.wrapping_mul(inverse), 1);
        let attack = |state: u64, round: u64, prompt: &str| {
            // The state after the first step, back to the seed the old mixing started from.
            let mut s = state.wrapping_sub(GOLDEN);
            for b in prompt.bytes().rev() {
                s = s.wrapping_mul(inverse) ^ b as u64;
            }
            s ^ round.wrapping_mul(0xA24B_AED4_963E_E407)
        };
        // The attacker is right about the old mixing (so the check below can fail) ...
        let old = |seed: u64, round: u64, prompt: &str| {
            let mut state = seed ^ round.wrapping_mul(0xA24B_AED4_963E_E407);
            for b in prompt.bytes() {
                state = (state ^ b as u64).wrapping_mul(FNV_PRIME);
            }
            state.wrapping_add(GOLDEN)
        };
        let (seed, round) = (0x1234_5678_9ABC_DEF0u64, 3);
        assert_eq!(
            attack(old(seed, round, "reasoning"), round, "reasoning"),
            seed
        );
        // ... and learns nothing from the harness's streams: not the seed, not the next round.
        let s = spec(TRAIN).unwrap();
        let state = request_rng(seed, round, &s.name).state();
        let guess = attack(state, round, &s.name);
        assert_ne!(guess, seed);
        let next = |seed| s.draw(seed, round + 1, Sharing::PerRequest).nonce;
        assert_ne!(
            next(guess),
            next(seed),
            "the next request's nonce was predicted"
        );
    }

    #[test]
    fn every_request_draws_its_own_nonce_and_its_prompt_starts_with_it() {
        let s = spec(TRAIN).unwrap();
        let a = s.draw(7, 0, Sharing::PerRun);
        assert_eq!(a.nonce.len(), 8);
        assert!(
            a.nonce.chars().all(|c| c.is_ascii_hexdigit()),
            "{}",
            a.nonce
        );
        let nonces: std::collections::BTreeSet<String> = (0..64)
            .map(|r| s.draw(7, r, Sharing::PerRun).nonce)
            .collect();
        assert_eq!(nonces.len(), 64);
        // Their first digits vary: two requests rarely share even that.
        let firsts: std::collections::BTreeSet<char> =
            nonces.iter().filter_map(|n| n.chars().next()).collect();
        assert!(firsts.len() >= 12, "{firsts:?}");
        assert_eq!(
            with_nonce(&a.nonce, "<|im_start|>"),
            format!("{}\n<|im_start|>", a.nonce)
        );
    }

    #[test]
    fn number_check_uses_the_drawn_speeds() {
        let s = spec(TRAIN).unwrap();
        let inst = s.draw(3, 1, Sharing::PerRun);
        let (a, b) = (
            inst.values["a"].number.unwrap() as f64,
            inst.values["b"].number.unwrap() as f64,
        );
        let right = format!("The average speed is {:.1} km/h.", 2.0 * a * b / (a + b));
        assert!(s.evaluate(&inst, &right)[0].passed, "{right}");
        let wrong = format!("The average speed is {} km/h.", (a + b) / 2.0 + 7.0);
        assert!(!s.evaluate(&inst, &wrong)[0].passed, "{wrong}");
    }

    #[test]
    fn keyword_contains_and_lines_checks() {
        let s = spec(
            r#"
            name = "code"
            about = "test"
            template = "Write {task.function}: {task}"
            [[params]]
            kind = "choice"
            name = "task"
            options = [{ text = "reverse a list", function = "rev", keywords = ["list", "reverse"] }]
            [[checks]]
            kind = "contains"
            patterns = ["def {task.function}("]
            [[checks]]
            kind = "keywords"
            from = "task"
            min = 2
            [[checks]]
            kind = "lines"
            min = 2
        "#,
        )
        .unwrap();
        let inst = s.draw(0, 0, Sharing::PerRun);
        assert_eq!(inst.user_text, "Write rev: reverse a list");
        let good = s.evaluate(
            &inst,
            "def rev(xs):\n    return xs[::-1]  # Reverse the LIST",
        );
        assert!(good.iter().all(|c| c.passed), "{good:?}");
        let bad = s.evaluate(&inst, "def reverse(xs): pass");
        assert!(bad.iter().all(|c| !c.passed), "{bad:?}");
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let err = spec(&TRAIN.replace("a + b", "a + c")).unwrap_err();
        assert!(err.contains("checks[0]") && err.contains("\"c\""), "{err}");
        let err = spec(&TRAIN.replace("{b}", "{speed}")).unwrap_err();
        assert!(err.contains("template") && err.contains("{speed}"), "{err}");
        let err = spec(&TRAIN.replace("template =", "templat =")).unwrap_err();
        assert!(err.contains("templat"), "{err}");
        let err = spec(&TRAIN.replace(
            "max = 120\n        step = 10\n        [[checks]]",
            "max = 1\n        [[checks]]",
        ))
        .unwrap_err();
        assert!(err.contains("params[1]"), "{err}");
    }

    #[test]
    fn sample_draws_distinct_options() {
        let s = spec(
            r#"
            name = "s"
            about = "t"
            template = "{doc}"
            [[params]]
            kind = "sample"
            name = "doc"
            count = 3
            separator = "|"
            options = [{ text = "a" }, { text = "b" }, { text = "c" }, { text = "d" }]
        "#,
        )
        .unwrap();
        for r in 0..20 {
            let text = s.draw(5, r, Sharing::PerRun).user_text;
            let mut parts: Vec<&str> = text.split('|').collect();
            parts.sort();
            parts.dedup();
            assert_eq!(parts.len(), 3, "{text}");
        }
    }

    #[test]
    fn finds_numbers_in_prose() {
        assert_eq!(
            numbers_in("It is 57.5 km/h, or 1,200 m. Done."),
            vec![57.5, 1200.0]
        );
    }
}
