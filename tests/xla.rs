//! The XLA engine (src/engine/xla) on the PJRT CPU plugin: the traced program's derivative against
//! finite differences, and the VAE family's training step against the fused CPU engine (loss,
//! every gradient, one Adam step) for one and two stochastic layers, the ELBO and the IWAE.
//!
//! The plugin is installed by `scripts/xla-plugin` (scripts/test runs it). Without it these
//! tests say so and pass, unless ELBO_REQUIRE_XLA is set (CI sets it), where they fail.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::relative_distance;
use elbo::distributions::Noise;
use elbo::engine::TrainStep;
use elbo::engine::vae::{FusedVae, VaeBatch};
use elbo::engine::xla::graph::Graph;
use elbo::engine::xla::vae::XlaVae;
use elbo::engine::xla::{Runtime, plugin_path, runtime};
use elbo::nn::activation::Activation;
use elbo::optim::{Adam, AdamConfig};
use elbo::vae::objective::{KlEstimator, Objective};
use elbo::vae::{Vae, VaeConfig};

/// The runtime, or `None` (with a line saying why) when the plugin is not installed and not
/// required.
fn rt() -> Option<Arc<Runtime>> {
    match runtime() {
        Ok(rt) => Some(rt),
        Err(e) if std::env::var_os("ELBO_REQUIRE_XLA").is_none() => {
            eprintln!(
                "skipped: no PJRT plugin at {} ({e}); run scripts/xla-plugin",
                plugin_path().display()
            );
            None
        }
        Err(e) => panic!("ELBO_REQUIRE_XLA is set: {e:#}"),
    }
}

/// y = sum(tanh(x W) * c) / 7 with its derivative in W by the traced reverse mode, against
/// central finite differences in f64 of the same function.
#[test]
fn traced_derivative_matches_finite_differences() {
    let Some(rt) = rt() else { return };
    let (m, k, n) = (3, 4, 2);
    let mut g = Graph::new();
    let x = g.input(&[m, k]);
    let w = g.input(&[k, n]);
    let c = g.input(&[m, n]);
    let a = g.dot(x, w, 1, 0).unwrap();
    let h = g.tanh(a);
    let p = g.mul(h, c).unwrap();
    let s = g.sum_all(p).unwrap();
    let y = g.scale(s, 1.0 / 7.0).unwrap();
    let dw = g.grad(y, &[w]).unwrap()[0];
    let text = g.to_stablehlo(&[y, dw]).unwrap();
    let exe = rt.compile(&text, 2).unwrap();
    let xs: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let ws: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.2)
        .collect();
    let cs: Vec<f32> = (0..m * n).map(|i| (i as f32 - 2.0) * 0.3).collect();
    let bx = rt.upload(&xs, &[m, k]).unwrap();
    let bw = rt.upload(&ws, &[k, n]).unwrap();
    let bc = rt.upload(&cs, &[m, n]).unwrap();
    let out = exe.run(&[&bx, &bw, &bc]).unwrap();
    let y_xla = out[0].to_vec(1).unwrap()[0] as f64;
    let dw_xla = out[1].to_vec(k * n).unwrap();
    let f = |w: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..m {
            for j in 0..n {
                let a: f64 = (0..k).map(|l| xs[i * k + l] as f64 * w[l * n + j]).sum();
                s += a.tanh() * cs[i * n + j] as f64;
            }
        }
        s / 7.0
    };
    let w64: Vec<f64> = ws.iter().map(|&v| v as f64).collect();
    assert!((y_xla - f(&w64)).abs() < 1e-6, "y: {y_xla} vs {}", f(&w64));
    let h = 1e-5;
    for i in 0..k * n {
        let (mut wp, mut wm) = (w64.clone(), w64.clone());
        wp[i] += h;
        wm[i] -= h;
        let fd = (f(&wp) - f(&wm)) / (2.0 * h);
        assert!(
            (dw_xla[i] as f64 - fd).abs() < 1e-5,
            "dW[{i}]: traced {} vs finite differences {fd}",
            dw_xla[i]
        );
    }
}

/// erf and erfc on the device (CHLO's, lowered by XLA) against libm's in f64 (erfc to a
/// relative 1e-5 in its tail, down to erfc(6) = 2e-17), and their traced derivatives +-2/sqrt(pi)
/// e^{-a^2} against central differences of libm's, from -6 to 6.
#[test]
fn traced_erf_and_erfc_match_libm() {
    use elbo::engine::xla::graph::Unary;
    let Some(rt) = rt() else { return };
    let xs: Vec<f32> = (0..49).map(|i| (i as f32 - 24.0) * 0.25).collect();
    type Exact = fn(f64) -> f64;
    let cases: [(Unary, Exact); 2] = [(Unary::Erf, libm::erf), (Unary::Erfc, libm::erfc)];
    for (op, exact) in cases {
        let mut g = Graph::new();
        let x = g.input(&[xs.len()]);
        let y = g.unary(op, x);
        let s = g.sum_all(y).unwrap();
        let dx = g.grad(s, &[x]).unwrap()[0];
        let exe = rt.compile(&g.to_stablehlo(&[y, dx]).unwrap(), 2).unwrap();
        let bx = rt.upload(&xs, &[xs.len()]).unwrap();
        let out = exe.run(&[&bx]).unwrap();
        let (y, dy) = (
            out[0].to_vec(xs.len()).unwrap(),
            out[1].to_vec(xs.len()).unwrap(),
        );
        for (i, &a) in xs.iter().enumerate() {
            let a = a as f64;
            let e = exact(a);
            let tol = 4e-7f64.max(1e-5 * e.abs());
            assert!(
                (y[i] as f64 - e).abs() < tol,
                "{op:?}({a}) = {} vs {e}",
                y[i]
            );
            let h = 1e-4;
            let fd = (exact(a + h) - exact(a - h)) / (2.0 * h);
            assert!(
                (dy[i] as f64 - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                "{op:?}'({a}) = {} vs {fd}",
                dy[i]
            );
        }
    }
}

/// A VAE with stochastic layers `latents` and hidden widths `hidden`, random weights.
fn model(hidden: Vec<Vec<usize>>, latents: Vec<usize>, activation: Activation) -> Vae {
    let config = VaeConfig {
        input_dim: 48,
        hidden,
        latent_dims: latents,
        activation,
        image_shape: None,
        ..VaeConfig::default()
    };
    Vae::new(config, &mut Noise::new(3), &Device::Cpu).unwrap()
}

/// Binary-ish data in [0, 1], `b` examples of `d` values.
fn data(b: usize, d: usize) -> Vec<f32> {
    (0..b * d)
        .map(|i| match i * 7919 % 13 {
            0..=5 => 0.0,
            6..=10 => 1.0,
            v => v as f32 / 13.0,
        })
        .collect()
}

/// The XLA step against the fused CPU engine on the same batch and noise: the sums, every
/// gradient, and (for the whole batch) one Adam step from each gradient.
fn compare(
    vae: &Vae,
    objective: Objective,
    kl: KlEstimator,
    k: usize,
    rows: std::ops::Range<usize>,
) {
    let Some(rt) = rt() else { return };
    let (b, d, beta) = (13, vae.config.input_dim, 0.8);
    let mut fused = FusedVae::from_vae(vae).unwrap();
    fused.set_objective(objective);
    fused.set_kl_estimator(kl);
    fused.set_beta(beta);
    let mut xla = XlaVae::from_vae(vae, rt).unwrap();
    xla.set_objective(objective);
    xla.set_kl_estimator(kl);
    xla.set_beta(beta);
    let batch = VaeBatch::draw(
        data(b, d),
        d,
        &vae.config.latent_dims,
        k,
        &mut Noise::new(9),
    );
    let params = fused.read_params().unwrap();
    assert_eq!(params, xla.read_params().unwrap());
    let n = params.len();
    let (mut g_fused, mut g_xla) = (vec![0f32; n], vec![0f32; n]);
    let s_fused = fused
        .loss_and_grads(&params, &batch, rows.clone(), &mut g_fused)
        .unwrap();
    let s_xla = xla
        .loss_and_grads(&params, &batch, rows.clone(), &mut g_xla)
        .unwrap();
    let what = format!(
        "{objective:?} {kl:?} K = {k}, {} layers, rows {rows:?}",
        vae.config.latent_dims.len()
    );
    for (i, (a, e)) in s_xla.iter().zip(&s_fused).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * e.abs().max(1.0),
            "{what}: sum {i}: XLA {a} vs fused {e}"
        );
    }
    for entry in fused.table().entries() {
        let len: usize = entry.shape.iter().product();
        let r = entry.offset..entry.offset + len;
        let dist = relative_distance(&g_xla[r.clone()], &g_fused[r]);
        assert!(
            dist < 1e-4,
            "{what}: gradient of {} differs by {dist:e}",
            entry.name
        );
    }
    if rows.len() == b {
        // One Adam step from each gradient: the parameters agree far below the step (lr).
        let config = AdamConfig::with_lr(1e-3);
        let (mut p_fused, mut p_xla) = (params.clone(), params.clone());
        Adam::new(fused.table().clone(), config)
            .step(&mut p_fused, &g_fused, 1)
            .unwrap();
        Adam::new(xla.table().clone(), config)
            .step(&mut p_xla, &g_xla, 1)
            .unwrap();
        let worst = p_fused
            .iter()
            .zip(&p_xla)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 2e-5,
            "{what}: parameters differ by {worst} after one Adam step"
        );
    }
}

