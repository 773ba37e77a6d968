//! Learned variances (`elbo::diffusion::learned`, Nichol & Dhariwal 2021): the hybrid and vlb
//! losses' closed-form gradients against candle's autodiff and finite differences, the fused
//! engine's step against candle's, and the bound of a network whose v is pinned.

use candle_core::{D, DType, Device, Tensor, Var};
use elbo::diffusion::learned::{LearnedHead, TrainLoss};
use elbo::diffusion::process::{Decoder, Denoiser, normal_kl, timestep_tensor};
use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
use elbo::distributions::Noise;

const T: usize = 50;

fn process(prediction: Prediction) -> GaussianDiffusion {
    let mut p = GaussianDiffusion::new(Schedule::new(BetaSchedule::Cosine, T).unwrap(), prediction);
    p.variance = Some(VarianceType::LearnedRange);
    p
}

/// 8-bit images in [-1, 1] `[b, 1, 3, 3]`, their x_t, eps and the target, at timesteps `t`.
fn batch(p: &GaussianDiffusion, t: &[usize], seed: u64) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let b = t.len();
    let mut noise = Noise::new(seed);
    let u = noise.rng_uniform((b, 1, 3, 3), &dev).unwrap();
    let x0 = (u * 255.0)
        .unwrap()
        .floor()
        .unwrap()
        .affine(1.0 / 127.5, -1.0)
        .unwrap();
    let eps = noise.randn((b, 1, 3, 3), &dev).unwrap();
    let xt = p.q_sample(&x0, t, &eps).unwrap();
    let target = p.target(&x0, &eps, t).unwrap();
    (x0, xt, target)
}

