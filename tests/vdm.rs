//! Continuous time (VDM, `diffusion::vdm`, `engine::vdm`): the bound against closed forms with
//! Gaussian data and the exact predictor, and the training step's gradients with respect to
//! a learned schedule against finite differences, on both engines.

use candle_core::{Device, Tensor};
use elbo::diffusion::Prediction;
use elbo::diffusion::nets::{Net, NetConfig, UnetOptions, sorted_vars};
use elbo::diffusion::vdm::{
    ContinuousTime, Gamma, GammaKind, MonotoneNet, alpha_sigma, diffusion_weight, on_grid, prior_kl,
};
use elbo::distributions::Noise;
use elbo::engine::vdm::{ContinuousBatch, ContinuousStep, DiffusionBatch};
use elbo::engine::{Engine, TrainStep, denoiser_step};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Data N(mu, s^2) per dimension; with sigma^2/alpha^2 = e^gamma the exact predictor
/// E[eps | z] leaves `m(gamma) = E (eps - eps_hat)^2 = s^2 / (s^2 + e^gamma)` per dimension.
const MU: f64 = 0.3;
const S: f64 = 0.5;

fn m(gamma: f64) -> f64 {
    S * S / (S * S + gamma.exp())
}

/// The continuous diffusion term in closed form: 1/2 int_{g0}^{g1} m(g) dg with
/// int m = g - log(s^2 + e^g).
fn continuous_closed_form(g0: f64, g1: f64) -> f64 {
    let f = |g: f64| g - (S * S + g.exp()).ln();
    0.5 * (f(g1) - f(g0))
}

/// The T-step diffusion term, exactly: sum_i T/2 expm1(gamma_i - gamma_{i-1}) m(gamma_i) / T.
fn discrete_exact(gamma: &Gamma, steps: usize) -> f64 {
    (1..=steps)
        .map(|i| {
            let t = i as f64 / steps as f64;
            diffusion_weight(gamma, t, Some(steps)) * m(gamma.value(t)) / steps as f64
        })
        .sum()
}

fn normal(rng: &mut StdRng) -> f64 {
    StandardNormal.sample(rng)
}

fn random_learned(seed: u64) -> Gamma {
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = ContinuousTime {
        gamma: GammaKind::Learned,
        features: 16,
        ..Default::default()
    };
    let mut p = spec.initial_params(|| StandardNormal.sample(&mut rng));
    for b in &mut p[3 + 16..3 + 32] {
        *b = 2.0 * normal(&mut rng);
    }
    Gamma::Learned(MonotoneNet::from_params(&p, 16).unwrap())
}

/// VDM Section 4.1 and the bound itself: with the exact predictor, the continuous bound lies
/// below the T-step bound for every T and above the exact -log p(x) (nats per dimension, in
/// expectation over the data). The continuous term's Monte Carlo estimate (t ~ U(0, 1), the
/// weight 1/2 gamma'(t), the exact predictor on drawn x and eps) agrees with its closed form,
/// and the T-step one's (t on the grid) with the exact sum, within 4 standard errors.
#[test]
fn the_continuous_bound_lies_between_the_exact_nll_and_every_t_step_bound() {
    let entropy = 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * S * S).ln();
    let mut rng = StdRng::seed_from_u64(3);
    for gamma in [
        Gamma::Linear { g0: -13.3, g1: 5.0 },
        Gamma::Cosine { g0: -10.0, g1: 8.0 },
        random_learned(5),
    ] {
        let (g0, g1) = gamma.endpoints();
        // The Gaussian decoder N(x; z_0/alpha_0, e^{gamma_0}): E[-log] = 1/2 log(2 pi e^{g0}) + 1/2.
        let reconstruction = 0.5 * (2.0 * std::f64::consts::PI * g0.exp()).ln() + 0.5;
        // E_x KL(q(z_1|x) || N(0, 1)) by the library's prior term on the data's moments:
        // linear in x^2, so E over x is the KL at x^2 = mu^2 + s^2.
        let prior = prior_kl(&[(MU * MU + S * S).sqrt()], g1).0;
        let continuous = continuous_closed_form(g0, g1);
        let bound = prior + reconstruction + continuous;
        assert!(
            bound > entropy,
            "{gamma:?}: bound {bound} <= entropy {entropy}"
        );
        let mut last = f64::INFINITY;
        let first = discrete_exact(&gamma, 1) - continuous;
        for steps in [1, 2, 5, 20, 100, 1000] {
            let discrete = discrete_exact(&gamma, steps);
            assert!(
                discrete > continuous,
                "{gamma:?} T = {steps}: {discrete} <= {continuous}"
            );
            // More steps, a tighter bound (VDM eq. 16).
            assert!(discrete < last, "{gamma:?} T = {steps}");
            last = discrete;
        }
        // ... and approaches the continuous one (slowest for the cosine schedule, whose
        // gamma' is largest at its ends).
        assert!(
            last - continuous < 0.1 * first,
            "{gamma:?}: {last} vs {continuous}"
        );
        // Monte Carlo with the exact predictor, continuous and 5 steps.
        for steps in [None, Some(5)] {
            let n = 200_000;
            let (mut sum, mut sq) = (0.0, 0.0);
            for _ in 0..n {
                let t = on_grid(rng.random::<f64>(), steps);
                let g = gamma.value(t);
                let (a, s) = alpha_sigma(g);
                let x = MU + S * normal(&mut rng);
                let eps = normal(&mut rng);
                let z = a * x + s * eps;
                let eps_hat = s * (z - a * MU) / (a * a * S * S + s * s);
                let l = diffusion_weight(&gamma, t, steps) * (eps - eps_hat).powi(2);
                sum += l;
                sq += l * l;
            }
            let mean = sum / n as f64;
            let se = ((sq / n as f64 - mean * mean) / n as f64).sqrt();
            let exact = match steps {
                None => continuous,
                Some(k) => discrete_exact(&gamma, k),
            };
            assert!(
                (mean - exact).abs() < 4.0 * se,
                "{gamma:?} {steps:?}: {mean} +- {se} vs {exact}"
            );
        }
    }
}

