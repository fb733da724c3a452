#!/usr/bin/env bash
# A quick A/B screen of a change to variants/current's CUDA path, before `host compare`: the
# GPU test binaries of HEAD (A) and of the working tree (B), and a script that times decode
# with each, alternating, on random models of SmolLM2's, the synthetic 1B's and the 8B's shapes
# (the test `probe_decode_steps`: 64 steps to warm up, 256 timed, from position 32 or PROMPT).
#
#   tools/gpu-probe.sh [DIR] [--patch FILE]...
#     writes DIR (default gpu-probe/; a test binary each, about 3.6 MB, ab.sh, run.sh and the
#     host, gzipped, that run.sh confines each binary with: 7 MB);
#     tools/gpu-stage.sh puts one in gpu-stage/1. Each --patch (a `git format-patch` file, say
#     one of candidates/) is applied to HEAD in a worktree (A's, reset between patches) and
#     built too, as a binary named by the patch file's first word
#     (candidates/g54-two-warps-a-row.patch: g54), so that one call screens several
#     candidates: a lease's start costs more device time than a screen. A patch may change
#     only variants/current, as a staged comparison may.
#
# Then on the GPU machine, in one call: carry gpu-probe, run `bash gpu-probe/ab.sh`
# (environment: SHAPES, default smollm2,1b,8b; ROUNDS, default 2; VARIANTS, the binaries in
# turn, default all of them, A first; PROMPT, the position decode
# starts from, default 32, 1680 for the protocol's long prompt; PROBE=prefill times a prefill
# of PROMPT tokens instead, `probe_prefill`, the variant's test: check that it prefills in the
# chunks a request uses). Three shapes and two rounds take about 70 s
# there for A and B; on the H200 the same binary's step time repeats within 0.3%. Add
# `bash gpu-probe/run.sh b --ignored --skip bench_ --skip probe_` to run B's GPU tests in the
# same call (and the same with each patch's binary). Every binary runs through run.sh
# (tools/gpu-run-confined.sh): confined as variant code, its leftovers killed when it exits.
#
# A screen is not a verdict: only `host compare` on the real model keeps a change. It says
# which ideas are worth a comparison, and what a change does at the shapes the comparison
# never sees (a compare on a synthetic model can never KEEP).
# Needs: cargo, git, strip, gzip, a kernel with Landlock (both sides build confined).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=""
PATCHES=()  # absolute paths
NAMES=()    # the binary each builds
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0 ;;
    --patch)
      [ $# -ge 2 ] || { echo "gpu-probe.sh: --patch needs a file (see --help)" >&2; exit 2; }
      [ -f "$2" ] || { echo "gpu-probe.sh: --patch $2: no such file" >&2; exit 2; }
      # As gpu-stage.sh stages nothing but variants/current, a screen builds nothing else: a
      # patch to plugin-api or the lock file would time code no comparison could run.
      # (From the checkout's root: in a subdirectory git skips the paths outside it.)
      outside="$(git -C "$ROOT" apply --numstat "$(realpath "$2")" 2> /dev/null | cut -f3 | grep -v '^variants/current/' || true)"
      [ -z "$outside" ] || { echo "gpu-probe.sh: --patch $2 changes files besides variants/current: $(echo $outside)" >&2; exit 2; }
      name="$(basename "$2")"; name="${name%%-*}"; name="${name%.patch}"
      case "$name" in
        ""|a|b|host|*[!A-Za-z0-9_]*)
          echo "gpu-probe.sh: --patch $2: its first word '$name' cannot name a binary (letters, digits and _ only; not a, b or host)" >&2; exit 2 ;;
      esac
      for other in "${NAMES[@]}"; do
        [ "$other" != "$name" ] || { echo "gpu-probe.sh: two patches would both build '$name'" >&2; exit 2; }
      done
      PATCHES+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); NAMES+=("$name"); shift 2 ;;
    -*) echo "gpu-probe.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *)
      [ -z "$OUT" ] || { echo "gpu-probe.sh: one directory at most, got '$OUT' and '$1' (see --help)" >&2; exit 2; }
      OUT="$1"; shift ;;
  esac
done
cd "$ROOT"
OUT="${OUT:-gpu-probe}"
OUT="${OUT%/}"
for tool in cargo git strip gzip; do
  command -v "$tool" > /dev/null || { echo "gpu-probe.sh: $tool is needed and not on PATH" >&2; exit 1; }
done
mkdir -p "$OUT" && git check-ignore -q "$OUT/" ||
  { echo "gpu-probe.sh: $OUT/ is not ignored by .gitignore (it is removed and written anew)" >&2; exit 1; }

