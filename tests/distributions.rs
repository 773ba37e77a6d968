//! The mathematics of `elbo::distributions`: closed forms against Monte Carlo, the
//! reparameterization gradient against the analytic one, and numerically stable likelihoods.

use candle_core::{D, Device, Tensor, Var};
use elbo::distributions::{
    DiagGaussian, LOG_2PI, Noise, bernoulli_log_prob_logits, gaussian_log_prob,
    standard_normal_log_prob,
};

fn cpu() -> Device {
    Device::Cpu
}

fn gaussian(mean: &[f32], log_var: &[f32]) -> DiagGaussian {
    let d = mean.len();
    DiagGaussian::new(
        Tensor::from_slice(mean, (1, d), &cpu()).unwrap(),
        Tensor::from_slice(log_var, (1, d), &cpu()).unwrap(),
    )
    .unwrap()
}

fn mean_and_stderr(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// KL(q || p) = E_q[log q(z) - log p(z)], estimated with 200,000 samples: the closed form must
/// lie within 4 standard errors of the estimate.
fn check_kl_against_monte_carlo(
    q: &DiagGaussian,
    closed_form: f64,
    log_p: impl Fn(&Tensor) -> Tensor,
) {
    let mut noise = Noise::new(7);
    let z = q.rsample(200_000, &mut noise).unwrap(); // [K, 1, D]
    let log_ratio = (q.log_prob(&z).unwrap() - log_p(&z))
        .unwrap()
        .flatten_all()
        .unwrap();
    let (mc, se) = mean_and_stderr(&log_ratio.to_vec1::<f32>().unwrap());
    assert!(
        (mc - closed_form).abs() < 4.0 * se + 1e-4,
        "closed form {closed_form} vs Monte Carlo {mc} +- {se}"
    );
}

#[test]
fn kl_to_standard_normal_matches_monte_carlo() {
    let q = gaussian(&[0.5, -1.0, 2.0, 0.0], &[0.3, -1.2, 0.8, -0.1]);
    let kl = q.kl_standard_normal().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    // By hand: 0.5 * sum(mu^2 + e^lv - 1 - lv).
    let by_hand: f64 = [(0.5f64, 0.3f64), (-1.0, -1.2), (2.0, 0.8), (0.0, -0.1)]
        .iter()
        .map(|(m, lv)| 0.5 * (m * m + lv.exp() - 1.0 - lv))
        .sum();
    assert!((kl - by_hand).abs() < 1e-5, "{kl} vs {by_hand}");
    check_kl_against_monte_carlo(&q, kl, |z| standard_normal_log_prob(z).unwrap());
}

#[test]
fn kl_between_two_gaussians_matches_monte_carlo() {
    let q = gaussian(&[0.5, -1.0, 2.0], &[0.3, -1.2, 0.8]);
    let p = gaussian(&[0.0, 1.0, 1.5], &[-0.5, 0.4, 1.0]);
    let kl = q.kl(&p).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    assert!(kl > 0.1);
    check_kl_against_monte_carlo(&q, kl, |z| p.log_prob(z).unwrap());
    // KL to N(0, I) is the special case p = N(0, I).
    let std_normal = gaussian(&[0.0; 3], &[0.0; 3]);
    let a = q.kl(&std_normal).unwrap().to_vec1::<f32>().unwrap()[0];
    let b = q.kl_standard_normal().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
}

#[test]
fn kl_of_identical_gaussians_is_zero() {
    let q = gaussian(&[0.5, -1.0, 2.0], &[0.3, -1.2, 0.8]);
    let kl = q.kl(&q.clone()).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(kl.abs() < 1e-6, "{kl}");
    let prior = gaussian(&[0.0; 5], &[0.0; 5]);
    assert_eq!(
        prior
            .kl_standard_normal()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0],
        0.0
    );
}

#[test]
fn log_prob_matches_known_constants() {
    // log N(0; 0, 1) = -0.5 log(2 pi) per dimension.
    let z = Tensor::zeros((1, 3), candle_core::DType::F32, &cpu()).unwrap();
    let lp = standard_normal_log_prob(&z)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    assert!((lp - (-1.5 * LOG_2PI)).abs() < 1e-5);
    // log N(x=3; 1, sigma^2=4) = -0.5 (log 2pi + log 4 + 1).
    let x = Tensor::new(&[[3.0f32]], &cpu()).unwrap();
    let m = Tensor::new(&[[1.0f32]], &cpu()).unwrap();
    let lv = Tensor::new(&[[4.0f32.ln()]], &cpu()).unwrap();
    let lp = gaussian_log_prob(&x, &m, &lv)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    assert!(
        (lp - (-0.5 * (LOG_2PI + 4f64.ln() + 1.0))).abs() < 1e-5,
        "{lp}"
    );
}

