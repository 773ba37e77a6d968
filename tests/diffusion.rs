//! The mathematics of `elbo::diffusion`: schedules against diffusers, the posterior and its KL,
//! the variational bound against the exact log-likelihood of Gaussian data, and the samplers.

use candle_core::{DType, Device, Tensor};
use elbo::diffusion::process::{
    BoundTerms, discretized_gaussian_log_likelihood, normal_kl, pixel_levels, timestep_tensor,
};
use elbo::diffusion::sampler::{ddim_sample, ddpm_sample};
use elbo::diffusion::{
    BetaSchedule, Decoder, Denoiser, GaussianDiffusion, Prediction, Schedule, VarianceType,
};
use elbo::distributions::{LOG_2PI, Noise};
use indicatif::ProgressBar;

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/diffusers_schedules.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// diffusers computes in float32: ours (f64) must agree to float32 precision, i.e. within a
/// relative 1e-5 (a 1000-step float32 cumulative product drifts by a few 1e-6), plus, for the
/// posterior variance, float32's epsilon (1.2e-7) absolute: diffusers forms it from
/// `1 - abar_t / abar_{t-1}`, a difference of numbers near 1.
#[test]
fn schedules_agree_with_diffusers_ddpm_scheduler() {
    let f = fixture();
    for (ours, theirs) in [
        (BetaSchedule::Linear, "linear"),
        (BetaSchedule::ScaledLinear, "scaled_linear"),
        (BetaSchedule::Cosine, "squaredcos_cap_v2"),
    ] {
        let s = Schedule::new(ours, 1000).unwrap();
        for (name, arr) in [
            ("betas", &s.betas),
            ("alphas_cumprod", &s.alphas_cumprod),
            ("posterior_variance", &s.posterior_variance),
        ] {
            let want: Vec<f64> = f[theirs][name]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(want.len(), 1000);
            let absolute = if name == "posterior_variance" {
                f32::EPSILON as f64
            } else {
                1e-12
            };
            for t in 0..1000 {
                let tol = 1e-5 * want[t].abs() + absolute;
                // diffusers clamps the t = 0 posterior variance (exactly 0) at 1e-20.
                assert!(
                    (arr[t] - want[t]).abs() <= tol.max(1e-19),
                    "{theirs} {name}[{t}]: {} vs {}",
                    arr[t],
                    want[t]
                );
            }
        }
    }
}

#[test]
fn schedule_constants_at_the_last_step() {
    let last = |k| {
        *Schedule::new(k, 1000)
            .unwrap()
            .alphas_cumprod
            .last()
            .unwrap()
    };
    // Values of diffusers' DDPMScheduler(num_train_timesteps=1000), alphas_cumprod[999].
    assert!((last(BetaSchedule::Linear) / 4.035_830e-5 - 1.0).abs() < 1e-5);
    assert!((last(BetaSchedule::ScaledLinear) / 7.334_120e-4 - 1.0).abs() < 1e-5);
    assert!((last(BetaSchedule::Cosine) / 2.428_735e-9 - 1.0).abs() < 1e-4);
    let cos = Schedule::new(BetaSchedule::Cosine, 1000).unwrap();
    assert!(cos.betas.iter().all(|&b| b <= 0.999) && *cos.betas.last().unwrap() == 0.999);
}

fn t1(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap()
}

#[test]
fn kl_is_zero_when_model_mean_is_the_posterior_mean_and_matches_monte_carlo_otherwise() {
    let d = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 1000).unwrap(),
        Prediction::Eps,
    );
    let x0 = t1(&[0.3, -0.5, 0.9]);
    let xt = t1(&[0.1, 0.2, -0.4]);
    let (qm, qlv) = d.q_posterior_mean_log_variance(&x0, &xt, &[500]).unwrap();
    let zero = normal_kl(&qm, &qlv, &qm, &qlv)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(zero, 0.0);
    let pm = (&qm + 0.05).unwrap();
    let plv = (&qlv + 0.3).unwrap();
    let kl = normal_kl(&qm, &qlv, &pm, &plv)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let (qm_v, qlv_v) = (
        qm.to_vec2::<f32>().unwrap()[0].clone(),
        qlv.to_vec2::<f32>().unwrap()[0].clone(),
    );
    let (pm_v, plv_v) = (
        pm.to_vec2::<f32>().unwrap()[0].clone(),
        plv.to_vec2::<f32>().unwrap()[0].clone(),
    );
    let mut noise = Noise::new(1);
    let n = 200_000;
    let eps = noise
        .randn((n, 3), &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let log_n = |x: f64, m: f64, lv: f64| -0.5 * (LOG_2PI + lv + (x - m).powi(2) / lv.exp());
    let samples: Vec<f64> = eps
        .iter()
        .map(|e| {
            (0..3)
                .map(|i| {
                    let x = qm_v[i] as f64 + (0.5 * qlv_v[i] as f64).exp() * e[i] as f64;
                    log_n(x, qm_v[i] as f64, qlv_v[i] as f64)
                        - log_n(x, pm_v[i] as f64, plv_v[i] as f64)
                })
                .sum()
        })
        .collect();
    let mean = samples.iter().sum::<f64>() / n as f64;
    let se =
        (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0) / n as f64)
            .sqrt();
    assert!(
        (mean - kl).abs() < 4.0 * se + 1e-5,
        "closed form {kl} vs Monte Carlo {mean} +- {se}"
    );
}

