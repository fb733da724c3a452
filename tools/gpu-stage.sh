#!/usr/bin/env bash
# Stages `host compare --device cuda --no-build` of the working tree's variants/current (B)
# against HEAD:variants/current (A) for a GPU machine that has no cargo, such as the lent H200.
# Each call there takes at most 64 MiB of the working tree, and the model alone is 94 MiB, so
# the files go in two folders, one per call, which the checkout ignores:
#
#   tools/gpu-stage.sh "what the change is" [HOST-COMPARE-OPTION...]
#     (options go to `host compare` on the device as they are, e.g. `--max-seconds 60` to stop
#     measuring early when little device time is left)
#     gpu-stage/1/  the host, A's and B's libraries (built/), the quality oracle
#                   (variants/baseline at HEAD, for the CPU), a bundle of HEAD and of B (the
#                   working tree's variants/current as a commit object, refs/gpu-stage/b),
#                   the GPU test binaries of A and B with the screen that times them (probe/,
#                   written by tools/gpu-probe.sh), and the model's first part. A and B are
#                   built by `host stage`, as `host compare` builds its two sides: fresh,
#                   confined, from one source path into one target path, in a random order
#                   (about 2 min: each compiles its GPU crates)
#     gpu-stage/2/  the model's second part and go.sh, which does the rest there
#
# Then, on the GPU machine, three kinds of call, each within 30 s of the last (a machine left
# idle longer is given back, and what was staged there with it):
#   1. carry gpu-stage/1, run B's GPU tests and the screen (or `true`):
#      `bash gpu-stage/1/probe/run.sh b --ignored --skip bench_ --skip probe_;
#      bash gpu-stage/1/probe/ab.sh` (run.sh runs a test binary confined: tools/gpu-run-confined.sh)
#      and make the next call at once: a slower screen is a reason to stop here, not to think
#   2. carry gpu-stage/2, run `bash gpu-stage/2/go.sh`: joins the model, puts every file where
#      the host looks for it, moves the machine's HEAD to this one's (its .git is the checkout as
#      the session started), prints `git status --short` (only B's files may differ), starts
#      the comparison of HEAD:variants/current against B's commit under setsid (so it
#      outlives the call) and follows it for up to 540 s (FOLLOW=S seconds instead, for a call
#      whose limit is shorter: little device time left), copying what it prints to
#      $OUT/compare.log every 5 s, so a call cut off at its limit still returns it. With SHAPE
#      set (`SHAPE=llama-3.2-1b bash gpu-stage/2/go.sh`) it compares on a synthetic model of
#      that shape instead, written there first without --seed: gated against the oracle at
#      that shape, so its KEEP counts (program.md; about 2 s for the 1B's 777 MB)
#      (`bash gpu-stage/2/go.sh setup` does the same without starting the comparison, for a
#      command of your own first, say a diagnostic comparison of a few pairs; then call
#      `bash gpu-stage/2/go.sh` within 30 s)
#   3. carry nothing, run `bash gpu-stage/2/go.sh wait`: follows it for 540 s (FOLLOW) more; again
#      until it ends. The last call leaves results/ (row and record) in $OUT/results.tgz: unpack
#      it here, append the row to results/results.tsv, copy the record into results/runs/, and
#      `host keep` on KEEP (`--allow-unsandboxed` if the row's sandbox is not `full`).
#   4. optionally, carry nothing, run `bash gpu-stage/2/go.sh bench`: `host bench` of A, then
#      of B, on the model and the synthetic 1B and 8B shapes (SHAPES, BENCH: see go.sh)
#   5. optionally, the peer table beside llama.cpp: `go.sh peer` after tools/gpu-peer.sh (see
#      there)
# Needs: cargo, git, strip, a kernel with Landlock, the model in the cache (any `host run`
# fetches it).
set -euo pipefail

case "${1:-}" in
  ""|-h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0 ;;