fn values(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The head over a batch, as the training step runs it: (the batch-mean loss, dL/d(out)).
fn head_loss(
    head: &LearnedHead,
    t: &[usize],
    x0: &Tensor,
    xt: &Tensor,
    target: &Tensor,
    out: &[f32],
) -> (f64, Vec<f32>) {
    let (x0, xt, target) = (values(x0), values(xt), values(target));
    let b = t.len();
    let n = x0.len() / b;
    let mut dy = vec![0f32; out.len()];
    let mut loss = 0.0;
    for (k, &tk) in t.iter().enumerate() {
        let v = k * n..(k + 1) * n;
        let o = 2 * n * k..2 * n * (k + 1);
        loss += head
            .example(
                tk,
                &x0[v.clone()],
                &xt[v.clone()],
                &target[v],
                &out[o.clone()],
                head.vb_weight(1.0),
                1.0 / b as f64,
                &mut dy[o],
            )
            .loss;
    }
    (loss, dy)
}

/// The same loss written with candle's ops from the library's process (p_mean_log_variance,
/// q_posterior, normal_kl), t > 0: mean over each example's values of the squared error
/// (hybrid) plus weight KL / ln 2, the mean detached in hybrid; the batch's mean.
fn candle_loss(
    p: &GaussianDiffusion,
    loss: TrainLoss,
    t: &[usize],
    x0: &Tensor,
    xt: &Tensor,
    target: &Tensor,
    out: &Tensor,
) -> Tensor {
    let c = x0.dim(1).unwrap();
    let pred = out.narrow(1, 0, c).unwrap();
    let raw = out.narrow(1, c, c).unwrap();
    let mean_in = if loss == TrainLoss::Hybrid {
        pred.detach()
    } else {
        pred.clone()
    };
    let frozen = Tensor::cat(&[&mean_in, &raw], 1).unwrap();
    let (mean, lv, _) = p
        .p_mean_log_variance(&frozen, xt, t, VarianceType::LearnedRange, false)
        .unwrap();
    let (qm, qlv) = p.q_posterior_mean_log_variance(x0, xt, t).unwrap();
    let kl = normal_kl(&qm, &qlv, &mean, &lv).unwrap();
    let per = |x: Tensor| x.flatten_from(1).unwrap().mean(D::Minus1).unwrap();
    let weight = if loss == TrainLoss::Hybrid {
        T as f64 / 1000.0
    } else {
        T as f64
    };
    let mut l = (per(kl) * (weight / std::f64::consts::LN_2)).unwrap();
    if loss == TrainLoss::Hybrid {
        l = (l + per((pred - target).unwrap().sqr().unwrap())).unwrap();
    }
    l.mean_all().unwrap()
}

/// For t > 0 the closed-form gradient (and value) equal candle's autodiff of the same loss
/// built from the library's Gaussian formulas, for hybrid (the mean's gradient stopped in
/// L_vlb: the prediction's gradient is the simple loss's alone) and for vlb, and for each
/// prediction type.
#[test]
fn learned_losses_match_candle_autodiff() {
    let dev = Device::Cpu;
    for prediction in [Prediction::Eps, Prediction::V, Prediction::X0] {
        for loss in [TrainLoss::Hybrid, TrainLoss::Vlb] {
            let p = process(prediction);
            let head = LearnedHead::new(&p, loss).unwrap();
            let t = [1, 7, 25, 49];
            let (x0, xt, target) = batch(&p, &t, 1);
            let mut noise = Noise::new(2);
            let out = noise.randn((4, 2, 3, 3), &dev).unwrap();
            // v in (-1, 1), as a trained network gives; the prediction near its target.
            let raw = out.narrow(1, 1, 1).unwrap().tanh().unwrap();
            let pred = (&target + (out.narrow(1, 0, 1).unwrap() * 0.3).unwrap()).unwrap();
            let out = Var::from_tensor(&Tensor::cat(&[&pred, &raw], 1).unwrap()).unwrap();
            let want = candle_loss(&p, loss, &t, &x0, &xt, &target, out.as_tensor());
            let grads = want.backward().unwrap();
            let g = values(grads.get(out.as_tensor()).unwrap());
            let (got, dy) = head_loss(&head, &t, &x0, &xt, &target, &values(out.as_tensor()));
            let want = want.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got - want).abs() < 1e-4 * want.abs(),
                "{prediction:?} {loss:?}: loss {got} vs candle {want}"
            );
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in dy.iter().zip(&g).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-3 * scale + 1e-7,
                    "{prediction:?} {loss:?}: d/d(out)[{i}] {a} vs candle {b} (scale {scale})"
                );
            }
            if loss == TrainLoss::Hybrid {
                // The prediction's gradient is the simple loss's alone: 2 (pred - target) / (B n).
                let (pv, tv) = (values(&pred), values(&target));
                for k in 0..4 {
                    for i in 0..9 {
                        let want = 2.0 * (pv[9 * k + i] - tv[9 * k + i]) / 36.0;
                        assert!((dy[18 * k + i] - want).abs() < 1e-6);
                    }
                }
            }
        }
    }
}

/// At t = 0 (the discretized decoder) the gradient is the loss's central differences, in both
/// losses.
#[test]
fn decoder_term_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    for loss in [TrainLoss::Hybrid, TrainLoss::Vlb] {
        let p = process(Prediction::Eps);
        let head = LearnedHead::new(&p, loss).unwrap();
        let t = [0, 0];
        let (x0, xt, target) = batch(&p, &t, 3);
        let mut noise = Noise::new(4);
        let raw = noise.randn((2, 1, 3, 3), &dev).unwrap().tanh().unwrap();
        let pred = (&target + (noise.randn((2, 1, 3, 3), &dev).unwrap() * 0.05).unwrap()).unwrap();
        let out = values(&Tensor::cat(&[&pred, &raw], 1).unwrap());
        let (_, dy) = head_loss(&head, &t, &x0, &xt, &target, &out);
        // (In hybrid the prediction's gradient is the simple loss's alone, by design, while the
        // value's L_vlb still moves with it: only v's channels are checked there.)
        let checked: &[usize] = if loss == TrainLoss::Hybrid {
            &[9, 13, 17, 27, 31, 35]
        } else {
            &[0, 4, 9, 13, 20, 31]
        };
        for &i in checked {
            let h = 1e-3f32;
            let at = |d: f32| {
                let mut o = out.clone();
                o[i] += d;
                head_loss(&head, &t, &x0, &xt, &target, &o).0
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let a = dy[i] as f64;
            assert!(
                (a - fd).abs() < 2e-3 * fd.abs().max(1e-2),
                "{loss:?} d/d(out)[{i}]: {a} vs finite difference {fd}"
            );
        }
    }
}