fn small_unet() -> NetConfig {
    NetConfig::Unet {
        base: 8,
        channel_mult: vec![1, 2],
        groups: 4,
        attention: false,
        in_channels: 1,
        res_blocks: None,
        attention_levels: vec![],
        dropout: 0.0,
        options: UnetOptions::default(),
    }
}

/// A batch of 3 images 1 x 8 x 8 in elbo's [-1, 1] scale with fixed draws.
fn batch(dev: &Device) -> ContinuousBatch {
    let mut noise = Noise::new(11);
    let mut rng = StdRng::seed_from_u64(12);
    let pixels: Vec<f32> = (0..3 * 64)
        .map(|_| rng.random_range(0..256u32) as f32 / 127.5 - 1.0)
        .collect();
    ContinuousBatch {
        x: Tensor::from_vec(pixels, (3, 1, 8, 8), dev).unwrap(),
        t: vec![0.07, 0.41, 0.88],
        eps: noise.randn((3, 1, 8, 8), dev).unwrap(),
        eps0: noise.randn(3 * 64, dev).unwrap().to_vec1::<f32>().unwrap(),
        dropout_seed: None,
    }
}

/// The learned schedule's gradients from one step against central differences: the
/// endpoints' of the bound (the step's loss), the inner shape's of the diffusion term's second
/// moment `1/B sum_b L_d,b^2`; on candle's autodiff and on the fused engine (whose input and
/// time gradients come from its own backward pass), which also agree with each other; for the
/// eps and the v parameterisation (whose target and weight move with gamma too).
#[test]
fn the_learned_schedules_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let features = 4;
    let spec = ContinuousTime {
        gamma: GammaKind::Learned,
        features,
        // The network's time input 1000 (gamma - gamma_min) / (gamma_max - gamma_min) turns
        // slowly with gamma over this wide range (its sinusoids are then smooth on the finite
        // differences' scale); the endpoints start inside it, where every term moves: a
        // coarse z_0 and a z_1 with some signal left.
        gamma_min: -30.0,
        gamma_max: 30.0,
    };
    let mut rng = StdRng::seed_from_u64(4);
    let mut gp = spec.initial_params(|| StandardNormal.sample(&mut rng));
    (gp[0], gp[1]) = (-5.0, 2.0);
    for b in &mut gp[3 + features..3 + 2 * features] {
        *b = StandardNormal.sample(&mut rng);
    }
    let gp32: Vec<f32> = gp.iter().map(|&v| v as f32).collect();
    let (net, varmap) = Net::trainable(&small_unet(), &mut Noise::new(1), &dev).unwrap();
    // A network whose output moves with its input and time as a trained one's does (a fresh
    // one's barely does): the schedule's gradient through x_t and the time input then carries
    // weight beside the one through gamma'.
    for (name, var) in sorted_vars(&varmap) {
        if name.starts_with("conv_out.") {
            var.set(&(var.as_tensor() * 30.0).unwrap()).unwrap();
        }
    }
    let batch = DiffusionBatch::Continuous(batch(&dev));
    for prediction in [Prediction::Eps, Prediction::V] {
        let mut schedule_grads = Vec::new();
        for engine in [Engine::Candle, Engine::Fused] {
            let (inner, _) = denoiser_step(engine, &net, sorted_vars(&varmap), None).unwrap();
            let mut step =
                ContinuousStep::new(inner, spec.clone(), prediction, gp32.clone()).unwrap();
            let params = step.read_params().unwrap();
            let at = params.len() - gp.len();
            let mut grads = vec![0f32; params.len()];
            let mut eval =
                |p: &[f32], grads: &mut [f32]| step.loss_and_grads(p, &batch, 0..3, grads).unwrap();
            let second = |sums: &[f64]| sums[4..].iter().map(|l| l * l).sum::<f64>() / 3.0;
            let _ = eval(&params, &mut grads);
            let got: Vec<f64> = grads[at..].iter().map(|&g| g as f64).collect();
            let mut scratch = vec![0f32; params.len()];
            let mut fds = Vec::with_capacity(gp.len());
            for k in 0..gp.len() {
                // Central differences in f32 parameters (the engines compute in f32).
                let h = 2e-3f32;
                let (mut up, mut down) = (params.clone(), params.clone());
                up[at + k] += h;
                down[at + k] -= h;
                let dh = (up[at + k] - down[at + k]) as f64;
                let (a, b) = (eval(&up, &mut scratch), eval(&down, &mut scratch));
                // Endpoints: the bound's gradient; the rest: the second moment's.
                fds.push(match k {
                    0 | 1 => (a[0] - b[0]) / dh,
                    _ => (second(&a) - second(&b)) / dh,
                });
            }
            for k in 0..2 {
                assert!(
                    (fds[k] - got[k]).abs() < 1e-2 * fds[k].abs(),
                    "{prediction:?} {engine:?} endpoint {k}: finite difference {}, step {}",
                    fds[k],
                    got[k]
                );
            }
            // The second moment is a square of f32 sums: its differences carry rounding noise of a
            // few units, so the shape's gradient is compared as a vector.
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let diff: Vec<f64> = fds[2..].iter().zip(&got[2..]).map(|(a, b)| a - b).collect();
            assert!(
                norm(&diff) < 0.03 * norm(&got[2..]),
                "{prediction:?} {engine:?}: the shape's gradient {:?}, finite differences {:?}",
                &got[2..],
                &fds[2..]
            );
            schedule_grads.push(got);
        }
        for (k, (c, f)) in schedule_grads[0].iter().zip(&schedule_grads[1]).enumerate() {
            assert!(
                (c - f).abs() < 1e-3 * c.abs().max(1.0),
                "{prediction:?} parameter {k}: candle {c}, fused {f}"
            );
        }
    }
}

