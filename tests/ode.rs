//! The probability-flow ODE likelihood (`elbo::diffusion::ode`) against closed forms: Gaussian
//! data x ~ N(mu, diag(s^2)) with the exact noise predictor of each schedule, whose marginal at
//! t = eps is Gaussian with a known density.

use candle_core::{DType, Device, Tensor};
use elbo::diffusion::ode::{ContinuousSchedule, OdeOptions, Probe, Rk45, log_likelihood};
use elbo::diffusion::process::{BoundOptions, Decoder, Denoiser};
use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
use elbo::distributions::Noise;

const MU: [f64; 3] = [0.5, -1.0, 0.2];
const S: [f64; 3] = [0.3, 0.8, 1.5];

/// The exact predictor of Gaussian data: at abar, x ~ N(sqrt(abar) mu, abar s^2 + 1 - abar),
/// eps_hat = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar), given as `prediction`.
struct Oracle {
    sched: ContinuousSchedule,
    t_max: usize,
    prediction: Prediction,
}

impl Oracle {
    /// abar at the network's time input s: step s of T, or a continuous-time model's
    /// `s = 1000 (gamma - gamma_min) / (gamma_max - gamma_min)`.
    fn abar(&self, s: f64) -> f64 {
        match &self.sched {
            ContinuousSchedule::Gamma(m) => {
                let g = m.spec.gamma_min + s * (m.spec.gamma_max - m.spec.gamma_min) / 1000.0;
                1.0 / (1.0 + g.exp())
            }
            _ => self.sched.log_abar(s / (self.t_max - 1) as f64).exp(),
        }
    }
}

impl Denoiser for Oracle {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, d) = xt.dims2()?;
        let ts = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut scale = Vec::with_capacity(b * d);
        let mut shift = Vec::with_capacity(b * d);
        let mut sig = Vec::with_capacity(b * d);
        let mut sab = Vec::with_capacity(b * d);
        for &s in &ts {
            let abar = self.abar(s);
            for i in 0..d {
                let var = abar * S[i] * S[i] + 1.0 - abar;
                let a = (1.0 - abar).sqrt() / var;
                scale.push(a as f32);
                shift.push((-a * abar.sqrt() * MU[i]) as f32);
                sig.push((1.0 - abar).sqrt() as f32);
                sab.push(abar.sqrt() as f32);
            }
        }
        let dev = xt.device();
        let v = |v: Vec<f32>| Tensor::from_vec(v, (b, d), dev);
        let (scale, shift, sig, sab) = (v(scale)?, v(shift)?, v(sig)?, v(sab)?);
        // Built from xt with tensor ops, so autodiff sees the Jacobian.
        let eps = ((xt * &scale)? + &shift)?;
        match self.prediction {
            Prediction::Eps => Ok(eps),
            Prediction::X0 => (xt - (&eps * &sig)?)?.div(&sab),
            Prediction::V => {
                let x0 = (xt - (&eps * &sig)?)?.div(&sab)?;
                (&eps * &sab)? - (x0 * &sig)?
            }
        }
    }
}

fn process(kind: BetaSchedule, prediction: Prediction) -> GaussianDiffusion {
    GaussianDiffusion::new(Schedule::new(kind, 1000).unwrap(), prediction)
}

fn oracle(p: &GaussianDiffusion) -> Oracle {
    Oracle {
        sched: ContinuousSchedule::new(p),
        t_max: p.num_timesteps(),
        prediction: p.prediction,
    }
}

/// Points from the marginal at t = eps and the model's exact log-density there: the flow maps
/// the Gaussian marginal at eps onto the one at t = 1 affinely, x_1 = m_1 + sqrt(v_1 / v_eps)
/// (x - m_eps) per dimension, and the model's density is N(0, I) at x_1 times that Jacobian
/// (the data's own density at eps differs from it by the prior's mismatch at t = 1: abar_1 > 0).
fn points(p: &GaussianDiffusion, eps: f64, n: usize, seed: u64) -> (Tensor, Vec<f64>) {
    points_on(&ContinuousSchedule::new(p), eps, n, seed)
}