#[test]
fn discretized_decoder_probabilities_sum_to_one() {
    let levels = pixel_levels();
    for (m, lv) in [
        (0.0f32, -6.0f32),
        (0.37, -2.0),
        (-0.99, -9.0),
        (1.2, 0.5),
        (0.5, -14.0),
    ] {
        let ll = discretized_gaussian_log_likelihood(&levels, &vec![m; 256], &vec![lv; 256]);
        let total: f64 = ll.iter().map(|l| l.exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "mean {m}, log var {lv}: sum {total}"
        );
    }
}

/// The exact eps-predictor for data x_0 ~ N(m, s^2 I): x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar),
/// E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar).
struct GaussianOracle {
    m: f64,
    s2: f64,
    alphas_cumprod: Vec<f64>,
}

impl Denoiser for GaussianOracle {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let t: Vec<f32> = t.to_vec1()?;
        let (b, d) = xt.dims2()?;
        let x = xt.to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(b * d);
        for (row, &ti) in x.iter().zip(&t) {
            let a = self.alphas_cumprod[ti as usize];
            for &v in row {
                out.push(
                    ((1.0 - a).sqrt() * (v as f64 - a.sqrt() * self.m) / (a * self.s2 + 1.0 - a))
                        as f32,
                );
            }
        }
        Tensor::from_vec(out, (b, d), xt.device())
    }
}

fn oracle(d: &GaussianDiffusion, m: f64, s: f64) -> GaussianOracle {
    GaussianOracle {
        m,
        s2: s * s,
        alphas_cumprod: d.schedule.alphas_cumprod.clone(),
    }
}

/// With the optimal denoiser for Gaussian data x_0 ~ N(m, s^2 I) every term of the bound has a
/// closed-form expectation (x_0_hat = E[x_0 | x_t], Var(x_0 | x_t) = s^2 (1 - abar) / (abar s^2 + 1 - abar)):
///
/// ```text
/// E[L_t]   = d/2 coef1_t^2 Var(x_0 | x_t) / beta~_t                 (t >= 1: only the means differ)
/// E[L_0]   = d/2 (log 2 pi sigma_0^2 + Var(x_0 | x_0-step) / sigma_0^2), sigma_0^2 = beta~_1
/// E[L_T]   = d/2 (abar (m^2 + s^2) - abar - log(1 - abar))
/// -log p   = d/2 (log 2 pi s^2 + 1)                                  (on average)
/// ```
///
/// The Monte Carlo bound (500 examples) must match the closed form within 4 standard errors,
/// and lie above the exact NLL. With fixed-small variances the continuous bound is not tight at
/// small t: the measured gap is 0.57 nats per dimension (linear schedule, T = 1000, s = 0.5).
#[test]
fn bound_with_the_optimal_denoiser_matches_its_closed_form_and_exceeds_the_exact_nll() {
    let (m, s) = (0.3f64, 0.5f64);
    let d = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 1000).unwrap(),
        Prediction::Eps,
    );
    let model = oracle(&d, m, s);
    let mut noise = Noise::new(4);
    let (b, dims) = (500, 4);
    let x0 = (noise.randn((b, dims), &Device::Cpu).unwrap() * s)
        .unwrap()
        .affine(1.0, m)
        .unwrap();
    let terms: BoundTerms = d
        .variational_bound(
            &model,
            &x0,
            VarianceType::FixedSmall,
            Decoder::Continuous,
            &mut noise,
            || {},
        )
        .unwrap();
    let totals = terms.total();
    let bound = totals.iter().sum::<f64>() / b as f64;
    let se =
        (totals.iter().map(|x| (x - bound).powi(2)).sum::<f64>() / (b as f64 - 1.0) / b as f64)
            .sqrt();

    let sc = &d.schedule;
    let s2 = s * s;
    let var_x0 = |t: usize| {
        let a = sc.alphas_cumprod[t];
        s2 * (1.0 - a) / (a * s2 + 1.0 - a)
    };
    let half_d = dims as f64 / 2.0;
    let sigma0_2 = sc.posterior_variance[1];
    let mut closed = half_d * ((LOG_2PI + sigma0_2.ln()) + var_x0(0) / sigma0_2);
    for t in 1..sc.len() {
        closed +=
            half_d * sc.posterior_mean_coef1[t].powi(2) * var_x0(t) / sc.posterior_variance[t];
    }
    let a_t = *sc.alphas_cumprod.last().unwrap();
    closed += half_d * (a_t * (m * m + s2) - a_t - (1.0 - a_t).ln());
    let exact = half_d * (LOG_2PI + s2.ln() + 1.0);
    eprintln!("bound {bound:.4} +- {se:.4}, closed form {closed:.4}, exact NLL {exact:.4}");
    assert!(
        (bound - closed).abs() < 4.0 * se,
        "Monte Carlo bound {bound} +- {se} vs closed form {closed}"
    );
    assert!(
        closed > exact && bound > exact,
        "bound {bound} below the exact NLL {exact}"
    );
    let gap_per_dim = (closed - exact) / dims as f64;
    assert!(
        (0.5..0.65).contains(&gap_per_dim),
        "gap per dimension {gap_per_dim}"
    );
}

