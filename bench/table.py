"""Runs each (framework, workload) of the benchmark in its own process and prints the table:
median milliseconds, elbo's speed-up over each peer (peer time / elbo time, > 1 means elbo is
faster), peak resident memory (ru_maxrss of that process) and elbo's "% of peak": the
workload's FLOPs (products only, as the fused engines count them; a training step is the
forward pass, dW and dx, less the dx of the layers reading the data) per second of elbo's
median, over the machine's gemm peak measured in the same run (the `gemm-peak` workload: the fastest of square f32 products through the `gemm` crate on
the same threads, measured before and after the workloads, the larger kept). 67% is a step
within 1.5x of its FLOP count at that peak. Called by bench/run.

With `--device cuda` (on a machine with an NVIDIA GPU, PyTorch and JAX with CUDA, and a
`--features cuda` build of the workloads in $ELBO_WORKLOADS) each workload runs as elbo on the
GPU (candle's CUDA kernels), PyTorch eager and JAX (jit) on the GPU, and elbo's fused CPU
engine on BENCH_THREADS threads beside them."""
import argparse
import json
import os
import statistics
import subprocess
import sys

THREADS = os.environ.get("BENCH_THREADS", "2")
ELBO = [os.environ.get("ELBO_WORKLOADS", "target/release/examples/workloads")]
PEERS = [sys.executable, "bench/peers.py"]
# workload -> frameworks that run it
WORKLOADS = {
    "vae-step-128": ["elbo", "elbo-candle", "torch", "torch-compile", "jax"],
    "vae-step-1024": ["elbo", "elbo-candle", "torch", "torch-compile", "jax"],
    "iwae-step-k1": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-k5": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-k50": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-2l-k1": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-2l-k5": ["elbo", "torch", "torch-compile", "jax"],
    "iwae-step-2l-k50": ["elbo", "torch", "torch-compile", "jax"],
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
    ap.add_argument("--baseline", default="",
                    help="another build of examples/workloads (an earlier commit's) timed beside"
                         " elbo in the same run: a 'before ms' column and elbo's speed-up over it")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: elbo, PyTorch and JAX on the GPU beside elbo's fused CPU engine")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every framework of a workload this many times, in alternating"
                         " order (forward, then reversed, ...): the table gives the median of"
                         " the rounds' medians, each ratio the median of the rounds' ratios"
                         " (each round's processes ran minutes apart at most), and elbo's"
                         " range over the rounds")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds: expected a positive number of rounds")
    names = [w for w in WORKLOADS if not a.only or w in a.only.split(",")]
    cuda = a.device == "cuda"
    rows = []
    peak = None if cuda else gemm_peak(a.quick)
    for w in names:
        extra = []
        if a.quick:
            extra = {"vae-step-128": ["--reps", "50"], "vae-step-1024": ["--reps", "20"],
                     "iwae-step-k1": ["--reps", "300"], "iwae-step-k5": ["--reps", "300"],
                     "iwae-step-k50": ["--reps", "100"], "iwae-step-2l-k1": ["--reps", "300"],
                     "iwae-step-2l-k5": ["--reps", "300"], "iwae-step-2l-k50": ["--reps", "100"],
                     "conv-vae-step-128": ["--reps", "20"],
                     "vae-epoch": ["--reps", "2"], "nll": ["--reps", "1", "--images", "200"],
                     "unet-step-64": ["--reps", "3"], "ddim-50": ["--reps", "1"],
                     "ddpm-1000": ["--reps", "1"], "unet-cifar-step-64": ["--reps", "3"],
                     "ddim-50-cifar": ["--reps", "1"]}[w]
        elif w == "nll":
            extra = ["--reps", "3"]
        results = {}
        frameworks = CUDA_FRAMEWORKS if cuda else WORKLOADS[w]
        if cuda and os.environ.get("ELBO_PJRT_PLUGIN") and w in XLA_WORKLOADS:
            frameworks = frameworks + ["elbo-xla"]
        if a.baseline and "elbo" in frameworks:
            frameworks = frameworks + ["elbo-baseline"]
        runs = {fw: [] for fw in frameworks}
        for round_ in range(a.rounds):
            order = frameworks if round_ % 2 == 0 else frameworks[::-1]
            for fw in order:
                print(f"  {w} / {fw} ...", file=sys.stderr, flush=True)
                try:
                    runs[fw].append(measure(fw, w, extra, a.baseline))
                except RuntimeError as e:
                    print(f"  {w} / {fw} FAILED: {e}", file=sys.stderr, flush=True)
        results = {fw: combine(r) for fw, r in runs.items() if r}
        rows.append((w, results))
        if a.json:  # after every workload, so that a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"gemm_peak_flops_per_s": peak, **{w: r for w, r in rows}}, f,
                          indent=1)
        print(f"  {w}: " + ", ".join(f"{fw} {r['median_ms']:.2f} ms, {r['peak_mb']:.0f} MB"
                                     for fw, r in results.items()), file=sys.stderr, flush=True)
    if not cuda:  # the peak again, the larger of the two: a shared machine's speed drifts
        peak = max(peak, gemm_peak(a.quick))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"gemm_peak_flops_per_s": peak, **{w: r for w, r in rows}}, f,
                          indent=1)
    print_cuda_table(rows) if cuda else print_table(rows, peak)