fn points_on(cs: &ContinuousSchedule, eps: f64, n: usize, seed: u64) -> (Tensor, Vec<f64>) {
    let abar = cs.log_abar(eps).exp();
    let abar1 = cs.log_abar(1.0).exp();
    let mut noise = Noise::new(seed);
    let z = noise
        .randn((n, 3), &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut xs = Vec::new();
    let mut logp = Vec::new();
    for row in z {
        let mut lp = 0.0;
        for i in 0..3 {
            let (m, var) = (abar.sqrt() * MU[i], abar * S[i] * S[i] + 1.0 - abar);
            let x = (m + var.sqrt() * row[i] as f64) as f32;
            xs.push(x);
            let (m1, var1) = (abar1.sqrt() * MU[i], abar1 * S[i] * S[i] + 1.0 - abar1);
            let x1 = m1 + (var1 / var).sqrt() * (x as f64 - m);
            lp += -0.5 * ((2.0 * std::f64::consts::PI).ln() + x1 * x1) + 0.5 * (var1 / var).ln();
        }
        logp.push(lp);
    }
    (Tensor::from_vec(xs, (n, 3), &Device::Cpu).unwrap(), logp)
}

fn opts(probe: Probe) -> OdeOptions {
    // score_sde's tolerances; tighter ones do not help here: the network's float32 evaluations
    // limit the answer to about 1e-3 nats.
    let tol = 1e-5;
    OdeOptions {
        solver: Rk45 {
            rtol: tol,
            atol: tol,
            max_evals: 100_000,
        },
        eps: 1e-5,
        probe,
    }
}

/// With the exact divergence, the ODE log-likelihood equals the model's analytic log-density
/// to 1e-3 nats per dimension, for the linear and cosine schedules.
#[test]
fn ode_likelihood_of_gaussian_data_is_exact() {
    for kind in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        let p = process(kind, Prediction::Eps);
        let (x, want) = points(&p, 1e-5, 16, 1);
        let (got, nfe) =
            log_likelihood(&p, &oracle(&p), &x, opts(Probe::Exact), &mut Noise::new(2)).unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{kind:?}: max |ODE - analytic| = {worst:.2e} nats over 3 dimensions, {nfe} evaluations"
        );
        assert!(worst < 3e-3, "{kind:?}: {worst}");
        // The tolerance is the solver's: a looser one gives a coarser answer.
    }
}

/// eps, x_0 and v predictions of one underlying model give the same likelihood.
#[test]
fn every_prediction_type_gives_the_same_likelihood() {
    let base = process(BetaSchedule::Linear, Prediction::Eps);
    let (x, _) = points(&base, 1e-5, 8, 3);
    let mut results = Vec::new();
    for pred in [Prediction::Eps, Prediction::X0, Prediction::V] {
        let p = process(BetaSchedule::Linear, pred);
        let (lp, _) =
            log_likelihood(&p, &oracle(&p), &x, opts(Probe::Exact), &mut Noise::new(2)).unwrap();
        results.push(lp);
    }
    for (k, r) in results.iter().enumerate().skip(1) {
        for (a, b) in r.iter().zip(&results[0]) {
            assert!((a - b).abs() < 1e-3, "prediction {k}: {a} vs {b}");
        }
    }
}

/// Hutchinson's estimator (Rademacher and Gaussian probes) is unbiased: over 200 points the
/// mean difference from the exact divergence's likelihood is within 3 standard errors; and the
/// variational bound of the same predictor lies above the exact negative log-likelihood.
#[test]
fn hutchinson_estimates_agree_and_the_bound_lies_above() {
    let p = process(BetaSchedule::Linear, Prediction::Eps);
    let (x, want) = points(&p, 1e-5, 200, 5);
    let o = oracle(&p);
    let (exact, _) = log_likelihood(&p, &o, &x, opts(Probe::Exact), &mut Noise::new(2)).unwrap();
    for probe in [Probe::Rademacher, Probe::Gaussian] {
        let (est, _) = log_likelihood(&p, &o, &x, opts(probe), &mut Noise::new(7)).unwrap();
        let d: Vec<f64> = est.iter().zip(&exact).map(|(a, b)| a - b).collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        eprintln!(
            "{probe:?}: mean difference {mean:.4} +- {:.4} (spread {sd:.3})",
            sd / n.sqrt()
        );
        if probe == Probe::Gaussian {
            // (Rademacher probes give the exact trace of this diagonal Jacobian.)
            assert!(sd > 1e-3, "{probe:?}: the estimator should vary");
        }
        assert!(mean.abs() < 3.0 * sd / n.sqrt() + 1e-3, "{probe:?}: {mean}");
    }
    // The bound (continuous decoder) of the same predictor on the same points, in nats: above
    // the exact NLL on average (it bounds -log p(x_0) from above).
    let bound_opts = BoundOptions {
        variance: VarianceType::FixedSmall,
        decoder: Decoder::Continuous,
        clip_denoised: false,
    };
    let terms = p
        .variational_bound_with(&o, &x, bound_opts, &mut Noise::new(9), || {})
        .unwrap();
    let bound = terms.total().iter().sum::<f64>() / 200.0;
    let nll = -want.iter().sum::<f64>() / 200.0;
    let ode = -exact.iter().sum::<f64>() / 200.0;
    eprintln!("bound {bound:.4}, ODE NLL {ode:.4}, analytic NLL {nll:.4} nats");
    assert!(bound > ode, "bound {bound} vs ODE {ode}");
}

