//! The VAE family (any depth, width, activation, one or more stochastic layers) on both
//! engines: the fused engine's hand-derived gradients of the ELBO and of the IWAE bound
//! against candle's autodiff, its log p(x) estimate against candle's, the bounds' ordering,
//! each layer's KL against Monte Carlo, and checkpoints of every architecture.

mod common;

use candle_core::{Device, Tensor};
use common::relative_distance;
use elbo::distributions::Noise;
use elbo::engine::vae::FusedVae;
use elbo::nn::activation::Activation;
use elbo::optim::{Adam, AdamConfig};
use elbo::vae::objective::{KlEstimator, Objective, draw_noise, pass_with};
use elbo::vae::{
    Init, Vae, VaeConfig, elbo_terms, elbo_terms_with, estimate_log_likelihood_candle, iwae_bound,
};
use rand::{Rng, SeedableRng};

fn config(input: usize, hidden: &[&[usize]], latents: &[usize], act: Activation) -> VaeConfig {
    VaeConfig {
        input_dim: input,
        latent_dims: latents.to_vec(),
        hidden: hidden.iter().map(|h| h.to_vec()).collect(),
        activation: act,
        likelihood: elbo::vae::Likelihood::Bernoulli,
        obs_log_var: None,
        mixtures: 1,
        image_shape: None,
        conv: None,
    }
}

/// `b` examples of `d` pixels in [0, 1], a third of them exactly 0 or 1.
fn data(b: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..b * d)
        .map(|i| match i % 3 {
            0 => rng.random_range(0.0..1.0),
            1 => 0.0,
            _ => 1.0,
        })
        .collect()
}

/// The architectures the tests run: (config, K, objective, beta).
fn cases() -> Vec<(VaeConfig, usize, Objective, f64)> {
    use Activation::*;
    vec![
        (
            config(30, &[&[24, 16]], &[6], Tanh),
            3,
            Objective::Elbo,
            0.7,
        ),
        (
            config(30, &[&[24, 16]], &[6], Tanh),
            5,
            Objective::Iwae,
            1.0,
        ),
        (
            config(30, &[&[20], &[12, 10]], &[8, 4], Tanh),
            2,
            Objective::Elbo,
            1.0,
        ),
        (
            config(30, &[&[20], &[12, 10]], &[8, 4], Tanh),
            5,
            Objective::Iwae,
            1.0,
        ),
        (
            config(25, &[&[16], &[12], &[8]], &[8, 6, 3], Softplus),
            4,
            Objective::Iwae,
            1.0,
        ),
        (
            config(25, &[&[16], &[]], &[8, 3], Elu),
            3,
            Objective::Elbo,
            0.5,
        ),
        (config(25, &[&[18]], &[5], Relu), 6, Objective::Iwae, 1.0),
        (conv_config(Activation::Tanh), 2, Objective::Elbo, 1.0),
        (conv_config(Activation::Relu), 4, Objective::Iwae, 1.0),
    ]
}

/// A convolutional VAE for 3 x 8 x 8 images: two stride-2 convolutions (4, 6 channels), an
/// MLP of 12 to z (5), mirrored.
fn conv_config(act: Activation) -> VaeConfig {
    let shape = elbo::data::ImageShape {
        channels: 3,
        height: 8,
        width: 8,
    };
    VaeConfig {
        input_dim: shape.dim(),
        image_shape: Some(shape),
        // 16 channels: both convolutions take the engine's stride-2 row products where the
        // CPU has AVX-512 (forward: multiples of 8 outputs; dW: of 16), the second with its
        // dx, and the first transposed convolution and that dx its sub-pixel products;
        // elsewhere im2col.
        conv: Some(elbo::vae::model::ConvNet {
            channels: vec![16, 16],
            residual: false,
        }),
        ..config(192, &[&[12]], &[5], act)
    }
}

