//! The host's tokenizer and chat template against independent implementations: token ids from
//! llama.cpp's tokenizer and chat text rendered by Python's Jinja2, for every prompt kind and
//! for hard cases (digit runs, unicode and emoji, runs of spaces and newlines, code with tabs).
//! The fixture is made by fixtures/tokenizer/make_fixture.py.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{host, model};

fn tokenize(text: &str, chat: bool) -> Vec<u32> {
    let mut cmd = host();
    cmd.arg("tokenize").arg("--model").arg(model());
    if chat {
        cmd.arg("--chat");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ids as JSON")
}

#[test]
fn matches_llama_cpp_and_jinja2_on_every_fixture_case() {
    let path = common::root().join("host/tests/fixtures/tokenizer/fixture.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 15,
        "the fixture has every prompt and hard case"
    );
    let mut failures = Vec::new();
    for case in cases {
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        // Chat cases go through the host's template: the ids only match if the rendering does.
        let got = match case["user_text"].as_str() {
            Some(user) => tokenize(user, true),
            None => tokenize(case["text"].as_str().unwrap(), false),
        };
        if got != want {
            let at = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            failures.push(format!(
                "{}: first difference at {at} (host {} ids, llama.cpp {})",
                case["name"],
                got.len(),
                want.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn known_example_from_facts() {
    assert_eq!(
        tokenize("Hello world 12345", false),
        vec![19556, 905, 216, 33, 34, 35, 36, 37]
    );
}