/// For f(z) = sum (z - c)^2 and z = mu + sigma * eps, E[f] = sum (mu - c)^2 + sigma^2, so
/// dE/dmu = 2 (mu - c) and dE/dlog_var = sigma^2. The reparameterized Monte Carlo gradient
/// (autodiff through `rsample_with`) must match within 5 standard errors.
#[test]
fn reparameterized_gradient_matches_analytic_gradient() {
    let (mu0, lv0, c) = ([0.3f32, -0.7], [0.2f32, -1.0], [1.0f32, 0.5]);
    let k = 100_000;
    let mu = Var::from_tensor(&Tensor::from_slice(&mu0, (1, 2), &cpu()).unwrap()).unwrap();
    let lv = Var::from_tensor(&Tensor::from_slice(&lv0, (1, 2), &cpu()).unwrap()).unwrap();
    let q = DiagGaussian::new(mu.as_tensor().clone(), lv.as_tensor().clone()).unwrap();
    let eps = Noise::new(3).randn((k, 1, 2), &cpu()).unwrap();
    let z = q.rsample_with(&eps).unwrap();
    let ct = Tensor::from_slice(&c, (1, 2), &cpu()).unwrap();
    let f = z
        .broadcast_sub(&ct)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let grads = f.mean_all().unwrap().backward().unwrap();
    let g_mu = grads
        .get(mu.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let g_lv = grads
        .get(lv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let eps_v = eps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..2 {
        let sigma = (0.5 * lv0[i]).exp();
        // Per-sample gradients, for the standard errors.
        let per_mu: Vec<f32> = (0..k)
            .map(|j| 2.0 * (mu0[i] + sigma * eps_v[2 * j + i] - c[i]))
            .collect();
        let per_lv: Vec<f32> = (0..k)
            .map(|j| (mu0[i] + sigma * eps_v[2 * j + i] - c[i]) * sigma * eps_v[2 * j + i])
            .collect();
        let (_, se_mu) = mean_and_stderr(&per_mu);
        let (_, se_lv) = mean_and_stderr(&per_lv);
        let (want_mu, want_lv) = (2.0 * (mu0[i] - c[i]) as f64, lv0[i].exp() as f64);
        assert!(
            (g_mu[i] as f64 - want_mu).abs() < 5.0 * se_mu,
            "d/dmu[{i}] {} vs {want_mu} (se {se_mu})",
            g_mu[i]
        );
        assert!(
            (g_lv[i] as f64 - want_lv).abs() < 5.0 * se_lv,
            "d/dlogvar[{i}] {} vs {want_lv} (se {se_lv})",
            g_lv[i]
        );
    }
}

#[test]
fn bernoulli_from_logits_equals_sigmoid_plus_bce() {
    let logits: Vec<f32> = (0..21).map(|i| -5.0 + 0.5 * i as f32).collect();
    let x: Vec<f32> = (0..21).map(|i| (i % 5) as f32 / 4.0).collect();
    for (l, xv) in logits.iter().zip(&x) {
        let lt = Tensor::new(&[[*l]], &cpu()).unwrap();
        let xt = Tensor::new(&[[*xv]], &cpu()).unwrap();
        let ours = bernoulli_log_prob_logits(&xt, &lt)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let p = 1.0 / (1.0 + (-(*l as f64)).exp());
        let bce = -(*xv as f64 * p.ln() + (1.0 - *xv as f64) * (1.0 - p).ln());
        assert!(
            (ours + bce).abs() < 1e-5,
            "logit {l}, x {xv}: {ours} vs -BCE {}",
            -bce
        );
    }
}

#[test]
fn bernoulli_from_logits_is_finite_at_extreme_logits() {
    let l = Tensor::new(&[[100.0f32], [-100.0], [100.0], [-100.0]], &cpu()).unwrap();
    let x = Tensor::new(&[[1.0f32], [0.0], [0.0], [1.0]], &cpu()).unwrap();
    let v = bernoulli_log_prob_logits(&x, &l)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    // Certain and right: log 1 = 0; certain and wrong: log sigmoid(-100) = -100.
    assert!(v[0].abs() < 1e-6 && v[1].abs() < 1e-6, "{v:?}");
    assert!(
        (v[2] + 100.0).abs() < 1e-4 && (v[3] + 100.0).abs() < 1e-4,
        "{v:?}"
    );
}

/// The discretized logistic (PixelCNN++): for several means and scales, the probabilities of
/// the 256 levels of a pixel sum to 1 (within 1e-5), and each equals the direct computation in
/// f64 (sigmoid differences, the edge bins taking the tails) within 1e-4 relative where it is
/// above 1e-6.
#[test]
fn discretized_logistic_sums_to_one_and_matches_a_direct_computation() {
    use elbo::distributions::discretized_logistic_log_prob;
    let dev = Device::Cpu;
    let levels: Vec<f32> = (0..256).map(|v| v as f32 / 255.0).collect();
    let x = Tensor::from_vec(levels.clone(), (256, 1), &dev).unwrap();
    for &(mean, log_scale) in &[
        (0.0f32, -3.0f32),
        (0.3, -5.0),
        (-0.98, -2.0),
        (0.999, -6.5),
        (0.5, 0.5),
        (-0.2, -9.0),
    ] {
        let m = Tensor::full(mean, (256, 1), &dev).unwrap();
        let ls = Tensor::full(log_scale, (256, 1), &dev).unwrap();
        let lp = discretized_logistic_log_prob(&x, &m, &ls)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "mean {mean}, log s {log_scale}: sum {total}"
        );
        let s = (log_scale.max(-7.0) as f64).exp();
        let sig = |t: f64| 1.0 / (1.0 + (-t).exp());
        for (v, &l) in lp.iter().enumerate() {
            let xc = 2.0 * v as f64 / 255.0 - 1.0;
            let upper = if v == 255 {
                1.0
            } else {
                sig((xc + 1.0 / 255.0 - mean as f64) / s)
            };
            let lower = if v == 0 {
                0.0
            } else {
                sig((xc - 1.0 / 255.0 - mean as f64) / s)
            };
            let want = upper - lower;
            if want > 1e-6 {
                let got = (l as f64).exp();
                assert!(
                    (got - want).abs() < 1e-4 * want,
                    "level {v}, mean {mean}, log s {log_scale}: {got} vs {want}"
                );
            }
        }
    }
}

/// The mixture of discretized logistics: the 256 probabilities of a value sum to 1 and equal
/// the pi-weighted sum of the components' probabilities, computed directly in f64.
#[test]
fn discretized_logistic_mixture_sums_to_one_and_matches_a_direct_computation() {
    use elbo::distributions::discretized_logistic_mixture_log_prob;
    let dev = Device::Cpu;
    let levels: Vec<f32> = (0..256).map(|v| v as f32 / 255.0).collect();
    let x = Tensor::from_vec(levels, (256, 1), &dev).unwrap();
    // Three components: logits of pi, means, log-scales ([B = 256, M = 3, D = 1]).
    let (logits, means, scales) = (
        [0.3f32, -1.0, 1.2],
        [-0.5f32, 0.1, 0.8],
        [-3.0f32, -1.5, -4.0],
    );
    let full = |v: [f32; 3]| Tensor::from_vec(v.repeat(256), (256, 3, 1), &dev).unwrap();
    let lp = discretized_logistic_mixture_log_prob(&x, &full(logits), &full(means), &full(scales))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "sum {total}");
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    let sig = |t: f64| 1.0 / (1.0 + (-t).exp());
    for (v, &l) in lp.iter().enumerate() {
        let xc = 2.0 * v as f64 / 255.0 - 1.0;
        let mut want = 0.0;
        for m in 0..3 {
            let s = (scales[m] as f64).exp();
            let up = if v == 255 {
                1.0
            } else {
                sig((xc + 1.0 / 255.0 - means[m] as f64) / s)
            };
            let low = if v == 0 {
                0.0
            } else {
                sig((xc - 1.0 / 255.0 - means[m] as f64) / s)
            };
            want += (logits[m] as f64).exp() / z * (up - low);
        }
        if want > 1e-6 {
            let got = (l as f64).exp();
            assert!(
                (got - want).abs() < 1e-4 * want,
                "level {v}: {got} vs {want}"
            );
        }
    }
}