esac
DESCRIPTION="$1"
shift
EXTRA=""  # the options for host compare, each quoted for the shell that runs go.sh
for option in "$@"; do EXTRA+=" $(printf '%q' "$option")"; done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STAGE=gpu-stage
MODEL="${AUTOINFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoinfer}/SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT=$((64 * 1024 * 1024 - 512 * 1024))  # a call's tree, less some room
for tool in cargo git strip; do
  command -v "$tool" > /dev/null || { echo "gpu-stage.sh: $tool is needed and not on PATH" >&2; exit 1; }
done
[ -f "$MODEL" ] || { echo "gpu-stage.sh: no model at $MODEL: run \`host run variants/current\` once to fetch it" >&2; exit 1; }
mkdir -p "$STAGE" && git check-ignore -q "$STAGE/" || { echo "gpu-stage.sh: $STAGE/ is not ignored by .gitignore" >&2; exit 1; }
if git diff --quiet HEAD -- variants/current && [ -z "$(git ls-files --others --exclude-standard variants/current)" ]; then
  echo "gpu-stage.sh: variants/current has no changes against HEAD: nothing to compare" >&2; exit 2
fi
other="$(git status --porcelain --untracked-files=all | grep -v ' variants/current/' || true)"
if [ -n "$other" ]; then
  echo "gpu-stage.sh: files besides variants/current differ from HEAD; the comparison would run on them too:" >&2
  echo "$other" >&2; exit 2
fi

# The oracle's library as the host names it: by its build key (revision.rs: the object ids of
# the workspace manifest, the lock file, plugin-api and the variant at that commit).
key() {
  for p in Cargo.toml Cargo.lock plugin-api "$1"; do echo "$p:$(git rev-parse "HEAD:$p")"; done |
    sha256sum | cut -c1-16
}
ORACLE="baseline-$(key variants/baseline).so"
HEAD_SHA="$(git rev-parse HEAD)"

rm -rf "$STAGE"
mkdir -p "$STAGE/1" "$STAGE/2"
started=$SECONDS

# The harness's own code first, unconfined, where no variant build may write: the host (in
# target/), and the oracle (HEAD:variants/baseline, in a worktree of HEAD, into a target
# directory of its own, unless the host has built it already).
worktree="$(mktemp -d)"
trap 'git worktree remove --force "$worktree" 2> /dev/null || rm -rf "$worktree"' EXIT
git worktree add -q --detach "$worktree" HEAD
echo "gpu-stage.sh: building the host and the oracle (HEAD:variants/baseline)"
cargo build --release --quiet -p host
if [ -f "target/autoinfer-git/built/$ORACLE" ]; then  # the host's own build of it
  strip --strip-debug -o "$STAGE/1/$ORACLE" "target/autoinfer-git/built/$ORACLE"
else
  (cd "$worktree" && CARGO_TARGET_DIR="$ROOT/target/gpu-stage-oracle" cargo build --release --quiet -p baseline)
  strip --strip-debug -o "$STAGE/1/$ORACLE" "$ROOT/target/gpu-stage-oracle/release/libbaseline.so"
fi
# Then variant code. B, the working tree's variants/current, becomes a commit object (HEAD's
# tree with that directory replaced, kept by refs/gpu-stage/b for the bundle), so that on the GPU
# machine both sides are revisions. `host stage` builds both as `host compare` builds its sides:
# fresh, confined (a build script can write only its own build's output), from one source path
# into one target path, in an order drawn at random, so that neither build can tell which side
# it is (README, "What remains out of reach").
index="$(mktemp -u)"
GIT_INDEX_FILE="$index" git read-tree HEAD
GIT_INDEX_FILE="$index" git add -A variants/current
B_COMMIT="$(git commit-tree "$(GIT_INDEX_FILE="$index" git write-tree)" -p HEAD \
  -m "gpu-stage.sh: the working tree's variants/current")"
rm -f "$index"
git update-ref refs/gpu-stage/b "$B_COMMIT"
echo "gpu-stage.sh: building A (HEAD:variants/current) and B (${B_COMMIT:0:12}:variants/current, the working tree's) for cuda, confined, and both sides' GPU tests"
target/release/host stage HEAD:variants/current "$B_COMMIT:variants/current" --device cuda \
  --out "$STAGE/1/built" 2>&1 | tee "$STAGE/stage.log"