fn moments(x: &Tensor) -> (f64, f64) {
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

/// DDIM at eta = 0 is a deterministic map of x_T; with the optimal denoiser its samples
/// (and DDPM's) have the data's mean and variance. 4,000 samples: the standard error of the
/// mean is 0.008 and of the variance about 0.0056 here; tolerances are 0.04 and 0.03.
#[test]
fn samplers_with_the_optimal_denoiser_reproduce_the_data_distribution() {
    let (m, s) = (0.3, 0.5);
    let d = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 1000).unwrap(),
        Prediction::Eps,
    );
    let model = oracle(&d, m, s);
    let bar = ProgressBar::hidden();
    let x_t = Noise::new(8).randn((4000, 1), &Device::Cpu).unwrap();
    let a = ddim_sample(
        &d,
        &model,
        x_t.clone(),
        50,
        0.0,
        false,
        &mut Noise::new(1),
        &bar,
    )
    .unwrap();
    let b = ddim_sample(
        &d,
        &model,
        x_t.clone(),
        50,
        0.0,
        false,
        &mut Noise::new(2),
        &bar,
    )
    .unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        diff, 0.0,
        "DDIM eta = 0 must not depend on the noise stream"
    );
    let stochastic = ddim_sample(
        &d,
        &model,
        x_t.clone(),
        50,
        1.0,
        false,
        &mut Noise::new(3),
        &bar,
    )
    .unwrap();
    let moved = (&stochastic - &a)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.1, "DDIM eta = 1 must be stochastic");
    for (name, x) in [
        ("ddim-50", a),
        (
            "ddpm",
            ddpm_sample(
                &d,
                &model,
                x_t,
                VarianceType::FixedSmall,
                false,
                &mut Noise::new(5),
                &bar,
            )
            .unwrap(),
        ),
    ] {
        let (mean, var) = moments(&x);
        assert!((mean - m).abs() < 0.04, "{name}: mean {mean} vs {m}");
        assert!(
            (var - s * s).abs() < 0.03,
            "{name}: variance {var} vs {}",
            s * s
        );
    }
}

