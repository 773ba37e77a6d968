"""The peers of elbo's benchmark workloads (bench/run): PyTorch (the text's code) and JAX
(jax.jit of the whole step, optax.adam). One workload per process, as elbo's
`examples/workloads.rs`, printing one JSON object: {"workload", "framework", "unit", "ms": [...]}.

    bench/.venv/bin/python bench/peers.py torch|torch-compile|jax WORKLOAD [--reps N] [--warmup N] [--device cpu|cuda]

Workloads: vae-step-128, vae-step-1024, vae-epoch, nll (K = 5000), iwae-step-k1,
iwae-step-k5 and iwae-step-k50 (Burda et al.'s one-layer model, batch 20), iwae-step-2l-k1,
iwae-step-2l-k5 and iwae-step-2l-k50 (its two-layer model), conv-vae-step-128 (a convolutional
VAE on 1 x 28 x 28), and for torch only unet-step-64,
ddim-50, ddpm-1000 with a U-Net identical to elbo's default (same layers, same state_dict
names, same parameter count: 171,937), and unet-cifar-step-64, ddim-50-cifar (16 images) with
DDPM's CIFAR-10 U-Net at base width 32 (3 x 32 x 32; elbo's NetConfig::ddpm_cifar10(32, 3)).
JAX runs the U-Net rows with the same network as a pure function (jax_unet_workload). `torch` runs the training steps in their fastest eager
form (BCE from logits, not the text's sigmoid + BCE); `torch-compile` wraps the model and loss
in `torch.compile` and warms it up until compilation is over (not timed). `--device cuda` puts
PyTorch's tensors on the first GPU (its default device) and JAX on its CUDA platform; each
repetition then ends when the GPU has finished (`torch.cuda.synchronize`, JAX's
`block_until_ready`).
"""
import argparse
import gzip
import json
import math
import os
import pathlib
import struct
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def load_images():
    raw = gzip.open(ROOT / "data/mnist-10k/train-images-idx3-ubyte.gz", "rb").read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    assert magic == 2051 and rows == 28 and cols == 28
    x = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 784).astype(np.float32) / 255.0
    return x[:9000], x[9000:]  # elbo's built-in split


SYNC = lambda: None  # waits for the GPU: torch.cuda.synchronize under torch --device cuda


def timed(warmup, reps, f):
    for _ in range(warmup):
        f()
    SYNC()
    out = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        SYNC()
        out.append((time.perf_counter() - s) * 1e3)
    return out