/// The v parameterisation's step: its per-example diffusion term, computed as
/// 1/2 gamma' alpha^2 ||v - v_hat||^2 against the target v = alpha eps - sigma x, equals
/// 1/2 gamma' ||eps - eps_hat||^2 with eps_hat = sigma z + alpha v_hat computed here by hand
/// from the same network output (the form the evaluation uses).
#[test]
fn the_v_parameterisation_trains_the_same_diffusion_term() {
    use elbo::diffusion::Denoiser;
    use elbo::diffusion::vdm::{encode_level, level_of};
    let dev = Device::Cpu;
    let spec = ContinuousTime::default();
    let (net, varmap) = Net::trainable(&small_unet(), &mut Noise::new(2), &dev).unwrap();
    let b = batch(&dev);
    let (x, eps) = (
        b.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.eps.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let t = b.t.clone();
    let (inner, _) = denoiser_step(Engine::Fused, &net, sorted_vars(&varmap), None).unwrap();
    let mut step = ContinuousStep::new(inner, spec.clone(), Prediction::V, Vec::new()).unwrap();
    let params = step.read_params().unwrap();
    let mut grads = vec![0f32; params.len()];
    let sums = step
        .loss_and_grads(&params, &DiffusionBatch::Continuous(b), 0..3, &mut grads)
        .unwrap();
    let gamma = spec.schedule(&[]).unwrap();
    let mut z = Vec::new();
    let mut c = Vec::new();
    for (e, &te) in t.iter().enumerate() {
        let (a, s) = alpha_sigma(gamma.value(te));
        for i in e * 64..(e + 1) * 64 {
            z.push((a * encode_level(level_of(x[i])) + s * eps[i] as f64) as f32);
        }
        c.push(spec.model_time(gamma.value(te)) as f32);
    }
    let zt = Tensor::from_vec(z.clone(), (3, 1, 8, 8), &dev).unwrap();
    let out = net
        .forward(&zt, &Tensor::from_vec(c, 3, &dev).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (e, &te) in t.iter().enumerate() {
        let (a, s) = alpha_sigma(gamma.value(te));
        let sse: f64 = (e * 64..(e + 1) * 64)
            .map(|i| {
                let eps_hat = s * z[i] as f64 + a * out[i] as f64;
                (eps[i] as f64 - eps_hat).powi(2)
            })
            .sum();
        let want = diffusion_weight(&gamma, te, None) * sse;
        assert!(
            (sums[4 + e] - want).abs() < 1e-4 * want,
            "example {e}: step {} vs {want}",
            sums[4 + e]
        );
    }
}