# The test binary cargo builds in directory $1 into target directory $2, confined as the host
# builds variant code (tools/confined-cargo.sh; a compile error is printed, rendered, on stderr).
test_binary() {
  (cd "$1" && "$ROOT/tools/confined-cargo.sh" "$2" test --release --quiet -p current \
    --features cuda --no-run --message-format=json-render-diagnostics) |
    { grep -o '"executable":"[^"]*"' || true; } | tail -1 | cut -d'"' -f4
}

rm -rf "$OUT"
mkdir -p "$OUT"
cargo build --release --quiet -p host  # the harness's own code, which confines the builds below
# A in a worktree of HEAD, into the target directory gpu-stage.sh also builds A in.
worktree="$(mktemp -d)"
trap 'git worktree remove --force "$worktree" 2> /dev/null || rm -rf "$worktree"' EXIT
git worktree add -q --detach "$worktree" HEAD
for patch in "${PATCHES[@]}"; do  # before any build: a stale candidate stops the script early
  git -C "$worktree" apply --check "$patch" ||
    { echo "gpu-probe.sh: $patch does not apply to HEAD (candidates/README.md: rewrite it on the kept tree)" >&2; exit 1; }
done
echo "gpu-probe.sh: building A's GPU tests (HEAD) in target/gpu-stage-a"
a="$(test_binary "$worktree" "$ROOT/target/gpu-stage-a")" || a=""
[ -n "$a" ] && [ -f "$a" ] || { echo "gpu-probe.sh: cargo named no test binary for A" >&2; exit 1; }
strip --strip-debug -o "$OUT/a" "$a"
echo "gpu-probe.sh: building B's GPU tests (the working tree) in target/gpu-stage-b"
b="$(test_binary "$ROOT" "$ROOT/target/gpu-stage-b")" || b=""
[ -n "$b" ] && [ -f "$b" ] || { echo "gpu-probe.sh: cargo named no test binary for B" >&2; exit 1; }
strip --strip-debug -o "$OUT/b" "$b"
# Each patch on HEAD, in A's worktree reset between them, into B's target directory (only the
# variant's crates compile again).
for i in "${!PATCHES[@]}"; do
  name="${NAMES[$i]}"
  git -C "$worktree" reset -q --hard HEAD && git -C "$worktree" clean -q -fd
  git -C "$worktree" apply --index "${PATCHES[$i]}"
  echo "gpu-probe.sh: building $name's GPU tests (HEAD and ${PATCHES[$i]}) in target/gpu-stage-b"
  p="$(test_binary "$worktree" "$ROOT/target/gpu-stage-b")" || p=""
  [ -n "$p" ] && [ -f "$p" ] || { echo "gpu-probe.sh: cargo named no test binary for $name" >&2; exit 1; }
  strip --strip-debug -o "$OUT/$name" "$p"
  # A binary equal to an earlier one screens nothing: cargo kept a stale build (program.md).
  for other in a b "${NAMES[@]:0:$i}"; do
    ! cmp -s "$OUT/$name" "$OUT/$other" ||
      { echo "gpu-probe.sh: $name's binary is $other's, byte for byte: a stale build, or the same change twice" >&2; exit 1; }
  done
done

# Every binary runs confined on the GPU machine (run.sh, from tools/gpu-run-confined.sh), with
# the host that confines it beside it (gzipped: 7 MB).
cp tools/gpu-run-confined.sh "$OUT/run.sh"
strip --strip-debug -o "$OUT/host" target/release/host
gzip -f "$OUT/host"
{ echo "#!/usr/bin/env bash"; echo "all=\"a b ${NAMES[*]:-}\"  # the binaries tools/gpu-probe.sh built"; } > "$OUT/ab.sh"
cat >> "$OUT/ab.sh" <<'EOF'
# Written by tools/gpu-probe.sh: decode step (or, with PROBE=prefill, prefill) times of A
# (HEAD), B (the working tree) and each patch's binary (VARIANTS: which, in turn), each run
# confined by run.sh.
set -uo pipefail
dir="$(dirname "$0")"
for round in $(seq "${ROUNDS:-2}"); do
  for v in ${VARIANTS:-$all}; do
    AUTOINFER_PROBE_SHAPES="${SHAPES:-smollm2,1b,8b}" AUTOINFER_PROBE_PROMPT="${PROMPT:-32}" \
      bash "$dir/run.sh" "$v" --ignored --exact \
      "cuda::tests::probe_${PROBE:-decode_steps}" --nocapture 2>&1 |
      grep -E "us a step|us a prefill|panicked|run.sh|host confine" | sed "s/^/$v $round /"
  done
done
EOF
chmod +x "$OUT/ab.sh"
du -sh "$OUT"
