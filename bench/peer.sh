#!/usr/bin/env bash
# The peer, side by side: llama.cpp's llama-bench and `host bench` on the same GGUF, the same
# thread counts and the same workloads, in one table.
#
#   bench/peer.sh                                  # variants/baseline, -p 128,512 -n 128 -r 5, all cores
#   bench/peer.sh -t 1,2 variants/current          # one row per test and thread count
#   bench/peer.sh -p 512 -n 128 -r 3 --model my.gguf
#   bench/peer.sh -t 1,2 -r 3 --rounds 5 variants/current   # 5 rounds, the median ratio
#   bench/peer.sh --device cuda --no-build        # on an NVIDIA GPU (llama.cpp built with CUDA)
#   bench/peer.sh --device cuda --build-only      # build llama-bench and stop
#   bench/peer.sh --source-only                   # fetch and unpack llama.cpp, print where
#
# llama.cpp comes from the package registry: the source distribution of the PyPI package
# llama-cpp-python (pinned in this script; it vendors llama.cpp), fetched with pip. Only llama-bench is
# built, with CMake, once, in $AUTOINFER_CACHE/peer (default ~/.cache/autoinfer/peer); later runs
# reuse it. With --rounds N both engines run N times, taking turns at going first (llama.cpp in
# odd rounds), and the table gives the median of the rounds' ratios with its range: on a shared
# machine the rate moves by tens of percent from one minute to the next, so a single run's ratio
# says as much about the moment as about the engines. On a CPU that advertises AMX the build disables it (-mno-amx-*): virtual machines
# may advertise AMX without being able to run it, and a native build then dies with an illegal
# instruction. With --device cuda, llama-bench is built with its CUDA backend (nvcc on PATH or in
# /usr/local/cuda; CUDA_ARCHITECTURES, default native) into its own build folder, runs every
# layer on the GPU (-ngl 99), and `host bench --device cuda` runs the variant there (build it
# with its `cuda` feature; --no-build uses the library already in target/release). Offline,
# unpack the llama.cpp source into $AUTOINFER_CACHE/peer/llama.cpp-VERSION first and nothing is
# fetched. Needs: pip, cmake, a C++ compiler, python3, and cargo (the host is built if
# target/release/host is missing).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PROMPTS=128,512
GENS=128
REPS=5
ROUNDS=1
THREADS="$(nproc)"
MODEL=""
VARIANT=variants/baseline
DEVICE=cpu
NO_BUILD=""
BUILD_ONLY=""
SOURCE_ONLY=""

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -p) PROMPTS="$2"; shift 2 ;;
    -n) GENS="$2"; shift 2 ;;
    -r) REPS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -t) THREADS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --no-build) NO_BUILD=1; shift ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --source-only) SOURCE_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "peer.sh: unknown option $1" >&2; usage 2 ;;
    *) VARIANT="$1"; shift ;;
  esac