/// The candle loss of a case: `-(1/B) sum_b [rec - beta KL]` (the top KL estimated as `kl`
/// says) or `-(1/B) sum_b IWAE_K`.
fn candle_loss(
    vae: &Vae,
    x: &Tensor,
    k: usize,
    (objective, kl): (Objective, KlEstimator),
    beta: f64,
    seed: u64,
) -> Tensor {
    let mut noise = Noise::new(seed);
    match objective {
        Objective::Elbo => elbo_terms_with(vae, x, k, kl, &mut noise)
            .unwrap()
            .loss(beta)
            .unwrap(),
        Objective::Iwae => iwae_bound(vae, x, k, &mut noise)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap(),
    }
}

/// For every architecture and objective, on one thread and split across two, the fused
/// engine's loss and every parameter's gradient equal candle's autodiff of the same loss with
/// the same noise (relative 2e-4: float32 rounding through a few layers). The ELBO is checked
/// with its top-layer KL in closed form and by Monte Carlo (`--kl mc`), whose losses differ,
/// so an engine that ignored the estimator would fail here. For the IWAE that is
/// the paper's gradient, the normalised weights as constants (Eq. 14), since autodiff of the
/// log-mean-exp gives exactly that. (The convolutional cases start from PyTorch's
/// initialisation: with Glorot's zero biases a ReLU meets inputs of exactly 0, where candle
/// takes the derivative as 1 and elbo, like PyTorch, as 0.)
#[test]
fn fused_gradients_match_candle_autodiff_for_every_architecture() {
    let estimators = |objective| match objective {
        Objective::Elbo => vec![KlEstimator::Analytic, KlEstimator::MonteCarlo],
        Objective::Iwae => vec![KlEstimator::Analytic],
    };
    let runs = cases().into_iter().enumerate().flat_map(|(case, c)| {
        estimators(c.2)
            .into_iter()
            .map(move |kl| (case, c.clone(), kl))
    });
    for (case, (cfg, k, objective, beta), kl) in runs {
        let init = if cfg.conv.is_some() {
            Init::Pytorch
        } else {
            Init::Glorot
        };
        let vae = Vae::initialised(
            cfg.clone(),
            init,
            None,
            &mut Noise::new(case as u64),
            &Device::Cpu,
        )
        .unwrap();
        let b = 40; // at least 32: two threads cut it into two slices
        let xv = data(b, cfg.input_dim, 100 + case as u64);
        let x = Tensor::from_vec(xv.clone(), (b, cfg.input_dim), &Device::Cpu).unwrap();
        let loss = candle_loss(&vae, &x, k, (objective, kl), beta, 7);
        let grads = loss.backward().unwrap();
        let want = loss.to_scalar::<f32>().unwrap() as f64;
        for threads in [1, 2] {
            let mut fused = FusedVae::from_vae(&vae).unwrap();
            fused.set_threads(threads);
            fused.set_objective(objective);
            fused.set_kl_estimator(kl);
            let sums = fused
                .forward_backward(&xv, k, beta, &mut Noise::new(7))
                .unwrap();
            let what = format!(
                "case {case} ({} K={k} {objective:?} {kl:?}, {threads} threads)",
                cfg.describe()
            );
            assert!(
                (sums.loss - want).abs() < 1e-4 * want.abs(),
                "{what}: loss {} vs candle {want}",
                sums.loss
            );
            for (name, g) in fused.gradients() {
                let var = &vae.params().iter().find(|(n, _)| *n == name).unwrap().1;
                let gc = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let dist = relative_distance(&g, &gc);
                assert!(
                    dist < 2e-4,
                    "{what}, {name}: gradient differs by {dist:e} (relative)"
                );
            }
        }
    }
}

