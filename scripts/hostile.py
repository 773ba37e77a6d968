#!/usr/bin/env python3
"""Runs the elbo binary the way a hostile but realistic user would and counts what goes wrong.

Usage: scripts/hostile.py PATH/TO/elbo [--quick]

Categories (issue 9): IDX files, checkpoints, flags, faults. Each run is classified:
- panic: exit 101 or "panicked" on stderr;
- abort: killed by SIGABRT/SIGSEGV or "memory allocation" on stderr (not our injected faults);
- hang: still running after the timeout;
- unclear: failed, but not with one line naming the flag or file it should name;
- wrong-exit-0: bad input that ended with exit 0 (a NaN or inf printed, nothing written);
- data loss: after a fault, continuing the run (--resume, or a new start when --resume says
  there is nothing to continue) does not reach the uninterrupted run's metrics and weights.
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
ROOT = tempfile.mkdtemp(prefix="hostile-")
ENV = dict(os.environ, RUST_BACKTRACE="1")  # as in many developers' shells
COUNTS = {}
# T's flag: --num-train-timesteps since issue 11's flag clean-up, --steps before.
T_FLAG = ("--num-train-timesteps"
          if "--num-train-timesteps" in subprocess.run([ELBO, "schedule", "--help"], capture_output=True,
                                                       text=True).stdout
          else "--steps")
EXAMPLES = {}


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
    c = COUNTS.setdefault(category, {"runs": 0, "panic": 0, "abort": 0, "hang": 0,
                                      "unclear": 0, "wrong-exit-0": 0, "data loss": 0})
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
        (["train", "vae", "--hidden-dim", "9223372036854775808", "--out", out], "--hidden-dim"),
        (["train", "vae", "--hidden-dim", "1000000000", "--out", out], "--hidden-dim"),
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
    p = subprocess.Popen([ELBO, "eval", "vae", "--checkpoint", FIX, "--iw-samples", "1000000000", "--limit", "1"],
                         stderr=subprocess.PIPE, env=ENV)
    import time
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(10)
        note("flags", None, "ctrl-c")
    except subprocess.TimeoutExpired:
        p.kill()
        note("flags", "hang", "eval --iw-samples 1e9 ignores Ctrl-C")


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
    category_idx(FIX)
    category_checkpoints(FIX, DFIX)
    category_flags()
    category_faults()
    cols = ["runs", "panic", "abort", "hang", "unclear", "wrong-exit-0", "data loss"]
    print("| category | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for cat, c in COUNTS.items():
        print(f"| {cat} | " + " | ".join(str(c[k]) for k in cols) + " |")
    print()
    for (cat, outcome), what in sorted(EXAMPLES.items()):
        print(f"- {cat} / {outcome}: {what}")
    shutil.rmtree(ROOT, ignore_errors=True)
