#!/usr/bin/env python3
"""Runs the elbo binary the way a hostile but realistic user would and counts what goes wrong.

Usage: scripts/hostile.py PATH/TO/elbo [--quick]

Categories (issue 9): IDX files, checkpoints, flags, faults; (issue 33) writes, run links,
bounds, non-finite, kinds, messages. Each run is classified:
- panic: exit 101 or "panicked" on stderr;
- abort: killed by SIGABRT/SIGSEGV or "memory allocation" on stderr (not our injected faults);
- hang: still running after the timeout;
- unclear: failed, but not with one line naming the flag or file it should name;
- wrong-exit-0: bad input that ended with exit 0 (a NaN or inf printed, nothing written);
- data loss: after a fault, continuing the run (--resume, or a new start when --resume says
  there is nothing to continue) does not reach the uninterrupted run's metrics and weights;
- clobber: a file that was not the command's output (a link's target, a user's file beside
  it, a user's file in --out) was changed or removed, or the output was left a link;
- escape: --resume opened something behind a run-folder link that leads outside the folder;
- unbounded: a read of a bounded input took more than 1 GB of memory.
Faults are injected with strace (SIGKILL at the N-th rename, ENOSPC at the N-th fsync), so
the same faults hit any version of the binary. Needs python3, strace, mkfifo; no packages.
"""

import gzip
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

ELBO = os.path.abspath(sys.argv[1])
QUICK = "--quick" in sys.argv
# --only=writes,bounds,...: run only these categories (idx, checkpoints, flags, faults, writes,
# run-links, bounds, non-finite, kinds, messages).
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
ROOT = tempfile.mkdtemp(prefix="hostile-")
ENV = dict(os.environ, RUST_BACKTRACE="1")  # as in many developers' shells
COUNTS = {}
# T's flag: --num-train-timesteps since issue 11's flag clean-up, --steps before.
T_FLAG = ("--num-train-timesteps"
          if "--num-train-timesteps" in subprocess.run([ELBO, "schedule", "--help"], capture_output=True,
                                                       text=True).stdout
          else "--steps")
EXAMPLES = {}
OUTCOMES = ["panic", "abort", "hang", "unclear", "wrong-exit-0", "data loss", "clobber", "escape",
            "unbounded"]


def limit_memory():
    """8 GB of address space per run: a binary that trusts a size aborts instead of taking the
    machine down (the runs' verdicts are the same; the machine survives)."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def run(args, timeout=30, env=None, cwd=ROOT):
    try:
        p = subprocess.run(
            [ELBO] + args, capture_output=True, timeout=timeout, env=env or ENV, cwd=cwd,
            preexec_fn=limit_memory,
        )
        return p.returncode, p.stderr.decode("utf-8", "replace"), p.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        return None, "", ""


def note(category, outcome, what):
    c = COUNTS.setdefault(category, {k: 0 for k in ["runs"] + OUTCOMES})
    c["runs"] += 1
    if outcome:
        c[outcome] += 1
        EXAMPLES.setdefault((category, outcome), what)


def classify(category, args, needle, bad=True, timeout=30, env=None):
    """One run of bad input: it must fail with one line containing `needle`."""
    rc, err, out = run(args, timeout, env)
    what = " ".join(args)[:160]
    if rc is None:
        return note(category, "hang", what)
    if rc == 101 or "panicked" in err:
        return note(category, "panic", what + " :: " + err.strip().splitlines()[0][:120])
    if rc < 0 or rc == 134 or "memory allocation" in err:
        return note(category, "abort", what + f" :: rc {rc}")
    if rc == 0:
        return note(category, "wrong-exit-0" if bad else None, what + " :: " + out.strip()[:100])
    lines = err.strip().splitlines()
    if len(lines) != 1 or (needle and needle not in lines[0]):
        return note(category, "unclear", what + " :: " + err.strip()[:200].replace("\n", " | "))
    return note(category, None, what)


# ---------------------------------------------------------------------------------------------
# Inputs

def idx_images(n, rows=28, cols=28, seed=0):
    rng = random.Random(seed)
    return struct.pack(">IIII", 0x803, n, rows, cols) + bytes(rng.randrange(256) for _ in range(n * rows * cols))


def idx_labels(n):
    return struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))


def mutate(data, rng):
    v = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        k = rng.randrange(5)
        i = rng.randrange(min(len(v), 32)) if v and rng.random() < 0.6 else (rng.randrange(len(v)) if v else 0)
        if k == 0 and v:
            v[i] ^= 1 << rng.randrange(8)
        elif k == 1 and v:
            v[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif k == 2:
            del v[rng.randrange(len(v) + 1):]
        elif k == 3:
            v[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif len(v) >= 8:
            i = min(i, len(v) - 4)
            v[i:i + 4] = struct.pack(">I", rng.choice([0, 1, 28, 0x7FFFFFFF, 0xFFFFFFFF]))
    return bytes(v)


def folder(name, images, labels=None, gz=False):
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    with open(path, "wb") as f:
        f.write(images)
    if labels is not None:
        with open(os.path.join(d, "t10k-labels-idx1-ubyte"), "wb") as f:
            f.write(labels)
    return d, path


def safetensors(tensors, metadata=None):
    """tensors: name -> (dtype, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n:]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}, meta