# Which library is which side, for `go.sh bench` (host stage prints "staged REV as PATH" on
# stderr).
side_lib() { sed -n "s|^staged $1:variants/current as .*/||p" "$STAGE/stage.log"; }
A_LIB="$(side_lib HEAD)"
B_LIB="$(side_lib "$B_COMMIT")"
[ -n "$A_LIB" ] && [ -n "$B_LIB" ] || { echo "gpu-stage.sh: host stage named no library for A or B" >&2; exit 1; }
for lib in "$STAGE/1/built/"*.so; do strip --strip-debug "$lib"; done
# The host goes compressed: since its rarely-run dependencies are built without optimisation
# (Cargo.toml) it is 24 MB stripped, 7 MB gzipped, and the model's first part needs the room.
# gpu-probe.sh packs it for its run.sh; one copy serves both (run.sh also looks in ../).
tools/gpu-probe.sh "$STAGE/1/probe" > /dev/null
mv "$STAGE/1/probe/host.gz" "$STAGE/1/host.gz"
git bundle create -q "$STAGE/1/head.bundle" HEAD refs/gpu-stage/b

# The model split so that each call's tree stays under the limit.
tree=$(git ls-files -z | xargs -0 cat | wc -c)
staged=$(find "$STAGE/1" -type f -exec cat {} + | wc -c)
first=$((LIMIT - tree - staged))
size=$(stat -c %s "$MODEL")
[ "$first" -gt 0 ] && [ $((size - first + tree + 65536)) -le "$LIMIT" ] || {
  echo "gpu-stage.sh: the binaries ($staged bytes) leave too little room to split the model ($size bytes) over two calls" >&2; exit 1; }
head -c "$first" "$MODEL" > "$STAGE/1/model.part1"
tail -c +"$((first + 1))" "$MODEL" > "$STAGE/2/model.part2"
MODEL_SHA="$(sha256sum < "$MODEL" | cut -d' ' -f1)"
# What the second call checks before it uses the first call's files: the first call may have run
# B's test binaries (variant code, confined there by run.sh, but a second line costs nothing) on
# the same machine.
STAGED_SUMS="$(cd "$STAGE/1" && sha256sum host.gz built/*.so "$ORACLE" head.bundle)"

cat > "$STAGE/2/go.sh" <<EOF
#!/usr/bin/env bash
# Written by tools/gpu-stage.sh: see there. \`go.sh\` sets up and starts (on a synthetic model
# of shape \$SHAPE when set); \`go.sh setup\` only
# sets up; \`go.sh wait\` follows; \`go.sh bench\` (after the comparison) sets up and runs
# \`host bench\` of A and then of B on the default model and the synthetic shapes in \$SHAPES
# (default llama-3.2-1b llama-3.1-8b, written there by \`host synth\`), with the options in
# \$BENCH (default -p 512 -n 128 -r 3); \`go.sh peer\` (after tools/gpu-peer.sh's build.sh)
# sets up, waits up to \$WAIT s (480) for llama-bench's build and runs bench/peer.sh with
# \$SIDE's library (B) on the same models. A is $A_LIB, B $B_LIB.
set -uo pipefail
S=$STAGE
# Seconds each call follows the comparison (checked before anything starts).
follow=\${FOLLOW:-540}
case "\$follow" in ''|*[!0-9]*) echo "FOLLOW is a number of seconds, not '\$follow'"; exit 2 ;; esac
# Seconds \`go.sh peer\` waits for llama-bench's build.
wait_build=\${WAIT:-480}
case "\$wait_build" in ''|*[!0-9]*) echo "WAIT is a number of seconds, not '\$wait_build'"; exit 2 ;; esac
case "\${1:-}" in
  ""|setup|wait|bench|peer) ;;
  *) echo "go.sh: no command '\$1' (setup, wait, bench, peer, or none to start the comparison)"; exit 2 ;;
