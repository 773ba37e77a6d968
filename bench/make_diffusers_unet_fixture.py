"""Writes tests/fixtures/diffusers_ddpm_tiny/ and tests/fixtures/diffusers_ddpm_tiny_io.safetensors:
a DDPM pipeline folder as diffusers' `save_pretrained` writes it (model_index.json, unet/,
scheduler/), its UNet2DModel with google/ddpm-cifar10-32's block layout (DownBlock2D,
AttnDownBlock2D at 16 x 16, two DownBlock2D; the mirrored up blocks; two resnets per level;
mid-block attention; norm_eps 1e-6, flip_sin_to_cos False, freq_shift 1, downsample_padding 0)
at a small width (block_out_channels 8, 16, 16, 16; 4 groups), random weights; and diffusers'
forward of that UNet on a few inputs, for elbo's loader to match.

Run with bench/.venv/bin/python after `pip install torch diffusers safetensors`.
"""
import pathlib
import shutil

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file


def main():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        attention_head_dim=None,
        act_fn="silu",
        mid_block_scale_factor=1,
        center_input_sample=False,
        time_embedding_type="positional",
        resnet_time_scale_shift="default",
        add_attention=True,
    )
    # Random weights away from the initialisation (norms' scales and shifts included), so that
    # a parameter read into the wrong place shows.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unet.eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              variance_type="fixed_small", clip_sample=True,
                              prediction_type="epsilon")
    root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out = root / "diffusers_ddpm_tiny"
    shutil.rmtree(out, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        y = unet(x, t).sample
    save_file({"x": x.contiguous(), "t": t.float().contiguous(), "out": y.contiguous()},
              root / "diffusers_ddpm_tiny_io.safetensors")
    print("wrote", out, "and", root / "diffusers_ddpm_tiny_io.safetensors")
    print("parameters:", sum(p.numel() for p in unet.parameters()))


if __name__ == "__main__":
    main()