/// x0- and v-prediction of the same optimal model recover the same x_0 as eps-prediction.
#[test]
fn prediction_types_are_consistent() {
    let sched = Schedule::new(BetaSchedule::Cosine, 1000).unwrap();
    let eps_d = GaussianDiffusion::new(sched.clone(), Prediction::Eps);
    let mut noise = Noise::new(2);
    let x0 = noise.randn((6, 3), &Device::Cpu).unwrap();
    let eps = noise.randn((6, 3), &Device::Cpu).unwrap();
    let t = [0, 10, 200, 500, 900, 999];
    let xt = eps_d.q_sample(&x0, &t, &eps).unwrap();
    for p in [Prediction::Eps, Prediction::X0, Prediction::V] {
        let d = GaussianDiffusion::new(sched.clone(), p);
        let target = d.target(&x0, &eps, &t).unwrap();
        let back = d.predict_x0(&xt, &t, &target).unwrap();
        let err = (&back - &x0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // eps-prediction divides by sqrt(abar), about 2e4 at t = 999 of the cosine schedule.
        let tol = if p == Prediction::Eps { 5e-2 } else { 1e-5 };
        assert!(err < tol, "{p:?}: x0 recovered with error {err}");
    }
    let _ = timestep_tensor(&t, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
}

/// The MLP denoiser trained briefly (4 epochs of 500 steps, batch 256) on the 8 Gaussians
/// yields DDIM samples whose mean and covariance match the data's. Measured (seed 0): largest
/// error 0.033 for the mean and 0.10 for a covariance entry (the data covariance is about 2 I);
/// tolerances 0.15 and 0.3.
#[test]
fn mlp_trained_on_a_toy_set_matches_its_mean_and_covariance() {
    use elbo::data::toy::Toy;
    use elbo::diffusion::model::{DiffusionConfig, LoadedDiffusion};
    use elbo::diffusion::nets::NetConfig;
    use elbo::train::diffusion::{DiffusionData, DiffusionTrainConfig, train_diffusion};
    let dir = tempfile::tempdir().unwrap();
    let model = DiffusionConfig {
        net: NetConfig::default_mlp(2),
        beta_schedule: BetaSchedule::Linear,
        num_train_timesteps: 1000,
        prediction: Prediction::Eps,
        image_shape: None,
        betas: None,
        model_times: None,
        variance: None,
        continuous: None,
    };
    let config = DiffusionTrainConfig {
        data: DiffusionData::Toy(Toy::EightGaussians),
        epochs: 4,
        batch_size: 256,
        lr: 1e-3,
        ema_decay: 0.99,
        seed: 0,
        toy_steps_per_epoch: 500,
        valid: None,
        train_limit: None,
        test_limit: Some(500),
        sample_steps: 20,
        engine: Default::default(),
        loss: Default::default(),
    };
    let metrics = train_diffusion(model, &config, dir.path(), false, false, &Device::Cpu).unwrap();
    assert_eq!(metrics.len(), 4);
    let m = LoadedDiffusion::load(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let n = 4000;
    let x_t = Noise::new(21).randn((n, 2), &Device::Cpu).unwrap();
    let bar = ProgressBar::hidden();
    let x = ddim_sample(
        &m.process,
        &m.net,
        x_t,
        100,
        0.0,
        false,
        &mut Noise::new(0),
        &bar,
    )
    .unwrap();
    let samples = x.to_vec2::<f32>().unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let data: Vec<Vec<f32>> = Toy::EightGaussians
        .sample(n, &mut rng)
        .chunks(2)
        .map(|c| c.to_vec())
        .collect();
    let stats = |pts: &[Vec<f32>]| {
        let n = pts.len() as f64;
        let mean = [0, 1].map(|i| pts.iter().map(|p| p[i] as f64).sum::<f64>() / n);
        let cov = [(0, 0), (0, 1), (1, 1)].map(|(i, j)| {
            pts.iter()
                .map(|p| (p[i] as f64 - mean[i]) * (p[j] as f64 - mean[j]))
                .sum::<f64>()
                / n
        });
        (mean, cov)
    };
    let ((ms, cs), (md, cd)) = (stats(&samples), stats(&data));
    eprintln!("samples mean {ms:?} cov {cs:?}; data mean {md:?} cov {cd:?}");
    for i in 0..2 {
        assert!(
            (ms[i] - md[i]).abs() < 0.15,
            "mean[{i}]: samples {} vs data {}",
            ms[i],
            md[i]
        );
    }
    for k in 0..3 {
        assert!(
            (cs[k] - cd[k]).abs() < 0.3,
            "cov[{k}]: samples {} vs data {}",
            cs[k],
            cd[k]
        );
    }
}

#[test]
fn unet_maps_images_to_images() {
    use elbo::diffusion::nets::{Net, NetConfig};
    let cfg = NetConfig::Unet {
        base: 8,
        channel_mult: vec![1, 2, 2],
        groups: 4,
        attention: true,
        in_channels: 1,
        res_blocks: None,
        attention_levels: Vec::new(),
        dropout: 0.0,
        options: elbo::diffusion::nets::UnetOptions::default(),
    };
    let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &Device::Cpu).unwrap();
    let x = Noise::new(1).randn((3, 1, 28, 28), &Device::Cpu).unwrap();
    let y = net
        .forward(&x, &timestep_tensor(&[0, 500, 999], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[3, 1, 28, 28]);
    // Every parameter receives a gradient.
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    for (name, var) in elbo::diffusion::nets::sorted_vars(&varmap) {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{name} has no gradient"
        );
    }
}

/// A stand-in network, f(x, t) = 0.1 x + t / 2000, to compare samplers with diffusers.
struct Affine;

impl Denoiser for Affine {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        (xt * 0.1)?.broadcast_add(&(t.unsqueeze(1)? / 2000.0)?)
    }
}

/// DDIM-50 at eta = 0 (clipping x_0 to [-1, 1]) agrees with diffusers' `DDIMScheduler` for
/// each prediction type, run from the same x_T with the same stand-in network
/// (`bench/make_ddim_fixture.py`), to float32 precision.
#[test]
fn ddim_agrees_with_diffusers_ddim_scheduler() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/diffusers_ddim.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect()
    };
    let want_t: Vec<usize> = f["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(elbo::diffusion::sampler::ddim_timesteps(1000, 50), want_t);
    let x_t = Tensor::from_vec(rows(&f["x_T"]), (4, 3), &Device::Cpu).unwrap();
    for (p, key) in [
        (Prediction::Eps, "epsilon"),
        (Prediction::X0, "sample"),
        (Prediction::V, "v_prediction"),
    ] {
        let d = GaussianDiffusion::new(Schedule::new(BetaSchedule::Linear, 1000).unwrap(), p);
        let x = ddim_sample(
            &d,
            &Affine,
            x_t.clone(),
            50,
            0.0,
            true,
            &mut Noise::new(0),
            &ProgressBar::hidden(),
        )
        .unwrap();
        let got = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(rows(&f[key])) {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{key}: {g} vs diffusers {w}"
            );
        }
    }
}

