"""Writes tests/fixtures/improved_diffusion_tiny.pt and tests/fixtures/improved_diffusion_tiny.json
with improved-diffusion's own code (openai/improved-diffusion; none of it is committed):

- the checkpoint: a random-weight UNetModel made by `create_model_and_diffusion` with the flags
  in FLAGS (learned variances, the cosine schedule, T = 40, two heads, scale-shift norm), its
  state dict saved by `torch.save` in float16 (a small file; the float32 model below runs the
  rounded weights);
- the network's output at a few (x, t) with t rescaled as the model sees it
  (`rescale_timesteps`: t 1000 / T), in tests/fixtures/improved_diffusion_tiny_io.safetensors;
- the bound of improved-diffusion's `calc_bpd_loop` (clip_denoised=True, as `image_nll.py`) on
  the images of tests/fixtures/diffusers_ddpm_tiny_images/test, R times with different noise:
  per image the mean total in nats and the variance of a one-draw total (the sum over t of the
  terms' variances across the R runs);
- respaced processes (`space_timesteps`, `SpacedDiffusion`) for two `timestep_respacing` values:
  the kept timesteps and the new betas.

Run with a checkout of improved-diffusion on the path:
    git clone https://github.com/openai/improved-diffusion bench/.cache/improved-diffusion
    PYTHONPATH=bench/.cache/improved-diffusion bench/.venv/bin/python bench/make_improved_diffusion_fixture.py
"""
import json
import math
import pathlib

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion import gaussian_diffusion as gd

R = 8
FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    num_heads=2,
    attention_resolutions="16,8",
    learn_sigma=True,
    dropout=0.3,
    diffusion_steps=40,
    noise_schedule="cosine",
)


def main():
    root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    torch.manual_seed(0)
    args = model_and_diffusion_defaults()
    args.update(FLAGS)
    model, diffusion = create_model_and_diffusion(**args)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:  # zero_module's output convolutions
                p.normal_(0.0, 0.05)
            p.copy_(p.half().float())
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, root / "improved_diffusion_tiny.pt")
    params = sum(p.numel() for p in model.parameters())

    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([0, 17, T - 1])
    # What the wrapped model of a (Spaced)GaussianDiffusion gives the network: t 1000 / T.
    model_t = t.float() * (1000.0 / T)
    with torch.no_grad():
        out = model(x, model_t)
    save_file(
        {"x": x.contiguous(), "out": out.contiguous(), "model_t": model_t},
        str(root / "improved_diffusion_tiny_io.safetensors"),
    )
    forward = {"t": t.tolist(), "model_t": model_t.tolist()}

    folder = root / "diffusers_ddpm_tiny_images" / "test" / "0"
    imgs = [np.asarray(Image.open(folder / f"{k}.png").convert("RGB")) for k in range(4)]
    x0 = torch.tensor(np.stack(imgs), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0
    dims = x0[0].numel()
    nats = dims * math.log(2.0)
    runs = []
    for r in range(R):
        torch.manual_seed(100 + r)
        with torch.no_grad():
            res = diffusion.calc_bpd_loop(model, x0, clip_denoised=True)
        runs.append((res["vb"].double() * nats, res["prior_bpd"].double() * nats))
    vb = torch.stack([v for v, _ in runs])  # [R, N, T]
    totals = vb.sum(2) + runs[0][1]
    bound = {
        "images": "diffusers_ddpm_tiny_images/test",
        "clip_denoised": True,
        "runs": R,
        "total_nats": totals.mean(0).tolist(),
        "one_draw_var": vb.var(0).sum(1).tolist(),
        "prior_nats": runs[0][1].tolist(),
        # calc_bpd_loop runs t = T-1 down to 0: L_0 is the last column.
        "l0_nats": vb[:, :, -1].mean(0).tolist(),
    }

    respaced = {}
    base_betas = gd.get_named_beta_schedule(FLAGS["noise_schedule"], T)
    for spacing in ["ddim10", "10,5"]:
        use = space_timesteps(T, spacing)
        sd = SpacedDiffusion(
            use_timesteps=use,
            betas=base_betas,
            model_mean_type=diffusion.model_mean_type,
            model_var_type=diffusion.model_var_type,
            loss_type=diffusion.loss_type,
            rescale_timesteps=True,
        )
        respaced[spacing] = {"timestep_map": sd.timestep_map, "betas": sd.betas.tolist()}
    linear = gd.get_named_beta_schedule("linear", 4000)

    doc = {
        "flags": FLAGS,
        "parameters": params,
        "forward": forward,
        "bound": bound,
        "respaced": respaced,
        "linear_4000_betas_sample": [linear[0], linear[1], linear[1999], linear[3999]],
    }
    (root / "improved_diffusion_tiny.json").write_text(json.dumps(doc))
    # A tiny state dict: the fuzz corpus's seed for the pickle reader (f32, f16, a transposed
    # tensor, a scalar).
    tiny = {
        "a.weight": torch.randn(4, 3, 1),
        "b.bias": torch.randn(5).half(),
        "c.t": torch.arange(6.0).reshape(2, 3).t(),
        "d.scalar": torch.tensor(1.5),
    }
    path = root / "torch_state_dict_tiny.pt"
    torch.save(tiny, path)
    # candle's zip reader refuses the central directory torch 2.15 writes for this small
    # archive (the large one above reads): the same entries rewritten, stored, by zipfile.
    import io
    import zipfile
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    print(f"{params} parameters; bound {bound['total_nats']} nats; one-draw sd {np.sqrt(bound['one_draw_var'])}")


if __name__ == "__main__":
    main()
