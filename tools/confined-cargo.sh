#!/usr/bin/env bash
# Runs cargo on variant code the way the host builds a variant: confined by `host confine`
# (Landlock, seccomp, no capabilities), reading only the system, the toolchain, the checkout and
# the current directory, writing only TARGET_DIR, offline (`--frozen`). A build script or proc
# macro of the variant then cannot touch the host binary, the staged files, the oracle, another
# side's build or anything else outside TARGET_DIR. tools/gpu-stage.sh and tools/gpu-probe.sh
# build every variant library and test binary through it.
#
#   tools/confined-cargo.sh TARGET_DIR CARGO_ARGS...    (in the crate's workspace)
#
# TARGET_DIR must be a directory no trusted build uses: whatever the confined build leaves
# there, the next build there reuses. Needs: target/release/host (built first, unconfined, as
# harness code) and a kernel with Landlock (ABI 3 or later).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOST="${AUTOINFER_HOST:-$ROOT/target/release/host}"  # tests name the binary they built
[ $# -ge 2 ] || { echo "confined-cargo.sh: usage: tools/confined-cargo.sh TARGET_DIR CARGO_ARGS..." >&2; exit 2; }
target="$(realpath -m "$1")"
shift
case "$target/" in
  "$ROOT/target/"|"$ROOT/target/release/"*|"$ROOT/target/debug/"*|"$ROOT/target/autoinfer-git/"*|"$ROOT/target/gpu-stage-oracle/"*)
    echo "confined-cargo.sh: $target holds the harness's own builds; give variant code a target directory of its own" >&2
    exit 2 ;;
esac
[ -x "$HOST" ] || { echo "confined-cargo.sh: no host at $HOST: build it first (cargo build --release -p host)" >&2; exit 1; }
mkdir -p "$target/tmp"
# Resolving and downloading runs no code of the crate; the confined build that follows is offline.
cargo fetch --quiet
# --variant-build refuses to run where the kernel cannot confine the build's files. The build
# runs in a session of its own (the sandbox keeps it from starting another), which is killed
# when cargo is done, so nothing a build script leaves running outlives it.
CARGO_TARGET_DIR="$target" TMPDIR="$target/tmp" setsid "$HOST" confine --variant-build \
  --read "$ROOT" --read "$PWD" --write "$target" -- cargo "$@" --frozen &
build=$!
status=0
wait "$build" || status=$?
kill -KILL -- -"$build" 2> /dev/null || true
exit "$status"