/// The im2col convolution of the U-Net against candle's direct `conv2d`: same output, same
/// gradients with respect to the input, the weight and the bias, for each kernel and stride the
/// U-Net uses (3x3 stride 1, 3x3 stride 2 on odd and even sizes, 1x1).
#[test]
fn im2col_convolution_matches_candle_conv2d_and_its_gradients() {
    use candle_core::{DType, Device, Module, Var};
    use candle_nn::{VarBuilder, VarMap};
    use elbo::nn::modules::conv::Conv2d;
    let dev = Device::Cpu;
    for (c, o, k, stride, size) in [
        (3, 5, 3, 1, 9),
        (4, 4, 3, 2, 7),
        (2, 3, 3, 2, 8),
        (6, 2, 1, 1, 5),
    ] {
        let varmap = VarMap::new();
        let conv = Conv2d::new(
            c,
            o,
            k,
            stride,
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )
        .unwrap();
        let data = varmap.data().lock().unwrap().clone();
        let (w, b) = (&data["weight"], &data["bias"]);
        let x = Var::from_tensor(&Noise::new(3).randn((2, c, size, size), &dev).unwrap()).unwrap();
        // A loss that weighs every output differently, so a misplaced entry shows.
        let y = conv.forward(x.as_tensor()).unwrap();
        let weights = Noise::new(4).randn(y.shape(), &dev).unwrap();
        let grads = weighted_sum_grads(&y, &weights);

        let y_ref = x
            .as_tensor()
            .conv2d(w.as_tensor(), k / 2, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(y.dims(), y_ref.dims());
        let grads_ref = weighted_sum_grads(&y_ref, &weights);
        assert!(
            max_abs_diff(&y, &y_ref) < 1e-5,
            "output, k {k} stride {stride}"
        );
        for (name, v) in [
            ("x", x.as_tensor()),
            ("weight", w.as_tensor()),
            ("bias", b.as_tensor()),
        ] {
            let (g, g_ref) = (grads.get(v).unwrap(), grads_ref.get(v).unwrap());
            let d = max_abs_diff(g, g_ref);
            assert!(
                d < 1e-4,
                "gradient of {name}, k {k} stride {stride}: differs by {d}"
            );
        }
    }
}

/// The fused GroupNorm (alone and followed by SiLU) against candle_nn's GroupNorm (and candle's
/// SiLU): same output and gradients for x, weight and bias.
#[test]
fn fused_group_norm_matches_candle_nn_and_its_gradients() {
    use candle_core::{Device, Module, Var};
    use candle_nn::{VarBuilder, VarMap};
    use elbo::nn::modules::group_norm::GroupNorm;
    let dev = Device::Cpu;
    for (b, c, groups, size) in [(3, 8, 4, 5), (2, 6, 2, 7)] {
        let varmap = VarMap::new();
        let norm = GroupNorm::new(
            groups,
            c,
            1e-5,
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )
        .unwrap();
        let data = varmap.data().lock().unwrap().clone();
        let (w, bias) = (&data["weight"], &data["bias"]);
        w.set(&Noise::new(1).randn(c, &dev).unwrap()).unwrap();
        bias.set(&Noise::new(2).randn(c, &dev).unwrap()).unwrap();
        let x = Noise::new(3).randn((b, c, size, size), &dev).unwrap();
        let x = Var::from_tensor(&(x * 3.0).unwrap().affine(1.0, 0.5).unwrap()).unwrap();
        let reference = candle_nn::GroupNorm::new(
            w.as_tensor().clone(),
            bias.as_tensor().clone(),
            c,
            groups,
            1e-5,
        )
        .unwrap();
        for silu in [false, true] {
            let (y, y_ref) = if silu {
                let y_ref = reference.forward(x.as_tensor()).unwrap().silu().unwrap();
                (norm.forward_silu(x.as_tensor()).unwrap(), y_ref)
            } else {
                let y_ref = reference.forward(x.as_tensor()).unwrap();
                (norm.forward(x.as_tensor()).unwrap(), y_ref)
            };
            let weights = Noise::new(4).randn(y.shape(), &dev).unwrap();
            let grads = weighted_sum_grads(&y, &weights);
            let grads_ref = weighted_sum_grads(&y_ref, &weights);
            assert!(
                max_abs_diff(&y, &y_ref) < 1e-5,
                "output differs (silu {silu})"
            );
            for (name, v) in [
                ("x", x.as_tensor()),
                ("weight", w.as_tensor()),
                ("bias", bias.as_tensor()),
            ] {
                let d = max_abs_diff(grads.get(v).unwrap(), grads_ref.get(v).unwrap());
                assert!(d < 1e-4, "gradient of {name} differs by {d} (silu {silu})");
            }
        }
    }
}

/// Largest |a - b| over all entries.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Gradients of `sum(y * weights)`: a loss that weighs every output differently, so that a
/// misplaced entry in a backward pass shows.
fn weighted_sum_grads(y: &Tensor, weights: &Tensor) -> candle_core::backprop::GradStore {
    (y * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// The fused U-Net engine (`engine::unet`) computes, for a batch of timesteps, the same
/// output, simple loss and gradient of every parameter as candle's autodiff of the same
/// network, to 1e-3 of each gradient's largest entry, for four configurations: the default
/// compact net (28 x 28, attention in the middle); a compact net without attention or 1x1
/// skips; DDPM's CIFAR-10 layout at base width 8 on 3 x 32 x 32 (two blocks per level,
/// attention at 16 x 16, dropout 0.1 with the same masks on both paths); DDPM's layout on
/// 28 x 28 (odd sizes 7 -> 4 and back, attention at the lowest level). Every parameter is
/// perturbed off its initial value so that GroupNorm's scale and shift are not the identity.
/// The middle attention's query bias is also checked against central finite differences of
/// the loss (candle_nn's `softmax_last_dim` has no backward pass; a network built on it got
/// no gradient there).
#[test]
fn fused_unet_matches_candle_autodiff_and_finite_differences() {
    use elbo::diffusion::nets::{Net, NetConfig, sorted_vars};
    use elbo::engine::unet::FusedUnet;
    let dev = Device::Cpu;
    let configs = [
        (NetConfig::default_unet(), (1, 28, 28), None),
        (
            NetConfig::Unet {
                base: 8,
                channel_mult: vec![1, 1],
                groups: 2,
                attention: false,
                in_channels: 1,
                res_blocks: None,
                attention_levels: Vec::new(),
                dropout: 0.0,
                options: elbo::diffusion::nets::UnetOptions::default(),
            },
            (1, 28, 28),
            None,
        ),
        (NetConfig::ddpm_cifar10(8, 3), (3, 32, 32), Some(11u64)),
        (
            NetConfig::Unet {
                base: 8,
                channel_mult: vec![1, 2, 2],
                groups: 4,
                attention: false,
                in_channels: 1,
                res_blocks: Some(1),
                attention_levels: vec![2],
                dropout: 0.0,
                options: elbo::diffusion::nets::UnetOptions::default(),
            },
            (1, 28, 28),
            None,
        ),
        // diffusers' DDPM checkpoints: sines first, frequency shift 1, eps 1e-6, "SAME"
        // downsampling (zeros after the image: 28 -> 14 -> 7).
        (
            NetConfig::Unet {
                base: 8,
                channel_mult: vec![1, 2, 2],
                groups: 4,
                attention: true,
                in_channels: 3,
                res_blocks: Some(1),
                attention_levels: vec![1],
                dropout: 0.0,
                options: elbo::diffusion::nets::UnetOptions {
                    flip_sin_to_cos: false,
                    freq_shift: 1,
                    norm_eps: 1e-6,
                    downsample_padding: 0,
                    ..Default::default()
                },
            },
            (3, 28, 28),
            None,
        ),
        // improved-diffusion's: scale-shift norm, two heads down and in the middle, four up.
        (
            NetConfig::Unet {
                base: 8,
                channel_mult: vec![1, 2],
                groups: 4,
                attention: true,
                in_channels: 3,
                res_blocks: Some(1),
                attention_levels: vec![1],
                dropout: 0.0,
                options: elbo::diffusion::nets::UnetOptions {
                    heads: 2,
                    heads_up: 4,
                    scale_shift: true,
                    ..Default::default()
                },
            },
            (3, 12, 12),
            None,
        ),
    ];
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (index, (cfg, (c, h, w), seed)) in configs.into_iter().enumerate() {
        let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
        let mut noise = Noise::new(7);
        for (_, var) in sorted_vars(&varmap) {
            let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.1).unwrap();
            var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
        }
        let Net::Unet(unet) = &net else {
            unreachable!()
        };
        let b = 5;
        let x = noise.randn((b, c, h, w), &dev).unwrap();
        let target = noise.randn((b, c, h, w), &dev).unwrap();
        let t = timestep_tensor(&[0, 17, 250, 600, 999], &dev).unwrap();
        let candle_loss = |unet: &elbo::diffusion::nets::UNet| {
            let out = match seed {
                Some(s) => unet.forward_dropout(&x, &t, s).unwrap(),
                None => unet.forward_candle(&x, &t).unwrap(),
            };
            let loss = (&out - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            (out, loss)
        };
        let (out, loss) = candle_loss(unet);
        let grads = loss.backward().unwrap();

        let fused = FusedUnet::new(unet).unwrap();
        // Winograd F(2x2, 3x3) in every stride-1 3x3 convolution (the default keeps it for
        // 128 channels and more): the same forward pass, input VJP and training gradients as
        // the row-shift gemms, to float32 rounding.
        let wino = FusedUnet::with_winograd(unet, 1).unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 2e-5 * scale + 1e-7,
                "config {index}, Winograd {what}: {err:e} of {scale:e}"
            );
        };
        close(
            &values(&wino.forward(&x, &t).unwrap()),
            &values(&fused.forward(&x, &t).unwrap()),
            "forward",
        );
        let probe = vec![noise.randn(out.shape(), &dev).unwrap()];
        let (a, b) = (
            wino.vjp(&x, &t, &probe).unwrap(),
            fused.vjp(&x, &t, &probe).unwrap(),
        );
        close(&values(&a.1[0]), &values(&b.1[0]), "input VJP");
        let step = |f: &FusedUnet| {
            f.loss_and_grads(&values(&x), &values(&t), &values(&target), (h, w), seed)
                .unwrap()
        };
        let ((la, ga), (lb, gb)) = (step(&wino), step(&fused));
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "config {index}, Winograd loss {la} vs {lb}"
        );
        let n = fused.num_params();
        close(&ga[..n], &gb[..n], "gradient");
        if seed.is_none() {
            assert!(max_abs_diff(&fused.forward(&x, &t).unwrap(), &out) < 1e-4);
        } else {
            // Dropout changes the training pass only.
            let eval = unet.forward_candle(&x, &t).unwrap();
            assert!(max_abs_diff(&fused.forward(&x, &t).unwrap(), &eval) < 1e-4);
            assert!(max_abs_diff(&eval, &out) > 1e-3, "dropout dropped nothing");
        }
        // The input's vector-Jacobian products (the ODE's divergence), two cotangents through
        // one forward pass, against candle's autodiff of the same network.
        let v: Vec<Tensor> = (0..2)
            .map(|_| noise.randn(out.shape(), &dev).unwrap())
            .collect();
        let (y, dx) = fused.vjp(&x, &t, &v).unwrap();
        let (y_ref, dx_ref) = elbo::diffusion::process::Denoiser::vjp(&net, &x, &t, &v).unwrap();
        assert!(max_abs_diff(&y, &y_ref) < 1e-4);
        for (got, want) in dx.iter().zip(&dx_ref) {
            let scale = values(want).iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = max_abs_diff(got, want);
            assert!(
                scale > 1e-3 && err <= 1e-3 * scale,
                "config {index}: input VJP max |fused - candle| = {err:e}, max |candle| = {scale:e}"
            );
        }
        let (fused_loss, flat) = fused
            .loss_and_grads(&values(&x), &values(&t), &values(&target), (h, w), seed)
            .unwrap();
        let reference = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (fused_loss - reference).abs() < 1e-5 * reference,
            "{fused_loss} vs {reference}"
        );
        // The flat gradient by name, through the engine's parameter table.
        let table = fused.table(&sorted_vars(&varmap)).unwrap();
        let store: std::collections::HashMap<String, Tensor> = table
            .tensors(&flat[..table.len()], "", &dev)
            .unwrap()
            .into_iter()
            .collect();
        for (name, var) in sorted_vars(&varmap) {
            let want = grads.get(var.as_tensor()).expect(&name);
            let got = store.get(&name).expect(&name);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_abs_diff(got, want);
            assert!(
                err <= 1e-3 * scale + 1e-7,
                "config {index}, {name}: max |fused - candle| = {err:e}, max |candle| = {scale:e}"
            );
            if index == 0 && name == "mid.attn.qkv.bias" {
                // dL/db_q by central differences, h = 1e-2, for the first query channels.
                let (analytic, mut v) = (values(got), values(var.as_tensor()));
                for i in 0..3 {
                    let mut at = |d: f32| {
                        v[i] += d;
                        var.set(&Tensor::new(v.as_slice(), &dev).unwrap()).unwrap();
                        v[i] -= d;
                        candle_loss(unet).1.to_scalar::<f32>().unwrap() as f64
                    };
                    let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
                    let a = analytic[i] as f64;
                    assert!(
                        a.abs() > 1e-5 && (fd - a).abs() < 0.05 * a.abs(),
                        "query bias {i}: finite difference {fd:e}, analytic {a:e}"
                    );
                }
                var.set(&Tensor::new(v.as_slice(), &dev).unwrap()).unwrap();
            }
        }
    }
}