/// The dequantized likelihood by hand: 8-bit values on [-1, 1] in three dimensions, two draws
/// of U; `eval::ode_likelihood` draws U first from `derive_seed(seed, 7, batch)` (the exact
/// divergence draws nothing more), so the same draws give the analytic model density of each
/// dequantized point, whose mean over the draws it must equal.
#[test]
fn dequantized_likelihood_matches_a_hand_computation() {
    use elbo::distributions::derive_seed;
    let p = process(BetaSchedule::Linear, Prediction::Eps);
    let o = oracle(&p);
    // Levels k = 100, 130, 200 etc.: x = k / 127.5 - 1.
    let levels = [[100f32, 130.0, 200.0], [0.0, 255.0, 64.0]];
    let x: Vec<f32> = levels.iter().flatten().map(|k| k / 127.5 - 1.0).collect();
    let x = Tensor::from_vec(x, (2, 3), &Device::Cpu).unwrap();
    let run = elbo::eval::OdeRun {
        ode: opts(Probe::Exact),
        probes: 1,
        repeats: 2,
        dequantize: true,
    };
    let got = elbo::eval::ode_likelihood(&p, None, &o, &x, run, 2, 11, &|| {}).unwrap();
    let cs = ContinuousSchedule::new(&p);
    let (abar, abar1) = (cs.log_abar(1e-5).exp(), cs.log_abar(1.0).exp());
    let mut noise = Noise::new(derive_seed(11, 7, 0));
    let mut want = [0.0f64; 2];
    for _ in 0..2 {
        let u = noise
            .rng_uniform((2, 3), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (row, lv) in levels.iter().enumerate() {
            let mut lp = 0.0;
            for i in 0..3 {
                let xd = (2.0 * (lv[i] + u[row][i]) / 256.0 - 1.0) as f64;
                let (m, var) = (abar.sqrt() * MU[i], abar * S[i] * S[i] + 1.0 - abar);
                let (m1, var1) = (abar1.sqrt() * MU[i], abar1 * S[i] * S[i] + 1.0 - abar1);
                let x1 = m1 + (var1 / var).sqrt() * (xd - m);
                lp +=
                    -0.5 * ((2.0 * std::f64::consts::PI).ln() + x1 * x1) + 0.5 * (var1 / var).ln();
            }
            want[row] -= lp / 2.0;
        }
    }
    for (g, w) in got.totals.iter().zip(want) {
        assert!((g - w).abs() < 3e-3, "{g} vs {w}");
    }
    assert_eq!(got.solves, 2);
    // The reported bits/dim add D ln 128 (the [-1, 1] scaling and the 256 bins): 7 bits/dim.
    assert!((elbo::eval::bits_per_dim(3.0 * 128f64.ln(), 3) - 7.0).abs() < 1e-12);
}

/// A U-Net as the commands run it (`engine::FrozenNet`: forward and vector-Jacobian products
/// on the fused engine, its backward pass computing dx only) against candle's autodiff of the
/// bare network: on 2 x 2 images (4 dimensions) the exact-divergence likelihoods agree within
/// 1e-2 nats at rtol = atol = 1e-6 (at score_sde's 1e-5 the two solves take other steps, and
/// both are about 0.16 nats from the converged value for this random network). The bound is
/// the solver's, not the network's: measured, candle's own solve moves by 3.8e-3 nats from
/// rtol 1e-6 to 1e-7, and changes in the last bits of the forward pass (a softmax summed in 16
/// lanes instead of one) move the two solves apart by 3e-4 to 2.2e-3; the network's
/// vector-Jacobian products themselves are checked to float32 precision in
/// `tests/diffusion.rs`. Hutchinson's
/// estimate agrees with the exact divergence within 3 standard errors over 16 images. (A
/// forward pass outside the autodiff, with no VJP of its own, would give every model the same
/// likelihood: its Jacobian would read as zero.)
#[test]
fn unet_likelihood_differentiates_the_network() {
    use elbo::diffusion::nets::{Net, NetConfig, UnetOptions, sorted_vars};
    let dev = Device::Cpu;
    let cfg = NetConfig::Unet {
        base: 8,
        channel_mult: vec![1],
        groups: 4,
        attention: true,
        in_channels: 1,
        res_blocks: Some(1),
        attention_levels: vec![],
        dropout: 0.0,
        options: UnetOptions::default(),
    };
    let (_, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
    let mut noise = Noise::new(1);
    for (_, var) in sorted_vars(&varmap) {
        let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.02).unwrap();
        var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
    }
    // Frozen copies of the weights (what a loaded checkpoint holds).
    let tensors: std::collections::HashMap<String, Tensor> = sorted_vars(&varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let bare = Net::build(&cfg, vb).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let frozen = elbo::engine::FrozenNet::new(Net::build(&cfg, vb).unwrap());
    let p = process(BetaSchedule::Linear, Prediction::Eps);
    let x = (Noise::new(3).randn((16, 1, 2, 2), &dev).unwrap() * 0.5).unwrap();
    let tight = OdeOptions {
        solver: Rk45 {
            rtol: 1e-6,
            atol: 1e-6,
            max_evals: 100_000,
        },
        ..opts(Probe::Exact)
    };
    let (c, _) = log_likelihood(&p, &bare, &x, tight, &mut Noise::new(2)).unwrap();
    let (f, _) = log_likelihood(&p, &frozen, &x, tight, &mut Noise::new(2)).unwrap();
    for (u, v) in c.iter().zip(&f) {
        assert!((u - v).abs() < 1e-2, "{u} vs {v}");
    }
    let (a, _) = log_likelihood(&p, &frozen, &x, opts(Probe::Exact), &mut Noise::new(2)).unwrap();
    let (h, _) =
        log_likelihood(&p, &frozen, &x, opts(Probe::Rademacher), &mut Noise::new(5)).unwrap();
    let d: Vec<f64> = h.iter().zip(&a).map(|(u, v)| u - v).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    eprintln!(
        "U-Net: Hutchinson - exact = {mean:.4} +- {:.4} (spread {sd:.4})",
        sd / n.sqrt()
    );
    assert!(sd > 1e-3, "the network's Jacobian must reach the estimate");
    assert!(mean.abs() < 3.0 * sd / n.sqrt(), "{mean} (sd {sd})");
    // The fused engine alone is what FrozenNet runs.
    let Net::Unet(u) = &bare else { unreachable!() };
    let fused = elbo::engine::unet::FusedUnet::new(u).unwrap();
    let (g, _) = log_likelihood(&p, &fused, &x, opts(Probe::Exact), &mut Noise::new(2)).unwrap();
    assert_eq!(g, a);
}

/// A continuous-time model's own schedule (`log abar = log sigmoid(-gamma(t))`, the network
/// given gamma scaled to [0, 1000]): the ODE likelihood equals the analytic log-density for the
/// linear, cosine and a learned (random monotone) gamma, as on the discrete schedules.
#[test]
fn ode_likelihood_on_continuous_time_schedules_is_exact() {
    use elbo::diffusion::vdm::{ContinuousModel, ContinuousTime, Gamma, GammaKind};
    let spec = ContinuousTime {
        gamma: GammaKind::Learned,
        features: 8,
        gamma_min: -10.0,
        gamma_max: 8.0,
    };
    let mut noise = Noise::new(5);
    let mut params = spec.initial_params(|| {
        noise
            .randn(1, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64
    });
    for b in &mut params[3 + 8..3 + 16] {
        *b = 1.5;
    }
    for gamma in [
        Gamma::Linear { g0: -10.0, g1: 8.0 },
        Gamma::Cosine { g0: -10.0, g1: 8.0 },
        spec.schedule(&params).unwrap(),
    ] {
        let model = ContinuousModel {
            spec: spec.clone(),
            gamma: gamma.clone(),
            prediction: Prediction::Eps,
        };
        let p = model.discretized(100).unwrap();
        let sched = ContinuousSchedule::Gamma(model);
        let o = Oracle {
            sched: sched.clone(),
            t_max: 101,
            prediction: Prediction::Eps,
        };
        let (x, want) = points_on(&sched, 1e-5, 16, 7);
        let mut noise = Noise::new(1);
        let (got, _) = elbo::diffusion::ode::log_likelihood_on(
            &p,
            &sched,
            &o,
            &x,
            opts(Probe::Exact),
            &mut noise,
        )
        .unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 3e-3,
            "{gamma:?}: max error {err} nats over 3 dimensions"
        );
    }
}