/// A network whose v is pinned: raw v = -1 (frac 0) gives exactly the fixed-small bound, every
/// term; raw v = 1 (frac 1) gives the fixed-large bound for every L_t, t >= 1 (at t = 0
/// learned-range's upper end is log beta_0, where fixed-large takes beta~_1: improved-diffusion's
/// conventions).
#[test]
fn pinned_v_gives_the_fixed_variances_bounds() {
    struct Pinned {
        v: f32,
    }
    impl Denoiser for Pinned {
        fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
            // Some prediction that depends on x_t and t.
            let ts = t.to_dtype(DType::F32)?.affine(1e-3, 0.0)?;
            let pred = (xt
                .affine(0.5, 0.1)?
                .broadcast_add(&ts.reshape((ts.dim(0)?, 1, 1, 1))?))?;
            Tensor::cat(&[&pred, &pred.ones_like()?.affine(self.v as f64, 0.0)?], 1)
        }
    }
    struct Plain;
    impl Denoiser for Plain {
        fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
            let ts = t.to_dtype(DType::F32)?.affine(1e-3, 0.0)?;
            xt.affine(0.5, 0.1)?
                .broadcast_add(&ts.reshape((ts.dim(0)?, 1, 1, 1))?)
        }
    }
    let learned = process(Prediction::Eps);
    let mut fixed = learned.clone();
    fixed.variance = None;
    let (x0, _, _) = batch(&learned, &[0, 0, 0], 5);
    let bound = |p: &GaussianDiffusion, m: &dyn Denoiser, v: VarianceType| {
        p.variational_bound(m, &x0, v, Decoder::Discretized, &mut Noise::new(9), || {})
            .unwrap()
    };
    let small = bound(&learned, &Pinned { v: -1.0 }, VarianceType::FixedSmall);
    let want = bound(&fixed, &Plain, VarianceType::FixedSmall);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
    for (a, b) in small.total().iter().zip(want.total()) {
        assert!(close(*a, b), "frac 0: {a} vs fixed-small {b}");
    }
    let large = bound(&learned, &Pinned { v: 1.0 }, VarianceType::FixedSmall);
    let want = bound(&fixed, &Plain, VarianceType::FixedLarge);
    for (la, lb) in large.lt.iter().zip(&want.lt) {
        for (a, b) in la.iter().zip(lb) {
            assert!(close(*a, *b), "frac 1: L_t {a} vs fixed-large {b}");
        }
    }
    assert!(
        large.l0 != want.l0,
        "L_0 takes log beta_0 under learned-range"
    );
    // And the learned variances reach the bound: v = 0 lies between the two.
    let mid = bound(&learned, &Pinned { v: 0.0 }, VarianceType::FixedSmall);
    assert!(mid.total() != small.total());
}