/// DDPM's CIFAR-10 U-Net at base width 32 (`NetConfig::ddpm_cifar10`) has the parameters of
/// its PyTorch twin in `bench/peers.py` (the DDPM-layout `UNet` there, 2,245,763 parameters
/// counted by PyTorch): the same count, the state_dict names a PyTorch `ModuleList` gives.
#[test]
fn ddpm_cifar10_unet_has_the_pytorch_peers_parameters() {
    use elbo::diffusion::nets::{Net, NetConfig, sorted_vars};
    let cfg = NetConfig::ddpm_cifar10(32, 3);
    assert_eq!(cfg.parameter_count(), Some(2_245_763));
    let (_, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &Device::Cpu).unwrap();
    let names: Vec<String> = sorted_vars(&varmap).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 304);
    for name in [
        "down.0.res.1.conv2.weight",
        "down.1.attn.1.qkv.weight",
        "down.2.downsample.weight",
        "mid.attn.proj_out.bias",
        "up.3.res.2.conv_shortcut.weight",
        "up.1.attn.2.norm.weight",
        "up.1.upsample.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing");
    }
}

/// `--t-samples K` (`eval::bound_sampled`), stratified and importance-sampled (`--t-sampling`):
/// the estimate of each example's bound is unbiased, and its spread falls as 1/sqrt(K). On 1,000
/// 2-D points under a random MLP denoiser (T = 100): the per-point difference between the
/// estimate and the exact sum (over every t, other draws of x_t) has a mean within 4 standard
/// errors of 0 for six seeds at K = 5 and K = 20, and pooled over the seeds at K = 20 (where the
/// standard error is small enough that a 5% bias of the sum over t fails: planted once, it
/// does); its spread at K = 5 is at least 1.4 times that at K = 20 (2 for pure t-sampling; the
/// x_t draws of both add the same floor).
#[test]
fn sampled_timesteps_estimate_the_bound_without_bias() {
    use elbo::diffusion::nets::{Net, NetConfig};
    use elbo::diffusion::process::TSampling;
    use elbo::eval::{bound_sampled, bound_terms};
    let dev = Device::Cpu;
    let process = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 100).unwrap(),
        Prediction::Eps,
    );
    let (net, _) = Net::trainable(&NetConfig::default_mlp(2), &mut Noise::new(3), &dev).unwrap();
    let x = (Noise::new(4).randn((1000, 2), &dev).unwrap() * 0.5).unwrap();
    let opts = elbo::diffusion::process::BoundOptions {
        variance: VarianceType::FixedSmall,
        decoder: Decoder::Continuous,
        clip_denoised: false,
    };
    let exact = bound_terms(&process, &net, &x, opts, 1000, 0, &|| {}).unwrap();
    // (spread, mean difference, its standard error) of one estimate against the exact sum.
    let stats = |k: usize, seed: u64, sampling: TSampling| -> (f64, f64, f64) {
        let est = bound_sampled(&process, &net, &x, k, sampling, opts, 1000, seed, &|| {}).unwrap();
        let d: Vec<f64> = est
            .totals
            .iter()
            .zip(&exact.totals)
            .map(|(a, b)| a - b)
            .collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let z = mean / (sd / n.sqrt());

        assert!(
            z.abs() < 4.0,
            "K = {k}, {sampling:?}, seed {seed}: mean difference {mean} (z = {z})"
        );
        (sd, mean, sd / n.sqrt())
    };
    let sum_lt: f64 = exact.lt.iter().sum();
    for sampling in [TSampling::Stratified, TSampling::Importance] {
        let (mut sd5, mut sd20) = (0.0, 0.0);
        let (mut means, mut var) = (0.0, 0.0);
        let seeds = 6;
        for seed in 1..=seeds {
            sd5 += stats(5, seed, sampling).0;
            let (sd, mean, se) = stats(20, seed, sampling);
            sd20 += sd;
            means += mean;
            var += se * se;
        }
        // Pooled over the seeds at K = 20: unbiased within 4 standard errors, and sensitive
        // enough that a 5% bias of the sum over t (about 0.6 nats of 12.3) would not pass.
        let (mean, se) = (means / seeds as f64, var.sqrt() / seeds as f64);
        eprintln!(
            "{sampling:?}: pooled mean difference {mean:.3} +- {se:.3} nats (sum over t {sum_lt:.2})"
        );
        assert!(
            (mean / se).abs() < 4.0,
            "{sampling:?}: pooled bias {mean} (se {se})"
        );
        assert!(
            4.0 * se < 0.05 * sum_lt,
            "{sampling:?}: too noisy to see a 5% bias: se {se}"
        );
        eprintln!(
            "{sampling:?}: spread at K = 5: {sd5:.3}, at K = 20: {sd20:.3} (sums over {seeds} seeds)"
        );
        assert!(
            sd5 > 1.4 * sd20,
            "{sampling:?}: spread at K = 5: {sd5}, at K = 20: {sd20}"
        );
    }
}

