//! A variant cannot buy a better score: every attack of issue 13, written into a fixture as an
//! agent after a better score might write it, is defeated for the right reason.
//!
//! The runtime attacks are modes of the `drift` fixture (the baseline's code plus
//! `src/attacks.rs`), run on a tiny synthetic model, where `sleep` (20 ms before each token)
//! bounds the honest decode rate at 50 tok/s: a figure above it would be a figure bought. The
//! build-time attack is the `build-escape` fixture, built by the host. The kernel must offer
//! Landlock (ABI 3 or later), as machines of this project's kind do; on one without, these
//! tests fail rather than pass without checking anything.

mod common;

use std::os::fd::FromRawFd;
use std::path::Path;

use common::{build_plain, fixture, host, landlock_abi, output, records, root, run_fixture};
use common::{scratch, tiny_model};

/// The most a `sleep` variant can decode: one token per 20 ms, plus a margin for when the
/// first token's arrival is stamped a little late.
const SLEEP_BOUND_TOK_S: f64 = 52.0;

fn require_landlock() {
    assert!(
        landlock_abi() >= 3,
        "this kernel has Landlock ABI {}: variant code cannot be confined here",
        landlock_abi()
    );
}

/// `host run` of the drift fixture in `mode` on the tiny model: one round of the `code`
/// prompt, 16 tokens, the workers' log echoed.
fn attack(mode: &str, results: &Path, extra: &[&str]) -> (std::process::Output, String, String) {
    require_landlock();
    let mut args = vec!["--model", tiny_model().to_str().unwrap()];
    args.extend(["--prompt", "code", "--max-new-tokens", "16", "--verbose"]);
    args.extend(extra);
    run_fixture("drift", mode, results, &args)
}

/// The lines where the fixture reports attack `name`.
fn reports<'a>(stderr: &'a str, name: &str) -> Vec<&'a str> {
    let tag = format!("attack {name}:");
    stderr.lines().filter(|l| l.contains(&tag)).collect()
}

/// Asserts the attack `name` ran (`at_least` attempts reported) and none of its attempts
/// succeeded.
fn all_denied(stderr: &str, name: &str, at_least: usize) {
    let lines = reports(stderr, name);
    assert!(
        lines.len() >= at_least,
        "attack {name} reported {} attempts, expected {at_least}:\n{stderr}",
        lines.len()
    );
    for line in lines {
        assert!(line.contains("denied"), "attack {name} got through: {line}");
    }
}

fn decode_of(results: &Path) -> f64 {
    let rows = records(results);
    rows.last().unwrap()["decode_tok_s"].parse().unwrap()
}

#[test]
fn a_patched_clock_moves_no_figure() {
    let results = scratch("attack-clock");
    let (out, _, stderr) = attack("sleep,clock", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    if cfg!(target_arch = "x86_64") {
        let patched = reports(&stderr, "clock");
        assert!(
            patched.iter().any(|l| l.ends_with("DONE")),
            "the worker's clock was patched (the attack ran): {stderr}"
        );
    }
    // The worker's clock runs at half speed, the supervisor's does not.
    let decode = decode_of(&results);
    assert!(
        decode <= SLEEP_BOUND_TOK_S,
        "decode {decode} tok/s: the patched clock was believed"
    );
}

#[test]
fn a_forged_reply_breaks_the_protocol_and_reaches_no_inherited_descriptor() {
    // A writable pipe left open (not close-on-exec) by whatever started the host.
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::fcntl(fds[0], libc::F_SETFL, libc::O_NONBLOCK) };
    let results = scratch("attack-forge");
    let (out, _, stderr) = attack("sleep,forge", &results, &[]);
    assert!(
        !out.status.success(),
        "a forged reply must fail the run: {stderr}"
    );
    assert!(
        stderr.contains("broke the worker protocol") && stderr.contains("drift"),
        "{stderr}"
    );
    assert_eq!(records(&results)[0]["status"], "failed");
    // Nothing reached the inherited pipe: the worker closed it before the variant ran.
    let mut read_end = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    unsafe { libc::close(fds[1]) };
    let mut buf = [0u8; 64];
    let got = std::io::Read::read(&mut read_end, &mut buf);
    assert!(
        matches!(&got, Ok(0))
            || got
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the variant wrote into a descriptor the host inherited: {got:?}"
    );
}

/// Every memo file the `memo` attack may have left where it outlives a worker.
fn memo_files() -> Vec<std::path::PathBuf> {
    let mut dirs = vec![
        Path::new("/tmp").to_path_buf(),
        Path::new("/dev/shm").to_path_buf(),
    ];
    dirs.extend(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    dirs.iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("autoinfer-drift-memo-"))
        .collect()
}