/// The fused U-Net engine's learned-variance step equals candle's (the same loss, L_t and
/// gradients) on one batch.
#[test]
fn fused_and_candle_learned_steps_agree() {
    use elbo::diffusion::nets::{Net, NetConfig, UnetOptions, sorted_vars};
    use elbo::engine::{DenoiseBatch, Engine, denoiser_step};
    let dev = Device::Cpu;
    let cfg = NetConfig::Unet {
        base: 8,
        channel_mult: vec![1, 2],
        groups: 4,
        attention: true,
        in_channels: 1,
        res_blocks: Some(1),
        attention_levels: vec![1],
        dropout: 0.0,
        options: UnetOptions {
            out_channels: 2,
            ..Default::default()
        },
    };
    let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
    let p = process(Prediction::Eps);
    let t = vec![0, 3, 17, 49, 30];
    let mut noise = Noise::new(6);
    let u = noise.rng_uniform((5, 1, 8, 8), &dev).unwrap();
    let x0 = (u * 255.0)
        .unwrap()
        .floor()
        .unwrap()
        .affine(1.0 / 127.5, -1.0)
        .unwrap();
    let eps = noise.randn((5, 1, 8, 8), &dev).unwrap();
    let xt = p.q_sample(&x0, &t, &eps).unwrap();
    let mut batch = DenoiseBatch {
        xt,
        t: t.clone(),
        target: eps,
        dropout_seed: None,
        x0: Some(x0),
        weights: None,
        weighted: None,
    };
    for loss in [TrainLoss::Hybrid, TrainLoss::Vlb] {
        if loss == TrainLoss::Vlb {
            // Importance weights 1 / (T p_t), as the loss-aware sampler gives them.
            batch.weights = Some(vec![0.5, 2.0, 1.0, 0.8, 3.0]);
        }
        let head = || Some(LearnedHead::new(&p, loss).unwrap());
        let run = |engine: Engine| {
            let (mut step, _) = denoiser_step(engine, &net, sorted_vars(&varmap), head()).unwrap();
            let params = step.read_params().unwrap();
            let mut grads = vec![0f32; params.len()];
            let sums = step
                .loss_and_grads(&params, &batch, 0..5, &mut grads)
                .unwrap();
            // By name: the engines lay their buffers out in different orders.
            let named: std::collections::HashMap<String, Vec<f32>> = step
                .table()
                .tensors(&grads, "", &dev)
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, values(&t)))
                .collect();
            (sums, named)
        };
        let (fs, fg) = run(Engine::Fused);
        let (cs, cg) = run(Engine::Candle);
        // [loss, mean L_t, each example's L_t]
        assert_eq!(fs.len(), 2 + 5);
        assert!((fs[2..].iter().sum::<f64>() / 5.0 - fs[1]).abs() < 1e-9 * fs[1]);
        for (a, b) in fs.iter().zip(&cs) {
            assert!(
                (a - b).abs() < 1e-4 * b.abs(),
                "{loss:?} sums {fs:?} vs {cs:?}"
            );
        }
        assert_eq!(fg.len(), cg.len());
        for (name, c) in &cg {
            let f = &fg[name];
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-3 * scale + 1e-7,
                "{loss:?} {name}: max |fused - candle| {err} (scale {scale})"
            );
        }
    }
    let _ = timestep_tensor(&t, &dev).unwrap();
}

/// The exact eps predictor of Gaussian data N(mu, s^2) (per dimension) under a discrete
/// schedule: at step s (the time the network is given), x_t ~ N(sqrt(abar) mu, abar s^2 + 1 -
/// abar) and eps_hat = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar).
struct GaussOracle {
    abar: Vec<f64>,
    mu: [f64; 2],
    s: [f64; 2],
}

impl Denoiser for GaussOracle {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, d) = xt.dims2()?;
        let ts = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let x = xt.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut out = Vec::with_capacity(b * d);
        for (row, &s) in x.iter().zip(&ts) {
            let a = self.abar[s.round() as usize];
            for ((&x, &mu), &s) in row.iter().zip(&self.mu).zip(&self.s) {
                let var = a * s * s + 1.0 - a;
                out.push(((1.0 - a).sqrt() * (x - a.sqrt() * mu) / var) as f32);
            }
        }
        Tensor::from_vec(out, (b, d), xt.device())
    }
}