#[test]
fn vae_step_matches_the_fused_engine_one_layer() {
    let vae = model(vec![vec![32, 24]], vec![6], Activation::Tanh);
    compare(&vae, Objective::Elbo, KlEstimator::Analytic, 1, 0..13);
    compare(&vae, Objective::Elbo, KlEstimator::Analytic, 3, 0..13);
    compare(&vae, Objective::Elbo, KlEstimator::MonteCarlo, 2, 0..13);
    compare(&vae, Objective::Iwae, KlEstimator::Analytic, 5, 0..13);
    // A data-parallel rank's share of the batch.
    compare(&vae, Objective::Iwae, KlEstimator::Analytic, 5, 4..11);
}

/// The convolutional VAE (two stride-2 convolutions, 3 x 8 x 8 images, the mirrored
/// transposed convolutions): the ELBO and the IWAE step against the fused engine.
#[test]
fn conv_vae_step_matches_the_fused_engine() {
    use elbo::data::ImageShape;
    use elbo::vae::model::ConvNet;
    let shape = ImageShape {
        channels: 3,
        height: 8,
        width: 8,
    };
    for act in [Activation::Relu, Activation::Tanh] {
        let config = VaeConfig {
            input_dim: shape.dim(),
            image_shape: Some(shape),
            conv: Some(ConvNet {
                channels: vec![4, 6],
                residual: false,
            }),
            hidden: vec![vec![16]],
            latent_dims: vec![5],
            activation: act,
            ..VaeConfig::default()
        };
        let vae = Vae::new(config, &mut Noise::new(3), &Device::Cpu).unwrap();
        compare(&vae, Objective::Elbo, KlEstimator::Analytic, 2, 0..13);
        compare(&vae, Objective::Iwae, KlEstimator::Analytic, 3, 3..10);
    }
}

#[test]
fn vae_step_matches_the_fused_engine_two_layers() {
    for act in [
        Activation::Relu,
        Activation::Softplus,
        Activation::Elu,
        Activation::Silu,
    ] {
        let vae = model(vec![vec![20], vec![12, 12]], vec![8, 4], act);
        compare(&vae, Objective::Elbo, KlEstimator::Analytic, 2, 0..13);
        compare(&vae, Objective::Iwae, KlEstimator::Analytic, 5, 0..13);
    }
    let vae = model(
        vec![vec![20], vec![12, 12]],
        vec![8, 4],
        Activation::Sigmoid,
    );
    compare(&vae, Objective::Elbo, KlEstimator::MonteCarlo, 3, 2..9);
}

/// Three training steps with the parameters and Adam's moments resident on the device (one
/// compiled program a step, its buffers donated from step to step) against the fused engine's
/// gradient and the host's Adam, from the same start and batches: the sums of every step, and
/// the parameters and both moments after the last.
#[test]
fn resident_steps_match_the_fused_engine_and_host_adam() {
    let Some(rt) = rt() else { return };
    let vae = model(vec![vec![32], vec![16]], vec![8, 4], Activation::Tanh);
    let (b, d, k) = (13, vae.config.input_dim, 2);
    let mut fused = FusedVae::from_vae(&vae).unwrap();
    fused.set_objective(Objective::Iwae);
    let mut xla = XlaVae::from_vae(&vae, rt).unwrap();
    xla.set_objective(Objective::Iwae);
    let config = AdamConfig::with_lr(3e-3);
    let mut host = Adam::new(fused.table().clone(), config);
    let mut device = Adam::new(xla.table().clone(), config);
    let mut p_host = fused.read_params().unwrap();
    let mut p_device = p_host.clone();
    let mut grads = vec![0f32; p_host.len()];
    {
        let (m, v) = device.moments_mut();
        let state = elbo::engine::Resident {
            params: &mut p_device,
            m,
            v,
            average: None,
        };
        xla.load_resident(&state).unwrap();
    }
    let mut noise = Noise::new(21);
    for step in 0..3 {
        let batch = VaeBatch::draw(data(b, d), d, &vae.config.latent_dims, k, &mut noise);
        let s_host = fused
            .loss_and_grads(&p_host, &batch, 0..b, &mut grads)
            .unwrap();
        host.step(&mut p_host, &grads, 1).unwrap();
        let s_device = xla.step_resident(&batch, device.advance(), None).unwrap();
        for (i, (a, e)) in s_device.iter().zip(&s_host).enumerate() {
            assert!(
                (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                "step {step}, sum {i}: resident {a} vs host {e}"
            );
        }
    }
    let (mut m, mut v) = (vec![0f32; p_device.len()], vec![0f32; p_device.len()]);
    xla.store_resident(&mut elbo::engine::Resident {
        params: &mut p_device,
        m: &mut m,
        v: &mut v,
        average: None,
    })
    .unwrap();
    let worst = p_host
        .iter()
        .zip(&p_device)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 5e-5,
        "parameters differ by {worst} after 3 steps (lr 3e-3)"
    );
    let (hm, hv) = host.moments_mut();
    assert!(
        relative_distance(&m, hm) < 1e-4,
        "first moments: {:e}",
        relative_distance(&m, hm)
    );
    assert!(
        relative_distance(&v, hv) < 1e-3,
        "second moments: {:e}",
        relative_distance(&v, hv)
    );
}

