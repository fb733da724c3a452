#!/usr/bin/env bash
# Builds variants/baseline (or another variant) with its `cuda` feature on a machine without a
# GPU and without the CUDA toolkit, for a machine that has both (the lent H100).
#
#   tools/cuda-build.sh                       # variants/baseline -> target/cuda/release/libbaseline.so
#   tools/cuda-build.sh variants/current      # any variant with a `cuda` feature
#   CUDA_COMPUTE_CAP=89 tools/cuda-build.sh   # another GPU generation (default 90, the H100)
#
# nvcc and the CUDA headers come from PyPI, pinned to CUDA 13.0 (the device's driver is CUDA
# 13.0; a newer nvcc emits PTX that driver refuses): nvidia-cuda-nvcc, -crt, -runtime, -cccl and
# nvidia-nvvm, unpacked once into $AUTOINFER_CACHE/cuda-13.0 (default ~/.cache/autoinfer).
# candle's CUDA backend links the driver, cuBLAS, cuBLASLt, cuRAND and NVRTC at build time. Their
# real libraries are large and the driver's is not on PyPI at all, so this script writes link
# stubs instead: shared objects with the real sonames that define every function cudarc (candle's
# CUDA binding) declares and do nothing. The library that results needs the real ones at run
# time, found through LD_LIBRARY_PATH (on the device: /usr/local/cuda/lib64 and the driver).
# On a machine with the CUDA toolkit installed none of this is needed:
#   cargo build --release --features cuda --manifest-path variants/baseline/Cargo.toml
# Needs: pip, python3, unzip, a C compiler, cargo.
set -euo pipefail

VARIANT="${1:-variants/baseline}"
case "$VARIANT" in -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
[ -f "$VARIANT/Cargo.toml" ] || { echo "cuda-build.sh: no variant crate at $VARIANT (no Cargo.toml)" >&2; exit 2; }
grep -q '^cuda *=' "$VARIANT/Cargo.toml" || {
  echo "cuda-build.sh: $VARIANT/Cargo.toml has no \`cuda\` feature to build" >&2; exit 2; }
for tool in pip python3 unzip cc cargo; do
  command -v "$tool" > /dev/null || { echo "cuda-build.sh: $tool is needed and not on PATH" >&2; exit 1; }
done

# Pinned together: nvcc 13.0.88 is CUDA 13.0 Update 2's compiler.
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
CACHE="${AUTOINFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autoinfer}/cuda-13.0"
TOOLKIT="$CACHE/toolkit/nvidia/cu13"
started=$SECONDS

if [ ! -x "$TOOLKIT/bin/nvcc" ] || [ ! -f "$TOOLKIT/include/thrust/scan.h" ]; then
  echo "== fetching nvcc and the CUDA 13.0 headers from PyPI" >&2
  mkdir -p "$CACHE/wheels"
  pip download --no-deps -d "$CACHE/wheels" "${WHEELS[@]}" >&2
  rm -rf "$CACHE/toolkit.partial"; mkdir -p "$CACHE/toolkit.partial"
  for wheel in "$CACHE"/wheels/*.whl; do unzip -qo "$wheel" -d "$CACHE/toolkit.partial"; done
  # The cccl wheel keeps thrust/cub/libcu++ under include/cccl; nvcc looks in include.
  if [ -d "$CACHE/toolkit.partial/nvidia/cu13/include/cccl" ]; then
    cp -r "$CACHE/toolkit.partial/nvidia/cu13/include/cccl/." "$CACHE/toolkit.partial/nvidia/cu13/include/"
  fi
  chmod +x "$CACHE"/toolkit.partial/nvidia/cu13/bin/* "$CACHE"/toolkit.partial/nvidia/cu13/nvvm/bin/*
  rm -rf "$CACHE/toolkit"; mv "$CACHE/toolkit.partial" "$CACHE/toolkit"
fi
export PATH="$TOOLKIT/bin:$PATH"
nvcc --version | grep -q "release 13.0" || { echo "cuda-build.sh: $TOOLKIT/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# Link stubs, regenerated whenever the cudarc in Cargo.lock changes.
CUDARC="$(cargo metadata --format-version 1 --manifest-path "$VARIANT/Cargo.toml" --features cuda 2>/dev/null |
  python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')" || {
  echo "cuda-build.sh: cargo metadata found no cudarc for $VARIANT --features cuda" >&2; exit 1; }
STUBS="$TOOLKIT/lib/stubs"
if [ ! -f "$STUBS/.from" ] || [ "$(cat "$STUBS/.from")" != "$CUDARC" ]; then
  echo "== writing link stubs from $CUDARC" >&2
  rm -rf "$STUBS"; mkdir -p "$STUBS"
  # module of cudarc : library : soname of CUDA 13.0's library
  for entry in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 \
               cublaslt:cublasLt:libcublasLt.so.13 curand:curand:libcurand.so.10 \
               nvrtc:nvrtc:libnvrtc.so.13; do
    IFS=: read -r module lib soname <<< "$entry"
    python3 - "$CUDARC/src/$module/sys/mod.rs" > "$STUBS/$lib.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r"^pub unsafe fn (\w+)\(", open(sys.argv[1]).read(), re.M)))
if not names:
    sys.exit(f"no functions found in {sys.argv[1]}")
print("/* Link stub: every function cudarc declares, doing nothing. Never run. */")
for name in names:
    print(f"void {name}(void) {{}}")
PY
    cc -shared -fPIC -o "$STUBS/lib$lib.so" -Wl,-soname,"$soname" "$STUBS/$lib.c"
  done
  ln -sf ../libcudart.so.13 "$STUBS/libcudart.so"
  echo "$CUDARC" > "$STUBS/.from"
fi

export CUDA_ROOT="$TOOLKIT" CUDA_PATH="$TOOLKIT" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
export LIBRARY_PATH="$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"
echo "== cargo build --release --features cuda ($VARIANT, sm_$CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR" >&2
cargo build --release --features cuda --manifest-path "$VARIANT/Cargo.toml"
lib="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$VARIANT/Cargo.toml" | head -1 | tr - _)"
echo "== built $CARGO_TARGET_DIR/release/lib$lib.so in $((SECONDS - started)) s" >&2