/// The mistake the IWAE gradient invites: weighting every sample equally (the gradient of
/// mean_k log w_k, the K-sample ELBO) instead of by its normalised weight. On the same model
/// and noise it is far from the true gradient, so the comparison above would catch it.
#[test]
fn equal_weights_are_not_the_iwae_gradient() {
    let cfg = config(30, &[&[20], &[12, 10]], &[8, 4], Activation::Tanh);
    let vae = Vae::initialised(
        cfg.clone(),
        Init::Glorot,
        None,
        &mut Noise::new(3),
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::from_vec(data(16, 30, 5), (16, 30), &Device::Cpu).unwrap();
    let k = 5;
    let iwae = candle_loss(
        &vae,
        &x,
        k,
        (Objective::Iwae, KlEstimator::Analytic),
        1.0,
        9,
    );
    let eps = draw_noise(&vae, k, 16, &mut Noise::new(9)).unwrap();
    let equal = pass_with(&vae, &x, &eps)
        .unwrap()
        .log_weights()
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let (g1, g2) = (iwae.backward().unwrap(), equal.backward().unwrap());
    let mut worst = 0f64;
    for (_, var) in vae.params() {
        let a = g1
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = g2
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        worst = worst.max(relative_distance(&b, &a));
    }
    assert!(
        worst > 1e-2,
        "equal weights differ from the IWAE gradient by only {worst:e}"
    );
}

/// The fused log p(x) estimate and its parts (reconstruction, the KL of each layer) equal
/// candle's with the same noise and chunks, for one and for three stochastic layers.
#[test]
fn fused_log_likelihood_matches_candle_for_hierarchies() {
    for (case, (cfg, ..)) in cases()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| [0, 3, 4].contains(i))
    {
        let vae = Vae::initialised(
            cfg.clone(),
            Init::Glorot,
            None,
            &mut Noise::new(case as u64),
            &Device::Cpu,
        )
        .unwrap()
        .frozen()
        .unwrap();
        let xv = data(12, cfg.input_dim, 1);
        let x = Tensor::from_vec(xv.clone(), (12, cfg.input_dim), &Device::Cpu).unwrap();
        let c = estimate_log_likelihood_candle(&vae, &x, 70, 200, &mut Noise::new(4)).unwrap();
        let f =
            elbo::engine::estimate_log_likelihood(&vae, &x, 70, 200, &mut Noise::new(4)).unwrap();
        for i in 0..12 {
            assert!(
                (f.log_px[i] - c.log_px[i]).abs() < 1e-3,
                "case {case} example {i}: log p(x) {} vs {}",
                f.log_px[i],
                c.log_px[i]
            );
            assert!((f.reconstruction[i] - c.reconstruction[i]).abs() < 1e-3);
            for l in 0..cfg.layers() {
                let (a, b) = (f.kl_layers[l][i], c.kl_layers[l][i]);
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "case {case} layer {l} example {i}: KL {a} vs {b}"
                );
            }
        }
    }
}