/// The importance-sampled log p(x) on XLA against the fused engine's, same noise and chunks
/// (K = 7 in chunks of 3, 3 and 1 samples): log p(x), the reconstruction and each layer's KL
/// per example.
#[test]
fn log_likelihood_estimate_matches_the_fused_engine() {
    let Some(rt) = rt() else { return };
    for (hidden, latents) in [
        (vec![vec![32]], vec![6]),
        (vec![vec![20], vec![12]], vec![8, 4]),
    ] {
        let vae = model(hidden, latents, Activation::Tanh);
        let (b, d, k) = (11, vae.config.input_dim, 7);
        let x = data(b, d);
        let mut fused = FusedVae::from_vae(&vae).unwrap();
        let mut xla = XlaVae::from_vae(&vae, rt.clone()).unwrap();
        let e = fused
            .estimate_log_likelihood(&x, k, 3 * b, &mut Noise::new(4))
            .unwrap();
        let a = xla
            .estimate_log_likelihood(&x, k, 3 * b, &mut Noise::new(4))
            .unwrap();
        let close = |a: &[f64], e: &[f64], what: &str| {
            for (i, (p, q)) in a.iter().zip(e).enumerate() {
                assert!(
                    (p - q).abs() < 1e-4 * q.abs().max(1.0),
                    "{what}[{i}]: XLA {p} vs fused {q}"
                );
            }
        };
        close(&a.log_px, &e.log_px, "log p(x)");
        close(&a.reconstruction, &e.reconstruction, "reconstruction");
        for (l, (p, q)) in a.kl_layers.iter().zip(&e.kl_layers).enumerate() {
            close(p, q, &format!("KL layer {l}"));
        }
    }
}

