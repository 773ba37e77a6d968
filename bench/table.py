"""Runs each (framework, workload) of the benchmark in its own process and prints the table:
median milliseconds, elbo's speed-up over each peer (peer time / elbo time, > 1 means elbo is
faster) and peak resident memory (ru_maxrss of that process). Called by bench/run."""
import argparse
import json
import os
import statistics
import subprocess
import sys

THREADS = os.environ.get("BENCH_THREADS", "2")
ELBO = ["target/release/examples/workloads"]
PEERS = [sys.executable, "bench/peers.py"]
# workload -> frameworks that run it
WORKLOADS = {
    "vae-step-128": ["elbo", "elbo-candle", "torch", "torch-compile", "jax"],
    "vae-step-1024": ["elbo", "elbo-candle", "torch", "torch-compile", "jax"],
    "iwae-step-k1": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-k5": ["elbo", "torch", "torch-compile", "jax"],
    "conv-vae-step-128": ["elbo", "elbo-candle", "torch", "torch-compile", "jax"],
    "vae-epoch": ["elbo", "torch", "jax"],
    "nll": ["elbo", "torch", "jax"],
    "unet-step-64": ["elbo", "torch", "torch-compile", "jax"],
    "ddim-50": ["elbo", "torch", "torch-compile", "jax"],
    "ddpm-1000": ["elbo", "torch", "jax"],
    "unet-cifar-step-64": ["elbo", "torch", "torch-compile", "jax"],
    "ddim-50-cifar": ["elbo", "torch", "torch-compile", "jax"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 200 NLL images")
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--json", default="", help="also write the results to this file")
    a = ap.parse_args()
    names = [w for w in WORKLOADS if not a.only or w in a.only.split(",")]
    rows = []
    for w in names:
        extra = []
        if a.quick:
            extra = {"vae-step-128": ["--reps", "50"], "vae-step-1024": ["--reps", "20"],
                     "iwae-step-k1": ["--reps", "300"], "iwae-step-k5": ["--reps", "300"],
                     "conv-vae-step-128": ["--reps", "20"],
                     "vae-epoch": ["--reps", "2"], "nll": ["--reps", "1", "--images", "200"],
                     "unet-step-64": ["--reps", "3"], "ddim-50": ["--reps", "1"],
                     "ddpm-1000": ["--reps", "1"], "unet-cifar-step-64": ["--reps", "3"],
                     "ddim-50-cifar": ["--reps", "1"]}[w]
        elif w == "nll":
            extra = ["--reps", "3"]
        results = {}
        for fw in WORKLOADS[w]:
            print(f"  {w} / {fw} ...", file=sys.stderr, flush=True)
            try:
                results[fw] = measure(fw, w, extra)
            except RuntimeError as e:
                print(f"  {w} / {fw} FAILED: {e}", file=sys.stderr, flush=True)
        rows.append((w, results))
        print(f"  {w}: " + ", ".join(f"{fw} {r['median_ms']:.2f} ms, {r['peak_mb']:.0f} MB"
                                     for fw, r in results.items()), file=sys.stderr, flush=True)
    print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({w: r for w, r in rows}, f, indent=1)


def measure(framework, workload, extra):
    if framework == "elbo":
        cmd = ELBO + [workload] + extra
    elif framework == "elbo-candle":
        cmd = ELBO + [workload, "--engine", "candle"] + extra
    else:
        cmd = PEERS + [framework, workload] + extra
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS, OMP_NUM_THREADS=THREADS,
               BENCH_THREADS=THREADS)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit status {status}, {err.decode()[-2000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["median_ms"] = statistics.median(result["ms"])
    result["reps"] = len(result["ms"])
    result["peak_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def print_table(rows):
    head = ("workload", "elbo ms", "torch ms", "compiled ms", "jax ms", "vs torch",
            "vs fastest compiled", "elbo MB", "torch MB", "compiled MB", "jax MB",
            "elbo (candle engine) ms")
    lines = [head]
    for w, r in rows:
        if "elbo" not in r:
            continue
        e = r["elbo"]
        cell = lambda fw, k, fmt: fmt.format(r[fw][k]) if fw in r else "-"
        ratio = lambda fw: f"{r[fw]['median_ms'] / e['median_ms']:.2f}x" if fw in r else "-"
        compiled = [fw for fw in ("torch-compile", "jax") if fw in r]
        fastest = min(compiled, key=lambda fw: r[fw]["median_ms"]) if compiled else None
        lines.append((
            f"{w} ({e['reps']} reps)", f"{e['median_ms']:.2f}", cell("torch", "median_ms", "{:.2f}"),
            cell("torch-compile", "median_ms", "{:.2f}"), cell("jax", "median_ms", "{:.2f}"),
            ratio("torch"), f"{ratio(fastest)} ({fastest})" if fastest else "-",
            f"{e['peak_mb']:.0f}", cell("torch", "peak_mb", "{:.0f}"),
            cell("torch-compile", "peak_mb", "{:.0f}"), cell("jax", "peak_mb", "{:.0f}"),
            cell("elbo-candle", "median_ms", "{:.2f}")))
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    for i, l in enumerate(lines):
        print("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(l)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\nmedian wall time per repetition; 'compiled' = torch.compile; 'vs' = peer median / elbo"
          " median (> 1: elbo faster);"
          " MB = peak resident memory of the process. Threads: " + THREADS)


if __name__ == "__main__":
    main()