/// Strided DDPM sampling (`sample diffusion --sampler ddpm --steps K`,
/// `GaussianDiffusion::respaced`): abar is unchanged at the kept steps, and keeping all T gives
/// the full process's betas. With the exact predictor of Gaussian data every step is linear,
/// x' = A x + B + sigma z, so the chain's output is Gaussian with a mean and variance computed
/// in closed form from the respaced schedule: 4,000 samples of 50 of 1,000 steps (fixed-small
/// variances of the respaced process) match them (the mean within 4 standard errors, the
/// standard deviation within 3%; measured 2.6% and 0.7%). The full chain's closed form is the
/// data's to 2% (1.2%: fixed-small's deficit); the strided chain's is narrower still (16% and
/// 8.5% below the data's: fixed variances with few steps, what learned ones correct).
#[test]
fn strided_ddpm_keeps_abar_and_samples_gaussian_data() {
    use elbo::diffusion::sampler::ddpm_sample;
    use elbo::interop::improved_diffusion::space_timesteps;
    let full = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 1000).unwrap(),
        Prediction::Eps,
    );
    let all: Vec<usize> = (0..1000).collect();
    let same = full.respaced(&all).unwrap();
    for (a, b) in same.schedule.betas.iter().zip(&full.schedule.betas) {
        assert!((a - b).abs() < 1e-12);
    }
    let kept = space_timesteps(1000, "50").unwrap();
    assert_eq!(kept.len(), 50);
    let strided = full.respaced(&kept).unwrap();
    for (i, &s) in kept.iter().enumerate() {
        let (a, b) = (
            strided.schedule.alphas_cumprod[i],
            full.schedule.alphas_cumprod[s],
        );
        assert!((a - b).abs() < 1e-12 * b.max(1e-300) + 1e-15, "abar at {s}");
    }
    assert!(strided.respaced(&[3, 2]).is_err());
    let oracle = GaussOracle {
        abar: full.schedule.alphas_cumprod.clone(),
        mu: [0.5, -1.0],
        s: [0.3, 0.8],
    };
    let n = 4000;
    let x_t = Noise::new(1).randn((n, 2), &Device::Cpu).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let x = ddpm_sample(
        &strided,
        &oracle,
        x_t,
        VarianceType::FixedSmall,
        false,
        &mut Noise::new(2),
        &bar,
    )
    .unwrap()
    .to_dtype(DType::F64)
    .unwrap()
    .to_vec2::<f64>()
    .unwrap();
    // The chain's output distribution per dimension, in closed form.
    let closed_form = |p: &GaussianDiffusion, times: &[usize], i: usize| -> (f64, f64) {
        let (mu, s2) = (oracle.mu[i], oracle.s[i] * oracle.s[i]);
        let sc = &p.schedule;
        let (mut m, mut v) = (0.0, 1.0);
        for j in (0..times.len()).rev() {
            let a = oracle.abar[times[j]];
            let k = (1.0 - a).sqrt() / (a * s2 + 1.0 - a);
            let (c1, c2) = (sc.posterior_mean_coef1[j], sc.posterior_mean_coef2[j]);
            let big_a = c1 * (1.0 - (1.0 - a).sqrt() * k) / a.sqrt() + c2;
            let big_b = c1 * (1.0 - a).sqrt() * k * mu;
            let noise = if j > 0 {
                sc.posterior_log_variance_clipped[j].exp()
            } else {
                0.0
            };
            m = big_a * m + big_b;
            v = big_a * big_a * v + noise;
        }
        (m, v.sqrt())
    };
    for i in 0..2 {
        let (fm, fsd) = closed_form(&full, &all, i);
        let (m, sd_want) = closed_form(&strided, &kept, i);
        let col: Vec<f64> = x.iter().map(|r| r[i]).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let sd = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        eprintln!(
            "dimension {i}: mean {mean:.4} (closed form {m:.4}; data {}), sd {sd:.4} (closed form {sd_want:.4}; full chain {fm:.4}, {fsd:.4}; data {})",
            oracle.mu[i], oracle.s[i]
        );
        assert!((fm - oracle.mu[i]).abs() < 0.01 * oracle.s[i]);
        assert!((fsd / oracle.s[i] - 1.0).abs() < 0.02);
        assert!(sd_want < fsd);
        assert!((mean - m).abs() < 4.0 * sd_want / (n as f64).sqrt());
        assert!((sd / sd_want - 1.0).abs() < 0.03);
    }
}
