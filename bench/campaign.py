#!/usr/bin/env python3
"""Repeats `host compare` and counts its verdicts: the A/A false-verdict rate and the power.

  bench/campaign.py aa     --n 40   # variants/baseline against itself: should be NOISE
  bench/campaign.py slow5  --n 40   # baseline against the drift fixture decoding 5% slower
  bench/campaign.py fast10 --n 40   # the fixture decoding 10% slower against the baseline:
                                    # B is about 10% faster, a KEEP

Every comparison is a real `host compare` (rows land in --results, default
results/campaign-<kind>); extra arguments after `--` go to it, e.g. `-- --prompt code`.
Prints one line per comparison and a summary: outcomes, the decode rate's verdicts, and the
median rounds and seconds to the end of a comparison. Run from the checkout's root after
`cargo build --release` (and, for slowN and fastN, building the fixture: see README).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIFT = "host/tests/fixtures/variants/drift"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", help="aa, slowN or fastN (N a percentage)")
    ap.add_argument("--n", type=int, default=40, help="comparisons to run")
    ap.add_argument("--host", default=os.path.join(ROOT, "target/release/host"))
    ap.add_argument("--results", default=None)
    ap.add_argument("--no-build", action="store_true", help="pass --no-build to host compare")
    ap.add_argument("--max-wall", type=float, default=None,
                    help="start no new comparison after this many seconds")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra

    kind, percent = args.kind.rstrip("0123456789"), args.kind.lstrip("afstlow")
    if kind not in ("aa", "slow", "fast") or (kind == "aa") != (percent == ""):
        ap.error(f"kind must be aa, slowN or fastN (N a percentage), not {args.kind!r}")
    results = args.results or os.path.join(ROOT, "results", f"campaign-{args.kind}")
    # slowN: B decodes N% slower than A; fastN: A does, so B is faster.
    a, b = {"aa": ("variants/baseline", "variants/baseline"),
            "slow": ("variants/baseline", DRIFT),
            "fast": (DRIFT, "variants/baseline")}[kind]
    env = dict(os.environ, AUTOINFER_FIXTURE_MODE="none" if kind == "aa" else f"slow{percent}")
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    cmd = [args.host, "compare", a, b, "--json", "--results", results]
    if args.no_build:
        cmd.append("--no-build")
    cmd += args.extra

    outcomes, decode, rounds, seconds, wall = [], [], [], [], []
    campaign_started = time.time()
    for i in range(args.n):
        if args.max_wall is not None and time.time() - campaign_started > args.max_wall:
            print(f"stopping after {i} comparisons: --max-wall {args.max_wall} s reached", flush=True)
            break
        started = time.time()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.time() - started
        if run.returncode not in (0, 3, 4):
            sys.stderr.write(run.stderr[-3000:])
            sys.exit(f"comparison {i + 1} failed (exit {run.returncode})")
        out = json.loads(run.stdout)
        d = next(f for f in out["figures"] if f["figure"] == "decode_tok_s")
        outcomes.append(out["outcome"])
        decode.append(d["verdict"])
        rounds.append(out["rounds"])
        seconds.append(out["seconds"])
        wall.append(took)
        ratio = d["decision"]["ratio"] if d["decision"] else float("nan")
        print(f"{i + 1:3d}/{args.n} {out['outcome']:6s} decode {d['verdict']:6s} ratio {ratio:.4f} "
              f"rounds {out['rounds']:2d} measured {out['seconds']:6.1f} s wall {took:6.1f} s", flush=True)

    n = len(outcomes)
    count = lambda xs, v: sum(1 for x in xs if x == v)
    print(f"\n{args.kind}: {n} comparisons, command: {' '.join(cmd)}")
    print("outcomes: " + ", ".join(f"{v} {count(outcomes, v)}" for v in ("Keep", "Revert", "Noise")))
    print("decode verdicts: " + ", ".join(f"{v} {count(decode, v)}" for v in ("Faster", "Slower", "Noise")))
    if kind == "aa":
        false = n - count(outcomes, "Noise")
        print(f"A/A false-verdict rate (outcome not NOISE): {false}/{n} = {false / n:.1%}")
        print(f"false KEEP: {count(outcomes, 'Keep')}/{n} = {count(outcomes, 'Keep') / n:.1%}")
    elif kind == "slow":
        print(f"power (decode SLOWER): {count(decode, 'Slower')}/{n} = {count(decode, 'Slower') / n:.1%}")
    else:
        print(f"power (KEEP): {count(outcomes, 'Keep')}/{n} = {count(outcomes, 'Keep') / n:.1%}")
    print(f"median rounds {statistics.median(rounds)}, median measuring time {statistics.median(seconds):.1f} s, "
          f"median wall time {statistics.median(wall):.1f} s per comparison")


if __name__ == "__main__":
    main()