def gemm_peak(quick):
    """The machine's gemm peak in FLOP/s: the `gemm-peak` workload's fastest product."""
    print("  gemm-peak / elbo ...", file=sys.stderr, flush=True)
    g = measure("elbo", "gemm-peak", ["--reps", "4"] if quick else [])
    peak = g["flops"] / (g["median_ms"] / 1e3)
    print(f"  gemm-peak: {peak / 1e9:.1f} GFLOP/s ({g['unit']})", file=sys.stderr, flush=True)
    return peak


def combine(runs):
    """One framework's result over the rounds: the first round's fields, every repetition's
    time (`ms`), each round's median (`round_ms`), their median (`median_ms`) and the largest
    peak memory."""
    out = dict(runs[0])
    out["ms"] = [t for r in runs for t in r["ms"]]
    out["round_ms"] = [r["median_ms"] for r in runs]
    out["median_ms"] = statistics.median(out["round_ms"])
    out["peak_mb"] = max(r["peak_mb"] for r in runs)
    return out


def speedup(peer, elbo):
    """peer / elbo: the median of the rounds' ratios where both ran every round (the two
    processes of a round ran minutes apart at most), else the ratio of the medians."""
    a, b = peer.get("round_ms", []), elbo.get("round_ms", [])
    if len(a) > 1 and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return peer["median_ms"] / elbo["median_ms"]


def measure(framework, workload, extra, baseline=""):
    if framework == "elbo-baseline":
        cmd = [baseline, workload] + extra
    elif framework == "elbo":
        cmd = ELBO + [workload] + extra
    elif framework == "elbo-candle":
        cmd = ELBO + [workload, "--engine", "candle"] + extra
    elif framework == "elbo-xla":  # the device is the plugin's: ELBO_PJRT_PLUGIN
        cmd = ELBO + [workload, "--engine", "xla"] + extra
    elif framework == "elbo-cuda":
        cmd = ELBO + [workload, "--engine", "candle", "--device", "cuda"] + extra
    elif framework.endswith("-cuda"):
        cmd = PEERS + [framework.removesuffix("-cuda"), workload, "--device", "cuda"] + extra
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


CUDA_FRAMEWORKS = ["elbo-cuda", "torch-cuda", "jax-cuda", "elbo"]
# The workloads elbo's XLA engine (--engine xla, src/engine/xla) takes.
XLA_WORKLOADS = {"vae-step-128", "vae-step-1024", "vae-epoch", "conv-vae-step-128", "ddim-50",
                 "ddpm-1000", "ddim-50-cifar", "unet-step-64", "unet-cifar-step-64"} | {
    w for w in WORKLOADS if w.startswith("iwae-step-")}


