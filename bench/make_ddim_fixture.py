"""Writes tests/fixtures/diffusers_ddim.json: diffusers' DDIMScheduler (defaults: linear
schedule, T = 1000, clip_sample=True, set_alpha_to_one=True, "leading" spacing) run for 50
steps at eta = 0 from a fixed x_T with the stand-in model eps(x, t) = 0.1 x + t / 2000, for
each prediction type. Run with bench/.venv/bin/python after `pip install diffusers`.
"""
import json
import pathlib

import torch
from diffusers import DDIMScheduler


def main():
    torch.manual_seed(0)
    x_T = torch.randn(4, 3)
    out = {"x_T": x_T.tolist(), "timesteps": None}
    for pred in ["epsilon", "sample", "v_prediction"]:
        s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred)
        s.set_timesteps(50)
        out["timesteps"] = s.timesteps.tolist()
        x = x_T.clone()
        for t in s.timesteps:
            model_output = 0.1 * x + t.item() / 2000.0
            x = s.step(model_output, t, x, eta=0.0).prev_sample
        out[pred] = x.tolist()
    path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusers_ddim.json"
    path.write_text(json.dumps(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