/// The committed IWAE-paper checkpoints (one and two stochastic layers, trained on the ELBO and
/// on IWAE_5), evaluated as `elbo eval vae` evaluates them on 100 test digits with K = 200:
/// the -ELBO and the NLL on XLA equal the fused engine's to the printed digits (two decimals).
#[test]
fn committed_checkpoints_evaluate_to_the_printed_digits() {
    use elbo::data::{Named, PixelMode, Source, Split};
    use elbo::engine::Engine;
    if rt().is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/iwae");
    let data = Source::Named(Named::Mnist10k)
        .load(Split::Test)
        .unwrap()
        .take(100);
    for run in ["vae-1l-k1", "vae-2l-k1", "iwae-1l-k5", "iwae-2l-k5"] {
        let vae = Vae::load(&root.join(run).join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .frozen()
            .unwrap();
        let eval = |engine| {
            elbo::eval::evaluate_vae(&vae, &data, PixelMode::Dynamic, 200, 50, 0, engine, &|_| {})
                .unwrap()
                .summary(200, 784)
        };
        let (fused, xla) = (eval(Engine::Fused), eval(Engine::Xla));
        for (what, a, e) in [
            ("-ELBO", xla.neg_elbo, fused.neg_elbo),
            ("NLL", xla.nll, fused.nll),
        ] {
            assert_eq!(
                format!("{a:.2}"),
                format!("{e:.2}"),
                "{run} {what}: XLA {a} vs fused {e}"
            );
        }
    }
}

/// `sum(conv(x, w) * c)` in f64 by the definition (NCHW, OIHW): the input dilated by
/// `ld`, padded by `pad` (low, high), the kernel dilated by `rd`, strided by `s`.
fn conv_sum(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    c: &[f64],
    spec: &elbo::engine::xla::graph::Conv,
) -> f64 {
    let (s, ld, rd) = (spec.stride[0], spec.lhs_dil[0], spec.rhs_dil[0]);
    let lo = spec.pad[0].0;
    let dil = |n: usize, d: usize| 1 + d * (n - 1);
    let span = dil(xs[2], ld) as i64 + spec.pad[0].0 + spec.pad[0].1 - dil(ws[2], rd) as i64;
    let out = span as usize / s + 1;
    let mut total = 0.0;
    let mut at = 0;
    for b in 0..xs[0] {
        for o in 0..ws[0] {
            for p0 in 0..out {
                for p1 in 0..out {
                    let mut acc = 0.0;
                    for i in 0..xs[1] {
                        for k0 in 0..ws[2] {
                            for k1 in 0..ws[3] {
                                let y0 = (p0 * s + k0 * rd) as i64 - lo;
                                let y1 = (p1 * s + k1 * rd) as i64 - lo;
                                if y0 < 0 || y1 < 0 || y0 % ld as i64 != 0 || y1 % ld as i64 != 0 {
                                    continue;
                                }
                                let (q0, q1) =
                                    ((y0 / ld as i64) as usize, (y1 / ld as i64) as usize);
                                if q0 >= xs[2] || q1 >= xs[3] {
                                    continue;
                                }
                                acc += x[((b * xs[1] + i) * xs[2] + q0) * xs[3] + q1]
                                    * w[((o * ws[1] + i) * ws[2] + k0) * ws[3] + k1];
                            }
                        }
                    }
                    total += acc * c[at];
                    at += 1;
                }
            }
        }
    }
    total
}

/// The traced convolution's value and its derivatives in the input and the kernel against the
/// definition in f64 and central finite differences: PyTorch's conv2d (stride 2, padding 1,
/// 4 x 4, as the convolutional VAE's encoder) and its transposed convolution written as XLA
/// writes it (the input dilated by 2, padding 2, the decoder's), odd sizes, 1 and 3 channels.
#[test]
fn traced_convolution_derivatives_match_finite_differences() {
    use elbo::engine::xla::graph::Conv;
    let Some(rt) = rt() else { return };
    let transposed = Conv {
        stride: [1, 1],
        pad: [(2, 2); 2],
        lhs_dil: [2, 2],
        ..Conv::nchw(1, 0)
    };
    for (spec, xs, ws) in [
        (Conv::nchw(2, 1), [2, 3, 7, 7], [2, 3, 4, 4]),
        (Conv::nchw(1, 1), [1, 1, 5, 5], [3, 1, 3, 3]),
        (transposed, [2, 2, 3, 3], [1, 2, 4, 4]),
    ] {
        let mut g = Graph::new();
        let x = g.input(&xs);
        let w = g.input(&ws);
        let y = g.conv(x, w, spec.clone()).unwrap();
        let ys = g.shape(y).to_vec();
        let c = g.input(&ys);
        let p = g.mul(y, c).unwrap();
        let total = g.sum_all(p).unwrap();
        let grads = g.grad(total, &[x, w]).unwrap();
        let exe = rt
            .compile(&g.to_stablehlo(&[total, grads[0], grads[1]]).unwrap(), 3)
            .unwrap();
        let n = |s: &[usize]| s.iter().product::<usize>();
        let xv: Vec<f32> = (0..n(&xs))
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let wv: Vec<f32> = (0..n(&ws))
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let cv: Vec<f32> = (0..n(&ys))
            .map(|i| ((i * 5 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let bufs = [
            rt.upload(&xv, &xs).unwrap(),
            rt.upload(&wv, &ws).unwrap(),
            rt.upload(&cv, &ys).unwrap(),
        ];
        let out = exe.run(&[&bufs[0], &bufs[1], &bufs[2]]).unwrap();
        let (value, dx, dw) = (
            out[0].to_vec(1).unwrap()[0],
            out[1].to_vec(n(&xs)).unwrap(),
            out[2].to_vec(n(&ws)).unwrap(),
        );
        let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, w64, c64) = (f64v(&xv), f64v(&wv), f64v(&cv));
        let exact = conv_sum(&x64, xs, &w64, ws, &c64, &spec);
        assert!(
            (value as f64 - exact).abs() < 1e-4 * exact.abs().max(1.0),
            "{spec:?}: {value} vs {exact}"
        );
        let h = 1e-3;
        for (i, &d) in dx.iter().enumerate() {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (conv_sum(&p, xs, &w64, ws, &c64, &spec)
                - conv_sum(&m, xs, &w64, ws, &c64, &spec))
                / (2.0 * h);
            assert!(
                (d as f64 - fd).abs() < 1e-4 * fd.abs().max(1.0),
                "{spec:?}: d x[{i}] {d} vs {fd}"
            );
        }
        for (i, &d) in dw.iter().enumerate() {
            let (mut p, mut m) = (w64.clone(), w64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (conv_sum(&x64, xs, &p, ws, &c64, &spec)
                - conv_sum(&x64, xs, &m, ws, &c64, &spec))
                / (2.0 * h);
            assert!(
                (d as f64 - fd).abs() < 1e-4 * fd.abs().max(1.0),
                "{spec:?}: d w[{i}] {d} vs {fd}"
            );
        }
    }
}

/// The U-Net's forward pass on XLA against candle's (`UNet::forward_candle`): elbo's default
/// U-Net, DDPM's CIFAR-10 layout (attention at 16 x 16), diffusers' options ("SAME"
/// downsampling, sines first, frequency shift 1) and improved-diffusion's (scale-shift norm,
/// two heads down and four up, 2C outputs for learned variances), trained-looking weights.
#[test]
fn unet_forward_matches_candle() {
    use elbo::diffusion::nets::{Net, NetConfig, UnetOptions, sorted_vars};
    use elbo::engine::xla::unet::XlaUnet;
    let Some(rt) = rt() else { return };
    let dev = Device::Cpu;
    let unet = |mult: Vec<usize>, attention, c, levels: Vec<usize>, options| NetConfig::Unet {
        base: 8,
        channel_mult: mult,
        groups: 4,
        attention,
        in_channels: c,
        res_blocks: Some(1),
        attention_levels: levels,
        dropout: 0.0,
        options,
    };
    let configs = [
        (NetConfig::default_unet(), (1, 28, 28)),
        (NetConfig::ddpm_cifar10(8, 3), (3, 32, 32)),
        (
            unet(
                vec![1, 2, 2],
                true,
                3,
                vec![1],
                UnetOptions {
                    flip_sin_to_cos: false,
                    freq_shift: 1,
                    norm_eps: 1e-6,
                    downsample_padding: 0,
                    ..Default::default()
                },
            ),
            (3, 28, 28),
        ),
        (
            unet(
                vec![1, 2],
                true,
                3,
                vec![1],
                UnetOptions {
                    heads: 2,
                    heads_up: 4,
                    scale_shift: true,
                    out_channels: 6,
                    ..Default::default()
                },
            ),
            (3, 12, 12),
        ),
    ];
    for (cfg, (c, h, w)) in configs {
        let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
        let mut noise = Noise::new(7);
        for (_, var) in sorted_vars(&varmap) {
            let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.1).unwrap();
            var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
        }
        let Net::Unet(u) = &net else { unreachable!() };
        let b = 3;
        let x = noise.randn((b, c, h, w), &dev).unwrap();
        let t = candle_core::Tensor::new(&[3f32, 400.0, 999.0], &dev).unwrap();
        let expected = u.forward_candle(&x, &t).unwrap();
        let mut xla = XlaUnet::new(u, rt.clone()).unwrap();
        let got = xla.forward(&x, &t).unwrap();
        assert_eq!(got.dims(), expected.dims());
        let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dist = relative_distance(&v(&got), &v(&expected));
        assert!(
            dist < 1e-4,
            "{cfg:?}: the XLA U-Net differs from candle's by {dist:e}"
        );
    }
}

/// The U-Net's training step on the simple loss, traced and differentiated by XLA, against the
/// fused engine's hand-derived backward pass on the same batch: the loss and the gradient of
/// every parameter (matched by name: the two engines lay the buffer out differently), for
/// elbo's default U-Net and for DDPM's CIFAR-10 layout with dropout 0.1 (the same masks), on
/// the whole batch and on a data-parallel rank's rows.
#[test]
fn unet_step_matches_the_fused_engine() {
    use elbo::diffusion::nets::{Net, NetConfig, sorted_vars};
    use elbo::engine::{DenoiseBatch, Engine, denoiser_step};
    if rt().is_none() {
        return;
    }
    let dev = Device::Cpu;
    for (cfg, (c, h, w), seed) in [
        (NetConfig::default_unet(), (1, 28, 28), None),
        (NetConfig::ddpm_cifar10(8, 3), (3, 32, 32), Some(11u64)),
    ] {
        let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
        let mut noise = Noise::new(7);
        for (_, var) in sorted_vars(&varmap) {
            let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.1).unwrap();
            var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
        }
        let b = 4;
        let batch = DenoiseBatch {
            xt: noise.randn((b, c, h, w), &dev).unwrap(),
            t: vec![3, 250, 600, 999],
            target: noise.randn((b, c, h, w), &dev).unwrap(),
            dropout_seed: seed,
            x0: None,
            weights: None,
            weighted: None,
        };
        let (mut fused, _) =
            denoiser_step(Engine::Fused, &net, sorted_vars(&varmap), None).unwrap();
        let (mut xla, _) = denoiser_step(Engine::Xla, &net, sorted_vars(&varmap), None).unwrap();
        for rows in [0..b, 1..3] {
            let (pf, px) = (fused.read_params().unwrap(), xla.read_params().unwrap());
            let (mut gf, mut gx) = (vec![0f32; pf.len()], vec![0f32; px.len()]);
            let sf = fused
                .loss_and_grads(&pf, &batch, rows.clone(), &mut gf)
                .unwrap();
            let sx = xla
                .loss_and_grads(&px, &batch, rows.clone(), &mut gx)
                .unwrap();
            assert!(
                (sf[0] - sx[0]).abs() < 1e-4 * sf[0].abs(),
                "{cfg:?} rows {rows:?}: loss XLA {} vs fused {}",
                sx[0],
                sf[0]
            );
            let of = |table: &elbo::optim::ParamTable, name: &str| {
                let e = table.entries().iter().find(|e| e.name == name).unwrap();
                e.offset..e.offset + e.shape.iter().product::<usize>()
            };
            // Relative to the largest gradient of the network: a bias whose effect a GroupNorm
            // of one channel a group removes has a gradient of rounding noise in both.
            let scale = gf.iter().fold(0f32, |m, v| m.max(v.abs()));
            for e in fused.table().entries() {
                let (rf, rx) = (of(fused.table(), &e.name), of(xla.table(), &e.name));
                assert_eq!(
                    pf[rf.clone()],
                    px[rx.clone()],
                    "{}: the same weights",
                    e.name
                );
                let worst = gx[rx]
                    .iter()
                    .zip(&gf[rf])
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let dist = worst / scale;
                assert!(
                    dist < 1e-4,
                    "{cfg:?} rows {rows:?}: the gradient of {} differs by {dist:e} of the largest",
                    e.name
                );
            }
        }
    }
}

/// A two-level U-Net of 1 x 8 x 8 images with attention at the lower level and dropout 0.1;
/// `out_channels` 2 for learned variances (0: the default).
fn small_unet(out_channels: usize) -> elbo::diffusion::nets::NetConfig {
    elbo::diffusion::nets::NetConfig::Unet {
        base: 8,
        channel_mult: vec![1, 2],
        groups: 4,
        attention: true,
        in_channels: 1,
        res_blocks: Some(1),
        attention_levels: vec![1],
        dropout: 0.1,
        options: elbo::diffusion::nets::UnetOptions {
            out_channels,
            ..Default::default()
        },
    }
}

/// A diffusion step's sums on rows `rows` of `batch` from its own parameters, and its gradient
/// by parameter name (the engines lay their buffers out differently).
fn sums_and_named_grads(
    mut step: Box<dyn TrainStep<Batch = elbo::engine::DenoiseBatch> + '_>,
    batch: &elbo::engine::DenoiseBatch,
    rows: std::ops::Range<usize>,
) -> (Vec<f64>, std::collections::HashMap<String, Vec<f32>>) {
    let params = step.read_params().unwrap();
    let mut grads = vec![0f32; params.len()];
    let sums = step
        .loss_and_grads(&params, batch, rows, &mut grads)
        .unwrap();
    let named = step
        .table()
        .tensors(&grads, "", &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    (sums, named)
}

/// The learned-variance losses on XLA (in the program, f32) against the fused engine (the
/// head's closed form in f64), with one example at t = 0 (the discretized decoder):
/// L_hybrid, and L_vlb with importance weights; the sums (loss, mean L_t, each L_t) and every
/// gradient by name.
#[test]
fn learned_variance_step_matches_the_fused_engine() {
    use elbo::diffusion::learned::{LearnedHead, TrainLoss};
    use elbo::diffusion::nets::{Net, sorted_vars};
    use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
    use elbo::engine::{DenoiseBatch, Engine, denoiser_step};
    if rt().is_none() {
        return;
    }
    let dev = Device::Cpu;
    let cfg = small_unet(2);
    let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
    let mut p = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Cosine, 50).unwrap(),
        Prediction::Eps,
    );
    p.variance = Some(VarianceType::LearnedRange);
    let t = vec![0, 3, 17, 49, 30];
    let mut noise = Noise::new(6);
    let x0 = grid_images(&mut noise, (5, 1, 8, 8));
    let eps = noise.randn((5, 1, 8, 8), &dev).unwrap();
    let xt = p.q_sample(&x0, &t, &eps).unwrap();
    let mut batch = DenoiseBatch {
        xt,
        t,
        target: eps,
        dropout_seed: Some(5),
        x0: Some(x0),
        weights: None,
        weighted: None,
    };
    for loss in [TrainLoss::Hybrid, TrainLoss::Vlb] {
        if loss == TrainLoss::Vlb {
            batch.weights = Some(vec![0.5, 2.0, 1.0, 0.8, 3.0]);
        }
        let run = |engine: Engine| {
            let head = Some(LearnedHead::new(&p, loss).unwrap());
            let (step, _) = denoiser_step(engine, &net, sorted_vars(&varmap), head).unwrap();
            sums_and_named_grads(step, &batch, 0..5)
        };
        let (fs, fg) = run(Engine::Fused);
        let (xs, xg) = run(Engine::Xla);
        assert_eq!(fs.len(), xs.len());
        for (a, b) in xs.iter().zip(&fs) {
            assert!(
                (a - b).abs() < 1e-4 * b.abs().max(1e-3),
                "{loss:?} sums XLA {xs:?} vs fused {fs:?}"
            );
        }
        let scale = fg.values().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (name, f) in &fg {
            let x = &xg[name];
            let err = x.iter().zip(f).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err < 1e-4 * scale,
                "{loss:?} {name}: {err:e} of the largest gradient {scale:e}"
            );
        }
    }
}