def print_markdown(lines):
    """Prints rows of cells (the first is the head) as a markdown table, columns padded."""
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    for i, l in enumerate(lines):
        print("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(l)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def print_cuda_table(rows):
    """Median ms on the GPU (elbo through candle's CUDA kernels, PyTorch eager, JAX jit) beside
    elbo's fused engine on the CPU's threads; ratios are peer / elbo-cuda (> 1: elbo faster)."""
    head = ("workload", "elbo CUDA ms", "elbo XLA ms", "PyTorch CUDA ms", "JAX CUDA ms",
            "PyTorch / elbo", "JAX / elbo", "JAX / elbo XLA",
            f"elbo fused CPU ({THREADS} threads) ms", "CPU / elbo CUDA")
    lines = [head]
    for w, r in rows:
        ms = lambda fw: f"{r[fw]['median_ms']:.3f}" if fw in r else "-"
        ratio = lambda fw, to="elbo-cuda": (f"{r[fw]['median_ms'] / r[to]['median_ms']:.2f}x"
                                            if fw in r and to in r else "-")
        reps = r["elbo-cuda"]["reps"] if "elbo-cuda" in r else 0
        lines.append((f"{w} ({reps} reps)", ms("elbo-cuda"), ms("elbo-xla"), ms("torch-cuda"),
                      ms("jax-cuda"), ratio("torch-cuda"), ratio("jax-cuda"),
                      ratio("jax-cuda", "elbo-xla"), ms("elbo"), ratio("elbo")))
    print_markdown(lines)
    print("\nmedian wall time per repetition, each ended by a device synchronisation; ratios: "
          "other / elbo CUDA (> 1: elbo on the GPU is faster); elbo XLA: --engine xla on the "
          "PJRT plugin at ELBO_PJRT_PLUGIN (parameters and Adam resident on the device)")


def percent_of_peak(result, peak):
    """elbo's FLOPs per second at its median over the measured gemm peak, as a percentage."""
    if not peak or not result.get("flops"):
        return "-"
    return f"{100 * result['flops'] / (result['median_ms'] / 1e3) / peak:.0f}%"


def print_table(rows, peak):
    head = ("workload", "elbo ms", "torch ms", "compiled ms", "jax ms", "vs torch",
            "vs fastest compiled", "% of peak", "elbo MB", "torch MB", "compiled MB", "jax MB",
            "elbo (candle engine) ms")
    baseline = any("elbo-baseline" in r for _, r in rows)
    if baseline:
        head += ("before ms", "before / elbo")
    lines = [head]
    for w, r in rows:
        if "elbo" not in r:
            continue
        e = r["elbo"]
        cell = lambda fw, k, fmt: fmt.format(r[fw][k]) if fw in r else "-"
        ratio = lambda fw: f"{speedup(r[fw], e):.2f}x" if fw in r else "-"
        compiled = [fw for fw in ("torch-compile", "jax") if fw in r]
        fastest = min(compiled, key=lambda fw: r[fw]["median_ms"]) if compiled else None
        rounds = len(e["round_ms"])
        label = f"{w} ({e['reps']} reps" + (f" x {rounds} rounds)" if rounds > 1 else ")")
        elbo_ms = f"{e['median_ms']:.2f}" + (
            f" ({min(e['round_ms']):.2f}-{max(e['round_ms']):.2f})" if rounds > 1 else "")
        lines.append((
            label, elbo_ms, cell("torch", "median_ms", "{:.2f}"),
            cell("torch-compile", "median_ms", "{:.2f}"), cell("jax", "median_ms", "{:.2f}"),
            ratio("torch"), f"{ratio(fastest)} ({fastest})" if fastest else "-",
            percent_of_peak(e, peak), f"{e['peak_mb']:.0f}", cell("torch", "peak_mb", "{:.0f}"),
            cell("torch-compile", "peak_mb", "{:.0f}"), cell("jax", "peak_mb", "{:.0f}"),
            cell("elbo-candle", "median_ms", "{:.2f}"))
            + ((cell("elbo-baseline", "median_ms", "{:.2f}"), ratio("elbo-baseline"))
               if baseline else ()))
    print_markdown(lines)
    print("\nmedian wall time per repetition; 'compiled' = torch.compile; 'vs' = peer median / elbo"
          " median (> 1: elbo faster); over several rounds: the median of the rounds' medians"
          " (elbo's range over the rounds in brackets) and of the rounds' ratios;"
          " % of peak = elbo's FLOPs per second over the gemm peak"
          f" ({peak / 1e9:.1f} GFLOP/s in this run); MB = peak resident memory of the process."
          " Threads: " + THREADS)


if __name__ == "__main__":
    main()