/// DDPM's CIFAR-10 U-Net (base width 32, four levels down to 4 x 4, attention at 16 x 16,
/// two blocks per level) with Winograd in every stride-1 3x3 convolution against the row-shift
/// gemms: the same loss and gradient of one training step of two examples, to float32
/// rounding.
#[test]
fn winograd_trains_ddpms_cifar10_unet_as_the_gemms_do() {
    use elbo::diffusion::nets::{Net, NetConfig};
    use elbo::engine::unet::FusedUnet;
    let dev = Device::Cpu;
    let (net, _) =
        Net::trainable(&NetConfig::ddpm_cifar10(32, 3), &mut Noise::new(3), &dev).unwrap();
    let Net::Unet(unet) = &net else {
        unreachable!()
    };
    let mut noise = Noise::new(4);
    let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let x = values(noise.randn((2, 3, 32, 32), &dev).unwrap());
    let target = values(noise.randn((2, 3, 32, 32), &dev).unwrap());
    let t = [30f32, 700.0];
    let step = |f: FusedUnet| {
        let n = f.num_params();
        let (l, g) = f.loss_and_grads(&x, &t, &target, (32, 32), None).unwrap();
        (l, g[..n].to_vec())
    };
    let (lw, gw) = step(FusedUnet::with_winograd(unet, 1).unwrap());
    let (lg, gg) = step(FusedUnet::with_winograd(unet, usize::MAX).unwrap());
    assert!((lw - lg).abs() <= 1e-5 * lg, "loss {lw} vs {lg}");
    let scale = gg.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = gw
        .iter()
        .zip(&gg)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-4 * scale,
        "gradient: max difference {err:e} of {scale:e}"
    );
}