done
for list in "$PROMPTS" "$GENS" "$THREADS"; do
  [[ "$list" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "peer.sh: '$list' is not a comma-separated list of numbers" >&2; exit 2; }
done
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || { echo "peer.sh: -r wants a positive number, not '$REPS'" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "peer.sh: --rounds wants a positive number, not '$ROUNDS'" >&2; exit 2; }
[[ "$DEVICE" =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || { echo "peer.sh: --device wants cpu, cuda or cuda:N, not '$DEVICE'" >&2; exit 2; }
command -v python3 > /dev/null || { echo "peer.sh: python3 is needed and not on PATH" >&2; exit 1; }
[ -n "$SOURCE_ONLY" ] || command -v cmake > /dev/null || {
  echo "peer.sh: cmake is needed and not on PATH (PyPI has it: python3 -m pip install cmake)" >&2
  exit 1
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${AUTOINFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoinfer}/peer"
SRC="$CACHE/llama.cpp-$VERSION"
BUILD="$CACHE/build-$VERSION"
NGL=()
CUDA_FLAGS=()
if [ "$DEVICE" != cpu ]; then
  BUILD="$CACHE/build-$VERSION-cuda"
  NGL=(-ngl 99)
  [ "$DEVICE" = cuda ] || NGL+=(-mg "${DEVICE#cuda:}")
  CUDA_FLAGS=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-native}")
  command -v nvcc > /dev/null || export PATH="$PATH:/usr/local/cuda/bin"
  command -v nvcc > /dev/null || { echo "peer.sh: --device $DEVICE needs nvcc (not on PATH nor in /usr/local/cuda/bin)" >&2; exit 1; }
fi
BENCH="$BUILD/bin/llama-bench"
started=$SECONDS

# llama.cpp's source in $SRC: there already, or unpacked from llama-cpp-python's source
# distribution, fetched from PyPI once.
fetch_source() {
  [ ! -f "$SRC/CMakeLists.txt" ] || return 0
  mkdir -p "$CACHE/download"
  local sdist="$CACHE/download/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    command -v pip > /dev/null || { echo "peer.sh: pip is needed to fetch llama.cpp and is not on PATH" >&2; exit 1; }
    echo "== fetching llama-cpp-python $VERSION's source distribution from PyPI" >&2
    pip download "llama-cpp-python==$VERSION" --no-deps --no-binary llama-cpp-python \
      -d "$CACHE/download" >&2
  fi
  echo "== unpacking its vendored llama.cpp into $SRC" >&2
  rm -rf "$SRC.partial" && mkdir -p "$SRC.partial"
  tar xzf "$sdist" -C "$SRC.partial" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
  rm -rf "$SRC" && mv "$SRC.partial" "$SRC"
}
if [ -n "$SOURCE_ONLY" ]; then
  fetch_source
  echo "$SRC"
  exit 0
fi

if [ ! -x "$BENCH" ]; then
  fetch_source
  flags=""
  if grep -q amx /proc/cpuinfo 2> /dev/null; then
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    echo "== the CPU advertises AMX: building without it ($flags)" >&2
  fi
  echo "== building llama-bench ($DEVICE, native, Release) in $BUILD" >&2
  cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "${CUDA_FLAGS[@]}" \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" > "$CACHE/cmake-configure.log" 2>&1 \
    || { tail -20 "$CACHE/cmake-configure.log" >&2; exit 1; }
  cmake --build "$BUILD" --target llama-bench -j "$(nproc)" > "$CACHE/cmake-build.log" 2>&1 \
    || { tail -30 "$CACHE/cmake-build.log" >&2; exit 1; }
  echo "== llama-bench built in $((SECONDS - started)) s" >&2
else
  echo "== reusing $BENCH" >&2
fi

[ -z "$BUILD_ONLY" ] || exit 0

HOST="$ROOT/target/release/host"
if [ ! -x "$HOST" ]; then
  echo "== building the host" >&2
  (cd "$ROOT" && cargo build --release -p host >&2)
fi
[ -n "$MODEL" ] || MODEL="$(cd "$ROOT" && "$HOST" model)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# One round's llama-bench and host bench runs into folder $1.
run_peer() {
  echo "== llama-bench -p $PROMPTS -n $GENS -r $REPS -t $THREADS ${NGL[*]}" >&2
  "$BENCH" -m "$MODEL" -p "$PROMPTS" -n "$GENS" -r "$REPS" -t "$THREADS" "${NGL[@]}" -o json > "$1/peer.json"
}
run_ours() {
  local t
  for t in ${THREADS//,/ }; do
    echo "== host bench $VARIANT -p $PROMPTS -n $GENS -r $REPS -t $t --device $DEVICE" >&2
    (cd "$ROOT" && "$HOST" bench "$VARIANT" -p "$PROMPTS" -n "$GENS" -r "$REPS" -t "$t" \
      --device "$DEVICE" ${NO_BUILD:+--no-build} --model "$MODEL" --json) > "$1/ours-$t.json"
  done
}
for round in $(seq 1 "$ROUNDS"); do
  mkdir -p "$WORK/round-$round"
  [ "$ROUNDS" -eq 1 ] || echo "== round $round of $ROUNDS" >&2
  if [ $((round % 2)) -eq 1 ]; then
    run_peer "$WORK/round-$round"
    run_ours "$WORK/round-$round"
  else
    run_ours "$WORK/round-$round"
    run_peer "$WORK/round-$round"
  fi
done

python3 "$ROOT/bench/peer_table.py" "$WORK" "$VARIANT" "$VERSION" "$((SECONDS - started))"
