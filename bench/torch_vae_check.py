#!/usr/bin/env python3
"""Check elbo's VAE numbers without trusting elbo: rebuild any elbo VAE checkpoint as a plain
PyTorch module from its safetensors file and the config stored in it, load the weights with
`load_state_dict(strict=True)` (so the tensor names and shapes are exactly those of the
PyTorch module's state_dict), and compute the test set's -ELBO (K = 1 sample, with each layer's
KL as elbo computes it) and the importance-sampled NLL with K samples.

    bench/.venv/bin/python bench/torch_vae_check.py CHECKPOINT --mnist ../shared/data/mnist \
        [--k 5000] [--limit N] [--binarize dynamic|static|none] [--seed 0]

Prints one JSON object. The binarization is drawn with NumPy, not elbo's generator, so the
numbers agree with `elbo eval vae` within their standard errors, not to the digit.
"""

import argparse
import gzip
import json
import math
import struct

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}
LOG_2PI = math.log(2 * math.pi)


def mlp(sizes, act, linear_last):
    """Linear, act, Linear, act, ... (and a final Linear when `linear_last`)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes) or not linear_last:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class GaussianMLP(nn.Module):
    """x -> hidden -> (mean, log-variance): `net`, `fc_mu`, `fc_logvar`."""

    def __init__(self, sizes, out, act):
        super().__init__()
        self.net = mlp(sizes, act, linear_last=False)
        self.fc_mu = nn.Linear(sizes[-1], out)
        self.fc_logvar = nn.Linear(sizes[-1], out)

    def forward(self, x):
        h = self.net(x)
        return self.fc_mu(h), self.fc_logvar(h)


class OneLayer(nn.Module):
    """The state_dict layout of one stochastic layer (the text's SimpleVAE when 784-256-32)."""

    def __init__(self, d, hidden, latent, act, out):
        super().__init__()
        self.encoder = mlp([d] + hidden, act, linear_last=False)
        self.fc_mu = nn.Linear(([d] + hidden)[-1], latent)
        self.fc_logvar = nn.Linear(([d] + hidden)[-1], latent)
        self.decoder = mlp([latent] + hidden[::-1] + [out], act, linear_last=True)

    def q(self, l, x):
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def logits(self, z):
        return self.decoder(z)


class Residual(nn.Module):
    """h + conv2(act(conv1(act(h)))), 3x3 convolutions."""

    def __init__(self, c, act):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.act = ACTIVATIONS[act]()

    def forward(self, h):
        return h + self.conv2(self.act(self.conv1(self.act(h))))


class ConvVAE(nn.Module):
    """elbo's convolutional VAE: stride-2 4x4 convolutions (with residual blocks), an MLP to
    the heads; the decoder mirrors it with transposed convolutions."""

    def __init__(self, shape, conv, hidden, latent, act, out_channels):
        super().__init__()
        c, h, w = shape["channels"], shape["height"], shape["width"]
        chans, n = conv["channels"], len(conv["channels"])
        self.shape, self.residual = (c, h, w), conv["residual"]
        self.features = (chans[-1], h >> n, w >> n)
        feat = chans[-1] * (h >> n) * (w >> n)
        self.encoder = nn.Module()
        self.encoder.conv = nn.ModuleList(
            nn.Conv2d(ci, co, 4, 2, 1) for ci, co in zip([c] + chans[:-1], chans)
        )
        if self.residual:
            self.encoder.res = nn.ModuleList(Residual(co, act) for co in chans)
        self.encoder.mlp = mlp([feat] + hidden, act, linear_last=False)
        self.fc_mu = nn.Linear(([feat] + hidden)[-1], latent)
        self.fc_logvar = nn.Linear(([feat] + hidden)[-1], latent)
        self.decoder = nn.Module()
        self.decoder.mlp = mlp([latent] + hidden[::-1] + [feat], act, linear_last=True)
        rev = chans[::-1]
        if self.residual:
            self.decoder.res = nn.ModuleList(Residual(ci, act) for ci in rev)
        self.decoder.deconv = nn.ModuleList(
            nn.ConvTranspose2d(ci, co, 4, 2, 1) for ci, co in zip(rev, rev[1:] + [out_channels])
        )
        self.act = ACTIVATIONS[act]()

    def q(self, l, x):
        lead = x.shape[:-1]
        h = x.reshape((-1,) + self.shape)
        for j, conv in enumerate(self.encoder.conv):
            h = self.act(conv(h))
            if self.residual:
                h = self.encoder.res[j](h)
        h = self.encoder.mlp(h.flatten(1))
        return self.fc_mu(h).reshape(lead + (-1,)), self.fc_logvar(h).reshape(lead + (-1,))

    def logits(self, z):
        lead = z.shape[:-1]
        x = self.act(self.decoder.mlp(z.reshape(-1, z.shape[-1])).reshape((-1,) + self.features))
        for j, deconv in enumerate(self.decoder.deconv):
            if self.residual:
                x = self.decoder.res[j](x)
            x = deconv(x)
            if j + 1 < len(self.decoder.deconv):
                x = self.act(x)
        return x.flatten(1).reshape(lead + (-1,))


class Hierarchy(nn.Module):
    """encoder.{l} = q(z_{l+1}|z_l); decoder.0.net = p(x|z_1); decoder.{l} = p(z_l|z_{l+1})."""

    def __init__(self, d, hidden, latents, act, out):
        super().__init__()
        below = [d] + latents[:-1]
        self.encoder = nn.ModuleList(
            GaussianMLP([below[l]] + hidden[l], latents[l], act) for l in range(len(latents))
        )
        first = nn.Module()
        first.net = mlp([latents[0]] + hidden[0][::-1] + [out], act, linear_last=True)
        self.decoder = nn.ModuleList(
            [first]
            + [
                GaussianMLP([latents[l]] + hidden[l][::-1], latents[l - 1], act)
                for l in range(1, len(latents))
            ]
        )

    def q(self, l, x):
        return self.encoder[l](x)

    def p(self, l, z):
        return self.decoder[l](z)

    def logits(self, z):
        return self.decoder[0].net(z)


def gaussian_log_prob(z, mu, lv):
    return -0.5 * (LOG_2PI + lv + (z - mu) ** 2 * torch.exp(-lv)).sum(-1)


def discretized_logistic(x, mean, log_scale):
    """Per-value log-probabilities of 8-bit levels x in [0, 1] (PixelCNN++), written the plain
    way: differences of the logistic CDF, the edge bins taking the tails."""
    xc = (2 * x - 1).expand_as(mean)
    inv_s = torch.exp(-log_scale.clamp(min=-7.0))
    cdf_up = torch.sigmoid((xc + 1 / 255 - mean) * inv_s)
    cdf_low = torch.sigmoid((xc - 1 / 255 - mean) * inv_s)
    p = torch.where(xc < -0.999, cdf_up, torch.where(xc > 0.999, 1 - cdf_low, cdf_up - cdf_low))
    return torch.log(p.double().clamp(min=1e-30)).float()


def log_weights(model, cfg, x, k, gen):
    """log w [k, B] and per layer the KL estimate as elbo reports it ([k, B] each), plus
    log p(x|z_1) [k, B]."""
    layers = len(cfg["latent_dims"])
    inp, samples, qs = x, [], []
    for l in range(layers):
        mu, lv = model.q(l, inp)
        eps = torch.randn((k,) + tuple(mu.shape[-2:]) if l == 0 else mu.shape, generator=gen)
        z = mu + torch.exp(0.5 * lv) * eps
        samples.append(z)
        qs.append((mu, lv))
        inp = z
    logits = model.logits(samples[0])
    d = x.shape[-1]
    if cfg["likelihood"] == "bernoulli":
        log_px_z = (x * logits - nn.functional.softplus(logits)).sum(-1)
    elif cfg["likelihood"] == "logistic" and cfg.get("mixtures", 1) > 1:
        m = cfg["mixtures"]
        parts = logits.reshape(logits.shape[:-1] + (3, m, d))
        log_pi = torch.log_softmax(parts[..., 0, :, :], -2)
        per = discretized_logistic(x.unsqueeze(-2), parts[..., 1, :, :], parts[..., 2, :, :])
        log_px_z = torch.logsumexp(log_pi + per, -2).sum(-1)
    elif cfg["likelihood"] == "logistic":
        log_px_z = discretized_logistic(x, logits[..., :d], logits[..., d:]).sum(-1)
    else:
        lv = model.obs_log_var if cfg.get("obs_log_var") is None else torch.tensor(cfg["obs_log_var"])
        log_px_z = gaussian_log_prob(x, torch.sigmoid(logits), lv)
    log_w, kls = log_px_z.clone(), []
    for l in range(layers):
        z, (mu, lv) = samples[l], qs[l]
        log_q = gaussian_log_prob(z, mu, lv)
        if l + 1 == layers:
            log_p = -0.5 * (LOG_2PI + z**2).sum(-1)
            kl = -0.5 * (1 + lv - mu**2 - torch.exp(lv)).sum(-1)
            kls.append(kl.expand_as(log_q))
        else:
            pm, plv = model.p(l + 1, samples[l + 1])
            log_p = gaussian_log_prob(z, pm, plv)
            kls.append(log_q - log_p)
        log_w = log_w + log_p - log_q
    return log_w, kls, log_px_z


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051, f"{path}: not an IDX image file"
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(n, rows * cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--mnist", required=True, help="folder with t10k-images-idx3-ubyte.gz")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--binarize", default="dynamic", choices=["dynamic", "static", "none"])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with safe_open(args.checkpoint, "pt") as f:
        cfg = json.loads(f.metadata()["elbo.config"])
    if "latent_dims" not in cfg:  # checkpoints from before the VAE family
        cfg["latent_dims"], cfg["hidden"] = [cfg["latent_dim"]], [[cfg["hidden_dim"]]]
    act, d = cfg.get("activation", "relu"), cfg["input_dim"]
    mixtures = cfg.get("mixtures", 1)
    out = d * ((3 * mixtures if mixtures > 1 else 2) if cfg["likelihood"] == "logistic" else 1)
    if cfg.get("conv"):
        shape = cfg["image_shape"]
        out_channels = shape["channels"] * (2 if cfg["likelihood"] == "logistic" else 1)
        model = ConvVAE(shape, cfg["conv"], cfg["hidden"][0], cfg["latent_dims"][0], act, out_channels)
    elif len(cfg["latent_dims"]) == 1:
        model = OneLayer(d, cfg["hidden"][0], cfg["latent_dims"][0], act, out)
    else:
        model = Hierarchy(d, cfg["hidden"], cfg["latent_dims"], act, out)
    state = load_file(args.checkpoint)
    if "obs_log_var" in state:
        model.obs_log_var = nn.Parameter(torch.zeros(1))
    model.load_state_dict(state, strict=True)
    model.eval()

    images = read_idx_images(f"{args.mnist}/t10k-images-idx3-ubyte.gz")[: args.limit]
    x_all = images.astype(np.float32) / 255.0
    rng = np.random.default_rng(args.seed)
    if args.binarize == "dynamic":
        x_all = (rng.random(x_all.shape, dtype=np.float32) < x_all).astype(np.float32)
    elif args.binarize == "static":
        x_all = (x_all > 0.5).astype(np.float32)
    gen = torch.Generator().manual_seed(args.seed)
    log_px, neg_elbo, kl_layers = [], [], []
    with torch.no_grad():
        for start in range(0, len(x_all), args.batch):
            x = torch.from_numpy(x_all[start : start + args.batch])
            lse = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
            for done in range(0, args.k, 500):
                kc = min(500, args.k - done)
                log_w, _, _ = log_weights(model, cfg, x, kc, gen)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w.double(), 0))
            log_px.append(lse - math.log(args.k))
            log_w, kls, log_px_z = log_weights(model, cfg, x, 1, gen)
            kl = torch.stack([k_[0] for k_ in kls])  # [L, B]
            neg_elbo.append((kl.sum(0) - log_px_z[0]).double())
            kl_layers.append(kl.double())
    log_px = torch.cat(log_px)
    n = len(log_px)
    out = {
        "checkpoint": args.checkpoint,
        "n": n,
        "iw_samples": args.k,
        "neg_elbo": float(torch.cat(neg_elbo).mean()),
        "kl_layers": [float(v) for v in torch.cat(kl_layers, 1).mean(1)],
        "nll": float(-log_px.mean()),
        "nll_stderr": float(log_px.std(unbiased=True) / math.sqrt(n)),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