/// The U-Net's vector-Jacobian products on XLA (the ODE likelihood's divergence probes)
/// against candle's autodiff of the same network, two cotangents at once.
#[test]
fn unet_vjp_matches_candle_autodiff() {
    use elbo::diffusion::Denoiser;
    use elbo::diffusion::nets::{Net, NetConfig};
    use elbo::engine::xla::unet::XlaUnet;
    let Some(rt) = rt() else { return };
    let dev = Device::Cpu;
    let (net, _) = Net::trainable(&NetConfig::default_unet(), &mut Noise::new(0), &dev).unwrap();
    let Net::Unet(u) = &net else { unreachable!() };
    let mut noise = Noise::new(3);
    let x = noise.randn((2, 1, 28, 28), &dev).unwrap();
    let t = candle_core::Tensor::new(&[10f32, 700.0], &dev).unwrap();
    let vs = [
        noise.randn((2, 1, 28, 28), &dev).unwrap(),
        noise.randn((2, 1, 28, 28), &dev).unwrap(),
    ];
    let (y_c, g_c) = u.vjp(&x, &t, &vs).unwrap();
    let mut xla = XlaUnet::new(u, rt).unwrap();
    let (y_x, g_x) = xla.vjp(&x, &t, &vs).unwrap();
    let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(relative_distance(&v(&y_x), &v(&y_c)) < 1e-4);
    for (a, b) in g_x.iter().zip(&g_c) {
        let d = relative_distance(&v(a), &v(b));
        assert!(d < 1e-4, "a vector-Jacobian product differs by {d:e}");
    }
}