/// Burda et al. (2015), Theorem 1, on a two-layer model trained a little (so the bounds are
/// apart): E[ELBO] <= E[IWAE_5] <= E[IWAE_50] <= log p(x), per example the mean of 200 draws
/// of each bound (log p(x): K = 20,000); each step must hold for the mean over 32 examples
/// beyond 3 standard errors of the per-example differences.
#[test]
fn bounds_are_ordered_for_two_stochastic_layers() {
    let cfg = config(30, &[&[40], &[20]], &[10, 4], Activation::Tanh);
    let vae = Vae::initialised(cfg, Init::Glorot, None, &mut Noise::new(2), &Device::Cpu).unwrap();
    let (b, draws) = (32, 200);
    // Train on a fixed batch for 100 steps so q is informative but imperfect.
    let xv = data(b, 30, 8);
    let mut fused = FusedVae::from_vae(&vae).unwrap();
    let mut adam = Adam::new(fused.table().clone(), AdamConfig::with_lr(3e-3));
    let mut noise = Noise::new(1);
    for _ in 0..100 {
        fused
            .train_step(&xv, 1, 1.0, &mut noise, &mut adam)
            .unwrap();
    }
    fused.write_to(fused.params(), &vae).unwrap();
    let vae = vae.frozen().unwrap();
    let x = Tensor::from_vec(xv, (b, 30), &Device::Cpu).unwrap();
    let repeated = x.repeat((draws, 1)).unwrap();
    // The mean over the draws of each example (rows d * b + i).
    let per_example = |t: Tensor| -> Vec<f64> {
        let v = t.to_vec1::<f32>().unwrap();
        (0..b)
            .map(|i| (0..draws).map(|d| v[d * b + i] as f64).sum::<f64>() / draws as f64)
            .collect()
    };
    let mut n = Noise::new(12);
    let elbo = per_example(
        elbo_terms(&vae, &repeated, 1, &mut n)
            .unwrap()
            .elbo(1.0)
            .unwrap(),
    );
    let i5 = per_example(iwae_bound(&vae, &repeated, 5, &mut n).unwrap());
    let i50 = per_example(iwae_bound(&vae, &repeated, 50, &mut n).unwrap());
    let log_px = estimate_log_likelihood_candle(&vae, &x, 20_000, 100_000, &mut n)
        .unwrap()
        .log_px;
    for (what, hi, lo) in [
        ("IWAE_5 - ELBO", &i5, &elbo),
        ("IWAE_50 - IWAE_5", &i50, &i5),
        ("log p(x) - IWAE_50", &log_px, &i50),
    ] {
        let diff: Vec<f64> = hi.iter().zip(lo.iter()).map(|(a, b)| a - b).collect();
        let (m, se) = (elbo::eval::mean(&diff), elbo::eval::standard_error(&diff));
        assert!(m > 3.0 * se, "{what}: mean {m:.4} +- {se:.4}");
        println!("{what}: {m:.3} +- {se:.3}");
    }
}

/// Each layer's KL as the ELBO reports it (closed form at the top, given z_{L-1}; Monte Carlo
/// below) against a plain Monte Carlo estimate E_q[log q(z_l|.) - log p(z_l|.)] from 4,000
/// fresh samples: equal within 4 standard errors. So is the top layer's Monte Carlo estimator
/// (`--kl mc`) from another 4,000.
#[test]
fn kl_of_each_layer_matches_monte_carlo() {
    let cfg = config(20, &[&[16], &[12]], &[6, 3], Activation::Tanh);
    let vae = Vae::initialised(cfg, Init::Pytorch, None, &mut Noise::new(6), &Device::Cpu)
        .unwrap()
        .frozen()
        .unwrap();
    let x = Tensor::from_vec(data(1, 20, 2), (1, 20), &Device::Cpu).unwrap();
    let k = 4000;
    let reported = elbo_terms(&vae, &x, k, &mut Noise::new(1)).unwrap();
    let eps = draw_noise(&vae, k, 1, &mut Noise::new(2)).unwrap();
    let pass = pass_with(&vae, &x, &eps).unwrap();
    for (l, ratio) in pass.log_ratio.iter().enumerate() {
        let mc: Vec<f64> = ratio
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| -(v as f64))
            .collect();
        let (m, se) = (elbo::eval::mean(&mc), elbo::eval::standard_error(&mc));
        let got = reported.kl_layers[l].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (got - m).abs() < 4.0 * se + 1e-3,
            "layer {}: reported {got:.4}, Monte Carlo {m:.4} +- {se:.4}",
            l + 1
        );
    }
    let top = pass.log_ratio.len() - 1;
    let mc = elbo_terms_with(&vae, &x, k, KlEstimator::MonteCarlo, &mut Noise::new(3)).unwrap();
    let (closed, by_mc) = (
        reported.kl_layers[top].to_vec1::<f32>().unwrap()[0] as f64,
        mc.kl_layers[top].to_vec1::<f32>().unwrap()[0] as f64,
    );
    let ratio: Vec<f64> = pass.log_ratio[top]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let se = elbo::eval::standard_error(&ratio);
    assert!(
        (closed - by_mc).abs() < 4.0 * se + 1e-3,
        "top layer: closed form {closed:.4}, Monte Carlo estimator {by_mc:.4} +- {se:.4}"
    );
    assert!(
        closed != by_mc,
        "the Monte Carlo estimator is the closed form"
    );
}

