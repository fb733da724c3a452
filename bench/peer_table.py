"""The table of bench/peer.sh: llama-bench's JSON (peer.json) and `host bench --json` reports
(ours-THREADS.json), side by side, with the roofline.

    python3 bench/peer_table.py WORK_DIR VARIANT LLAMA_CPP_PYTHON_VERSION SECONDS_TAKEN

WORK_DIR holds one folder per round (round-1, round-2, ...; one unless peer.sh ran with
--rounds). With several rounds each cell is the median over the rounds of the
round's mean t/s, and the ratio is the median of the rounds' own ratios (each round's two
engines ran minutes apart, so its ratio shares that moment of the machine), with the lowest
and highest beside it and every round's ratio in a second table.

Every share of the roofline is against the one bound printed (the lowest thread count's
bandwidth probe, the median over rounds): each `host bench` run measures the bandwidth anew,
and comparing the variant against its own run's figure and llama.cpp against another's gave two
shares of different bounds.
"""
import glob, json, os, platform, statistics, sys, time


def load_round(folder):
    """(llama-bench's rows, our reports by thread count) of one round's folder."""
    peer_file = os.path.join(folder, "peer.json")
    ours_files = glob.glob(os.path.join(folder, "ours-*.json"))
    if not os.path.isfile(peer_file) or not ours_files:
        sys.exit(f"peer_table.py: {folder} lacks peer.json or an ours-THREADS.json")
    peer = json.load(open(peer_file))
    ours = sorted((json.load(open(f)) for f in ours_files), key=lambda report: report["threads"])
    return peer, ours


def peer_row(peer, threads, n_prompt, n_gen):
    """llama-bench's row for one test at one thread count, or None."""
    match = [p for p in peer if p["n_threads"] == threads and p["n_prompt"] == n_prompt and p["n_gen"] == n_gen]
    return match[0] if match else None


work, variant, version, took = sys.argv[1:]
folders = sorted(glob.glob(os.path.join(work, "round-*")), key=lambda f: int(f.rsplit("-", 1)[1]))
if not folders:
    sys.exit(f"peer_table.py: {work} holds no round-N folder")
rounds = [load_round(f) for f in folders]
peer, ours = rounds[0]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
first = ours[0]
if first["device"] != "cpu":
    import subprocess
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    cpu = f"{gpu or 'GPU (nvidia-smi unavailable)'} on {first['device']}, host CPU {cpu}"
print(f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} logical CPUs; model {first['model']['description']} "
      f"({os.path.basename(first['model']['path'])}); llama.cpp vendored by llama-cpp-python {version} "
      f"({peer[0].get('backends', 'CPU')} backend)\n")

# Every (threads, test) of the first round that llama-bench also ran, with each round's pair of
# figures: (llama.cpp mean, llama.cpp sd, ours mean, ours sd).
cells = []
for report in ours:
    t = report["threads"]
    for test in report["tests"]:
        if peer_row(peer, t, test["n_prompt"], test["n_gen"]) is None:
            continue
        pairs = []
        for k, (peer_k, ours_k) in enumerate(rounds, 1):
            mine = [r for r in ours_k if r["threads"] == t]
            theirs = peer_row(peer_k, t, test["n_prompt"], test["n_gen"])
            got = [x for r in mine for x in r["tests"] if x["test"] == test["test"]]
            if theirs is None or not got:
                sys.exit(f"peer_table.py: round {k} lacks {test['test']} at {t} thread(s)")
            pairs.append((theirs["avg_ts"], theirs["stddev_ts"], got[0]["mean_tok_s"], got[0]["sd_tok_s"]))
        cells.append((t, test, pairs))

print(f"| test | threads | llama.cpp t/s | {variant} t/s | {variant} / llama.cpp |")
print("| --- | ---: | ---: | ---: | ---: |")
for t, test, pairs in cells:
    if len(pairs) == 1:
        p, p_sd, o, o_sd = pairs[0]
        print(f"| {test['test']} | {t} | {p:.2f} ± {p_sd:.2f} | {o:.2f} ± {o_sd:.2f} | {o / p:.3f} |")
    else:
        ratios = [o / p for p, _, o, _ in pairs]
        print(f"| {test['test']} | {t} | {statistics.median(p for p, _, _, _ in pairs):.2f} | "
              f"{statistics.median(o for _, _, o, _ in pairs):.2f} | "
              f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |")
if len(rounds) > 1:
    print(f"\n{len(rounds)} rounds, llama.cpp first in the odd ones and {variant} first in the even ones; "
          "each t/s is the median of the rounds' means, each ratio the median of the rounds' own "
          f"ratios [lowest, highest]. Every round's figures ({variant} t/s / llama.cpp t/s):\n")
    print("| test | threads | " + " | ".join(f"round {k}" for k in range(1, len(rounds) + 1)) + " |")
    print("| --- | ---: |" + " ---: |" * len(rounds))
    for t, test, pairs in cells:
        print(f"| {test['test']} | {t} | " + " | ".join(f"{o:.1f} / {p:.1f} = {o / p:.3f}" for p, _, o, _ in pairs) + " |")

# What the table can vouch for: host bench checks every timed token of the variant against the
# oracle (the agreement gate of host run), except on a model of random weights from a seed, and
# draws its prompts from a fresh seed unless given one (then they could be known ahead).
every_report = [report for _, ours_k in rounds for report in ours_k]
if all(report.get("gated") and report.get("fresh_prompts") for report in every_report):
    print(f"\ngated: every timed token of {variant} was checked against the oracle, as host run "
          "checks them, on prompts drawn from a fresh seed; llama.cpp's are not checked.")
elif all(report.get("gated") for report in every_report):
    print(f"\ngated, but on prompts from a given --seed: {variant} could have had their answers "
          "ready before it was asked; leave --seed out for figures to set beside llama.cpp's.")
else:
    print(f"\nnot gated: {variant}'s tokens were not checked against the oracle (a model of random "
          "weights from a seed); its figures could be posted without computing.")
if first.get("synthetic"):
    print("\nSYNTHETIC MODEL (random weights): speed only.")
if first["roofline"] is None:
    print(f"\nroofline: not measured on {first['device']} (the host measures the CPU's bandwidth only).")
    print(f"\n(whole script: {took} s)")
    sys.exit(0)
# The lowest thread count's probe of each round; its median is the one bound.
probes = [ours_k[0]["roofline"] for _, ours_k in rounds]
bandwidth = statistics.median(probe["bandwidth_gb_s"] for probe in probes)
bytes_per_token = first["roofline"]["bytes_per_token"]
bound = bandwidth * 1e9 / bytes_per_token
spread = ""
if len(probes) > 1:
    spread = f" (median of {len(probes)} rounds' probes, {min(p['bandwidth_gb_s'] for p in probes):.1f}-" \
             f"{max(p['bandwidth_gb_s'] for p in probes):.1f})"
print(f"\nroofline: {bytes_per_token / 2**20:.2f} MiB of weights per generated token; measured read bandwidth "
      f"{bandwidth:.1f} GB/s{spread} (every core) allows {bound:.1f} t/s.")
for t, test, pairs in cells:
    if test["n_gen"] and not test["n_prompt"]:
        theirs = statistics.median(p for p, _, _, _ in pairs)
        mine = statistics.median(o for _, _, o, _ in pairs)
        # Against the bound printed above, as llama.cpp's (not the report's own share).
        print(f"{test['test']} at {t} thread(s): {variant} reaches {mine / bound:.1%} of it, "
              f"llama.cpp {theirs / bound:.1%}.")
print(f"\n(whole script: {took} s)")