/// Continuous time (VDM's weighted loss) on XLA against the fused engine: the time values
/// enter through the embedding computed in the program, so the derivative reaches them; the
/// sums (loss, each SSE, each g_b with a tangent in x_t and c and a moving target) and every
/// gradient by name, on the whole batch and a rank's rows.
#[test]
fn continuous_time_step_matches_the_fused_engine() {
    use elbo::diffusion::nets::{Net, NetConfig, sorted_vars};
    use elbo::engine::{DenoiseBatch, Engine, WeightedRows, denoiser_step};
    if rt().is_none() {
        return;
    }
    let dev = Device::Cpu;
    let (net, varmap) =
        Net::trainable(&NetConfig::default_unet(), &mut Noise::new(0), &dev).unwrap();
    let mut noise = Noise::new(4);
    let b = 3;
    let shape = (b, 1, 28, 28);
    let batch = DenoiseBatch {
        xt: noise.randn(shape, &dev).unwrap(),
        t: vec![0; b],
        target: noise.randn(shape, &dev).unwrap(),
        dropout_seed: None,
        x0: None,
        weights: None,
        weighted: Some(WeightedRows {
            model_t: vec![12.5, 480.0, 903.25],
            weights: vec![0.7, 1.3, 2.0],
            tangent: Some(((noise.randn(shape, &dev).unwrap() * 0.1).unwrap(), -37.5)),
            target_tangent: Some(noise.randn(shape, &dev).unwrap()),
        }),
    };
    let run = |engine: Engine, rows: std::ops::Range<usize>| {
        let (step, _) = denoiser_step(engine, &net, sorted_vars(&varmap), None).unwrap();
        sums_and_named_grads(step, &batch, rows)
    };
    for rows in [0..b, 1..2] {
        let (fs, fg) = run(Engine::Fused, rows.clone());
        let (xs, xg) = run(Engine::Xla, rows.clone());
        assert_eq!(fs.len(), xs.len());
        let big = fs.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (a, e)) in xs.iter().zip(&fs).enumerate() {
            assert!(
                (a - e).abs() < 1e-4 * e.abs().max(1e-3 * big),
                "rows {rows:?} sum {i}: XLA {a} vs fused {e}"
            );
        }
        let scale = fg.values().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (name, f) in &fg {
            let err = xg[name]
                .iter()
                .zip(f)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err < 1e-4 * scale,
                "rows {rows:?} {name}: {err:e} of the largest gradient {scale:e}"
            );
        }
    }
}

/// Three U-Net training steps with the parameters, Adam's moments and the EMA on the device
/// (one program a step, buffers donated) against the fused engine's gradient, the host's Adam
/// and the EMA as the diffusion loop keeps it: the step's sums (the loss; with learned
/// variances also each L_t), then the parameters, both moments and the EMA by name. The simple
/// loss, and L_hybrid with t = 0 (the discretized decoder) in every batch.
#[test]
fn resident_unet_steps_match_the_fused_engine_and_host_adam() {
    if rt().is_none() {
        return;
    }
    resident_unet_steps(None);
    resident_unet_steps(Some(elbo::diffusion::learned::TrainLoss::Hybrid));
}

fn resident_unet_steps(learned: Option<elbo::diffusion::learned::TrainLoss>) {
    use elbo::diffusion::learned::LearnedHead;
    use elbo::diffusion::nets::{Net, sorted_vars};
    use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
    use elbo::engine::{DenoiseBatch, Engine, denoiser_step};
    let dev = Device::Cpu;
    let cfg = small_unet(if learned.is_some() { 2 } else { 0 });
    let (net, varmap) = Net::trainable(&cfg, &mut Noise::new(0), &dev).unwrap();
    let mut process = GaussianDiffusion::new(
        Schedule::new(BetaSchedule::Linear, 1000).unwrap(),
        Prediction::Eps,
    );
    process.variance = Some(VarianceType::LearnedRange);
    let head = || learned.map(|l| LearnedHead::new(&process, l).unwrap());
    let (fused, _) = denoiser_step(Engine::Fused, &net, sorted_vars(&varmap), head()).unwrap();
    let (xla, _) = denoiser_step(Engine::Xla, &net, sorted_vars(&varmap), head()).unwrap();
    let mut noise = Noise::new(8);
    let batches = (0..3)
        .map(|step| {
            let t = vec![if learned.is_some() { 0 } else { 5 }, 100, 500, 900];
            let x0 = grid_images(&mut noise, (4, 1, 8, 8));
            let eps = noise.randn((4, 1, 8, 8), &dev).unwrap();
            DenoiseBatch {
                xt: process.q_sample(&x0, &t, &eps).unwrap(),
                t,
                target: eps,
                dropout_seed: Some(step),
                x0: Some(x0),
                weights: None,
                weighted: None,
            }
        })
        .collect();
    compare_resident(fused, xla, batches, &format!("{learned:?}"));
}

/// Images of 8-bit levels in [-1, 1], uniform.
fn grid_images(noise: &mut Noise, shape: (usize, usize, usize, usize)) -> candle_core::Tensor {
    let u = noise.rng_uniform(shape, &Device::Cpu).unwrap();
    (u * 255.0)
        .unwrap()
        .floor()
        .unwrap()
        .affine(1.0 / 127.5, -1.0)
        .unwrap()
}