# ---------------------------------------------------------------------------------------------

def category_idx(ckpt):
    rng = random.Random(1)
    good = idx_images(16)
    n = 60 if QUICK else 300
    for i in range(n):
        gz = i % 2 == 1
        data = mutate(gzip.compress(good) if gz else good, rng)
        if i % 6 == 5:  # a valid gzip of a mutated IDX file
            data = gzip.compress(mutate(good, rng))
        d, path = folder(f"idx-{i}", data, None, gz)
        rc, err, _ = run(["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "4", "--iw-samples", "2"])
        what = f"mutated IDX {i}"
        if rc is None:
            note("IDX", "hang", what)
        elif rc == 101 or "panicked" in err:
            note("IDX", "panic", what)
        elif rc < 0 or rc == 134 or "memory allocation" in err:
            note("IDX", "abort", what)
        elif rc != 0 and (len(err.strip().splitlines()) != 1 or path not in err):
            note("IDX", "unclear", what + " :: " + err.strip()[:160])
        else:
            note("IDX", None, what)
    # The special cases.
    bomb = gzip.compress(struct.pack(">I", 0x804) + bytes(2_500_000_000 if not QUICK else 200_000_000), 1)
    d, path = folder("idx-bomb", bomb, gz=True)
    classify("IDX", ["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "1"], path, timeout=60)
    raw = idx_images(16)
    two = gzip.compress(raw[:5000]) + gzip.compress(raw[5000:])
    d, path = folder("idx-multi", two, gz=True)
    rc, err, _ = run(["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "4", "--iw-samples", "2"])
    note("IDX", None if rc == 0 else "unclear", "valid multi-member gzip refused :: " + err.strip()[:120])
    d, path = folder("idx-trailing", gzip.compress(raw) + b"trailing garbage", gz=True)
    classify("IDX", ["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "1"], path)
    claim = struct.pack(">IIII", 0x803, 2**31, 28, 28) + bytes(784)
    d, path = folder("idx-claim", gzip.compress(claim), gz=True)
    classify("IDX", ["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "1"], path)
    d = os.path.join(ROOT, "idx-fifo")
    os.makedirs(d, exist_ok=True)
    os.mkfifo(os.path.join(d, "t10k-images-idx3-ubyte"))
    classify("IDX", ["eval", "vae", "--checkpoint", ckpt, "--data", d, "--limit", "1"], "t10k-images", timeout=10)


def category_checkpoints(ckpt, diffusion_ckpt):
    tensors, meta = read_safetensors(ckpt)
    rng = random.Random(2)
    with open(ckpt, "rb") as f:
        good = f.read()
    n = 40 if QUICK else 200
    for i in range(n):
        p = os.path.join(ROOT, f"ck-{i}.safetensors")
        with open(p, "wb") as f:
            f.write(mutate(good, rng))
        classify("checkpoints", ["eval", "vae", "--checkpoint", p, "--limit", "2", "--iw-samples", "2"], p, bad=False)

    def edited(name, edit, new_meta=None):
        t = dict(tensors)
        edit(t)
        p = os.path.join(ROOT, name)
        with open(p, "wb") as f:
            f.write(safetensors(t, new_meta if new_meta is not None else meta))
        return p

    def f32(values):
        return struct.pack(f"<{len(values)}f", *values)

    def set_values(t, name, fn):
        dtype, shape, raw = t[name]
        vals = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        t[name] = (dtype, shape, f32(fn(vals)))

    cases = [
        ("nan-bias", lambda t: set_values(t, "decoder.2.bias", lambda v: [float("nan")] + v[1:]), "decoder.2.bias"),
        ("nan-encoder", lambda t: set_values(t, "encoder.0.weight", lambda v: [float("nan")] * len(v)), "encoder.0.weight"),
        ("inf", lambda t: set_values(t, "fc_mu.bias", lambda v: [float("inf")] * len(v)), "fc_mu.bias"),
        ("huge", lambda t: set_values(t, "fc_mu.bias", lambda v: [1e30] * len(v)), "checkpoint"),
        ("i64", lambda t: t.update({"decoder.0.weight": ("I64", t["decoder.0.weight"][1], bytes(2 * len(t["decoder.0.weight"][2])))}), "decoder.0.weight"),
        ("u8", lambda t: t.update({"decoder.0.weight": ("U8", t["decoder.0.weight"][1], bytes(len(t["decoder.0.weight"][2]) // 4))}), "decoder.0.weight"),
    ]
    for name, edit, needle in cases:
        p = edited(name + ".safetensors", edit)
        classify("checkpoints", ["eval", "vae", "--checkpoint", p, "--limit", "2", "--iw-samples", "2"],
                 needle if needle != "checkpoint" else p)
    # Crafted metadata.
    dt, dm = read_safetensors(diffusion_ckpt)
    config = json.loads(dm["elbo.config"])
    for label, change in [("mult[]", ("channel_mult", [])), ("T=1e9", None), ("T=1e12", None)]:
        c = json.loads(json.dumps(config))
        if change:
            c["net"][change[0]] = change[1]
        else:
            c["num_train_timesteps"] = 10**9 if label == "T=1e9" else 10**12
        p = os.path.join(ROOT, f"diff-{label}.safetensors")
        with open(p, "wb") as f:
            f.write(safetensors(dt, dict(dm, **{"elbo.config": json.dumps(c)})))
        classify("checkpoints", ["sample", "diffusion", "--checkpoint", p, "--n", "2", "--steps", "2",
                                 "--out", os.path.join(ROOT, "s.png")], p, timeout=60)
    vae_cfg = json.loads(meta["elbo.config"])
    vae_cfg["latent_dim"] = 0
    zero = dict(tensors)
    for k in ["fc_mu.weight", "fc_logvar.weight"]:
        zero[k] = ("F32", [0, tensors[k][1][1]], b"")
    for k in ["fc_mu.bias", "fc_logvar.bias"]:
        zero[k] = ("F32", [0], b"")
    zero["decoder.0.weight"] = ("F32", [tensors["decoder.0.weight"][1][0], 0], b"")
    p = os.path.join(ROOT, "latent0.safetensors")
    with open(p, "wb") as f:
        f.write(safetensors(zero, dict(meta, **{"elbo.config": json.dumps(vae_cfg)})))
    classify("checkpoints", ["eval", "vae", "--checkpoint", p, "--limit", "2"], p)
    fifo = os.path.join(ROOT, "fifo.safetensors")
    os.mkfifo(fifo)
    for p in ["/dev/zero", fifo]:
        classify("checkpoints", ["eval", "vae", "--checkpoint", p], p, timeout=10)


def category_flags():
    out = os.path.join(ROOT, "flag-run")
    cases = [
        (["schedule", T_FLAG, "18446744073709551615"], T_FLAG),
        (["schedule", T_FLAG, "1000000000"], T_FLAG),
        (["train", "diffusion", T_FLAG, "18446744073709551615", "--out", out], T_FLAG),
        (["train", "diffusion", T_FLAG, "1000000000", "--out", out], T_FLAG),
        (["train", "diffusion", "--channels", "1000000", "--out", out], "--channels"),
        # --hidden-dim is an alias of --hidden, which the message names.
        (["train", "vae", "--hidden-dim", "9223372036854775808", "--out", out], "--hidden"),
        (["train", "vae", "--hidden-dim", "1000000000", "--out", out], "--hidden"),
        (["train", "vae", "--latent-dim", "1000000000", "--out", out], "--latent-dim"),
        (["train", "vae", "--mc-samples", "1000000000", "--out", out], "--mc-samples"),
        (["train", "vae", "--mc-samples", "1000000000", "--engine", "candle", "--out", out], "--mc-samples"),
        (["sample", "vae", "--n", "10000000", "--checkpoint", "FIX"], "--n"),
        (["train", "vae", "--epochs", "0", "--out", out], "--epochs"),
        (["train", "vae", "--train-limit", "0", "--out", out], "--train-limit"),
        (["train", "vae", "--test-limit", "0", "--out", out], "--test-limit"),
        (["train", "diffusion", "--dataset", "toy:moons", "--toy-steps-per-epoch", "0", "--out", out], "--toy-steps-per-epoch"),
        (["train", "vae", "--epochs", "-1", "--out", out], "--epochs"),
        (["sample", "diffusion", "--eta", "-1", "--checkpoint", "x"], "--eta"),
        (["train", "diffusion", "--ema-decay", "-0.5", "--out", out], "--ema-decay"),
        (["train", "vae", "--lr", "nan", "--out", out], "--lr"),
        (["train", "vae", "--batch-size", "0", "--out", out], "--batch-size"),
        (["eval", "vae", "--iw-samples", "0", "--checkpoint", "FIX"], "--iw-samples"),
        (["eval", "diffusion", "--limit", "0", "--checkpoint", "x"], "--limit"),
    ]
    for args, flag in cases:
        args = [FIX if a == "FIX" else a for a in args]
        classify("flags", args, flag, timeout=60)
        shutil.rmtree(out, ignore_errors=True)
    # An --out folder that holds a run's files but no model is not to be reused silently.
    for name in ["metrics.jsonl", "train_state.safetensors"]:
        d = os.path.join(ROOT, "existing-" + name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write("precious\n")
        rc, err, _ = run(["train", "vae", "--epochs", "1", "--train-limit", "256", "--test-limit", "32", "--out", d])
        with open(os.path.join(d, name), "rb") as f:
            kept = f.read() == b"precious\n"
        note("flags", None if kept and rc != 0 else "data loss", f"--out holding only {name} reused")
    # A long evaluation answers Ctrl-C.
    p = subprocess.Popen([ELBO, "eval", "vae", "--checkpoint", FIX, "--iw-samples", "10000000", "--limit", "10"],
                         stderr=subprocess.PIPE, env=ENV)
    import time
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(10)
        note("flags", None, "ctrl-c")
    except subprocess.TimeoutExpired:
        p.kill()
        note("flags", "hang", "eval --iw-samples 1e7 ignores Ctrl-C")


def metrics_of(d):
    try:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return None
    for l in lines:
        l.pop("seconds", None)
    return lines


def weights_of(d):
    try:
        t, _ = read_safetensors(os.path.join(d, "model.safetensors"))
        return {k: v[2] for k, v in t.items()}
    except (OSError, ValueError, KeyError):
        return None


def category_faults():
    base = ["train", "vae", "--epochs", "4", "--train-limit", "2000", "--test-limit", "200"]
    diff = ["train", "diffusion", "--dataset", "toy:moons", T_FLAG, "20", "--epochs", "3",
            "--toy-steps-per-epoch", "20", "--sample-steps", "2"]
    for label, args in [("vae", base), ("diffusion", diff)]:
        ref = os.path.join(ROOT, f"ref-{label}")
        rc, err, _ = run(args + ["--out", ref], timeout=120)
        assert rc == 0, err
        want = (metrics_of(ref), weights_of(ref))
        plans = [("kill-rename", n) for n in range(1, 31 if not QUICK else 12)]
        plans += [("enospc-fsync", n) for n in range(1, 21 if not QUICK else 8)]
        for kind, n in plans:
            d = os.path.join(ROOT, f"{label}-{kind}-{n}")
            if kind == "kill-rename":
                inject = ["-e", "trace=rename,renameat,renameat2",
                          "-e", f"inject=rename,renameat,renameat2:signal=SIGKILL:when={n}"]
            else:
                inject = ["-e", "trace=fsync", "-e", f"inject=fsync:error=ENOSPC:when={n}"]
            subprocess.run(["strace", "-f", "-o", "/dev/null"] + inject + [ELBO] + args + ["--out", d],
                           capture_output=True, env=ENV, timeout=120)
            rc, err, _ = run(args + ["--out", d, "--resume"], timeout=120)
            if rc not in (0,) and ("no committed epoch" in err or "has no" in err):
                rc, err, _ = run(args + ["--out", d], timeout=120)
            if rc == 0 and "already done" in err:
                rc = 0
            got = (metrics_of(d), weights_of(d))
            what = f"{label} {kind}@{n}"
            if rc is None:
                note("faults", "hang", what)
            elif rc != 0 and "has done" not in err:
                note("faults", "data loss", what + " :: cannot continue: " + err.strip()[:160])
            elif got != want:
                note("faults", "data loss", what + " :: resumed run differs from the uninterrupted one")
            else:
                note("faults", None, what)



# ---------------------------------------------------------------------------------------------
# Issue 33: writes, run-folder links, bounds, non-finite runs, kinds, messages.

def outcome_of(rc, err, needle=None, bad=True):
    """The outcome of one run of bad input (None when it was refused as it should be)."""
    if rc is None:
        return "hang"
    if rc == 101 or "panicked" in err:
        return "panic"
    if rc < 0 or rc == 134 or "memory allocation" in err:
        return "abort"
    if rc == 0:
        return "wrong-exit-0" if bad else None
    lines = err.strip().splitlines()
    if not lines or (needle and needle not in lines[-1]):
        return "unclear"
    return None


def category_writes(vae_run, diff_run):
    """Links and files planted at every output path a command writes."""
    vck, dck = os.path.join(vae_run, "model.safetensors"), os.path.join(diff_run, "model.safetensors")
    out = os.path.join(ROOT, "w-out")
    os.makedirs(out, exist_ok=True)
    victim = os.path.join(ROOT, "victim.txt")
    o = lambda n: os.path.join(out, n)
    commands = [
        (["sample", "vae", "--checkpoint", vck, "--n", "4", "--out", o("grid.png")], o("grid.png")),
        (["reconstruct", "vae", "--checkpoint", vck, "--n", "4", "--out", o("rec.png")], o("rec.png")),
        (["sample", "diffusion", "--checkpoint", dck, "--n", "2", "--steps", "2", "--out", o("d.png")],
         o("d.png")),
        (["report", vae_run, "--out", o("r.html")], o("r.html")),
        (["eval", "vae", "--checkpoint", vck, "--iw-samples", "2", "--limit", "4", "--report", vae_run],
         os.path.join(vae_run, "eval.json")),
        (["eval", "diffusion", "--checkpoint", dck, "--limit", "2", "--plot", o("lt.svg")], o("lt.svg")),
    ]
    for args, target in commands:
        what = " ".join(args)[:140]
        for plant in ["tmp-link", "tmp-file", "target-link"]:
            for p in [target, target + ".tmp"]:
                if os.path.lexists(p):
                    os.remove(p)
            with open(victim, "wb") as f:
                f.write(b"precious")
            mine = target + ".tmp"
            if plant == "tmp-link":
                os.symlink(victim, target + ".tmp")
            elif plant == "tmp-file":
                with open(mine, "wb") as f:
                    f.write(b"mine")
            else:
                os.symlink(victim, target)
            rc, err, _ = run(args, timeout=120)
            with open(victim, "rb") as f:
                kept = f.read() == b"precious"
            if plant == "tmp-file":
                kept = kept and os.path.isfile(mine) and open(mine, "rb").read() == b"mine"
            if not kept or (plant != "target-link" and os.path.islink(target)):
                note("writes", "clobber", f"{plant}: {what}")
            elif plant == "target-link":
                note("writes", outcome_of(rc, err, "link"), f"{plant}: {what} :: {err.strip()[-120:]}")
            else:
                note("writes", None if rc == 0 else "unclear", f"{plant}: {what} :: {err.strip()[-120:]}")
    # A new run's --out holding a file of the user's that a run writes.
    for name in ["samples.png", "reconstructions.png", "report.html", "pictures/samples-000001.png"]:
        d = os.path.join(ROOT, "w-user-" + name.replace("/", "-"))
        os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"mine")
        rc, err, _ = run(["train", "vae", "--epochs", "1", "--train-limit", "256", "--test-limit", "32",
                          "--out", d], timeout=120)
        kept = open(os.path.join(d, name), "rb").read() == b"mine"
        note("writes", None if kept and rc != 0 else "clobber", f"--out holding the user's {name}")


def category_run_links(vae_args):
    """--resume with links in the run folder that lead outside it: nothing behind them opened
    (or even looked up: stat counts)."""
    runs = []
    for name in ["l-run", "l-other"]:
        d = os.path.join(ROOT, name)
        rc, err, _ = run(vae_args + ["--epochs", "1", "--out", d], timeout=120)
        assert rc == 0, err
        runs.append(d)
    d, other = runs
    latest = os.path.join(d, "latest")
    original = os.readlink(latest)
    for target in ["/", "/etc", os.path.join(other, "commits/000001"), "../l-other/commits/000001",
                   "commits/../../l-other/commits/000001"]:
        os.remove(latest)
        os.symlink(target, latest)
        trace = os.path.join(ROOT, "strace.txt")
        p = subprocess.run(["strace", "-f", "-o", trace, "-e", "trace=open,openat,stat,lstat,newfstatat,statx", ELBO] + vae_args +
                           ["--out", d, "--resume", "--epochs", "2"], capture_output=True, env=ENV, timeout=120)
        opened = open(trace).read()
        inside = os.path.realpath(os.path.join(d, "commits")) + "/"
        paths = [l.split('"')[1] for l in opened.splitlines() if "commit.json" in l and '"' in l]
        outside = [q for q in paths
                   if not os.path.realpath(os.path.join(d, q)).startswith(inside)]
        what = f"latest -> {target}"
        if outside:
            note("run links", "escape", what + " :: " + outside[0][:120])
        else:
            note("run links", outcome_of(p.returncode, p.stderr.decode(), "refusing"), what)
    os.remove(latest)
    os.symlink(original, latest)
    shutil.move(os.path.join(d, "commits"), os.path.join(ROOT, "l-moved"))
    os.symlink(os.path.join(other, "commits"), os.path.join(d, "commits"))
    rc, err, _ = run(vae_args + ["--out", d, "--resume", "--epochs", "2"], timeout=120)
    note("run links", outcome_of(rc, err, "refusing"), "commits -> another run's commits")


def run_peak(args, timeout=120):
    """(rc, stderr, peak resident MB) of one run, measured by GNU time."""
    try:
        p = subprocess.run(["/usr/bin/time", "-f", "PEAK %M"] + [ELBO] + args, capture_output=True,
                           timeout=timeout, env=ENV, cwd=ROOT, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return None, "", 0
    err = p.stderr.decode("utf-8", "replace")
    peak = 0
    lines = err.strip().splitlines()
    if lines and lines[-1].startswith("PEAK "):
        peak = int(lines[-1].split()[1]) // 1024
        err = "\n".join(lines[:-1])
    rc = p.returncode
    if "Command terminated by signal" in err:
        rc = -6
        err = "\n".join(l for l in err.splitlines() if "Command terminated" not in l)
    elif "Command exited with non-zero status" in err:
        err = "\n".join(l for l in err.splitlines() if "Command exited" not in l)
    return rc, err, peak


def category_bounds(vae_run, vae_args):
    """Reads that must be bounded by a stated ceiling or by what a header declares."""
    import zipfile
    copy = os.path.join(ROOT, "b-report")
    os.makedirs(copy, exist_ok=True)
    shutil.copy(os.path.join(vae_run, "config.json"), os.path.join(copy, "config.json"))
    line = open(os.path.join(vae_run, "metrics.jsonl")).read()
    cases = []
    # 1 GB of zeros (sparse) and 300 MB of real lines as metrics.
    with open(os.path.join(copy, "metrics.jsonl"), "wb") as f:
        f.truncate(1 << 30)
    cases.append((["report", copy, "--out", os.path.join(ROOT, "b.html")], "metrics.jsonl", "report on 1 GB of zeros"))
    copy2 = os.path.join(ROOT, "b-report2")
    os.makedirs(copy2, exist_ok=True)
    shutil.copy(os.path.join(vae_run, "config.json"), os.path.join(copy2, "config.json"))
    with open(os.path.join(copy2, "metrics.jsonl"), "w") as f:
        chunk = line * 1000
        for _ in range(max(1, (300 << 20) // len(chunk))):
            f.write(chunk)
    cases.append((["report", copy2, "--out", os.path.join(ROOT, "b2.html")], "metrics.jsonl",
                  "report on 300 MB of metrics lines"))
    # --resume with a committed metrics file grown to 1 GB.
    d = os.path.join(ROOT, "b-resume")
    rc, err, _ = run(vae_args + ["--epochs", "1", "--out", d], timeout=120)
    assert rc == 0, err
    with open(os.path.join(d, "commits/000001/metrics.jsonl"), "r+b") as f:
        f.truncate(1 << 30)
    cases.append((vae_args + ["--out", d, "--resume", "--epochs", "2"], "metrics.jsonl", "--resume, 1 GB metrics"))
    # An .npz member whose header declares 100 x 28 x 28 but inflates to 1 GB.
    npz = os.path.join(ROOT, "bomb.npz")
    hdr = "{'descr': '|u1', 'fortran_order': False, 'shape': (100, 28, 28), }"
    hdr += " " * (63 - (10 + len(hdr)) % 64) + "\n"
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode())
            zeros = bytes(1 << 20)
            for _ in range(1024):
                f.write(zeros)
    cases.append((["train", "vae", "--data", npz, "--out", os.path.join(ROOT, "b-npz")], "images.npy",
                  ".npz member inflating to 1 GB"))
    for args, needle, what in cases:
        rc, err, peak = run_peak(args)
        out = outcome_of(rc, err, needle)
        if out is None and peak > 1024:
            out = "unbounded"
        note("bounds", out, f"{what} :: {peak} MB :: {err.strip()[-120:]}")
    # Work far too large for the flags' values: refused up front, naming the flag.
    for args, flag in [
        (["eval", "vae", "--checkpoint", FIX, "--iw-samples", "18446744073709551615"], "--iw-samples"),
        (["eval", "vae", "--checkpoint", FIX, "--iw-samples", "100000000"], "--iw-samples"),
        (["sample", "vae", "--checkpoint", FIX, "--n", "18446744073709551615"], "--n"),
        (["sample", "diffusion", "--checkpoint", DFIX, "--steps", "18446744073709551615"], "--steps"),
        (["train", "vae", "--epochs", "18446744073709551615", "--out", os.path.join(ROOT, "b-e")], "--epochs"),
        (["train", "vae", "--eval-every", "18446744073709551615", "--out", os.path.join(ROOT, "b-e2")],
         "--eval-every"),
    ]:
        classify("bounds", args, flag, timeout=30)


def category_non_finite():
    for kind, extra in [("diffusion", ["--train-limit", "32", "--test-limit", "8", T_FLAG, "10", "--channels", "8",
                                        "--sample-steps", "2"]),
                        ("vae", ["--train-limit", "256", "--test-limit", "32"])]:
        for lr in ["1e30", "1e6"]:
            d = os.path.join(ROOT, f"nan-{kind}-{lr}")
            rc, err, _ = run(["train", kind, "--lr", lr, "--epochs", "2", "--out", d] + extra, timeout=120)
            committed = os.path.lexists(os.path.join(d, "latest"))
            what = f"train {kind} --lr {lr}"
            if rc == 0 or committed:
                note("non-finite", "wrong-exit-0", what + (" (committed)" if committed else ""))
            else:
                note("non-finite", outcome_of(rc, err, "training stopped"), what)


def category_kinds(vae_run, diff_run):
    vck, dck = os.path.join(vae_run, "model.safetensors"), os.path.join(diff_run, "model.safetensors")
    classify("kinds", ["eval", "diffusion", "--checkpoint", dck, "--limit", "2", "--report", vae_run], "--report")
    classify("kinds", ["eval", "vae", "--checkpoint", vck, "--iw-samples", "2", "--limit", "4", "--report",
                       diff_run], "--report")
    import io
    import tarfile
    path = os.path.join(ROOT, "cifar-label.tar.gz")
    data = bytearray(10000 * 3073)
    data[4 * 3073] = 200
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = len(data)
        t.addfile(info, io.BytesIO(bytes(data)))
    # Accepted, the old binary went on to say the images do not fit the model: "unclear".
    classify("kinds", ["eval", "vae", "--checkpoint", FIX, "--data", path, "--iw-samples", "2"], "label 200")


def category_messages(vae_run):
    out = os.path.join(ROOT, "m-never")
    idx = struct.pack(">IIII", 2051, 10, 28, 28) + bytes(10 * 784)
    raw = gzip.compress(idx)
    for name, flip, needle in [("crc", len(raw) - 6, "CRC"), ("deflate", len(raw) // 2, "deflate")]:
        b = bytearray(raw)
        b[flip] ^= 0xFF
        b[flip + 1] ^= 0x55
        d, _ = folder("m-" + name, bytes(b), gz=True)
        classify("messages", ["eval", "vae", "--checkpoint", FIX, "--data", d, "--limit", "1"], needle)
    classify("messages", ["train", "vae", "--likelihood", "gaussian", "--obs-log-var", "-1000", "--out", out],
             "--obs-log-var")
    classify("messages", ["train", "diffusion", "--channels", "7", "--out", out], "--channels")
    rc, err, _ = run(["train", "diffusion", "--res-blocks", "0", "--out", out])
    note("messages", "unclear" if "Some(" in err or "--res-blocks" not in err else outcome_of(rc, err),
         "--res-blocks 0 :: " + err.strip()[-100:])
    copy = os.path.join(ROOT, "m-report")
    os.makedirs(copy, exist_ok=True)
    shutil.copy(os.path.join(vae_run, "config.json"), os.path.join(copy, "config.json"))
    line = open(os.path.join(vae_run, "metrics.jsonl")).read()
    with open(os.path.join(copy, "metrics.jsonl"), "w") as f:
        f.write(line + line + "{bad\n")
    classify("messages", ["report", copy, "--out", os.path.join(ROOT, "m.html")], "line 3")
    t, meta = read_safetensors(os.path.join(vae_run, "model.safetensors"))
    meta = dict(meta or {})
    meta["elbo.config"] = '{"kind": "' + "x" * (10 << 20) + '"}'
    p = os.path.join(ROOT, "m-meta.safetensors")
    with open(p, "wb") as f:
        f.write(safetensors(t, meta))
    rc, err, _ = run(["sample", "vae", "--checkpoint", p, "--out", os.path.join(ROOT, "m.png")])
    note("messages", "unclear" if len(err) > 1000 else outcome_of(rc, err, "elbo.config"),
         f"10 MB metadata string :: {len(err)} bytes of error")
    for name, data in [("plain", b"\x07\x1b[31mnot an archive" * 40),
                       ("gzip", gzip.compress(b"\x07\x1b[31mnot an archive" * 40))]:
        p = os.path.join(ROOT, f"m-{name}.tar.gz")
        with open(p, "wb") as f:
            f.write(data)
        rc, err, _ = run(["eval", "vae", "--checkpoint", FIX, "--data", p])
        note("messages", "unclear" if "\x1b" in err or "not an archive" in err else outcome_of(rc, err),
             f"{name} bytes named .tar.gz :: " + repr(err.strip()[-100:]))

if __name__ == "__main__":
    # Fixtures: a small VAE and a small diffusion checkpoint, trained by the binary under test.
    fix_dir = os.path.join(ROOT, "fix")
    rc, err, _ = run(["train", "vae", "--epochs", "1", "--train-limit", "512", "--test-limit", "32",
                      "--hidden-dim", "32", "--latent-dim", "4", "--out", fix_dir], timeout=120)
    assert rc == 0, err
    FIX = os.path.join(ROOT, "fix.safetensors")
    shutil.copy(os.path.join(fix_dir, "model.safetensors"), FIX)
    dfix_dir = os.path.join(ROOT, "dfix")
    rc, err, _ = run(["train", "diffusion", "--dataset", "mnist-10k", "--train-limit", "32", "--test-limit", "8",
                      T_FLAG, "20", "--channels", "8", "--epochs", "1", "--sample-steps", "2",
                      "--out", dfix_dir], timeout=300)
    assert rc == 0, err
    DFIX = os.path.join(ROOT, "dfix.safetensors")
    shutil.copy(os.path.join(dfix_dir, "model.safetensors"), DFIX)
    small_vae = ["train", "vae", "--train-limit", "256", "--test-limit", "32",
                 "--hidden-dim", "16", "--latent-dim", "2"]
    for name, go in [
        ("idx", lambda: category_idx(FIX)),
        ("checkpoints", lambda: category_checkpoints(FIX, DFIX)),
        ("flags", category_flags),
        ("faults", category_faults),
        ("writes", lambda: category_writes(fix_dir, dfix_dir)),
        ("run-links", lambda: category_run_links(small_vae)),
        ("bounds", lambda: category_bounds(fix_dir, small_vae)),
        ("non-finite", category_non_finite),
        ("kinds", lambda: category_kinds(fix_dir, dfix_dir)),
        ("messages", lambda: category_messages(fix_dir)),
    ]:
        if ONLY is None or name in ONLY:
            go()
    cols = ["runs"] + OUTCOMES
    print("| category | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for cat, c in COUNTS.items():
        print(f"| {cat} | " + " | ".join(str(c[k]) for k in cols) + " |")
    print()
    for (cat, outcome), what in sorted(EXAMPLES.items()):
        print(f"- {cat} / {outcome}: {what}")
    shutil.rmtree(ROOT, ignore_errors=True)