/// The U-Net's FLOP count (`bench/run`'s "% of peak") against a count made from the checkpoint's
/// tensors alone: each convolution weight `[O, C, k, k]` costs its size per pixel of the
/// resolution its name places it at (`down.i` and `up.i` at level i, 28 / 2^i rounded up;
/// `down.i.downsample` writes level i + 1, `up.i.upsample` level i - 1, `mid` the last), each
/// linear weight its size once, and attention `2 C n^2` for its two products.
#[test]
fn unet_flop_count_matches_the_tensors_at_their_resolutions() {
    use elbo::diffusion::nets::{Net, NetConfig, sorted_vars};
    use elbo::engine::unet::FusedUnet;
    let dev = Device::Cpu;
    let cfg = NetConfig::default_unet();
    let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
    let Net::Unet(unet) = &net else {
        unreachable!()
    };
    let fused = FusedUnet::new(unet).unwrap();
    let side = |level: usize| (28usize).div_ceil(1 << level);
    let pixels = |level: usize| (side(level) * side(level)) as f64;
    let mut macs = 0.0;
    // The layers whose dx a training step skips: conv_in and the time MLP's first layer.
    let mut data_layers = 0.0;
    for (name, var) in sorted_vars(&varmap) {
        let dims = var.dims().to_vec();
        let size = dims.iter().product::<usize>() as f64;
        let level = |prefix: &str| -> usize {
            name.strip_prefix(prefix)
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let at = if name.starts_with("down.") {
            level("down.") + usize::from(name.contains("downsample"))
        } else if name.starts_with("up.") {
            level("up.") - usize::from(name.contains("upsample"))
        } else if name.starts_with("mid.") {
            2
        } else {
            0
        };
        match dims.len() {
            4 => macs += size * pixels(at),
            2 => macs += size,
            _ => {}
        }
        match name.as_str() {
            "conv_in.weight" => data_layers += size * pixels(0),
            "time_embedding.linear_1.weight" => data_layers += size,
            _ => {}
        }
        if name.ends_with("attn.qkv.weight") {
            macs += 2.0 * (dims[0] / 3) as f64 * pixels(at) * pixels(at);
        }
    }
    let flops = fused.forward_flops((28, 28));
    assert!(
        (flops - 2.0 * macs).abs() < 1e-9 * flops,
        "counted {flops}, the tensors give {}",
        2.0 * macs
    );
    let step = 3.0 * 2.0 * macs - 2.0 * data_layers;
    let train = fused.train_flops((28, 28));
    assert!(
        (train - step).abs() < 1e-9 * train,
        "step {train}, expected {step}"
    );
}