/// Resident steps of `xla` on `batches` against `fused`'s gradient with the host's Adam and
/// the diffusion loop's EMA: every step's sums, then every parameter, both moments and the
/// EMA by name. Adam's epsilon is 1e-3: the key bias of attention has an exactly zero gradient
/// (the softmax ignores a shift of the keys), rounding noise in both engines, which epsilon
/// 1e-8 would turn into full steps of random sign.
fn compare_resident<B>(
    mut fused: Box<dyn TrainStep<Batch = B> + '_>,
    mut xla: Box<dyn TrainStep<Batch = B> + '_>,
    batches: Vec<B>,
    case: &str,
) {
    use elbo::engine::Resident;
    assert!(xla.resident(), "{case}: the XLA step is not resident");
    let config = AdamConfig {
        eps: 1e-3,
        ..AdamConfig::with_lr(3e-3)
    };
    let (mut host, mut device) = (
        Adam::new(fused.table().clone(), config),
        Adam::new(xla.table().clone(), config),
    );
    let mut p_host = fused.read_params().unwrap();
    let mut p_dev = xla.read_params().unwrap();
    let (mut ema_host, mut ema_dev) = (p_host.clone(), p_dev.clone());
    let decay_at = |step: u64| 0.999f64.min((1.0 + step as f64) / (10.0 + step as f64)) as f32;
    {
        let (m, v) = device.moments_mut();
        let state = Resident {
            params: &mut p_dev,
            m,
            v,
            average: Some(&mut ema_dev),
        };
        xla.load_resident(&state).unwrap();
    }
    let mut grads = vec![0f32; p_host.len()];
    for (step, batch) in batches.iter().enumerate() {
        let rows = 0..4;
        let s_host = fused
            .loss_and_grads(&p_host, batch, rows, &mut grads)
            .unwrap();
        host.step(&mut p_host, &grads, 1).unwrap();
        let d = decay_at(host.step_count());
        for (e, &p) in ema_host.iter_mut().zip(&p_host) {
            *e = *e * d + p * (1.0 - d);
        }
        let scalars = device.advance();
        let s_dev = xla
            .step_resident(batch, scalars, Some(decay_at(device.step_count())))
            .unwrap();
        assert_eq!(s_dev.len(), s_host.len());
        let big = s_host.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (a, b) in s_dev.iter().zip(&s_host) {
            assert!(
                (a - b).abs() < 1e-4 * b.abs().max(1e-3 * big),
                "{case} step {step}: sums {s_dev:?} vs {s_host:?}"
            );
        }
    }
    let len = p_dev.len();
    let (mut m_dev, mut v_dev) = (vec![0f32; len], vec![0f32; len]);
    xla.store_resident(&mut Resident {
        params: &mut p_dev,
        m: &mut m_dev,
        v: &mut v_dev,
        average: Some(&mut ema_dev),
    })
    .unwrap();
    let (m_host, v_host) = host.moments_mut();
    let (m_host, v_host) = (m_host.to_vec(), v_host.to_vec());
    for e in fused.table().entries() {
        let x = xla
            .table()
            .entries()
            .iter()
            .find(|x| x.name == e.name)
            .unwrap();
        let n: usize = e.shape.iter().product();
        let (rf, rx) = (e.offset..e.offset + n, x.offset..x.offset + n);
        let worst =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        let size = p_host[rf.clone()].iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!(
            worst(&p_dev[rx.clone()], &p_host[rf.clone()]) < 5e-5 * size,
            "{case} {}: parameters",
            e.name
        );
        assert!(
            worst(&ema_dev[rx.clone()], &ema_host[rf.clone()]) < 5e-5 * size,
            "{case} {}: EMA",
            e.name
        );
        let scale = m_host[rf.clone()]
            .iter()
            .fold(1e-12f32, |m, v| m.max(v.abs()));
        assert!(
            worst(&m_dev[rx.clone()], &m_host[rf.clone()]) < 1e-3 * scale.max(1e-6),
            "{case} {}: first moments",
            e.name
        );
        let scale = v_host[rf.clone()]
            .iter()
            .fold(1e-12f32, |m, v| m.max(v.abs()));
        assert!(
            worst(&v_dev[rx], &v_host[rf]) < 1e-2 * scale.max(1e-9),
            "{case} {}: second moments",
            e.name
        );
    }
}

/// Three continuous-time (VDM) steps resident against the fused engine and the host's Adam:
/// the network's parameters, moments and EMA on the device, the learned schedule's on the host,
/// its gradient through the device's derivatives in x_t and the time values; eps and v
/// prediction. The sums (bound, its three terms, each weighted SSE), then every parameter,
/// the schedule's included.
#[test]
fn resident_continuous_steps_match_the_fused_engine_and_host_adam() {
    use elbo::diffusion::Prediction;
    use elbo::diffusion::nets::{Net, sorted_vars};
    use elbo::diffusion::vdm::{ContinuousTime, GammaKind};
    use elbo::engine::vdm::{ContinuousStep, DiffusionBatch, continuous_batch};
    use elbo::engine::{Engine, denoiser_step};
    if rt().is_none() {
        return;
    }
    let dev = Device::Cpu;
    let (net, varmap) = Net::trainable(&small_unet(0), &mut Noise::new(0), &dev).unwrap();
    let spec = ContinuousTime {
        gamma: GammaKind::Learned,
        ..Default::default()
    };
    let mut normal = Noise::new(2);
    let gp: Vec<f32> = spec
        .initial_params(|| {
            let mut z = [0f32];
            normal.fill_randn(&mut z);
            z[0] as f64
        })
        .into_iter()
        .map(|v| v as f32)
        .collect();
    for prediction in [Prediction::Eps, Prediction::V] {
        let step = |engine: Engine| -> Box<dyn TrainStep<Batch = DiffusionBatch> + '_> {
            let (inner, _) = denoiser_step(engine, &net, sorted_vars(&varmap), None).unwrap();
            Box::new(ContinuousStep::new(inner, spec.clone(), prediction, gp.clone()).unwrap())
        };
        let mut noise = Noise::new(9);
        let batches = (0..3)
            .map(|i| {
                let x = grid_images(&mut noise, (4, 1, 8, 8));
                let u = 0.1 + 0.3 * i as f64;
                let b = continuous_batch(x, u, Some(i), &mut noise, &dev).unwrap();
                DiffusionBatch::Continuous(b)
            })
            .collect();
        compare_resident(
            step(Engine::Fused),
            step(Engine::Xla),
            batches,
            &format!("continuous {prediction:?}"),
        );
    }
}

/// Dropout masks computed on the device from the examples' hash bases are `fill_mask`'s, bit
/// for bit: splitmix64 in ui64, the top 24 bits against p.
#[test]
fn device_dropout_masks_equal_the_hosts() {
    use elbo::nn::dropout::{fill_mask, mask_base};
    let Some(rt) = rt() else { return };
    let (n, per, p, seed) = (3, 1000, 0.3f32, 0xDEAD_BEEF_u64);
    let mut g = Graph::new();
    let bases = g.input(&[n, 4]);
    let m = g.dropout_mask(bases, p, &[n, 10, 10, 10]).unwrap();
    let exe = rt.compile(&g.to_stablehlo(&[m]).unwrap(), 1).unwrap();
    let mut pieces = Vec::new();
    let mut expected = vec![0f32; n * per];
    for (e, chunk) in expected.chunks_mut(per).enumerate() {
        let stream = 1000 + 7 * e as u64;
        let base = mask_base(seed, stream);
        pieces.extend((0..4).map(|j| ((base >> (16 * j)) & 0xFFFF) as f32));
        fill_mask(seed, stream, p, chunk);
    }
    let input = rt.upload(&pieces, &[n, 4]).unwrap();
    let got = exe.run(&[&input]).unwrap()[0].to_vec(n * per).unwrap();
    let differ = got
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{differ} of {} mask values differ", n * per);
    let kept = expected.iter().filter(|&&v| v > 0.0).count();
    assert!(
        kept > 0 && kept < n * per,
        "a mask that keeps everything or nothing"
    );
}