/// A prefix cache across requests: `host run`'s one worker answers every round, so its
/// requests must share no long document, or prefill would be timed on the tail alone. (A
/// comparison's requests may share one: each goes to a fresh worker.)
#[test]
fn a_prefix_cache_finds_no_shared_document_to_reuse() {
    require_landlock();
    let results = scratch("attack-prefix");
    let model = tiny_model().to_str().unwrap().to_string();
    let (out, _, stderr) = run_fixture(
        "drift",
        "prefix",
        &results,
        &[
            "--model",
            &model,
            "--prompt",
            "summarization",
            "--max-new-tokens",
            "4",
            "--rounds",
            "3",
            "--verbose",
        ],
    );
    assert!(out.status.success(), "{stderr}");
    let reused: Vec<(usize, usize)> = reports(&stderr, "prefix")
        .iter()
        .filter_map(|l| {
            let rest = l.split("reused ").nth(1)?;
            let mut words = rest.split(' ');
            let n = words.next()?.parse().ok()?;
            let m = words.nth(1)?.parse().ok()?;
            Some((n, m))
        })
        .collect();
    assert_eq!(reused.len(), 4, "a warm-up and 3 rounds: {stderr}");
    // Live (every request reports), and it finds at most the first digits of a nonce: every
    // prompt begins with its own, before the chat template (after the template's 3-token
    // head, every later request reused those 3).
    assert!(reused.iter().all(|&(n, _)| n <= 2), "{reused:?}");
    // But never the report: at most a quarter of a 1,600-token prompt.
    for &(n, m) in &reused {
        assert!(
            m > 1000 && n * 4 < m,
            "reused {n} of {m} tokens: {reused:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&results);
}

#[test]
fn a_memo_cannot_outlive_its_worker() {
    for stale in memo_files() {
        std::fs::remove_file(stale).unwrap();
    }
    let results = scratch("attack-memo");
    // The same seed twice: the same instances, so only the sandbox keeps the second run from
    // replaying the first one's answers.
    for run in 0..2 {
        let (out, _, stderr) = attack("sleep,memo", &results, &["--seed", "11"]);
        assert!(out.status.success(), "{stderr}");
        let saves = reports(&stderr, "memo");
        assert!(
            saves
                .iter()
                .any(|l| l.contains("save /tmp/") && l.contains("denied")),
            "{stderr}"
        );
        assert!(
            !stderr.contains("replaying"),
            "run {run} replayed a memo: {stderr}"
        );
        let decode = decode_of(&results);
        assert!(
            decode <= SLEEP_BOUND_TOK_S,
            "run {run}: decode {decode} tok/s"
        );
        assert_eq!(
            memo_files(),
            Vec::<std::path::PathBuf>::new(),
            "a memo outlived the run"
        );
    }
    let rows = records(&results);
    assert_eq!(rows[0]["seed"], "11");
    assert_eq!(rows[1]["seed"], "11");
}

/// Peak memory is read from the worker's resident high-water mark, so the model's pages must
/// count while the variant reads them: dropping them before every block (the block's reads
/// would map its own back from the page cache) is refused by the worker's seccomp filter, in
/// every request.
#[test]
fn the_model_mapping_cannot_be_released_from_the_resident_set() {
    let results = scratch("attack-release");
    let (out, _, stderr) = attack("release", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    all_denied(&stderr, "release", 2);
    assert!(
        reports(&stderr, "release")
            .iter()
            .all(|l| l.contains("Operation not permitted")),
        "refused by the worker's filter, not by chance:\n{stderr}"
    );
}

/// Peak memory counts what a worker keeps in files beside its resident set: the `stash`
/// attack's 64 MiB in a file of its scratch directory and 64 MiB in a memfd it maps a page of
/// (none of it resident) raise the run's peak memory by at least that much over the plain
/// fixture's. Read from the resident set alone, both runs showed the same figure.
#[test]
fn memory_kept_in_files_counts_as_peak_memory() {
    let results = scratch("attack-stash");
    let (out, _, stderr) = attack("", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    let (out, _, stderr) = attack("stash", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    let stores = reports(&stderr, "stash");
    assert!(
        stores.len() == 2 && stores.iter().all(|l| l.ends_with("DONE")),
        "both stores made, as a variant may:\n{stderr}"
    );
    let peaks: Vec<f64> = records(&results)
        .iter()
        .map(|r| r["peak_rss_mib"].parse().unwrap())
        .collect();
    assert!(
        peaks[1] >= peaks[0] + 120.0,
        "plain {} MiB, with 128 MiB kept in files {} MiB",
        peaks[0],
        peaks[1]
    );
}

/// Memory kept in the kernel's pipe buffers counts as peak memory, as memory kept in files
/// does: filled pipes (up to 64 MiB; the kernel caps one user's pipes) raise the peak by what
/// they hold. A CPU worker may not make a unix socket pair, whose buffers would be another
/// such store, and no worker may make secret memory (`memfd_secret`), a file the count of its
/// files would not see.
#[test]
fn memory_kept_in_pipes_counts_and_other_kernel_stores_are_refused() {
    let results = scratch("attack-stash-pipes");
    let (out, _, stderr) = attack("", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    let (out, _, stderr) = attack("stash-pipes", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    let lines = reports(&stderr, "stash-pipes");
    // The most any worker stored (each worker reports once).
    let stored = lines
        .iter()
        .filter(|l| l.ends_with("DONE"))
        .filter_map(|l| {
            l.split("pipes holding ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .fold(0u64, u64::max);
    assert!(
        stored >= 32 << 20,
        "at least 32 MiB stored in pipes:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("socket pair") && l.contains("denied")),
        "the socket pair refused:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("memfd_secret") && l.contains("denied")),
        "secret memory refused:\n{stderr}"
    );
    let peaks: Vec<f64> = records(&results)
        .iter()
        .map(|r| r["peak_rss_mib"].parse().unwrap())
        .collect();
    let stored_mib = stored as f64 / f64::from(1 << 20);
    assert!(
        peaks[1] >= peaks[0] + 0.9 * stored_mib,
        "plain {} MiB, with {stored_mib:.1} MiB kept in pipes {} MiB",
        peaks[0],
        peaks[1]
    );
}

/// A worker cannot keep data in its own library's copy: the copy lies outside the scratch
/// directory whose files count as the worker's memory, readable only, and can be neither
/// replaced nor linked into the scratch directory. While the library lay in the scratch
/// directory (left out of the count as the host's), opening it for writing was DONE.
#[test]
fn a_worker_cannot_write_its_library() {
    let results = scratch("attack-stash-lib");
    let (out, _, stderr) = attack("stash-lib", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    // Three attempts a worker, one worker at least: the open, the replacement, the link.
    all_denied(&stderr, "stash-lib", 3);
    let lines = reports(&stderr, "stash-lib");
    for attempt in ["opened for writing", "replaced by a file", "linked into"] {
        assert!(
            lines.iter().any(|l| l.contains(attempt)),
            "no attempt '{attempt}':\n{stderr}"
        );
    }
}

/// A scratch directory of more directories than the supervisor walks cannot be measured for
/// what it keeps in files: the request fails, naming the variant, the directory and why.
#[test]
fn a_scratch_tree_too_large_to_measure_fails_the_request() {
    let results = scratch("attack-stash-dirs");
    let (out, _, stderr) = attack("stash-dirs", &results, &[]);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot be measured during")
            && stderr.contains("autoinfer-worker-")
            && stderr.contains("more than 256 directories"),
        "{stderr}"
    );
}

/// Peak memory includes the worker's resident high-water mark, read after each request; a CPU
/// worker that could write its `clear_refs` would reset it, and hide what it allocated and
/// freed between two samples (a GPU worker can: the CUDA driver writes its /proc entries).
/// Landlock keeps every path to it read-only, in every request.
#[test]
fn the_peak_memory_mark_cannot_be_reset() {
    let results = scratch("attack-hwm");
    let (out, _, stderr) = attack("hwm", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    // Three paths a request, two requests at least (the run's and the quality pass's).
    all_denied(&stderr, "hwm", 6);
}

#[test]
fn the_results_the_oracle_and_the_host_are_out_of_reach() {
    let results = scratch("attack-escape");
    let (out, _, stderr) = attack("sleep", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    let before = std::fs::read_to_string(results.join("results.tsv")).unwrap();
    let (out, _, stderr) = attack("escape", &results, &[]);
    assert!(out.status.success(), "{stderr}");
    all_denied(&stderr, "escape", 5);
    let after = std::fs::read_to_string(results.join("results.tsv")).unwrap();
    assert!(after.starts_with(&before), "earlier rows intact");
    assert_eq!(records(&results).len(), 2, "only the host's rows: {after}");
    assert!(!after.contains("forged"), "{after}");
    let planted = root().join("target/autoinfer-oracle/cache/scores/escaped.json");
    assert!(
        !planted.exists(),
        "the variant wrote into the oracle's cache"
    );
}

#[test]
fn the_supervisor_cannot_be_signalled() {
    let results = scratch("attack-kill");
    let (out, _, stderr) = attack("kill-parent", &results, &[]);
    assert!(out.status.success(), "the host must survive: {stderr}");
    all_denied(&stderr, "kill-parent", 3);
    // Nor can it stop the measurement: a Ctrl-C reaching the host would record it as
    // `interrupted` rather than as measured.
    let rows = records(&results);
    assert_eq!(rows.last().unwrap()["status"], "synthetic", "{rows:?}");
}

/// A worker reaches no socket: neither a daemon's unix socket (a path Landlock does not guard;
/// seccomp answers every connect with ENOENT) nor a TCP service on this machine.
#[test]
fn a_worker_reaches_no_socket() {
    let results = scratch("attack-sockets");
    let daemon = results.join("daemon.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&daemon).unwrap();
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let mode = format!("sockets,socket={},port={port}", daemon.display());
    let (out, _, stderr) = attack(&mode, &results, &[]);
    assert!(out.status.success(), "{stderr}");
    all_denied(&stderr, "sockets", 2);
    // Denied by the worker's rules, not by chance: the socket file exists, so ENOENT is the
    // connect rule's answer, and an AF_INET socket is refused outright (EPERM).
    let lines = reports(&stderr, "sockets");
    let line = |what: &str| {
        lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no sockets report names {what}: {stderr}"))
    };
    let unix = line("unix socket");
    assert!(unix.contains("os error 2)"), "{unix}");
    let tcp = line("127.0.0.1");
    assert!(tcp.contains("os error 1)"), "{tcp}");
}

/// `host compare variants/baseline drift` on the tiny model with the drift fixture in `mode`.
fn compare_against(
    mode: &str,
    results: &Path,
    tokens: &str,
) -> (std::process::Output, String, String) {
    compare_sides(Path::new("variants/baseline"), mode, results, tokens)
}

/// `host compare A drift` on the tiny model with the drift fixture in `mode` (both sides in
/// it when `a` is the fixture too), the libraries from a plain cargo build (`--no-build`).
fn compare_sides(
    a: &Path,
    mode: &str,
    results: &Path,
    tokens: &str,
) -> (std::process::Output, String, String) {
    build_plain();
    let mut cmd = drift_compare(
        a.as_os_str(),
        fixture("drift").as_os_str(),
        mode,
        results,
        tokens,
    );
    cmd.arg("--no-build")
        .env("CARGO_TARGET_DIR", root().join("target"));
    output(&mut cmd)
}

/// The command of `host compare A B` on the tiny model, in `mode`, looks of 2 rounds, every
/// worker's stderr shown.
fn drift_compare(
    a: &std::ffi::OsStr,
    b: &std::ffi::OsStr,
    mode: &str,
    results: &Path,
    tokens: &str,
) -> std::process::Command {
    require_landlock();
    let mut cmd = host();
    cmd.current_dir(root())
        .arg("compare")
        .arg(a)
        .arg(b)
        .arg("--model")
        .arg(tiny_model())
        .args(["--prompt", "code", "--max-new-tokens", tokens])
        .args(["--looks", "2", "--rounds-per-look", "2", "--verbose"])
        .arg("--results")
        .arg(results)
        .env("AUTOINFER_FIXTURE_MODE", mode);
    cmd
}

#[test]
fn the_other_side_of_a_comparison_is_out_of_reach() {
    let results = scratch("attack-others");
    let (out, _, stderr) = compare_against("others", &results, "8");
    assert!(matches!(out.status.code(), Some(0 | 3 | 4)), "{stderr}");
    let lines = reports(&stderr, "others");
    assert!(
        lines.iter().any(|l| l.contains("pin worker")),
        "the other worker was found and attacked: {stderr}"
    );
    all_denied(&stderr, "others", 5);
}

/// Asserts a comparison whose both sides carry one attack was not kept and read decode
/// neither FASTER nor SLOWER (`why` says why it must not).
fn neither_side_favoured(out: &std::process::Output, stdout: &str, why: &str) {
    assert_ne!(out.status.code(), Some(0), "no KEEP: {stdout}");
    let decode = stdout
        .lines()
        .find(|l| l.starts_with("decode tok/s"))
        .unwrap_or_else(|| panic!("a decode row: {stdout}"));
    assert!(
        !decode.contains("FASTER") && !decode.contains("SLOWER"),
        "{why}: {decode}"
    );
}

#[test]
fn a_variant_cannot_tell_which_side_it_is_by_starting_first() {
    // Both sides carry the `side` attack: whichever worker of a pair started first slows
    // itself. With A started first in every pair that was the reference every time (B
    // FASTER, a KEEP of nothing); started in each pair's order it is A and B alike.
    let results = scratch("attack-side");
    let (out, stdout, stderr) = compare_sides(&fixture("drift"), "side", &results, "8");
    assert!(matches!(out.status.code(), Some(0 | 3 | 4)), "{stderr}");
    let lines = reports(&stderr, "side");
    assert!(
        lines.iter().any(|l| l.contains("started first: yes"))
            && lines.iter().any(|l| l.contains("started first: no")),
        "the attack saw its sibling and acted: {stderr}"
    );
    neither_side_favoured(
        &out,
        &stdout,
        "whichever side starts first is A as often as B",
    );
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn a_variant_cannot_tell_which_side_it_is_from_its_build() {
    // Both sides carry the `built` attack and are built by the host (no --no-build): A from
    // HEAD's commit, B from the checkout, where an untracked file lies at the root and the
    // fixture's committed symbolic link `side-link` could be read through. Each
    // worker logs what its build saw; it must be the same for both, and the attack's slowdown
    // (for a library built where the reference used to be, or without that file) must hit
    // both or neither.
    let results = scratch("attack-built");
    let drift = "host/tests/fixtures/variants/drift";
    // An untracked file at the checkout's root, which a build of the working tree would see and
    // a build of HEAD would not (removed when the test ends, pass or fail).
    struct Untracked(std::path::PathBuf);
    impl Drop for Untracked {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let marker = Untracked(root().join("autoinfer-fixture-untracked"));
    std::fs::write(&marker.0, "only in the working tree").unwrap();
    let mut cmd = drift_compare(
        format!("HEAD:{drift}").as_ref(),
        drift.as_ref(),
        "built",
        &results,
        "8",
    );
    let (out, stdout, stderr) = output(&mut cmd);
    assert!(matches!(out.status.code(), Some(0 | 3 | 4)), "{stderr}");
    let mut seen: Vec<&str> = reports(&stderr, "built")
        .iter()
        .map(|l| l.split("attack built: ").nth(1).unwrap_or(l))
        .collect();
    assert!(seen.len() >= 4, "both sides' workers reported: {stderr}");
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        1,
        "A's and B's builds saw the same place: {seen:#?}"
    );
    assert!(
        seen[0].contains("git readable: false")
            && seen[0].contains("untracked file seen: false")
            && seen[0].contains("link followed: false"),
        "a build reads no git directory, no file of the working tree outside the variant, and a \
         symbolic link as a commit holds it: {}",
        seen[0]
    );
    neither_side_favoured(&out, &stdout, "whatever a build saw, A saw it as B did");
    std::fs::remove_dir_all(&results).unwrap();
}

/// The fixtures' workspace builds with the root's release profile (for the packages it has),
/// so a fixture built confined starts from the oracle's compiled dependencies: the test above
/// builds the drift fixture twice, which otherwise compiles 144 crates each time.
#[test]
fn the_fixtures_build_with_the_root_release_profile() {
    let read = |path: &Path| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let release =
        |manifest: &toml::Table| manifest["profile"]["release"].as_table().unwrap().clone();
    let fixtures = root().join("host/tests/fixtures/variants");
    let lock = std::fs::read_to_string(fixtures.join("Cargo.lock")).unwrap();
    let mut ours = release(&read(&root().join("Cargo.toml")));
    if let Some(toml::Value::Table(packages)) = ours.get_mut("package") {
        packages.retain(|name, _| name == "*" || lock.contains(&format!("name = \"{name}\"")));
    }
    assert_eq!(release(&read(&fixtures.join("Cargo.toml"))), ours);
}

#[test]
fn a_variant_burns_no_cpu_while_the_other_side_is_measured() {
    let results = scratch("attack-spin");
    let (out, stdout, stderr) = compare_against("spin", &results, "64");
    // Not exit 1: the frozen worker used no CPU (else "used ... ms of CPU while it was frozen").
    assert!(
        matches!(out.status.code(), Some(0 | 3 | 4)),
        "{stdout}{stderr}"
    );
    // Its spinning threads ran only in the moments between its own answer and its freezing.
    let burnt: Vec<f64> = reports(&stderr, "spin")
        .iter()
        .filter_map(|l| l.split("burnt ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(burnt.len() >= 4, "the attack ran: {stderr}");
    assert!(
        burnt.iter().all(|&ms| ms < 50.0),
        "the spinner burnt CPU between its requests (ms): {burnt:?}"
    );
    // Every request of the comparison had an instance of its own.
    let row = &records(&results)[0];
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(results.join("runs").join(&row["json"])).unwrap(),
    )
    .unwrap();
    let pairs = record["pairs"].as_array().unwrap();
    let warmups = record["warmups"].as_array().unwrap();
    // (The comparison may stop at any look, futility included: count against its pairs.)
    assert!(pairs.len() >= 2, "at least one look: {}", pairs.len());
    assert_eq!(
        warmups.len(),
        pairs.len(),
        "one warm-up per pair, each pair with fresh workers"
    );
    let texts: Vec<&str> = pairs
        .iter()
        .chain(warmups)
        .map(|p| p["a"]["instance"]["user_text"].as_str().unwrap())
        .collect();
    let distinct: std::collections::HashSet<&&str> = texts.iter().collect();
    assert_eq!(distinct.len(), texts.len(), "{texts:?}");
    for pair in pairs.iter().chain(warmups) {
        assert_eq!(
            pair["a"]["instance"], pair["b"]["instance"],
            "A and B share each instance"
        );
    }
}

/// Held by each test that builds the build-escape fixture. Its check for a lingering
/// `sleep 617` looks at every process of the machine, so a second build of the fixture in
/// flight on another test thread (its process alive until that build ends) would be read as an
/// escape; CI failed once on exactly that overlap.
static BUILD_ESCAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_build_script_writes_only_its_own_build_output() {
    require_landlock();
    let _alone = BUILD_ESCAPE.lock().unwrap_or_else(|e| e.into_inner());
    build_plain();
    let results = scratch("attack-build");
    std::fs::write(results.join("results.tsv"), "").unwrap();
    let mut cmd = host();
    cmd.arg("run")
        .arg(fixture("build-escape"))
        .arg("--model")
        .arg(tiny_model())
        .args([
            "--prompt",
            "code",
            "--max-new-tokens",
            "4",
            "--rounds",
            "1",
            "--results",
        ])
        .arg(&results)
        .env("AUTOINFER_FIXTURE_MODE", "build-escape")
        .env("AUTOINFER_FIXTURE_CHECKOUT", root());
    let (_, _, stderr) = output(&mut cmd);
    escaped_nothing(&stderr, 17);
}

/// A build that never ends (its script sleeps, and leaves a process holding cargo's output
/// open) is killed at the limit AUTOINFER_BUILD_TIMEOUT sets, with everything it started; the
/// run fails naming the variant and the limit, and writes no results row. A limit that is not
/// a number of seconds is refused before anything is built.
#[test]
fn a_build_that_hangs_is_killed_at_the_build_time_limit() {
    require_landlock();
    let _alone = BUILD_ESCAPE.lock().unwrap_or_else(|e| e.into_inner());
    build_plain();
    let results = scratch("build-hang");
    std::fs::write(results.join("results.tsv"), "earlier\n").unwrap();
    let run = |limit: &str| {
        let mut cmd = host();
        cmd.arg("run")
            .arg(fixture("build-escape"))
            .arg("--model")
            .arg(tiny_model())
            .args(["--prompt", "code", "--rounds", "1", "--results"])
            .arg(&results)
            .env("AUTOINFER_FIXTURE_MODE", "build-hang")
            .env("AUTOINFER_BUILD_TIMEOUT", limit);
        let (out, _, stderr) = output(&mut cmd);
        (out, stderr)
    };
    let (out, stderr) = run("5");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not end within 5 s") && stderr.contains("build-escape"),
        "{stderr}"
    );
    // The script's processes would sleep 619 s.
    assert!(
        all_gone("619"),
        "a process of the killed build outlived it: {:?}",
        tagged("619")
    );
    let (out, stderr) = run("5 minutes");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("AUTOINFER_BUILD_TIMEOUT is \"5 minutes\"")
            && !stderr.contains("Compiling"),
        "refused before any build:\n{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(results.join("results.tsv")).unwrap(),
        "earlier\n",
        "a failed build leaves the results as they were"
    );
}

/// Asserts the build-escape fixture's build script ran (`attempts` reported: 17 with a results
/// directory to find, 16 without) and wrote nothing but its own build output, and that the
/// process it left running ended with the build.
fn escaped_nothing(stderr: &str, attempts: usize) {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("build-escape: "))
        .collect();
    assert_eq!(lines.len(), attempts, "the build script ran: {stderr}");
    for line in &lines {
        let allowed = line.contains("its own build output") || line.contains("leave a process");
        assert_eq!(
            line.ends_with("DONE"),
            allowed,
            "{line}\n(only its own build output may be written)"
        );
    }
    // The group is killed with SIGKILL after cargo exits, and a signalled process takes a
    // moment to die on a loaded machine: `all_gone` gives it 5 s (a process that escaped lives
    // 617 s: `sleep 617`).
    assert!(
        all_gone("617"),
        "a build script's process outlived it: {:?}",
        tagged("617")
    );
}

/// tools/gpu-stage.sh and tools/gpu-probe.sh build variant code (A, B, their GPU tests) on this
/// machine for the GPU machine, which has no cargo: the libraries through `host stage` (the
/// host's own confined builds), the test binaries through tools/confined-cargo.sh, confined as
/// the host's own builds are. The build-escape fixture built that way writes nothing but its
/// own build output and leaves no process; and no line of either script runs cargo on
/// variants/current any other way.
#[test]
fn the_gpu_staging_tools_build_variant_code_confined() {
    require_landlock();
    let _alone = BUILD_ESCAPE.lock().unwrap_or_else(|e| e.into_inner());
    let target = scratch("confined-cargo");
    let (out, _, stderr) = output(
        std::process::Command::new(root().join("tools/confined-cargo.sh"))
            .arg(&target)
            .args(["build", "--release"])
            .current_dir(fixture("build-escape"))
            .env("AUTOINFER_HOST", env!("CARGO_BIN_EXE_host"))
            .env("AUTOINFER_FIXTURE_MODE", "build-escape")
            .env("AUTOINFER_FIXTURE_CHECKOUT", root()),
    );
    assert!(out.status.success(), "{stderr}");
    escaped_nothing(&stderr, 16);
    // A target directory the harness builds in is refused.
    let (out, _, stderr) = output(
        std::process::Command::new(root().join("tools/confined-cargo.sh"))
            .arg(root().join("target"))
            .args(["build", "--release"])
            .current_dir(fixture("build-escape")),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("holds the harness's own builds"),
        "{stderr}"
    );
    for script in ["tools/gpu-stage.sh", "tools/gpu-probe.sh"] {
        let text = std::fs::read_to_string(root().join(script)).unwrap();
        let plain: Vec<&str> = text
            .lines()
            .filter(|l| {
                let code = l.split('#').next().unwrap_or("");
                code.contains("-p current") && !code.contains("confined-cargo.sh")
            })
            .collect();
        assert!(
            plain.is_empty(),
            "{script} builds variant code unconfined: {plain:?}"
        );
        assert!(
            text.contains("confined-cargo.sh") || text.contains("release/host stage "),
            "{script} builds through confined-cargo.sh or the host's own confined builds"
        );
    }
    let _ = std::fs::remove_dir_all(&target);
}

/// A screen builds candidate patches of `variants/current` only, as a staged comparison runs
/// nothing else: a patch that reaches past it (plugin-api, say, which both sides link) is
/// refused by name before anything is built.
#[test]
fn the_gpu_screen_refuses_a_patch_outside_variants_current() {
    let dir = scratch("gpu-probe-patch");
    let patch = dir.join("g99-outside.patch");
    std::fs::write(
        &patch,
        "diff --git a/plugin-api/src/lib.rs b/plugin-api/src/lib.rs\n\
         --- a/plugin-api/src/lib.rs\n\
         +++ b/plugin-api/src/lib.rs\n\
         @@ -1 +1,2 @@\n \
         x\n\
         +y\n",
    )
    .unwrap();
    let (out, _, stderr) = output(
        std::process::Command::new(root().join("tools/gpu-probe.sh"))
            .arg("--patch")
            .arg(&patch),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("changes files besides variants/current: plugin-api/src/lib.rs"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// On the GPU machine a screen runs variant code (B's test binary, a candidate's) in the lease
/// that later compares: tools/gpu-run-confined.sh (each screen's run.sh) runs it under `host
/// confine --variant-run`. A stand-in binary, a script, tries what such code would: it writes
/// its scratch folder (allowed) but not its own folder or another one, reads neither an
/// unconfined process's memory view nor a file outside what it may read, cannot leave its
/// process group, reaches neither a daemon's unix socket nor the network, and what it leaves
/// running is killed when it exits.
/// A screen's folder as tools/gpu-probe.sh writes it, without binaries: run.sh and host.gz.
fn screen_folder(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    std::fs::copy(root().join("tools/gpu-run-confined.sh"), dir.join("run.sh")).unwrap();
    let gz = std::process::Command::new("gzip")
        .arg("-c")
        .arg(env!("CARGO_BIN_EXE_host"))
        .stdout(std::fs::File::create(dir.join("host.gz")).unwrap())
        .status()
        .unwrap();
    assert!(gz.success());
    dir
}

/// Writes `text` to `path` as an executable script: a stand-in for a screen's binary (or its
/// profiler).
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The live processes (not zombies) that have `marker` among their arguments: what a build
/// script or a screen's binary left running (`sleep 617`, `sleep 301.1234`). A screen's
/// binary runs in a PID namespace of its own, so the process ids it could print are not this
/// test's: the stand-ins tag what they start with a marker instead.
fn tagged(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            });
            !zombie && args.split(|&b| b == 0).any(|a| a == marker.as_bytes())
        })
        .collect()
}

/// Whether every process tagged with `marker` is gone (or a zombie) within 5 s: the kernel may
/// take a moment to kill a group or a namespace.
fn all_gone(marker: &str) -> bool {
    for _ in 0..50 {
        if tagged(marker).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    tagged(marker).is_empty()
}

/// A marker for [`tagged`], unique to this test process and `n`: a duration `sleep` accepts.
fn marker(n: u32) -> String {
    format!("{}.{}", 300 + n, std::process::id())
}

#[test]
fn a_screen_binary_runs_confined_and_leaves_nothing_running() {
    require_landlock();
    let dir = screen_folder("gpu-run-confined");
    let outside = scratch("gpu-run-confined-outside");
    std::fs::write(outside.join("secret"), "key").unwrap();
    // A daemon's socket and a network service on this machine, which the binary must not reach.
    let _daemon = std::os::unix::net::UnixListener::bind(outside.join("daemon.sock")).unwrap();
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let binary = dir.join("b");
    script(
        &binary,
        "#!/bin/sh\n\
         echo \"args $*\"\n\
         echo \"profiled ${PROFILED:-no}\"\n\
         echo x > \"$TMPDIR/mine\" && echo 'scratch WROTE'\n\
         echo x > \"$OUTSIDE/escaped\" 2> /dev/null && echo 'outside WROTE'\n\
         echo x > \"$(dirname \"$0\")/planted\" 2> /dev/null && echo 'folder WROTE'\n\
         head -c 1 /proc/$VICTIM/environ > /dev/null 2>&1 && echo 'victim READ'\n\
         cat \"$OUTSIDE/secret\" > /dev/null 2>&1 && echo 'secret READ'\n\
         setsid sh -c 'echo session ESCAPED' 2> /dev/null\n\
         python3 -c 'print(\"python ran\")'\n\
         python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' \
           \"$OUTSIDE/daemon.sock\" 2> /dev/null && echo 'daemon REACHED'\n\
         python3 -c 'import socket, sys; socket.create_connection((\"127.0.0.1\", int(sys.argv[1])))' \
           \"$PORT\" 2> /dev/null && echo 'network REACHED'\n\
         sleep \"$MARK\" > /dev/null 2>&1 &\n\
         kill -0 $! && echo 'left running'\n\
         exit 3\n",
    );
    // Plainly, then under a stand-in profiler (PROFILER), which must run inside the same
    // confinement: it tries to write outside, then runs the binary, which is denied the same.
    let stand_in = dir.join("profiler");
    script(
        &stand_in,
        "#!/bin/sh\n\
         echo x > \"$OUTSIDE/profiler-escaped\" 2> /dev/null && echo 'profiler WROTE'\n\
         PROFILED=yes exec \"$@\"\n",
    );
    // And in run.sh's own PID namespace (SCREEN_SHARED_PID_NAMESPACE=1), where the victim's
    // /proc entry is there to be denied, not absent.
    let profiled_run = Some(stand_in.to_str().unwrap());
    for (n, (profiler, shared)) in [(None, false), (profiled_run, false), (None, true)]
        .into_iter()
        .enumerate()
    {
        let mark = marker(n as u32);
        let mut run = std::process::Command::new("bash");
        run.arg(dir.join("run.sh"))
            .args(["b", "--ignored", "x"])
            .env("MARK", &mark)
            .env("OUTSIDE", &outside)
            .env("VICTIM", std::process::id().to_string())
            .env("PORT", port.to_string());
        if let Some(profiler) = profiler {
            run.env("PROFILER", profiler);
        }
        if shared {
            run.env("SCREEN_SHARED_PID_NAMESPACE", "1");
        }
        let (out, stdout, stderr) = output(&mut run);
        let profiled = if profiler.is_some() { "yes" } else { "no" };
        assert!(
            stdout.contains(&format!("profiled {profiled}")),
            "{profiler:?}: {stdout}{stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "the binary's status: {stdout}{stderr}"
        );
        assert!(stdout.contains("args --ignored x"), "{stdout}{stderr}");
        assert!(stdout.contains("scratch WROTE"), "{stdout}{stderr}");
        assert!(
            stdout.contains("python ran"),
            "the socket probes need python3: {stderr}"
        );
        for escape in [
            "outside", "folder", "victim", "secret", "session", "daemon", "network", "profiler",
        ] {
            assert!(!stdout.contains(escape), "{escape}: {stdout}");
        }
        assert!(!outside.join("escaped").exists() && !dir.join("planted").exists());
        assert!(!outside.join("profiler-escaped").exists());
        assert!(stdout.contains("left running"), "{stdout}{stderr}");
        // Killed with its group when run.sh returned.
        assert!(
            all_gone(&mark),
            "{:?} outlived the screen's binary",
            tagged(&mark)
        );
    }
    // A name that is no binary of the folder is refused by name.
    let (out, _, stderr) = output(
        std::process::Command::new("bash")
            .arg(dir.join("run.sh"))
            .arg("host.gz"),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'host.gz' is not a test binary"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&outside);
}

/// run.sh stopped from outside (a `timeout` around it in a device call, as the twenty-eighth
/// GPU session's profile had) still kills the binary's group: before, the binary and what it
/// started ran on, on the GPU, into whatever the lease ran next.
#[test]
fn a_screen_binary_stopped_from_outside_leaves_nothing_running() {
    require_landlock();
    let dir = screen_folder("gpu-run-confined-stopped");
    let binary = dir.join("b");
    script(
        &binary,
        "#!/bin/sh\n\
         sleep \"$MARK\" > /dev/null 2>&1 &\n\
         kill -0 $! && echo 'left running'\n\
         exec sleep \"$MARK\" > /dev/null 2>&1\n",
    );
    for (n, signal) in ["TERM", "INT", "HUP"].into_iter().enumerate() {
        let mark = marker(10 + n as u32);
        let (out, stdout, stderr) = output(
            std::process::Command::new("timeout")
                .args(["-s", signal, "3", "bash"])
                .arg(dir.join("run.sh"))
                .arg("b")
                .env("MARK", &mark),
        );
        assert_eq!(out.status.code(), Some(124), "{signal}: {stdout}{stderr}");
        assert!(
            stdout.contains("left running"),
            "{signal}: {stdout}{stderr}"
        );
        assert!(
            all_gone(&mark),
            "{signal}: {:?} outlived run.sh",
            tagged(&mark)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The screen's binary is the first process of a PID namespace of its own unless run.sh's
/// operator asks for the shared one (SCREEN_SHARED_PID_NAMESPACE=1, for a machine where none
/// can be made); any other value is refused by name.
#[test]
fn a_screen_binary_shares_run_sh_pid_namespace_only_when_asked() {
    require_landlock();
    let dir = screen_folder("gpu-run-confined-namespace");
    // What the CUDA driver does: name a thread under /proc/self/task by its id as the process
    // sees it (so /proc must be the namespace's own).
    script(
        &dir.join("b"),
        "#!/bin/sh\n\
         echo \"pid $$\"\n\
         echo named > /proc/self/task/$$/comm && echo 'named itself'\n\
         [ -e /proc/$VICTIM ] && echo 'sees the test'\n\
         true\n",
    );
    for (shared, first) in [(None, true), (Some("1"), false)] {
        let mut run = std::process::Command::new("bash");
        run.arg(dir.join("run.sh"))
            .arg("b")
            .env("VICTIM", std::process::id().to_string());
        if let Some(value) = shared {
            run.env("SCREEN_SHARED_PID_NAMESPACE", value);
        } else {
            run.env_remove("SCREEN_SHARED_PID_NAMESPACE");
        }
        let (out, stdout, stderr) = output(&mut run);
        assert!(out.status.success(), "{shared:?}: {stdout}{stderr}");
        let pid: u32 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
            .expect("the binary prints its pid");
        assert_eq!(pid == 1, first, "{shared:?}: the binary's pid {pid}");
        assert!(
            stdout.contains("named itself"),
            "{shared:?}: {stdout}{stderr}"
        );
        // In a namespace of its own it sees no process outside it, the test included.
        assert_eq!(
            stdout.contains("sees the test"),
            !first,
            "{shared:?}: {stdout}"
        );
    }
    let (out, _, stderr) = output(
        std::process::Command::new("bash")
            .arg(dir.join("run.sh"))
            .arg("b")
            .env("SCREEN_SHARED_PID_NAMESPACE", "yes"),
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SCREEN_SHARED_PID_NAMESPACE is 1 or unset, not 'yes'"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// run.sh killed with SIGKILL (a device call's limit may end it so) runs no trap, so the
/// group it would kill is left to the construction of `host confine --variant-run`: the
/// binary is the first process of a PID namespace of its own, tied to the supervisor, which
/// is tied to run.sh. Before, the binary and what it started ran on.
#[test]
fn a_screen_binary_outlives_no_sigkill_of_its_run_sh() {
    require_landlock();
    let dir = screen_folder("gpu-run-confined-killed");
    script(
        &dir.join("b"),
        "#!/bin/sh\n\
         sleep \"$MARK\" > /dev/null 2>&1 &\n\
         exec sleep \"$MARK\" > /dev/null 2>&1\n",
    );
    let mark = marker(20);
    let mut run = std::process::Command::new("bash")
        .arg(dir.join("run.sh"))
        .arg("b")
        .env("MARK", &mark)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Both sleeps running, found by their marker (which shows the search finds them).
    let started = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        tagged(&mark).len() == 2
    });
    assert!(
        started,
        "the binary's two sleeps never ran: {:?}",
        tagged(&mark)
    );
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    assert!(
        all_gone(&mark),
        "{:?} outlived run.sh's SIGKILL",
        tagged(&mark)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_the_committed_harness_measures() {
    require_landlock();
    build_plain();
    // A clone of the checkout's HEAD, with a quality threshold lowered.
    let clone = scratch("harness-clone");
    std::fs::remove_dir_all(&clone).unwrap();
    git2::Repository::clone(root().to_str().unwrap(), &clone).expect("clone the checkout");
    let protocol = clone.join("prompts/protocol.toml");
    let text = std::fs::read_to_string(&protocol).unwrap();
    std::fs::write(
        &protocol,
        text.replace("min_agreement = 0.999", "min_agreement = 0.5"),
    )
    .unwrap();
    let in_clone = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_host"));
        cmd.current_dir(&clone)
            .args(args)
            .env("CARGO_TARGET_DIR", root().join("target"));
        output(&mut cmd)
    };
    let results = clone.join("results");
    let (out, _, stderr) = in_clone(&["compare", "variants/baseline", "variants/baseline"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refuses to measure") && stderr.contains("prompts/protocol.toml"),
        "{stderr}"
    );
    assert!(
        records(&results).is_empty(),
        "refused before measuring: no row"
    );
    let (out, _, stderr) = in_clone(&["keep", "-m", "faster"]);
    assert!(!out.status.success());
    assert!(
        stderr.contains("host keep refuses") && stderr.contains("prompts/protocol.toml"),
        "{stderr}"
    );
    // A run measures, but says so before and after, and its row can match no other.
    let drift = clone.join("host/tests/fixtures/variants/drift");
    let (out, _, stderr) = in_clone(&[
        "run",
        drift.to_str().unwrap(),
        "--no-build",
        "--model",
        tiny_model().to_str().unwrap(),
        "--prompt",
        "code",
        "--max-new-tokens",
        "4",
        "--rounds",
        "1",
    ]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("HARNESS MODIFIED").count(), 2, "{stderr}");
    assert!(stderr.contains("prompts/protocol.toml"), "{stderr}");
    let row = &records(&results)[0];
    assert!(row["harness"].starts_with("modified-"), "{row:?}");
    std::fs::remove_dir_all(&clone).unwrap();
}

/// The CPU time and wall time of every timed request of the newest run in `results`, in ms.
fn cpu_and_wall(results: &Path) -> Vec<(f64, f64)> {
    let row = records(results).pop().unwrap();
    let json = results.join("runs").join(&row["json"]);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    record["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["cpu_ms"].as_f64().unwrap(),
                s["timing"]["total_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The CPU lists the `widen` attack's helper threads report they may run on.
fn widen_cpus(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.split("attack widen-cpus: ").nth(1))
        .map(|list| list.trim().to_string())
        .collect()
}

/// `--threads 1` is a budget of one CPU, not a request: the `widen` attack asks for every CPU
/// back and burns CPU on two extra threads while it generates (`sleep` paces it at 20 ms a
/// token), yet its threads may run on one CPU only and its requests use no more CPU time than
/// wall time. Without the budget the same attack's threads may run on every CPU.
#[test]
fn a_variant_held_to_one_thread_computes_on_one_cpu() {
    let results = scratch("attack-widen");
    let (out, _, stderr) = attack("sleep,widen", &results, &["--threads", "1"]);
    assert!(out.status.success(), "{stderr}");
    all_denied(&stderr, "widen", 1);
    let lists = widen_cpus(&stderr);
    assert!(!lists.is_empty(), "the helpers reported no CPUs: {stderr}");
    for list in &lists {
        assert!(
            list.parse::<usize>().is_ok(),
            "a helper thread may run on CPUs {list}, not one CPU"
        );
    }
    assert_eq!(records(&results).last().unwrap()["device"], "cpu, 1 thread");
    // Two helpers burning through every 20 ms sleep would show about twice the wall time.
    for (cpu, wall) in cpu_and_wall(&results) {
        assert!(
            cpu <= wall * 1.05 + 10.0,
            "held to one CPU, a request used {cpu:.0} ms of CPU in {wall:.0} ms"
        );
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        let free = scratch("attack-widen-free");
        let (out, _, stderr) = attack("sleep,widen", &free, &[]);
        assert!(out.status.success(), "{stderr}");
        assert!(reports(&stderr, "widen")[0].contains("DONE"), "{stderr}");
        let lists = widen_cpus(&stderr);
        assert!(
            !lists.is_empty() && lists.iter().all(|l| l.parse::<usize>().is_err()),
            "unbudgeted, the helpers may run on every CPU: {lists:?}"
        );
        std::fs::remove_dir_all(&free).unwrap();
    }
    std::fs::remove_dir_all(&results).unwrap();
}

/// A budget larger than the machine is refused up front, naming the flag.
#[test]
fn a_thread_budget_beyond_the_machine_is_named() {
    let results = scratch("threads-too-many");
    let (out, _, stderr) = attack("", &results, &["--threads", "100000"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--threads 100000"), "{stderr}");
    assert!(records(&results).is_empty(), "no row for a refused run");
}
