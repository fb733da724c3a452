#!/usr/bin/env bash
# Stages the peer table for the GPU machine, which reaches no network: llama.cpp's source for
# `bench/peer.sh --device cuda` to build there, beside what tools/gpu-stage.sh staged (the host,
# the variant's libraries, the model). Run it after gpu-stage.sh, which empties gpu-stage/:
#
#   tools/gpu-stage.sh "..."; tools/gpu-peer.sh
#     gpu-stage/peer/  llama.cpp as llama-cpp-python VERSION vendors it (bench/peer.sh's pin),
#                      without what llama-bench's build never reads (models/, docs/, tests, the
#                      server and its web UI: 76 MB down to about 6 MB, so one call carries it),
#                      and build.sh
#
# Then, on the GPU machine, three calls, each within 30 s of the last:
#   1. carry gpu-stage/peer, run `bash gpu-stage/peer/build.sh`: unpacks the source where
#      peer.sh looks for it and starts llama-bench's CUDA build in the background (about 270 s
#      on the H100 machine's 16 cores), then returns
#   2. carry gpu-stage/1, run `true`
#   3. carry gpu-stage/2, run `bash gpu-stage/2/go.sh peer`: sets up as for a comparison, waits
#      for the build, measures the card's read bandwidth (torch, if there), then runs
#      `bench/peer.sh --device cuda --no-build` with B's library (SIDE=A for A's) on the model
#      and the synthetic shapes in $SHAPES, about 45 s in all; $OUT/peer.log holds the tables.
#      Run it after a comparison, not before: it runs B's library (confined, in host bench's
#      workers) and writes synthetic models.
# Needs: what `bench/peer.sh --source-only` needs (pip: llama-cpp-python's source distribution
# comes from PyPI once, into the cache), tar with xz.
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0 ;;
  "") ;;
  *) echo "gpu-peer.sh: no arguments expected, got '$1' (see --help)" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STAGE=gpu-stage
[ -f "$STAGE/2/go.sh" ] || { echo "gpu-peer.sh: no $STAGE/2/go.sh: run tools/gpu-stage.sh first (it empties $STAGE/)" >&2; exit 1; }
# llama.cpp's source as peer.sh fetches and unpacks it here (its pin, or
# LLAMA_CPP_PYTHON_VERSION), named llama.cpp-VERSION.
src="$(bash bench/peer.sh --source-only)"
VERSION="${src##*/llama.cpp-}"

out="$STAGE/peer"
rm -rf "$out" && mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -a "$src" "$work/llama.cpp"
# What llama-bench's build (peer.sh: no tests, examples or server) does not read.
for unused in models docs media gguf-py conversion benches tests tools/ui tools/server .devops .github; do
  rm -rf "${work:?}/llama.cpp/$unused"
done
[ -f "$work/llama.cpp/tools/llama-bench/llama-bench.cpp" ] ||
  { echo "gpu-peer.sh: llama-cpp-python $VERSION vendors no tools/llama-bench: peer.sh's build would fail" >&2; exit 1; }
tar cJf "$out/llama.cpp.tar.xz" -C "$work" llama.cpp

cat > "$out/build.sh" <<EOF
#!/usr/bin/env bash
# Written by tools/gpu-peer.sh: see there. Unpacks llama.cpp (llama-cpp-python $VERSION's) where
# bench/peer.sh looks for it and starts its CUDA build of llama-bench in the background; the log
# is $out/build.log, and \`go.sh peer\` waits for it.
set -euo pipefail
if [ -f $STAGE/compare.pid ] && kill -0 "\$(cat $STAGE/compare.pid)" 2> /dev/null; then
  echo "a comparison is running here: building llama-bench now would take its cores; build after it ends" >&2
  exit 1
fi
P="\${AUTOINFER_CACHE:-\${XDG_CACHE_HOME:-\$HOME/.cache}/autoinfer}/peer"
mkdir -p "\$P" && rm -rf "\$P/llama.cpp-$VERSION" "\$P/llama.cpp-$VERSION.partial"
mkdir "\$P/llama.cpp-$VERSION.partial"
tar xJf $out/llama.cpp.tar.xz -C "\$P/llama.cpp-$VERSION.partial" --strip-components=1
mv "\$P/llama.cpp-$VERSION.partial" "\$P/llama.cpp-$VERSION"
LLAMA_CPP_PYTHON_VERSION=$VERSION setsid nohup bash bench/peer.sh --device cuda --build-only \\
  > $out/build.log 2>&1 < /dev/null &
echo \$! > $out/build.pid
sleep 2
cat $out/build.log
EOF
chmod +x "$out/build.sh"
echo "gpu-peer.sh: staged llama.cpp (llama-cpp-python $VERSION) in $out:"
du -sh "$out"
