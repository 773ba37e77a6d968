"""Checks `elbo export diffusers`: loads the pipeline folder that
`cargo run --release --example export_check -- DIR` wrote with diffusers' own
`DDPMPipeline.from_pretrained`, runs its UNet2DModel on the inputs elbo ran, and prints the max
abs difference from elbo's output; then runs the pipeline's sampler for a few steps (it must
load and run).

    cargo run --release --example export_check -- /tmp/export-check
    bench/.venv/bin/python bench/check_export_diffusers.py /tmp/export-check
"""
import pathlib
import sys

import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file


def main():
    root = pathlib.Path(sys.argv[1])
    pipe = DDPMPipeline.from_pretrained(root / "pipeline")
    pipe.unet.eval()
    io = load_file(str(root / "elbo_io.safetensors"))
    with torch.no_grad():
        out = pipe.unet(io["x"], io["t"]).sample
    diff = (out - io["out"]).abs().max().item()
    scale = io["out"].abs().max().item()
    print(f"max abs difference {diff:.3e} (max abs output {scale:.3f}); scheduler {pipe.scheduler.config.variance_type}, {pipe.scheduler.config.beta_schedule}")
    pipe.scheduler.set_timesteps(5)
    images = pipe(batch_size=1, num_inference_steps=5, output_type="np").images
    print("sampled", images.shape)
    assert diff < 1e-4 * max(scale, 1.0), diff


if __name__ == "__main__":
    main()