/// Every architecture survives a checkpoint round trip: same config, same parameters, and the
/// names PyTorch's state_dict of the equivalent module would give.
#[test]
fn checkpoints_round_trip_for_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    for (case, (cfg, ..)) in cases().into_iter().enumerate() {
        let vae = Vae::initialised(
            cfg.clone(),
            Init::Glorot,
            None,
            &mut Noise::new(case as u64),
            &Device::Cpu,
        )
        .unwrap();
        let path = dir.path().join(format!("{case}.safetensors"));
        vae.save(&path).unwrap();
        let back = Vae::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.config, cfg);
        for ((n1, a), (n2, b)) in vae.params().iter().zip(back.params()) {
            assert_eq!(n1, n2);
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{n1}");
        }
        let names: Vec<&str> = vae.params().iter().map(|(n, _)| n.as_str()).collect();
        if cfg.conv.is_some() {
            for n in [
                "encoder.conv.0.weight",
                "encoder.mlp.0.weight",
                "fc_mu.bias",
                "decoder.deconv.1.bias",
            ] {
                assert!(names.contains(&n), "{n} missing from {names:?}");
            }
        } else if cfg.layers() == 1 {
            assert!(names.contains(&"encoder.0.weight") && names.contains(&"fc_logvar.bias"));
            let last = 2 * cfg.hidden[0].len();
            assert!(
                names.contains(&format!("decoder.{last}.weight").as_str()),
                "{names:?}"
            );
        } else {
            assert!(
                names.contains(&"encoder.1.fc_mu.weight")
                    && names.contains(&"decoder.0.net.0.weight")
            );
            assert!(names.contains(&"decoder.1.fc_logvar.bias"), "{names:?}");
        }
    }
}

