"""The table of bench/peer.sh: llama-bench's JSON (peer.json) and `host bench --json` reports
(ours-THREADS.json) from one folder, side by side, with the roofline.

    python3 bench/peer_table.py WORK_DIR VARIANT LLAMA_CPP_PYTHON_VERSION SECONDS_TAKEN

Every share of the roofline is against the one bound printed (the lowest thread count's
bandwidth probe): each `host bench` run measures the bandwidth anew, and comparing the variant
against its own run's figure and llama.cpp against another's gave two shares of different
bounds.
"""
import glob, json, os, platform, sys, time
work, variant, version, took = sys.argv[1:]
peer = json.load(open(os.path.join(work, "peer.json")))
ours = sorted((json.load(open(f)) for f in glob.glob(os.path.join(work, "ours-*.json"))),
              key=lambda report: report["threads"])
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
print(f"| test | threads | llama.cpp t/s | {variant} t/s | {variant} / llama.cpp |")
print("| --- | ---: | ---: | ---: | ---: |")
for report in ours:
    t = report["threads"]
    for test in report["tests"]:
        match = [p for p in peer if p["n_threads"] == t and p["n_prompt"] == test["n_prompt"] and p["n_gen"] == test["n_gen"]]
        if not match:
            continue
        p = match[0]
        print(f"| {test['test']} | {t} | {p['avg_ts']:.2f} ± {p['stddev_ts']:.2f} | "
              f"{test['mean_tok_s']:.2f} ± {test['sd_tok_s']:.2f} | {test['mean_tok_s'] / p['avg_ts']:.3f} |")
rl = first["roofline"]
# What the table can vouch for: host bench checks every timed token of the variant against the
# oracle (the agreement gate of host run), except on a model of random weights from a seed, and
# draws its prompts from a fresh seed unless given one (then they could be known ahead).
if all(report.get("gated") and report.get("fresh_prompts") for report in ours):
    print(f"\ngated: every timed token of {variant} was checked against the oracle, as host run "
          "checks them, on prompts drawn from a fresh seed; llama.cpp's are not checked.")
elif all(report.get("gated") for report in ours):
    print(f"\ngated, but on prompts from a given --seed: {variant} could have had their answers "
          "ready before it was asked; leave --seed out for figures to set beside llama.cpp's.")
else:
    print(f"\nnot gated: {variant}'s tokens were not checked against the oracle (a model of random "
          "weights from a seed); its figures could be posted without computing.")
if first.get("synthetic"):
    print("\nSYNTHETIC MODEL (random weights): speed only.")
if rl is None:
    print(f"\nroofline: not measured on {first['device']} (the host measures the CPU's bandwidth only).")
    print(f"\n(whole script: {took} s)")
    sys.exit(0)
print(f"\nroofline: {rl['bytes_per_token'] / 2**20:.2f} MiB of weights per generated token; measured read bandwidth "
      f"{rl['bandwidth_gb_s']:.1f} GB/s (every core) allows {rl['bound_tok_s']:.1f} t/s.")
for report in ours:
    for test in report["tests"]:
        if test["n_gen"]:
            p = [p for p in peer if p["n_threads"] == report["threads"] and p["n_gen"] == test["n_gen"] and p["n_prompt"] == 0]
            peer_share = f", llama.cpp {p[0]['avg_ts'] / rl['bound_tok_s']:.1%}" if p else ""
            # Against the bound printed above, as llama.cpp's (not the report's own share).
            share = test['mean_tok_s'] / rl['bound_tok_s']
            print(f"{test['test']} at {report['threads']} thread(s): {variant} reaches {share:.1%} of it{peer_share}.")
print(f"\n(whole script: {took} s)")