# ----------------------------------------------------------------------------- PyTorch
def torch_workload(name, a, compiled=False):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    global SYNC
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if a.device == "cuda":
        torch.set_default_device("cuda")  # modules and factory functions: on the GPU
        SYNC = torch.cuda.synchronize
    train, test = (torch.from_numpy(v).to(a.device) for v in load_images())

    sys.path.insert(0, str(ROOT / "bench"))
    from torch_vae import SimpleVAE  # the text's model, verbatim

    def logits_loss(model, xb):
        """The text's vae_loss in its fast form: BCE from the decoder's logits (the model's
        last layer before its sigmoid), the closed-form KL."""
        h = model.encoder(xb)
        mu, logvar = model.fc_mu(h), model.fc_logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = model.decoder(z)  # the logits the text passes through torch.sigmoid
        bce = F.binary_cross_entropy_with_logits(logits, xb, reduction="sum")
        return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    if name.startswith("iwae-step-"):
        k = int(name.rsplit("k", 1)[1])
        layers = 2 if name.startswith("iwae-step-2l-") else 1

        class IwaeMLP(nn.Module):  # Burda et al. 2015, one stochastic layer
            def __init__(self):
                super().__init__()
                self.enc = nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh())
                self.mu, self.lv = nn.Linear(200, 50), nn.Linear(200, 50)
                self.dec = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                                         nn.Linear(200, 784))
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
                        nn.init.zeros_(m.bias)

            def forward(self, x):
                h = self.enc(x)
                mu, lv = self.mu(h), self.lv(h)
                eps = torch.randn((k,) + mu.shape)
                z = mu + torch.exp(0.5 * lv) * eps
                logits = self.dec(z)
                log_px = -F.binary_cross_entropy_with_logits(
                    logits, x.expand_as(logits), reduction="none").sum(-1)
                if k == 1:  # the VAE: the ELBO with its closed-form KL
                    kl = -0.5 * (1 + lv - mu.pow(2) - lv.exp()).sum(-1)
                    return -(log_px[0] - kl).mean()
                log_w = log_px - 0.5 * z.pow(2).sum(-1) + 0.5 * (lv + eps.pow(2)).sum(-1)
                return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()

        def mlp(*sizes):  # tanh between the linear layers, Glorot weights, zero biases
            mods = []
            for i, o in zip(sizes, sizes[1:]):
                lin = nn.Linear(i, o)
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
                mods += [lin, nn.Tanh()]
            return nn.Sequential(*mods[:-1])

        class Iwae2(nn.Module):  # Burda et al. 2015, two stochastic layers
            def __init__(self):
                super().__init__()
                self.q1 = mlp(784, 200, 200, 2 * 100)  # mean | log-variance of q(z1|x)
                self.q2 = mlp(100, 100, 100, 2 * 50)  # of q(z2|z1)
                self.p1 = mlp(50, 100, 100, 2 * 100)  # of p(z1|z2)
                self.px = mlp(100, 200, 200, 784)  # the logits of p(x|z1)

            def forward(self, x):
                mu1, lv1 = self.q1(x).chunk(2, -1)
                e1 = torch.randn((k,) + mu1.shape)
                z1 = mu1 + torch.exp(0.5 * lv1) * e1
                mu2, lv2 = self.q2(z1).chunk(2, -1)
                e2 = torch.randn(mu2.shape)
                z2 = mu2 + torch.exp(0.5 * lv2) * e2
                pm, plv = self.p1(z2).chunk(2, -1)
                logits = self.px(z1)
                log_px = -F.binary_cross_entropy_with_logits(
                    logits, x.expand_as(logits), reduction="none").sum(-1)
                # log p(z1|z2) - log q(z1|x), their constants cancelling
                ratio1 = (-0.5 * (plv + (z1 - pm).pow(2) * torch.exp(-plv))
                          + 0.5 * (lv1 + e1.pow(2))).sum(-1)
                if k == 1:  # the VAE: the top layer's KL in closed form, as elbo's
                    kl2 = -0.5 * (1 + lv2 - mu2.pow(2) - lv2.exp()).sum(-1)
                    return -(log_px + ratio1 - kl2)[0].mean()
                log_w = log_px + ratio1 - 0.5 * (z2.pow(2) - lv2 - e2.pow(2)).sum(-1)
                return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()

        model = Iwae2() if layers == 2 else IwaeMLP()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        loss_fn = torch.compile(model) if compiled else model
        xb = (torch.rand(20, 784) < train[:20]).float()

        def step():
            loss = loss_fn(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        warm = a.warmup or (300 if compiled else 100)
        return timed(warm, a.reps or 1000, step), f"one training step of the IWAE paper's {layers}-layer model, batch 20, k = {k}"

    if name == "conv-vae-step-128":
        class ConvVAE(nn.Module):  # elbo's --conv 32,64 --hidden 256 --latent-dim 32
            def __init__(self):
                super().__init__()
                self.enc = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1),
                                         nn.ReLU(), nn.Flatten(), nn.Linear(3136, 256), nn.ReLU())
                self.mu, self.lv = nn.Linear(256, 32), nn.Linear(256, 32)
                self.dec = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 3136), nn.ReLU(),
                                         nn.Unflatten(1, (64, 7, 7)), nn.ConvTranspose2d(64, 32, 4, 2, 1),
                                         nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Flatten())

            def forward(self, x):
                h = self.enc(x.view(-1, 1, 28, 28))
                mu, lv = self.mu(h), self.lv(h)
                z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
                bce = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
                return bce - 0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())

        model = ConvVAE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.compile(model) if compiled else model
        xb = train[:128].clone()

        def step():
            loss = loss_fn(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        warm = a.warmup or (30 if compiled else 5)
        return timed(warm, a.reps or 50, step), "one conv VAE training step, batch 128"

    if name.startswith("vae-step-") or name == "vae-epoch":
        model = SimpleVAE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.compile(logits_loss) if compiled else logits_loss

        def step(xb):
            loss = loss_fn(model, xb)
            opt.zero_grad()
            loss.backward()
            opt.step()

        if name == "vae-epoch":
            def epoch():
                for idx in torch.randperm(len(train)).split(128):
                    step(train[idx])
            return timed(a.warmup or 1, a.reps or 5, epoch), "one epoch, 9000 digits, batch 128"
        b = int(name.rsplit("-", 1)[1])
        xb = train[:b].clone()
        warm = a.warmup or (100 if compiled else 20)
        return timed(warm, a.reps or 200, lambda: step(xb)), f"one training step, batch {b}"

    if name == "nll":
        model = SimpleVAE().eval()
        x_all = test[: a.images]

        @torch.no_grad()
        def nll():
            for xb in x_all.split(100):
                h = model.encoder(xb)
                mu, logvar = model.fc_mu(h), model.fc_logvar(h)
                std = torch.exp(0.5 * logvar)
                b = xb.shape[0]
                kc = 25_000 // b
                lse = torch.full((b,), -math.inf, dtype=torch.float64)
                done = 0
                while done < 5000:
                    k = min(kc, 5000 - done)
                    eps = torch.randn(k, b, mu.shape[1])
                    z = mu + std * eps
                    logits = model.decoder(z)
                    log_px_z = -F.binary_cross_entropy_with_logits(
                        logits, xb.expand(k, b, 784), reduction="none").sum(-1)
                    log_pz_minus_q = -0.5 * (z.pow(2) - eps.pow(2) - logvar).sum(-1)
                    lse = torch.logaddexp(lse, torch.logsumexp(log_px_z + log_pz_minus_q, 0).double())
                    done += k
        return timed(a.warmup, a.reps or 3, nll), f"log p(x), K = 5000, {len(x_all)} test digits"

    # The U-Net of elbo's src/diffusion/nets.rs (default: base 16, mult 1,2,2, 8 groups, attention).
    def conv(i, o, k, stride=1):
        return nn.Conv2d(i, o, k, stride=stride, padding=k // 2)

    class ResBlock(nn.Module):
        def __init__(self, i, o, temb, groups, dropout=0.0):
            super().__init__()
            self.norm1 = nn.GroupNorm(groups, i)
            self.conv1 = conv(i, o, 3)
            self.time_emb_proj = nn.Linear(temb, o)
            self.norm2 = nn.GroupNorm(groups, o)
            self.dropout = nn.Dropout(dropout)
            self.conv2 = conv(o, o, 3)
            self.conv_shortcut = conv(i, o, 1) if i != o else None

        def forward(self, x, temb):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.time_emb_proj(temb)[:, :, None, None]
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)

    class Attention(nn.Module):
        def __init__(self, c, groups):
            super().__init__()
            self.norm = nn.GroupNorm(groups, c)
            self.qkv = conv(c, 3 * c, 1)
            self.proj_out = conv(c, c, 1)

        def forward(self, x):
            b, c, h, w = x.shape
            qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w)
            q, k, v = qkv[:, 0].transpose(1, 2), qkv[:, 1], qkv[:, 2].transpose(1, 2)
            att = torch.softmax(q @ k / math.sqrt(c), dim=-1)
            out = (att @ v).transpose(1, 2).reshape(b, c, h, w)
            return x + self.proj_out(out)

    class UNet(nn.Module):
        """elbo's U-Net, either layout (nets.rs): res_blocks=None is the compact one."""

        def __init__(self, base=16, mult=(1, 2, 2), groups=8, in_ch=1, res_blocks=None,
                     attn_levels=(), dropout=0.0):
            super().__init__()
            self.base, self.compact = base, res_blocks is None
            temb = 4 * base
            chans = [m * base for m in mult]
            per = res_blocks or 1
            block = lambda i, o: ResBlock(i, o, temb, groups, dropout)
            self.time_embedding = nn.Module()
            self.time_embedding.linear_1 = nn.Linear(base, temb)
            self.time_embedding.linear_2 = nn.Linear(temb, temb)
            self.conv_in = conv(in_ch, base, 3)
            self.down = nn.ModuleList()
            prev, skips = base, ([] if self.compact else [base])
            for i, c in enumerate(chans):
                level = nn.Module()
                if self.compact:
                    level.res = block(prev, c)
                    if i in attn_levels:
                        level.attn = Attention(c, groups)
                else:
                    level.res = nn.ModuleList([block(prev if j == 0 else c, c) for j in range(per)])
                    if i in attn_levels:
                        level.attn = nn.ModuleList([Attention(c, groups) for _ in range(per)])
                skips += [c] * per
                if i + 1 < len(chans):
                    level.downsample = conv(c, c, 3, stride=2)
                    if not self.compact:
                        skips.append(c)
                self.down.append(level)
                prev = c
            self.mid = nn.Module()
            self.mid.res1 = block(prev, prev)
            self.mid.attn = Attention(prev, groups)
            self.mid.res2 = block(prev, prev)
            self.up = nn.ModuleList([nn.Module() for _ in chans])
            for i in reversed(range(len(chans))):
                out = (base if i == 0 else chans[i - 1]) if self.compact else chans[i]
                blocks = []
                for _ in range(per + (0 if self.compact else 1)):
                    blocks.append(block(prev + skips.pop(), out))
                    prev = out
                self.up[i].res = blocks[0] if self.compact else nn.ModuleList(blocks)
                if i in attn_levels:
                    atts = [Attention(out, groups) for _ in blocks]
                    self.up[i].attn = atts[0] if self.compact else nn.ModuleList(atts)
                if i > 0:
                    self.up[i].upsample = conv(out, out, 3)
            self.norm_out = nn.GroupNorm(groups, prev)
            self.conv_out = conv(prev, in_ch, 3)

        def forward(self, x, t):
            half = self.base // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = t.float()[:, None] * freqs[None]
            emb = torch.cat([args.cos(), args.sin()], dim=-1)
            temb = F.silu(self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb))))
            as_list = lambda m: [m] if self.compact else list(m)
            h = self.conv_in(x)
            skips = [] if self.compact else [h]
            for level in self.down:
                atts = as_list(level.attn) if hasattr(level, "attn") else None
                for j, res in enumerate(as_list(level.res)):
                    h = res(h, temb)
                    if atts:
                        h = atts[j](h)
                    skips.append(h)
                if hasattr(level, "downsample"):
                    h = level.downsample(h)
                    if not self.compact:
                        skips.append(h)
            h = self.mid.res2(self.mid.attn(self.mid.res1(h, temb)), temb)
            for i in reversed(range(len(self.up))):
                level = self.up[i]
                atts = as_list(level.attn) if hasattr(level, "attn") else None
                for j, res in enumerate(as_list(level.res)):
                    h = res(torch.cat([h, skips.pop()], 1), temb)
                    if atts:
                        h = atts[j](h)
                if i > 0:
                    h = level.upsample(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
            return self.conv_out(F.silu(self.norm_out(h)))

    cifar = "cifar" in name
    if cifar:  # DDPM's CIFAR-10 U-Net at base width 32 (elbo's NetConfig::ddpm_cifar10(32, 3))
        net = UNet(base=32, mult=(1, 2, 2, 2), groups=32, in_ch=3, res_blocks=2,
                   attn_levels=(1,), dropout=0.1)
        shape = (3, 32, 32)
    else:
        net = UNet()
        shape = (1, 28, 28)
        n_params = sum(p.numel() for p in net.parameters())
        assert n_params == 171_937, f"U-Net has {n_params} parameters, elbo's default has 171937"
    if compiled:
        net = torch.compile(net)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, device="cpu")
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    f = lambda v, i: float(v[i])

    if name in ("unet-step-64", "unet-cifar-step-64"):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        if cifar:
            x0 = torch.randn(64, *shape).clamp(-1, 1)
        else:
            x0 = train[:64].reshape(64, 1, 28, 28) * 2 - 1
        abar32 = abar.float().to(x0.device)

        def step():
            t = torch.randint(0, 1000, (64,))
            eps = torch.randn_like(x0)
            a_t = abar32[t].view(-1, 1, 1, 1)
            xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
            loss = F.mse_loss(net(xt, t), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return timed(a.warmup or (6 if compiled else 2), a.reps or 10, step), "one U-Net training step, batch 64"

    net.eval()

    @torch.no_grad()
    def ddpm():
        x = torch.randn(64, 1, 28, 28)
        for i in reversed(range(1000)):
            eps = net(x, torch.full((64,), i))
            x0 = ((x - math.sqrt(1 - f(abar, i)) * eps) / math.sqrt(f(abar, i))).clamp(-1, 1)
            mean = f(coef1, i) * x0 + f(coef2, i) * x
            x = mean + (math.exp(0.5 * f(post_logvar, i)) * torch.randn_like(x) if i > 0 else 0)

    @torch.no_grad()
    def ddim():
        x = torch.randn(16 if cifar else 64, *shape)
        ts = list(range(0, 1000, 20))[::-1]
        for i in ts:
            eps = net(x, torch.full((x.shape[0],), i))
            a_t = f(abar, i)
            a_prev = f(abar, i - 20) if i >= 20 else 1.0
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    if name in ("ddim-50", "ddim-50-cifar"):
        n = 16 if cifar else 64
        return timed(a.warmup or (2 if compiled else 1), a.reps or 3, ddim), f"DDIM, 50 steps, {n} images"
    if name == "ddpm-1000":
        return timed(a.warmup, a.reps or 1, ddpm), "DDPM, 1000 steps, 64 images"
    raise SystemExit(f"unknown workload {name}")


# ----------------------------------------------------------------------------- JAX
def jax_workload(name, a):
    os.environ.setdefault("JAX_PLATFORMS", a.device)
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
    import jax
    import jax.numpy as jnp
    import optax

    train, test = load_images()
    key = jax.random.PRNGKey(0)

    def linear(key, i, o):
        bound = 1 / math.sqrt(i)
        kw, kb = jax.random.split(key)
        return (jax.random.uniform(kw, (o, i), minval=-bound, maxval=bound),
                jax.random.uniform(kb, (o,), minval=-bound, maxval=bound))

    keys = jax.random.split(key, 6)
    params = {"enc": linear(keys[0], 784, 256), "mu": linear(keys[1], 256, 32),
              "lv": linear(keys[2], 256, 32), "d0": linear(keys[3], 32, 256),
              "d2": linear(keys[4], 256, 784)}
    lin = lambda p, x: x @ p[0].T + p[1]

    def encode(p, x):
        h = jax.nn.relu(lin(p["enc"], x))
        return lin(p["mu"], h), lin(p["lv"], h)

    def decode(p, z):
        return lin(p["d2"], jax.nn.relu(lin(p["d0"], z)))

    def loss_fn(p, x, key):  # the text's vae_loss, BCE in its stable logits form
        mu, logvar = encode(p, x)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        logits = decode(p, z)
        bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x))
        kld = -0.5 * jnp.sum(1 + logvar - mu ** 2 - jnp.exp(logvar))
        return bce + kld

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s, x, key):
        key, sub = jax.random.split(key)
        g = jax.grad(loss_fn)(p, x, sub)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s, key

    if name.startswith("iwae-step-"):
        k = int(name.rsplit("k", 1)[1])
        layers = 2 if name.startswith("iwae-step-2l-") else 1

        if layers == 1:
            def glorot(key, i, o):
                bound = math.sqrt(6 / (i + o))
                return (jax.random.uniform(key, (o, i), minval=-bound, maxval=bound), jnp.zeros(o))

            ks = jax.random.split(key, 8)
            sizes = {"e0": (784, 200), "e1": (200, 200), "mu": (200, 50), "lv": (200, 50),
                     "d0": (50, 200), "d1": (200, 200), "d2": (200, 784)}
            ip = {n: glorot(kk, *io) for kk, (n, io) in zip(ks, sizes.items())}

            def iwae_loss(p, x, key):
                h = jnp.tanh(lin(p["e1"], jnp.tanh(lin(p["e0"], x))))
                mu, lv = lin(p["mu"], h), lin(p["lv"], h)
                eps = jax.random.normal(key, (k,) + mu.shape)
                z = mu + jnp.exp(0.5 * lv) * eps
                logits = lin(p["d2"], jnp.tanh(lin(p["d1"], jnp.tanh(lin(p["d0"], z)))))
                log_px = -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x[None]), -1)
                if k == 1:
                    kl = -0.5 * jnp.sum(1 + lv - mu ** 2 - jnp.exp(lv), -1)
                    return -jnp.mean(log_px[0] - kl)
                log_w = log_px - 0.5 * jnp.sum(z ** 2, -1) + 0.5 * jnp.sum(lv + eps ** 2, -1)
                return -jnp.mean(jax.nn.logsumexp(log_w, 0) - math.log(k))
        else:
            def glorot_mlp(key, *sizes):
                out = []
                for kk, i, o in zip(jax.random.split(key, len(sizes) - 1), sizes, sizes[1:]):
                    bound = math.sqrt(6 / (i + o))
                    out.append((jax.random.uniform(kk, (o, i), minval=-bound, maxval=bound), jnp.zeros(o)))
                return out

            def run(net, h):
                for j, layer in enumerate(net):
                    h = lin(layer, h)
                    if j + 1 < len(net):
                        h = jnp.tanh(h)
                return h

            ks = jax.random.split(key, 4)
            ip = {"q1": glorot_mlp(ks[0], 784, 200, 200, 200), "q2": glorot_mlp(ks[1], 100, 100, 100, 100),
                  "p1": glorot_mlp(ks[2], 50, 100, 100, 200), "px": glorot_mlp(ks[3], 100, 200, 200, 784)}

            def iwae_loss(p, x, key):
                k1, k2 = jax.random.split(key)
                mu1, lv1 = jnp.split(run(p["q1"], x), 2, -1)
                e1 = jax.random.normal(k1, (k,) + mu1.shape)
                z1 = mu1 + jnp.exp(0.5 * lv1) * e1
                mu2, lv2 = jnp.split(run(p["q2"], z1), 2, -1)
                e2 = jax.random.normal(k2, mu2.shape)
                z2 = mu2 + jnp.exp(0.5 * lv2) * e2
                pm, plv = jnp.split(run(p["p1"], z2), 2, -1)
                logits = run(p["px"], z1)
                log_px = -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x[None]), -1)
                ratio1 = jnp.sum(-0.5 * (plv + (z1 - pm) ** 2 * jnp.exp(-plv)) + 0.5 * (lv1 + e1 ** 2), -1)
                if k == 1:
                    kl2 = -0.5 * jnp.sum(1 + lv2 - mu2 ** 2 - jnp.exp(lv2), -1)
                    return -jnp.mean((log_px + ratio1 - kl2)[0])
                log_w = log_px + ratio1 - 0.5 * jnp.sum(z2 ** 2 - lv2 - e2 ** 2, -1)
                return -jnp.mean(jax.nn.logsumexp(log_w, 0) - math.log(k))

        iopt = optax.adam(1e-3, eps=1e-4)

        @jax.jit
        def istep(p, s, x, key):
            key, sub = jax.random.split(key)
            g = jax.grad(iwae_loss)(p, x, sub)
            updates, s = iopt.update(g, s)
            return optax.apply_updates(p, updates), s, key

        xb = jnp.asarray((np.random.default_rng(0).random((20, 784)) < train[:20]).astype(np.float32))
        st = {"p": ip, "s": iopt.init(ip), "k": key}

        def one():
            st["p"], st["s"], st["k"] = istep(st["p"], st["s"], xb, st["k"])
            jax.block_until_ready(st["p"])
        return timed(a.warmup or 100, a.reps or 1000, one), f"one training step of the IWAE paper's {layers}-layer model, batch 20, k = {k}"

    if name == "conv-vae-step-128":
        from jax import lax

        def conv_init(key, o, i, k):
            bound = 1 / math.sqrt(i * k * k)
            kw, kb = jax.random.split(key)
            return (jax.random.uniform(kw, (o, i, k, k), minval=-bound, maxval=bound),
                    jax.random.uniform(kb, (o,), minval=-bound, maxval=bound))

        ks = jax.random.split(key, 9)
        cp = {"c0": conv_init(ks[0], 32, 1, 4), "c1": conv_init(ks[1], 64, 32, 4),
              "e": linear(ks[2], 3136, 256), "mu": linear(ks[3], 256, 32), "lv": linear(ks[4], 256, 32),
              "d0": linear(ks[5], 32, 256), "d1": linear(ks[6], 256, 3136),
              # ConvTranspose2d(in, out): weight [in, out, k, k], bias [out].
              "t0": (conv_init(ks[7], 64, 32, 4)[0], jnp.zeros(32)),
              "t1": (conv_init(ks[8], 32, 1, 4)[0], jnp.zeros(1))}
        dn = ("NCHW", "OIHW", "NCHW")

        def conv(p, x):
            y = lax.conv_general_dilated(x, p[0], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
            return y + p[1][None, :, None, None]

        def deconv(p, x):  # PyTorch's ConvTranspose2d(k 4, stride 2, padding 1): doubles the size
            y = lax.conv_transpose(x, p[0], (2, 2), ((2, 2), (2, 2)),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"), transpose_kernel=True)
            return y + p[1][None, :, None, None]

        def conv_loss(p, x, key):
            h = jax.nn.relu(conv(p["c1"], jax.nn.relu(conv(p["c0"], x.reshape(-1, 1, 28, 28)))))
            h = jax.nn.relu(lin(p["e"], h.reshape(h.shape[0], -1)))
            mu, lv = lin(p["mu"], h), lin(p["lv"], h)
            z = mu + jnp.exp(0.5 * lv) * jax.random.normal(key, mu.shape)
            f = jax.nn.relu(lin(p["d1"], jax.nn.relu(lin(p["d0"], z)))).reshape(-1, 64, 7, 7)
            logits = deconv(p["t1"], jax.nn.relu(deconv(p["t0"], f))).reshape(x.shape[0], -1)
            bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x))
            return bce - 0.5 * jnp.sum(1 + lv - mu ** 2 - jnp.exp(lv))

        @jax.jit
        def cstep(p, s, x, key):
            key, sub = jax.random.split(key)
            g = jax.grad(conv_loss)(p, x, sub)
            updates, s = opt.update(g, s)
            return optax.apply_updates(p, updates), s, key

        xb = jnp.asarray(train[:128])
        st = {"p": cp, "s": opt.init(cp), "k": key}

        def one():
            st["p"], st["s"], st["k"] = cstep(st["p"], st["s"], xb, st["k"])
            jax.block_until_ready(st["p"])
        return timed(a.warmup or 5, a.reps or 50, one), "one conv VAE training step, batch 128"

    if name.startswith("vae-step-") or name == "vae-epoch":
        state = {"p": params, "s": opt.init(params), "k": key}

        def run(x):
            state["p"], state["s"], state["k"] = step(state["p"], state["s"], x, state["k"])

        if name == "vae-epoch":
            rng = np.random.default_rng(0)

            def epoch():
                order = rng.permutation(len(train))
                for i in range(0, len(order), 128):
                    run(jnp.asarray(train[order[i:i + 128]]))
                jax.block_until_ready(state["p"])
            return timed(a.warmup or 1, a.reps or 5, epoch), "one epoch, 9000 digits, batch 128"
        b = int(name.rsplit("-", 1)[1])
        xb = jnp.asarray(train[:b])

        def one():
            run(xb)
            jax.block_until_ready(state["p"])
        return timed(a.warmup or 20, a.reps or 200, one), f"one training step, batch {b}"

    if name == "nll":
        @jax.jit
        def chunk_lse(p, x, mu, logvar, key, k):
            eps = jax.random.normal(key, (k,) + mu.shape)
            z = mu + jnp.exp(0.5 * logvar) * eps
            logits = decode(p, z)
            log_px_z = -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x[None]), -1)
            log_pz_minus_q = -0.5 * jnp.sum(z ** 2 - eps ** 2 - logvar, -1)
            return jax.nn.logsumexp(log_px_z + log_pz_minus_q, 0)

        chunk_lse = jax.jit(chunk_lse.__wrapped__, static_argnums=5)
        x_all = test[: a.images]
        xb0 = jnp.asarray(x_all[:100])
        mu0, lv0 = encode(params, xb0)
        chunk_lse(params, xb0, mu0, lv0, key, 25_000 // xb0.shape[0]).block_until_ready()  # compile

        def nll():
            k_state = key
            for i in range(0, len(x_all), 100):
                xb = jnp.asarray(x_all[i:i + 100])
                mu, logvar = encode(params, xb)
                kc = 25_000 // xb.shape[0]
                lse = np.full(xb.shape[0], -np.inf)
                done = 0
                while done < 5000:
                    k = min(kc, 5000 - done)
                    k_state, sub = jax.random.split(k_state)
                    lse = np.logaddexp(lse, np.asarray(chunk_lse(params, xb, mu, logvar, sub, k), dtype=np.float64))
                    done += k
        return timed(a.warmup, a.reps or 3, nll), f"log p(x), K = 5000, {len(x_all)} test digits"
    if name in ("unet-step-64", "ddim-50", "ddpm-1000", "unet-cifar-step-64", "ddim-50-cifar"):
        return jax_unet_workload(name, a, train, key)
    raise SystemExit(f"jax: workload {name} is not benchmarked")


def jax_unet_workload(name, a, train, key):
    """elbo's U-Net (either layout, as the PyTorch peer) as a pure function of a parameter
    pytree: lax.conv_general_dilated convolutions, GroupNorm, single-head attention over the
    pixels, nearest-neighbour upsampling; the step (loss, grad, optax.adam) jitted whole."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    cifar = "cifar" in name
    if cifar:
        base, mult, groups, in_ch, per, attn_levels, dropout = 32, (1, 2, 2, 2), 32, 3, 2, (1,), 0.1
        shape, compact = (3, 32, 32), False
    else:
        base, mult, groups, in_ch, per, attn_levels, dropout = 16, (1, 2, 2), 8, 1, 1, (), 0.0
        shape, compact = (1, 28, 28), True
    keys = iter(jax.random.split(key, 512))

    def uniform(shape_, fan_in):
        b = 1 / math.sqrt(fan_in)
        return jax.random.uniform(next(keys), shape_, minval=-b, maxval=b)

    conv_p = lambda i, o, k: {"w": uniform((o, i, k, k), i * k * k), "b": uniform((o,), i * k * k)}
    lin_p = lambda i, o: {"w": uniform((o, i), i), "b": uniform((o,), i)}
    norm_p = lambda c: {"g": jnp.ones(c), "b": jnp.zeros(c)}
    temb_dim = 4 * base

    def res_p(i, o):
        p = {"n1": norm_p(i), "c1": conv_p(i, o, 3), "t": lin_p(temb_dim, o), "n2": norm_p(o),
             "c2": conv_p(o, o, 3)}
        if i != o:
            p["skip"] = conv_p(i, o, 1)
        return p

    attn_p = lambda c: {"n": norm_p(c), "qkv": conv_p(c, 3 * c, 1), "proj": conv_p(c, c, 1)}
    # The program: the stages of nets.rs (kind, params, concat, push).
    chans = [m * base for m in mult]
    stages, skips, prev = [], ([] if compact else [base]), base
    for i, c in enumerate(chans):
        for _ in range(per):
            stages.append(("res", {"r": res_p(prev, c), "a": attn_p(c) if i in attn_levels else None},
                           False, True))
            skips.append(c)
            prev = c
        if i + 1 < len(chans):
            stages.append(("down", conv_p(c, c, 3), False, not compact))
            if not compact:
                skips.append(c)
    stages.append(("res", {"r": res_p(prev, prev), "a": attn_p(prev)}, False, False))
    stages.append(("res", {"r": res_p(prev, prev), "a": None}, False, False))
    for i in reversed(range(len(chans))):
        out = (base if i == 0 else chans[i - 1]) if compact else chans[i]
        for _ in range(per + (0 if compact else 1)):
            stages.append(("res", {"r": res_p(prev + skips.pop(), out),
                                   "a": attn_p(out) if i in attn_levels else None}, True, False))
            prev = out
        if i > 0:
            stages.append(("up", conv_p(out, out, 3), False, False))
    params = {"t1": lin_p(base, temb_dim), "t2": lin_p(temb_dim, temb_dim),
              "in": conv_p(in_ch, base, 3), "stages": [st[1] for st in stages],
              "nout": norm_p(prev), "out": conv_p(prev, in_ch, 3)}
    program = [(kind, concat, push) for kind, _, concat, push in stages]
    dn = ("NCHW", "OIHW", "NCHW")

    def conv(p, x, stride=1):
        k = p["w"].shape[-1]
        y = lax.conv_general_dilated(x, p["w"], (stride, stride), ((k // 2, k // 2),) * 2,
                                     dimension_numbers=dn)
        return y + p["b"][None, :, None, None]

    def gnorm(p, x, act):
        b, c, h, w = x.shape
        g = x.reshape(b, groups, -1)
        mu, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
        y = ((g - mu) / jnp.sqrt(var + 1e-5)).reshape(b, c, h, w)
        y = y * p["g"][None, :, None, None] + p["b"][None, :, None, None]
        return jax.nn.silu(y) if act else y

    def res(p, x, temb, key):
        h = conv(p["c1"], gnorm(p["n1"], x, True))
        h = h + (temb @ p["t"]["w"].T + p["t"]["b"])[:, :, None, None]
        h = gnorm(p["n2"], h, True)
        if key is not None and dropout > 0:
            h = jnp.where(jax.random.bernoulli(key, 1 - dropout, h.shape), h / (1 - dropout), 0)
        return conv(p["c2"], h) + (conv(p["skip"], x) if "skip" in p else x)

    def attn(p, x):
        b, c, h, w = x.shape
        qkv = conv(p["qkv"], gnorm(p["n"], x, False)).reshape(b, 3, c, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        att = jax.nn.softmax(jnp.einsum("bci,bcj->bij", q, k) / math.sqrt(c), -1)
        return x + conv(p["proj"], jnp.einsum("bij,bcj->bci", att, v).reshape(b, c, h, w))

    half = base // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)

    def unet(p, x, t, key=None):
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
        lin = lambda q, v: v @ q["w"].T + q["b"]
        temb = jax.nn.silu(lin(p["t2"], jax.nn.silu(lin(p["t1"], emb))))
        h = conv(p["in"], x)
        stack = [] if compact else [h]
        for n, ((kind, concat, push), sp) in enumerate(zip(program, p["stages"])):
            if kind == "res":
                if concat:
                    h = jnp.concatenate([h, stack.pop()], 1)
                h = res(sp["r"], h, temb, None if key is None else jax.random.fold_in(key, n))
                if sp["a"] is not None:
                    h = attn(sp["a"], h)
            elif kind == "down":
                h = conv(sp, h, 2)
            else:
                h = conv(sp, jnp.repeat(jnp.repeat(h, 2, 2), 2, 3))
            if push:
                stack.append(h)
        return conv(p["out"], gnorm(p["nout"], h, True))

    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    abar32 = jnp.asarray(abar, jnp.float32)
    opt = optax.adam(1e-3)

    if name in ("unet-step-64", "unet-cifar-step-64"):
        def loss_fn(p, x0, key):
            kt, ke, kd = jax.random.split(key, 3)
            t = jax.random.randint(kt, (x0.shape[0],), 0, 1000)
            eps = jax.random.normal(ke, x0.shape)
            a_t = abar32[t][:, None, None, None]
            xt = jnp.sqrt(a_t) * x0 + jnp.sqrt(1 - a_t) * eps
            return jnp.mean((unet(p, xt, t, kd) - eps) ** 2)

        @jax.jit
        def step(p, s, x0, key):
            key, sub = jax.random.split(key)
            g = jax.grad(loss_fn)(p, x0, sub)
            updates, s = opt.update(g, s)
            return optax.apply_updates(p, updates), s, key

        if cifar:
            x0 = jnp.clip(jax.random.normal(next(keys), (64,) + shape), -1, 1)
        else:
            x0 = jnp.asarray(train[:64].reshape(64, 1, 28, 28) * 2 - 1)
        st = {"p": params, "s": opt.init(params), "k": key}

        def one():
            st["p"], st["s"], st["k"] = step(st["p"], st["s"], x0, st["k"])
            jax.block_until_ready(st["p"])
        return timed(a.warmup or 3, a.reps or 10, one), "one U-Net training step, batch 64"

    net = jax.jit(unet)
    f = lambda v, i: float(v[i])
    n = 16 if cifar else 64

    def ddim():
        x = jax.random.normal(next(keys), (n,) + shape)
        for i in list(range(0, 1000, 20))[::-1]:
            eps = net(params, x, jnp.full((n,), i))
            a_t, a_prev = f(abar, i), (f(abar, i - 20) if i >= 20 else 1.0)
            x0 = jnp.clip((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t), -1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        jax.block_until_ready(x)

    if name in ("ddim-50", "ddim-50-cifar"):
        return timed(a.warmup or 1, a.reps or 3, ddim), f"DDIM, 50 steps, {n} images"
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)

    def ddpm():
        x = jax.random.normal(next(keys), (n,) + shape)
        k = jax.random.PRNGKey(1)
        for i in reversed(range(1000)):
            eps = net(params, x, jnp.full((n,), i))
            x0 = jnp.clip((x - math.sqrt(1 - f(abar, i)) * eps) / math.sqrt(f(abar, i)), -1, 1)
            mean = f(coef1, i) * x0 + f(coef2, i) * x
            if i > 0:
                k, sub = jax.random.split(k)
                x = mean + math.exp(0.5 * f(post_logvar, i)) * jax.random.normal(sub, x.shape)
            else:
                x = mean
        jax.block_until_ready(x)
    return timed(a.warmup, a.reps or 1, ddpm), f"DDPM, 1000 steps, {n} images"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=["torch", "torch-compile", "jax"])
    ap.add_argument("workload")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    if a.framework == "jax":
        ms, unit = jax_workload(a.workload, a)
    else:
        ms, unit = torch_workload(a.workload, a, compiled=a.framework == "torch-compile")
    print(json.dumps({"workload": a.workload, "framework": a.framework, "unit": unit, "ms": ms}))


if __name__ == "__main__":
    sys.exit(main())