esac
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:\${LD_LIBRARY_PATH:-} CARGO_TARGET_DIR=target
if { [ "\${1:-}" = bench ] || [ "\${1:-}" = peer ]; } && [ -f \$S/compare.pid ] && kill -0 "\$(cat \$S/compare.pid)" 2> /dev/null; then
  echo "the comparison is still running: \\\`go.sh wait\\\` until it ends, then \$1"; exit 1
fi
# llama-bench's build (tools/gpu-peer.sh) takes every core: a comparison beside it would share
# them with the build for as long as it runs.
if [ -z "\${1:-}" ] && [ -f \$S/peer/build.pid ] && kill -0 "\$(cat \$S/peer/build.pid)" 2> /dev/null; then
  echo "llama-bench is still building on this machine's cores: compare after it ends (\\\`go.sh peer\\\` waits for it)"; exit 1
fi
if [ "\${1:-}" != wait ]; then
  set -e
  M=\$HOME/.cache/autoinfer/$(basename "$MODEL")
  mkdir -p "\$(dirname "\$M")" target/release target/autoinfer-git/built
  (cd \$S/1 && sha256sum --quiet -c -) <<'SUMS' || { echo "gpu-stage/1 is not what was staged: not comparing"; exit 1; }
$STAGED_SUMS
SUMS
  cat \$S/1/model.part1 \$S/2/model.part2 > "\$M"
  [ "\$(sha256sum < "\$M" | cut -d' ' -f1)" = $MODEL_SHA ] || { echo "the joined model is not the staged one"; exit 1; }
  gunzip -c \$S/1/host.gz > target/release/host && chmod +x target/release/host
  cp \$S/1/built/*.so \$S/1/$ORACLE target/autoinfer-git/built/
  git fetch -q \$S/1/head.bundle +HEAD:refs/gpu-stage/head +refs/gpu-stage/b:refs/gpu-stage/b
  if [ "\$(git rev-parse HEAD)" != $HEAD_SHA ]; then
    git reset -q --soft $HEAD_SHA && git reset -q
  fi
  echo "HEAD \$(git rev-parse --short HEAD); what differs from it (only variants/current may):"
  git status --short
  if [ "\${1:-}" = setup ]; then exit 0; fi
  H=./target/release/host
  # The models a bench or peer run measures: the default one (""), then the synthetic shapes in
  # \$SHAPES, written now or there from an earlier call (then synth refuses to overwrite them).
  synth_models() {
    models=("")
    for shape in \${SHAPES:-llama-3.2-1b llama-3.1-8b}; do
      m="\$(\$H synth --shape "\$shape" 2> \$S/synth.err | tail -1)"
      [ -f "\$m" ] || m="\$HOME/.cache/autoinfer/synth/\$shape-q4_1.gguf"
      if [ -f "\$m" ]; then models+=("\$m")
      else echo "no synthetic \$shape, skipped: \$(tail -1 \$S/synth.err)"; fi
    done
  }
  if [ "\${1:-}" = bench ]; then
    set +e
    synth_models
    for side in "A $A_LIB" "B $B_LIB"; do
      set -- \$side
      echo "\$1: \$2"
      cp "target/autoinfer-git/built/\$2" target/release/libcurrent.so
      for model in "\${models[@]}"; do
        \$H bench variants/current --device cuda --no-build \${BENCH:--p 512 -n 128 -r 3} \${model:+--model=\$model} 2>&1 |
          grep -E '^\\| |gated|rror'
      done
    done
    exit 0
  fi
  if [ "\${1:-}" = peer ]; then
    set +e
    [ -f \$S/peer/build.pid ] || { echo "no llama.cpp build started here: carry \$S/peer and run \\\`bash \$S/peer/build.sh\\\` first (tools/gpu-peer.sh)"; exit 1; }
    case "\${SIDE:-B}" in
      A) lib=$A_LIB ;;
      B) lib=$B_LIB ;;
      *) echo "SIDE is A or B, not '\$SIDE'"; exit 2 ;;
    esac
    echo "\${SIDE:-B}: \$lib"
    cp "target/autoinfer-git/built/\$lib" target/release/libcurrent.so
    synth_models
    waited=0
    while kill -0 "\$(cat \$S/peer/build.pid)" 2> /dev/null && [ \$waited -lt \$wait_build ]; do
      sleep 5; waited=\$((waited + 5))
    done
    if kill -0 "\$(cat \$S/peer/build.pid)" 2> /dev/null; then
      echo "llama-bench is still building after \$waited s more: call \\\`bash \$S/2/go.sh peer\\\` again within 30 s"; exit 1
    fi
    grep -q "llama-bench built" \$S/peer/build.log || { echo "llama-bench's build failed:"; tail -20 \$S/peer/build.log; exit 1; }
    {
      grep "llama-bench built" \$S/peer/build.log
      # The card's read bandwidth, the 70% target's reference: a sum over 4 GiB of float32.
      if ! python3 - 2> \$S/peer/torch.err <<'PY'
import torch
x = torch.ones(1 << 30, dtype=torch.float32, device="cuda")
for _ in range(3):
    x.sum()
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ms = []
for _ in range(20):
    a.record(); x.sum(); b.record(); torch.cuda.synchronize(); ms.append(a.elapsed_time(b))
ms.sort()
gb = x.numel() * 4 / 1e9
print(f"read bandwidth (torch sum of 4 GiB of float32, 20 runs): median {gb / (ms[10] / 1e3):.0f} GB/s, best {gb / (ms[0] / 1e3):.0f}")
PY
      then echo "read bandwidth not measured: \$(tail -1 \$S/peer/torch.err)"; fi
      failed=0
      for model in "\${models[@]}"; do
        bash bench/peer.sh --device cuda --no-build \${BENCH:--p 512 -n 128 -r 3} \${model:+--model \$model} variants/current 2>&1 |
          grep -v '^ggml_cuda_init\|^  Device [0-9]\|repetition\|warm-up' || failed=1
      done
      exit \$failed
    } | tee "\${OUT:-/tmp}/peer.log"
    exit
  fi
  on=()
  if [ -n "\${SHAPE:-}" ]; then
    # A file of its own for this comparison, with a secret key (so gated).
    ./target/release/host synth --shape "\$SHAPE" --out "\$S/compare-\$SHAPE.gguf" --force > /dev/null ||
      { echo "no synthetic \$SHAPE: not comparing"; exit 1; }
    on=("--model=\$S/compare-\$SHAPE.gguf")
  fi
  set +e
  setsid nohup ./target/release/host compare HEAD:variants/current $B_COMMIT:variants/current \\
    --device cuda --no-build "\${on[@]}"$EXTRA \\
    --description "$(printf '%s' "$DESCRIPTION" | sed 's/["$`\\]/\\&/g')" > \$S/compare.log 2>&1 < /dev/null &
  echo \$! > \$S/compare.pid
fi
pid=\$(cat \$S/compare.pid)
# Follows the comparison for \$follow seconds, writing what it has printed so far to
# \$OUT/compare.log every 5 s and at the end: a call cut off at its limit still brings that back.
tail_log() {
  grep -v '^[AB] prompt\|^oracle: [0-9]' \$S/compare.log | tail -40 > \$S/compare.tail
  if [ -n "\${OUT:-}" ]; then cp \$S/compare.tail "\$OUT/compare.log"; fi
}
for _ in \$(seq \$(((follow + 4) / 5))); do
  kill -0 "\$pid" 2> /dev/null || break
  sleep 5
  tail_log
done
tail_log
cat \$S/compare.tail
if kill -0 "\$pid" 2> /dev/null; then echo "STILL RUNNING: call \\\`bash \$S/2/go.sh wait\\\` within 30 s"; fi
tar czf "\${OUT:-/tmp}/results.tgz" results 2> /dev/null || true
EOF
chmod +x "$STAGE/2/go.sh"
echo "gpu-stage.sh: staged in $((SECONDS - started)) s:"
du -sh "$STAGE/1" "$STAGE/2"
