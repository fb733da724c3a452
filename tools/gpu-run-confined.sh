#!/usr/bin/env bash
# Runs one of a GPU screen's test binaries confined, on the GPU machine. tools/gpu-probe.sh
# copies this script into its folder as run.sh, beside the binaries and the host (host.gz
# there, or in the folder above, as tools/gpu-stage.sh stages it):
#
#   bash gpu-probe/run.sh NAME [ARGUMENT...]     (NAME: a, b or a patch's binary)
#
# A screen's binaries are variant code (B's, a candidate's), and the machine also runs the
# comparison that decides whether B is kept: `host synth` holds a secret key in its memory while
# it writes a synthetic model, and the host and the staged libraries lie on its disk. So each
# binary runs under `host confine --variant-run`, as the host confines variant builds: Landlock
# lets it read the system and this folder only, write only a scratch folder of its own (TMPDIR)
# and its threads' /proc entries (the CUDA driver names its threads there), open only the
# NVIDIA device nodes besides /dev/null and the like, and trace or read the memory of no
# process outside its domain; seccomp denies ptrace, other processes' memory and scheduling,
# leaving its process group, and every socket but a unix one, whose connects answer ENOENT (a
# daemon's socket is no file Landlock guards), as for a worker. It starts in a session of its
# own, and that process group is killed when it exits or when run.sh is stopped by a signal
# (TERM, INT, HUP: a `timeout` around it), so nothing it started outlives it (into a comparison
# later in the lease). A SIGKILL of run.sh runs no trap: for that, `host confine` runs the
# binary as the first process of a PID namespace of its own (with its own /proc, as in a
# container), which the kernel kills whole when `host confine` (its supervisor) dies, and
# `host confine` dies with run.sh. `host confine` refuses to run it where the kernel has no
# Landlock ABI 3 or no PID namespace can be made;
# SCREEN_SHARED_PID_NAMESPACE=1 (the operator's choice, for such a machine) runs it in run.sh's
# namespace, held by the group alone.
#
# With PROFILER set to a profiler's command line (`PROFILER="/usr/local/cuda/bin/ncu --csv
# --page raw --metrics gpu__time_duration.sum --launch-skip 2000 --launch-count 400"`), the
# binary runs under it, the profiler inside the same confinement. ncu does not work so: it
# starts and warns (it cannot put its section files under $HOME), then profiles no kernel (on
# the H100 machine, 2026-12-06 and twice on 2026-12-07: 120-400 s, named kernels, nothing back),
# likely because the confinement refuses the socket its injected library reports through. The
# same binary run plainly under ncu profiled four named kernels in 31 s: do that only after the
# lease's last comparison, with a binary of code you wrote, then give the machine back
# (program.md).
set -uo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { echo "run.sh: which binary? (a, b or a patch's name)" >&2; exit 2; }
name="$1"; shift
case "$name" in
  ""|*/*|run.sh|ab.sh|host|host.gz|.host) echo "run.sh: '$name' is not a test binary of this folder" >&2; exit 2 ;;
esac
[ -x "$dir/$name" ] || { echo "run.sh: no test binary $dir/$name" >&2; exit 2; }
profiler=()
[ -z "${PROFILER:-}" ] || read -r -a profiler <<< "$PROFILER"
namespace=()
case "${SCREEN_SHARED_PID_NAMESPACE:-}" in
  "") ;;
  1) namespace=(--shared-pid-namespace) ;;
  *) echo "run.sh: SCREEN_SHARED_PID_NAMESPACE is 1 or unset, not '$SCREEN_SHARED_PID_NAMESPACE'" >&2; exit 2 ;;
esac

# The host, unpacked once into this folder (readable to the binaries, writable to none).
host="$dir/.host"
if [ ! -x "$host" ]; then
  gz="$dir/host.gz"
  [ -f "$gz" ] || gz="$dir/../host.gz"
  [ -f "$gz" ] || { echo "run.sh: no host.gz in $dir or its parent" >&2; exit 1; }
  gunzip -c "$gz" > "$host.tmp" && chmod +x "$host.tmp" && mv "$host.tmp" "$host" ||
    { echo "run.sh: cannot unpack $gz" >&2; rm -f "$host.tmp"; exit 1; }
fi

devices=()
for node in /dev/nvidia*; do
  [ -e "$node" ] && devices+=(--device "$node")
done
scratch="$(mktemp -d)"
# In a subshell, so that setsid makes this very process a session (and group) leader without
# forking: $! is then the group to kill.
( exec setsid env TMPDIR="$scratch" "$host" confine --variant-run "${namespace[@]}" --read "$dir" \
    --write "$scratch" --write /proc/self/task "${devices[@]}" -- \
    "${profiler[@]}" "$dir/$name" "$@" ) &
leader=$!
# The group is killed however run.sh ends: when the binary exits, and when run.sh itself is
# stopped (a `timeout` around it, the call's limit), which would otherwise leave the binary
# running on the GPU into whatever the lease runs next.
stop() {
  kill -KILL -- "-$leader" 2> /dev/null
  rm -rf "$scratch"
}
trap 'stop; exit 143' TERM
trap 'stop; exit 130' INT
trap 'stop; exit 129' HUP
wait "$leader"
rc=$?
stop
exit "$rc"
