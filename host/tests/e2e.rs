//! The main job end to end: `host run variants/current` on the real model.

mod common;

use common::{build_plain, host, model, output, records, scratch};

#[test]
fn scores_the_current_variant_on_the_real_model() {
    model();
    let results = scratch("e2e");
    let (out, stdout, stderr) = output(
        host()
            .args([
                "run",
                "variants/current",
                "--rounds",
                "1",
                "--max-new-tokens",
                "24",
                "--description",
                "e2e test",
                "--results",
            ])
            .arg(&results),
    );
    assert!(out.status.success(), "host run failed:\n{stderr}");
    for header in [
        "prompt",
        "prefill tok/s",
        "decode tok/s",
        "TTFT ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "peak RSS MiB",
    ] {
        assert!(
            stdout.contains(header),
            "{header:?} missing from the table:\n{stdout}"
        );
    }
    for prompt in [
        "code",
        "creative",
        "explanation",
        "reasoning",
        "summarization",
    ] {
        assert!(
            stdout.contains(prompt),
            "{prompt} missing from the table:\n{stdout}"
        );
    }

    // The gates: every figure and threshold shown, and the unchanged copy of the baseline
    // reproduces the oracle exactly.
    for needle in [
        "quality gates",
        "agreement",
        "ppl ratio",
        "checks (baseline)",
        "thresholds per prompt",
        "gates: PASS",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
    assert!(
        stderr.contains("oracle: "),
        "the oracle's cost is shown: {stderr}"
    );

    let rows = records(&results);
    assert_eq!(rows.len(), 1, "one row per run");
    let row = &rows[0];
    assert_eq!(row.len(), 35);
    for column in [
        "against",
        "against_tree",
        "compare_rounds",
        "decode_ratio",
        "verdict",
    ] {
        assert_eq!(row[column], "-", "a run is not a comparison: {column}");
    }
    assert_eq!(
        (
            row["variant"].as_str(),
            row["status"].as_str(),
            row["description"].as_str(),
            row["prompts"].as_str(),
            row["gates"].as_str(),
        ),
        ("variants/current", "ok", "e2e test", "all", "pass")
    );
    assert_eq!(
        (row["agreement"].as_str(), row["ppl_ratio"].as_str()),
        ("1.0000", "1.0000"),
        "{row:?}"
    );
    assert_eq!(row["checks_passed"], row["checks_baseline"], "{row:?}");
    // Built and run by the host, confined as far as this kernel allows; a fresh seed drawn and
    // recorded; the harness is the committed one (a modified one says so).
    let expected = if common::landlock_abi() >= 3 {
        "full"
    } else {
        "partial"
    };
    assert!(row["sandbox"].starts_with(expected), "{row:?}");
    assert!(row["seed"].parse::<u64>().is_ok(), "{row:?}");
    assert!(!row["harness"].is_empty(), "{row:?}");
    assert!(
        row["decode_tok_s"].parse::<f64>().unwrap() > 1.0,
        "decode tok/s is a real figure: {row:?}"
    );

    let json_path = results.join("runs").join(&row["json"]);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    let samples = run["samples"].as_array().unwrap();
    let bound = run["roofline"]["bound_tok_s"].as_f64().unwrap();
    let bytes = run["roofline"]["bytes_per_token"].as_u64().unwrap();
    let suspect_above = run["suspect_above_tok_s"].as_f64().unwrap();
    assert!(
        (90_000_000..100_000_000).contains(&bytes),
        "about 96 MB of weights per token: {bytes}"
    );
    // Not the bound itself: an honest variant comes near it, and a shared machine's measured
    // bandwidth moves by 7-13% (a CI run of 2026-12-05 read 196.3 tok/s against 183).
    assert!(
        suspect_above > bound && bound > 0.0,
        "the suspect threshold is above the bound ({suspect_above}, {bound})"
    );
    let fastest = samples
        .iter()
        .map(|s| s["timing"]["decode_tok_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        fastest <= suspect_above,
        "an honest variant is not suspect: fastest {fastest} tok/s, threshold {suspect_above}"
    );
    assert_eq!(samples.len(), 5, "one timed request per prompt per round");
    // No two requests share an instance, the untimed warm-up included.
    let warmups = run["warmups"].as_array().unwrap();
    assert_eq!(warmups.len(), 1);
    let texts: std::collections::HashSet<&str> = samples
        .iter()
        .chain(warmups)
        .map(|s| s["instance"]["user_text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 6);
    assert_eq!(
        run["provenance"]["model_sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    for s in samples {
        assert_eq!(s["tokens"].as_array().unwrap().len(), 24, "fixed work");
        assert!(
            s["cpu_ms"].as_f64().unwrap() > 0.0,
            "the worker's CPU is measured: {s}"
        );
        assert_eq!(s["timing"]["itl_ms"].as_array().unwrap().len(), 23);
        assert_eq!(s["quality"]["tokens"], 24, "every request is scored: {s}");
        assert_eq!(s["quality"]["matches_reference"], true);
    }
    assert_eq!(run["gates"]["failures"].as_array().unwrap().len(), 0);
    assert_eq!(run["gates"]["per_prompt"].as_array().unwrap().len(), 5);
    assert!(run["oracle"]["commit"].as_str().unwrap().len() == 40);
    let long = samples
        .iter()
        .find(|s| s["prompt"] == "summarization")
        .unwrap();
    assert!(
        long["timing"]["prompt_tokens"].as_u64().unwrap() >= 1500,
        "the long-context prompt is long"
    );
    // Coherent English: the explanation's answer is mostly common words, not noise.
    let text = samples
        .iter()
        .find(|s| s["prompt"] == "explanation")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(looks_like_english(&text), "not coherent English? {text:?}");
}

/// The most frequent English words: a reply of real sentences is full of
/// them, token soup from a broken model is not.
const COMMON_WORDS: &[&str] = &[
    "the", "be", "to", "of", "and", "a", "an", "in", "that", "have", "i", "it", "for", "not", "on",
    "with", "he", "as", "you", "do", "at", "this", "but", "his", "by", "from", "they", "we", "say",
    "her", "she", "or", "will", "my", "one", "all", "would", "there", "their", "what", "so", "up",
    "out", "if", "about", "who", "get", "which", "go", "me", "when", "make", "can", "like", "time",
    "no", "just", "him", "know", "take", "people", "into", "year", "your", "good", "some", "could",
    "them", "see", "other", "than", "then", "now", "look", "only", "come", "its", "over", "think",
    "also", "back", "after", "use", "two", "how", "our", "work", "first", "well", "way", "even",
    "new", "want", "because", "any", "these", "give", "day", "most", "us", "is", "are", "was",
    "were", "has", "had", "here", "little", "tell", "more", "very", "each", "many", "where", "why",
    "i'm", "it's", "let's",
];

/// Whether `text` (lower case) reads as English sentences: at least ten
/// words, nearly all of them plain words, and one in five among the most
/// common words. Written for the test of the real model; tolerant of which
/// prompt instance was drawn.
fn looks_like_english(text: &str) -> bool {
    let words: Vec<&str> = text
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\''))
        .filter(|w| !w.is_empty())
        .collect();
    // Numbers (a numbered list's "1.") are neither words nor noise, up to a few of them.
    let numbers = words
        .iter()
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .count();
    let plain = words
        .iter()
        .filter(|w| {
            w.chars()
                .all(|c| c.is_alphabetic() || c == '\'' || c == '-')
        })
        .count();
    let common = words.iter().filter(|w| COMMON_WORDS.contains(w)).count();
    words.len() >= 10
        && numbers * 10 <= words.len() * 3
        && plain * 10 >= (words.len() - numbers) * 9
        && common * 5 >= words.len()
}

#[test]
fn the_english_check_tells_sentences_from_noise() {
    for good in [
        "hello, my dear grandmother, i'm glad you're here. i'll tell you a little bit about my home,",
        "a rainbow forms when sunlight is bent by drops of water in the air, and the light splits",
        // A numbered list, as SmolLM2 answered the explanation prompt in one CI run.
        "the seasons:\n1. spring: the earth's tilt causes the seasons to change.\n2. summer: the",
    ] {
        assert!(looks_like_english(good), "{good:?}");
    }
    for bad in [
        "qx zzv ptrk lmno vvb ghjk wqrt plok xxyz mnbv",
        "the the",
        "<|im_end|> ##4 0x1f 9913 ]] {{ the of and a is to",
        "12 7 9913 44 1 2 3 the of 8",
    ] {
        assert!(!looks_like_english(bad), "{bad:?}");
    }
}

#[test]
fn json_summary_and_no_build() {
    let results = scratch("e2e-json");
    let (out, stdout, stderr) = output(
        host()
            .args([
                "run",
                "variants/current",
                "--rounds",
                "1",
                "--max-new-tokens",
                "4",
                "--prompt",
                "code",
                "--prompt",
                "reasoning",
                "--json",
                "--results",
            ])
            .arg(&results),
    );
    assert!(out.status.success(), "{stderr}");
    let both: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON only");
    let summary = &both["summary"];
    assert_eq!(summary["overall"]["requests"], 2);
    assert_eq!(summary["per_prompt"].as_array().unwrap().len(), 2);
    assert_eq!(both["gates"]["overall"]["agreement"], 1.0);
    for figure in [
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "peak_rss_mib",
    ] {
        let median = summary["overall"][figure]["median"].as_f64();
        assert!(
            median.is_some_and(|m| m > 0.0),
            "{figure}: {}",
            summary["overall"][figure]
        );
    }
    let repetition = summary["overall"]["repetition"]["median"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&repetition),
        "repetition is a share: {repetition}"
    );
    // The same variant again without building: the library a plain cargo build left is used,
    // and the row says its build was not the host's (so not confined).
    build_plain();
    let (out, _, stderr) = output(
        host()
            .args([
                "run",
                "variants/current",
                "--no-build",
                "--rounds",
                "1",
                "--max-new-tokens",
                "2",
                "--prompt",
                "code",
                "--results",
            ])
            .arg(&results),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("Finished"),
        "--no-build must not run cargo build: {stderr}"
    );
    let rows = records(&results);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[1]["prompts"], "code",
        "a partial run says so: {:?}",
        rows[1]
    );
    assert!(
        rows[1]["sandbox"].starts_with("partial: --no-build"),
        "{:?}",
        rows[1]
    );

    // An unknown prompt name is refused, naming the known ones, before anything runs.
    let (out, _, stderr) = output(host().args([
        "run",
        "variants/current",
        "--no-build",
        "--prompt",
        "poetry",
    ]));
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"poetry\"") && stderr.contains("reasoning"),
        "{stderr}"
    );
}

#[test]
fn model_tensors_lists_types_and_shares_of_a_tokens_read() {
    let path = model();
    let (out, stdout, stderr) = output(host().args(["model", "--tensors", "--model"]).arg(path));
    assert!(out.status.success(), "{stderr}");
    // SmolLM2-135M: the FFN and attention matrices of 30 layers are Q4_1; the token
    // embedding, tied to the output layer, is Q8_0 and read whole every token.
    for line in [
        "blk.*.ffn_down.weight        Q4_1       30     1536 x 576",
        "token_embd.weight            Q8_0        1    576 x 49152",
        "one decoded token reads 96.6 MB: F32 0.1% Q4_1 68.7% Q8_0 31.1%",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    // Bad input names the file; --model alone is a usage error.
    let (out, _, stderr) =
        output(host().args(["model", "--tensors", "--model", "/nonexistent.gguf"]));
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent.gguf"), "{stderr}");
    let (out, _, stderr) = output(host().args(["model", "--model"]).arg(path));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tensors"), "{stderr}");
}