/// The candle path trains every parameter: after Adam steps on the live model (candle's
/// autodiff, as `--engine candle` and the Gaussian and logistic likelihoods train), the live
/// model computes what a frozen copy and a reloaded checkpoint compute. (A layer built once
/// from a copy of its weights, say a concatenation of the two heads, would keep computing
/// with the initial values while Adam moved the parameters.)
#[test]
fn the_live_model_sees_every_update() {
    use elbo::vae::Likelihood;
    for likelihood in [
        Likelihood::Bernoulli,
        Likelihood::Gaussian,
        Likelihood::Logistic,
    ] {
        let mut cfg = config(20, &[&[16], &[8]], &[6, 3], Activation::Tanh);
        cfg.likelihood = likelihood;
        let vae = Vae::new(cfg.clone(), &mut Noise::new(1), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(8, 20, 3), (8, 20), &Device::Cpu).unwrap();
        let mut adam = Adam::for_vars(vae.params(), AdamConfig::with_lr(1e-2));
        for step in 0..10 {
            let loss = elbo_terms(&vae, &x, 2, &mut Noise::new(step))
                .unwrap()
                .loss(1.0)
                .unwrap();
            adam.step_vars(vae.params(), &loss.backward().unwrap())
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        vae.save(&path).unwrap();
        let reloaded = Vae::load(&path, &Device::Cpu).unwrap();
        let eps = draw_noise(&vae, 2, 8, &mut Noise::new(99)).unwrap();
        let weights = |m: &Vae| -> Vec<f32> {
            let w = pass_with(m, &x, &eps).unwrap().log_weights().unwrap();
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let live = weights(&vae);
        for (what, other) in [
            ("frozen", weights(&vae.frozen().unwrap())),
            ("reloaded", weights(&reloaded)),
        ] {
            let d = relative_distance(&live, &other);
            assert!(
                d < 1e-6,
                "{likelihood:?}: live vs {what} log weights differ by {d:e}"
            );
        }
    }
}

/// The discretized logistic likelihood end to end on the built-in digits (8-bit grey levels,
/// the candle path): 3 epochs take the test bound from 8 bits/dim (a uniform distribution over
/// 256 levels) to below 2.1 bits/dim, and the importance-sampled NLL (K = 100, 200 digits)
/// sits below the -ELBO.
#[test]
fn discretized_logistic_vae_reaches_a_stated_bound_in_bits_per_dim() {
    use elbo::data::{Named, PixelMode, Source, Split};
    use elbo::train::{TrainConfig, train_vae};
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        epochs: 3,
        ..TrainConfig::new(Source::Named(Named::Mnist10k))
    };
    let model = VaeConfig {
        likelihood: elbo::vae::Likelihood::Logistic,
        ..VaeConfig::default()
    };
    let metrics = train_vae(model, &config, dir.path(), false, false, &Device::Cpu).unwrap();
    let test = metrics.last().unwrap().test.clone().unwrap();
    let bits = elbo::eval::bits_per_dim(test.neg_elbo, 784);
    assert!(bits < 2.1, "test bound {bits:.3} bits/dim after 3 epochs");
    let vae = Vae::load(&dir.path().join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .frozen()
        .unwrap();
    let data = Source::Named(Named::Mnist10k).load(Split::Test).unwrap();
    let idx: Vec<usize> = (0..200).collect();
    let x = data
        .batch(
            &idx,
            PixelMode::Grey,
            &mut rand::rngs::StdRng::seed_from_u64(0),
            &Device::Cpu,
        )
        .unwrap();
    let est =
        elbo::engine::estimate_log_likelihood(&vae, &x, 100, 20_000, &mut Noise::new(0)).unwrap();
    let (nll, neg_elbo) = (
        -elbo::eval::mean(&est.log_px),
        -elbo::eval::mean(&est.elbo()),
    );
    println!("{bits:.3} bits/dim bound; NLL {nll:.1} <= -ELBO {neg_elbo:.1}");
    assert!(nll <= neg_elbo, "NLL {nll} above -ELBO {neg_elbo}");
}

/// Convolutional VAEs (plain and residual) for colour images: the decoder gives one output
/// per value (two for the discretized logistic), the parameters carry the names of the
/// equivalent PyTorch module, survive a checkpoint round trip, and a shape the convolutions
/// cannot halve is one line naming it.
#[test]
fn conv_vaes_for_colour_images() {
    use elbo::data::ImageShape;
    use elbo::vae::Likelihood;
    use elbo::vae::model::ConvNet;
    let shape = ImageShape {
        channels: 3,
        height: 16,
        width: 16,
    };
    for (residual, likelihood) in [(false, Likelihood::Bernoulli), (true, Likelihood::Logistic)] {
        let cfg = VaeConfig {
            input_dim: shape.dim(),
            image_shape: Some(shape),
            conv: Some(ConvNet {
                channels: vec![8, 16],
                residual,
            }),
            hidden: vec![vec![32]],
            latent_dims: vec![6],
            likelihood,
            ..VaeConfig::default()
        };
        let vae = Vae::new(cfg.clone(), &mut Noise::new(0), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(4, shape.dim(), 1), (4, shape.dim()), &Device::Cpu).unwrap();
        let q = vae.encode(&x).unwrap();
        assert_eq!(q.mean.dims(), &[4, 6]);
        let z = Tensor::zeros((2, 4, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.decode(&z).unwrap().dims(), &[2, 4, cfg.output_dim()]);
        let names: Vec<&str> = vae.params().iter().map(|(n, _)| n.as_str()).collect();
        for n in [
            "encoder.conv.1.weight",
            "encoder.mlp.0.weight",
            "fc_mu.bias",
            "decoder.mlp.2.bias",
            "decoder.deconv.1.weight",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert_eq!(names.contains(&"decoder.res.0.conv2.weight"), residual);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        vae.save(&path).unwrap();
        let back = Vae::load(&path, &Device::Cpu).unwrap();
        let eps = draw_noise(&vae, 2, 4, &mut Noise::new(3)).unwrap();
        let lw = |m: &Vae| {
            pass_with(m, &x, &eps)
                .unwrap()
                .log_weights()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(lw(&vae), lw(&back));
    }
    let bad = VaeConfig {
        input_dim: 3 * 10 * 10,
        image_shape: Some(ImageShape {
            channels: 3,
            height: 10,
            width: 10,
        }),
        conv: Some(ConvNet {
            channels: vec![8, 16],
            residual: false,
        }),
        ..VaeConfig::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("divisible by 4") && !err.contains('\n'),
        "{err}"
    );
}

/// A convolutional VAE trains on the built-in digits (candle's autodiff): 2 epochs over 3,000
/// digits take the test -ELBO from 543 nats (784 ln 2) to below 215.
#[test]
fn conv_vae_trains_on_digits() {
    use elbo::data::{Named, PixelMode, Source};
    use elbo::train::{TrainConfig, train_vae};
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        epochs: 2,
        batch_size: 64,
        lr: 2e-3,
        pixels: PixelMode::Dynamic,
        train_limit: Some(3000),
        test_limit: Some(500),
        ..TrainConfig::new(Source::Named(Named::Mnist10k))
    };
    let model = VaeConfig {
        conv: Some(elbo::vae::model::ConvNet {
            channels: vec![16, 32],
            residual: true,
        }),
        hidden: vec![vec![128]],
        latent_dims: vec![16],
        ..VaeConfig::default()
    };
    let metrics = train_vae(model, &config, dir.path(), false, false, &Device::Cpu).unwrap();
    let test = metrics.last().unwrap().test.clone().unwrap();
    println!(
        "conv VAE: test -ELBO {:.2} (KL {:.2})",
        test.neg_elbo, test.kl
    );
    assert!(test.neg_elbo < 215.0, "test -ELBO {}", test.neg_elbo);
}

/// A mixture of discretized logistics end to end: the decoder gives 3 M values per pixel, the
/// checkpoint round-trips, and 2 epochs on the digits learn (the NLL below the -ELBO, and
/// below 2.2 bits/dim).
#[test]
fn logistic_mixture_vae_trains() {
    use elbo::data::{Named, PixelMode, Source, Split};
    use elbo::train::latent::{FitConfig, evaluate, fit};
    let cfg = VaeConfig {
        likelihood: elbo::vae::Likelihood::Logistic,
        mixtures: 3,
        hidden: vec![vec![128]],
        latent_dims: vec![16],
        ..VaeConfig::default()
    };
    assert_eq!(cfg.output_dim(), 3 * 3 * 784);
    let vae = Vae::new(cfg.clone(), &mut Noise::new(0), &Device::Cpu).unwrap();
    let train = Source::Named(Named::Mnist10k)
        .load(Split::Train)
        .unwrap()
        .take(4000);
    let config = FitConfig {
        epochs: 2,
        batch_size: 100,
        pixels: PixelMode::Grey,
        ..Default::default()
    };
    let vars: Vec<candle_core::Var> = vae.params().iter().map(|(_, v)| v.clone()).collect();
    fit(&vae, vars, &train, &config).unwrap();
    let test = Source::Named(Named::Mnist10k).load(Split::Test).unwrap();
    let e = evaluate(
        &vae.frozen().unwrap(),
        &test,
        PixelMode::Grey,
        50,
        Some(100),
        0,
    )
    .unwrap();
    let bits = elbo::eval::bits_per_dim(e.nll, 784);
    println!(
        "logistic mixture: NLL {:.1} ({bits:.3} bits/dim), -ELBO {:.1}",
        e.nll, e.neg_elbo
    );
    assert!(
        e.nll <= e.neg_elbo && bits < 2.2,
        "NLL {} (-ELBO {})",
        e.nll,
        e.neg_elbo
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    vae.save(&path).unwrap();
    assert_eq!(Vae::load(&path, &Device::Cpu).unwrap().config, cfg);
}
