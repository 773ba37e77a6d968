"""Writes tests/fixtures/diffusers_schedules.json: diffusers' DDPMScheduler arrays at T = 1000
for the linear, scaled_linear and squaredcos_cap_v2 (cosine) beta schedules
(run with bench/.venv/bin/python after `pip install diffusers`).

posterior_variance[t] is DDPMScheduler._get_variance(t) with variance_type="fixed_small"
(clamped by diffusers at 1e-20, so t = 0 reads 1e-20 where the formula gives 0).
"""
import json
import pathlib

from diffusers import DDPMScheduler


def main():
    out = {}
    for name in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        s = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
        out[name] = {
            "betas": s.betas.tolist(),
            "alphas_cumprod": s.alphas_cumprod.tolist(),
            "posterior_variance": [float(s._get_variance(t)) for t in range(1000)],
        }
    path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusers_schedules.json"
    path.write_text(json.dumps(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
