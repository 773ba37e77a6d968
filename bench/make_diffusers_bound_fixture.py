"""Writes tests/fixtures/diffusers_ddpm_tiny_images/ (four 32 x 32 colour images in an image
folder, both splits) and tests/fixtures/diffusers_ddpm_tiny_bound.json: the variational bound
of the pipeline in tests/fixtures/diffusers_ddpm_tiny on those images, computed here with
diffusers' UNet2DModel forward and DDPMScheduler arrays and the bound written from its
formulas (Ho et al. 2020, eq. 5; improved-diffusion's `_vb_terms_bpd` / `calc_bpd_loop`):

    L_0     = -log p(x_0 | x_1), the discretized Gaussian decoder (exact normal CDF)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  t = 2..T, x_t ~ q(x_t | x_0)
    L_T     = KL(q(x_T | x_0) || N(0, I))

with p's variance the posterior's (fixed_small; log-variance clipped at t = 1 as theirs), the
predicted x_0 as the network gives it, and again clipped to [-1, 1] (improved-diffusion's
`clip_denoised`, elbo's `--clip-denoised`; `*_clipped` in the file). Each term is averaged over R draws of x_t; the file keeps, per
image, the total (nats) and the variance of a one-draw estimate of it (the sum over t of the
terms' variances), so that a one-draw estimate (elbo's) can be compared within its error.

Run with bench/.venv/bin/python after make_diffusers_unet_fixture.py.
"""
import json
import math
import pathlib

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

R = 8


def main():
    root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    pipe = root / "diffusers_ddpm_tiny"
    unet = UNet2DModel.from_pretrained(pipe / "unet").eval()
    sched = DDPMScheduler.from_pretrained(pipe / "scheduler")
    rng = np.random.default_rng(0)
    # Smooth colour images with noise, as 8-bit pixels.
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = []
    for k in range(4):
        base = np.stack([np.sin(xx / (3 + k)) , np.cos(yy / (4 + k)), np.sin((xx + yy) / (5 + k))], -1)
        u8 = np.clip((base * 0.4 + 0.5 + 0.1 * rng.standard_normal(base.shape)) * 255, 0, 255).round().astype(np.uint8)
        imgs.append(u8)
        for split in ["train", "test"]:
            d = root / "diffusers_ddpm_tiny_images" / split / "0"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(u8).save(d / f"{k}.png")
    x0 = torch.tensor(np.stack(imgs), dtype=torch.float64).permute(0, 3, 1, 2) / 127.5 - 1.0
    n = x0.shape[0]
    betas = sched.betas.double()
    T = len(betas)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_lv = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    c0 = betas * abar_prev.sqrt() / (1 - abar)
    ct = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    def kl(m1, lv1, m2, lv2):
        return 0.5 * (lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2) - 1)

    def ndtr(z):
        return 0.5 * torch.erfc(-z / math.sqrt(2))

    def term_of(t, x0_pred, xt):
        mean = c0[t] * x0_pred + ct[t] * xt
        lv = post_lv[t]
        if t == 0:
            # Discretized Gaussian over the 256 levels, edges at +-1 open.
            inv = torch.exp(-0.5 * lv)
            hi = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), inv * (x0 - mean + 1 / 255))
            lo = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), inv * (x0 - mean - 1 / 255))
            p = torch.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
            return -torch.log(p.clamp(min=1e-300)).flatten(1).sum(1)
        qm = c0[t] * x0 + ct[t] * xt
        return kl(qm, post_lv[t], mean, lv).flatten(1).sum(1)

    gen = torch.Generator().manual_seed(1)
    mean_terms = {c: torch.zeros(n, T, dtype=torch.float64) for c in (False, True)}
    var_terms = {c: torch.zeros(n, T, dtype=torch.float64) for c in (False, True)}
    with torch.no_grad():
        for t in range(T):
            vals = {False: [], True: []}
            for _ in range(R):
                eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
                xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
                tt = torch.full((n,), t)
                out = unet(xt.float(), tt).sample.double()
                x0_raw = (xt - (1 - abar[t]).sqrt() * out) / abar[t].sqrt()
                for clip in (False, True):
                    x0_pred = x0_raw.clamp(-1, 1) if clip else x0_raw
                    vals[clip].append(term_of(t, x0_pred, xt))
            for clip in (False, True):
                v = torch.stack(vals[clip])
                mean_terms[clip][:, t] = v.mean(0)
                var_terms[clip][:, t] = v.var(0, unbiased=True)
    prior_m = abar[-1].sqrt() * x0
    prior = kl(prior_m, torch.log(1 - abar[-1]), torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)
    out = {"images": n, "draws_per_term": R}
    for clip, suffix in ((False, ""), (True, "_clipped")):
        total = mean_terms[clip].sum(1) + prior
        out["total_nats" + suffix] = total.tolist()
        out["one_draw_variance" + suffix] = var_terms[clip].sum(1).tolist()
        out["l0" + suffix] = mean_terms[clip][:, 0].tolist()
        out["bpd" + suffix] = (total.mean() / (3 * 32 * 32 * math.log(2))).item()
    out["l_prior"] = prior.tolist()
    (root / "diffusers_ddpm_tiny_bound.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ["total_nats", "bpd", "total_nats_clipped", "bpd_clipped"]}))


if __name__ == "__main__":
    main()