/// [`small_unet`]'s network, the same weights on each call: the initial ones, jittered so the
/// last layer is not zero.
fn jittered_small_unet(out_channels: usize) -> elbo::diffusion::nets::Net {
    use elbo::diffusion::nets::{Net, sorted_vars};
    let dev = Device::Cpu;
    let (net, varmap) =
        Net::trainable(&small_unet(out_channels), &mut Noise::new(0), &dev).unwrap();
    let mut noise = Noise::new(7);
    for (_, var) in sorted_vars(&varmap) {
        let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.1).unwrap();
        var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
    }
    net
}

/// The samplers on XLA, each step one program with x_t kept on the device, against the fused
/// engine's network and the host's update (`ddim_sample`, `ddpm_sample`): DDIM with eta 0,
/// clipped and not, and eta 1 (the noise drawn on the host in the host loop's order); DDPM with
/// fixed-small and fixed-large variances; for eps, x_0 and v prediction; and 2C-output networks
/// whose DDPM draws with their learned variances (learned-range, and the log-variance itself).
/// The images agree to 1e-4.
#[test]
fn sampler_steps_match_the_fused_engine() {
    use elbo::diffusion::process::Denoiser;
    use elbo::diffusion::sampler::{ddim_sample, ddpm_sample};
    use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
    use elbo::engine::{Engine, FrozenNet};
    if rt().is_none() {
        return;
    }
    let dev = Device::Cpu;
    let bar = indicatif::ProgressBar::hidden();
    let cases = [
        (0, Prediction::Eps, None),
        (0, Prediction::X0, None),
        (0, Prediction::V, None),
        (2, Prediction::Eps, Some(VarianceType::LearnedRange)),
        (2, Prediction::V, Some(VarianceType::Learned)),
    ];
    for (out_channels, prediction, variance) in cases {
        let mut process =
            GaussianDiffusion::new(Schedule::new(BetaSchedule::Linear, 40).unwrap(), prediction);
        process.variance = variance;
        let fused =
            FrozenNet::with_engine(jittered_small_unet(out_channels), Engine::Fused).unwrap();
        let xla = FrozenNet::with_engine(jittered_small_unet(out_channels), Engine::Xla).unwrap();
        assert!(xla.step_runner().is_some() && fused.step_runner().is_none());
        let x_t = Noise::new(3).randn((3, 1, 8, 8), &dev).unwrap();
        let run = |net: &FrozenNet, sampler: usize| {
            let mut noise = Noise::new(4);
            let x = x_t.clone();
            let p = &process;
            match sampler {
                0 => ddim_sample(p, net, x, 8, 0.0, true, &mut noise, &bar),
                1 => ddim_sample(p, net, x, 8, 0.0, false, &mut noise, &bar),
                2 => ddim_sample(p, net, x, 8, 1.0, true, &mut noise, &bar),
                3 => ddpm_sample(p, net, x, VarianceType::FixedSmall, true, &mut noise, &bar),
                _ => ddpm_sample(p, net, x, VarianceType::FixedLarge, false, &mut noise, &bar),
            }
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        };
        for sampler in 0..5 {
            let (a, b) = (run(&xla, sampler), run(&fused, sampler));
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                err < 1e-4 * scale,
                "{prediction:?}, {out_channels} outputs, sampler {sampler}: {err:e} of {scale}"
            );
        }
    }
}

/// The bound's terms on XLA (the network, the means and log-variances, the KL or the decoder
/// and the per-example sums in one program) against the fused engine's network with the host's
/// arithmetic (`GaussianDiffusion::bound_term`): fixed-small and fixed-large variances, the clip
/// of x_0, the discretized and the continuous decoder, learned-range and learned log-variances;
/// eps, x_0 and v prediction; t = 0 (the decoder) beside t > 0 in every batch. Each term agrees
/// to 1e-4 of its size.
#[test]
fn bound_terms_match_the_fused_engine() {
    use elbo::diffusion::process::{BoundOptions, Decoder};
    use elbo::diffusion::{BetaSchedule, GaussianDiffusion, Prediction, Schedule, VarianceType};
    use elbo::engine::{Engine, FrozenNet};
    if rt().is_none() {
        return;
    }
    let opts = |variance, decoder, clip_denoised| BoundOptions {
        variance,
        decoder,
        clip_denoised,
    };
    let (small, large) = (VarianceType::FixedSmall, VarianceType::FixedLarge);
    let cases = [
        (
            Prediction::Eps,
            None,
            opts(small, Decoder::Discretized, false),
        ),
        (
            Prediction::Eps,
            None,
            opts(large, Decoder::Discretized, true),
        ),
        (
            Prediction::X0,
            None,
            opts(small, Decoder::Continuous, false),
        ),
        (Prediction::V, None, opts(large, Decoder::Continuous, true)),
        (
            Prediction::Eps,
            Some(VarianceType::LearnedRange),
            opts(small, Decoder::Discretized, false),
        ),
        (
            Prediction::V,
            Some(VarianceType::Learned),
            opts(small, Decoder::Discretized, true),
        ),
    ];
    for (prediction, variance, opts) in cases {
        let out_channels = if variance.is_some() { 2 } else { 0 };
        let mut process =
            GaussianDiffusion::new(Schedule::new(BetaSchedule::Linear, 40).unwrap(), prediction);
        process.variance = variance;
        let fused =
            FrozenNet::with_engine(jittered_small_unet(out_channels), Engine::Fused).unwrap();
        let xla = FrozenNet::with_engine(jittered_small_unet(out_channels), Engine::Xla).unwrap();
        let x0 = grid_images(&mut Noise::new(5), (4, 1, 8, 8));
        let t = [0, 1, 17, 39];
        let run = |net: &FrozenNet| {
            process
                .bound_term(net, &x0, &t, opts, &mut Noise::new(6))
                .unwrap()
        };
        let (a, b) = (run(&xla), run(&fused));
        for (i, (x, f)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - f).abs() < 1e-4 * f.abs().max(1.0),
                "{prediction:?} {variance:?} {opts:?} t = {}: XLA {x} vs fused {f}",
                t[i]
            );
        }
    }
}
