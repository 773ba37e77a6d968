//! Continuous-time diffusion: variational diffusion models (Kingma, Salimans, Poole & Ho 2021,
//! "VDM"). The forward process is q(z_t | x) = N(alpha_t x, sigma_t^2 I) for t in [0, 1],
//! variance preserving, with the noise schedule given by
//!
//! ```text
//! gamma(t) = -log SNR(t),   alpha_t^2 = sigmoid(-gamma(t)),   sigma_t^2 = sigmoid(gamma(t))
//! ```
//!
//! and the bound (their eq. 11 with the T -> infinity limit of eq. 17):
//!
//! ```text
//! -log p(x) <= KL(q(z_1 | x) || N(0, I))                       prior
//!            + E_{z_0} [-log p(x | z_0)]                         reconstruction
//!            + 1/2 E_{t ~ U(0, 1), eps} [gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2]   diffusion
//! ```
//!
//! The T-step discrete bound replaces the diffusion term by
//! `T/2 E_{i ~ U{1..T}} [expm1(gamma(t_i) - gamma(s_i)) ||eps - eps_hat(z_{t_i}; gamma_{t_i})||^2]`
//! with `t_i = i/T`, `s_i = (i-1)/T` (their eq. 13); it is never below the continuous one in
//! expectation (their Section 4.1). Images are the 256 levels of 8-bit pixels, encoded as
//! `f = (2x + 1)/256 - 1`, and `p(x | z_0)` factorises over pixels with
//! `p(x_i | z_0) = softmax_k(-(z_0/alpha_0 - f_k)^2 / (2 e^{gamma_0}))` over all 256 levels.
//!
//! The schedule is fixed (linear in gamma, or the cosine schedule's log-SNR between the same
//! endpoints) or learned: [`Gamma::Learned`], VDM's `NoiseSchedule_NNet` (a monotone network of
//! positive-weight dense layers) normalised to run from learned endpoints gamma_0 to gamma_1.
//! The endpoints train on the bound; the inner shape does not change the continuous bound's
//! expectation (their eq. 18), and trains on the variance of its estimate instead (their
//! Section 5.3 / Appendix I.2): d/d eta E[L_d^2] = E[2 L_d dL_d/d eta].

use anyhow::{Result, bail};

/// VDM's endpoints: gamma_0 = -13.3 (sigma_0^2 ~ 1.7e-6), gamma_1 = 5 (alpha_1^2 ~ 6.7e-3).
pub const GAMMA_MIN: f64 = -13.3;
pub const GAMMA_MAX: f64 = 5.0;
/// The hidden features of VDM's schedule network.
pub const FEATURES: usize = 1024;
/// Pixel levels of 8-bit images.
pub const LEVELS: usize = 256;

/// How gamma(t) is made.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GammaKind {
    /// gamma(t) = gamma_min + (gamma_max - gamma_min) t (VDM's `fixed_linear`).
    #[default]
    Linear,
    /// The cosine schedule's log-SNR between the same endpoints: gamma(t) = 2 log tan(a + (b - a) t)
    /// with tan a = e^{gamma_min/2}, tan b = e^{gamma_max/2} (Nichol & Dhariwal's cosine
    /// schedule, alpha_t = cos of an angle linear in t, truncated to the endpoints).
    Cosine,
    /// VDM's monotone network with learned endpoints ([`MonotoneNet`]).
    Learned,
}

/// A continuous-time model's schedule settings (stored in its checkpoint's config).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContinuousTime {
    pub gamma: GammaKind,
    /// The fixed schedules' endpoints and the learned one's start; the network's time input
    /// is `1000 (gamma_t - gamma_min) / (gamma_max - gamma_min)` (VDM's `ScoreUNet`).
    pub gamma_min: f64,
    pub gamma_max: f64,
    /// The learned schedule's hidden features.
    #[serde(default = "default_features")]
    pub features: usize,
}

fn default_features() -> usize {
    FEATURES
}

impl Default for ContinuousTime {
    fn default() -> Self {
        Self {
            gamma: GammaKind::Linear,
            gamma_min: GAMMA_MIN,
            gamma_max: GAMMA_MAX,
            features: FEATURES,
        }
    }
}

impl ContinuousTime {
    pub fn validate(&self) -> Result<()> {
        let (a, b) = (self.gamma_min, self.gamma_max);
        if !(a.is_finite() && b.is_finite() && a < b && a > -40.0 && b < 40.0) {
            bail!("--gamma-min {a} and --gamma-max {b}: expected -40 < gamma_min < gamma_max < 40");
        }
        if self.gamma == GammaKind::Learned {
            crate::limits::count("the schedule network's features", self.features, 1 << 16)?;
        }
        Ok(())
    }

    /// The network's time input for gamma: `1000 (gamma - gamma_min) / (gamma_max - gamma_min)`.
    pub fn model_time(&self, gamma: f64) -> f64 {
        1000.0 * (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    }

    /// d(model time)/d gamma.
    pub fn model_time_slope(&self) -> f64 {
        1000.0 / (self.gamma_max - self.gamma_min)
    }

    /// The learned schedule's parameters as named tensors `(name, shape)` in the order of
    /// [`MonotoneNet::from_params`]'s flat buffer; none for a fixed schedule.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self.gamma {
            GammaKind::Learned => {
                let n = self.features;
                vec![
                    (PARAM_ENDPOINTS.to_string(), vec![2]),
                    ("gamma.l1.weight".to_string(), vec![1]),
                    ("gamma.l2.weight".to_string(), vec![n]),
                    ("gamma.l2.bias".to_string(), vec![n]),
                    ("gamma.l3.weight".to_string(), vec![n]),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// The learned schedule's initial parameters: endpoints (gamma_min, gamma_max), l1's weight
    /// 1, l2's and l3's weights N(0, 1) and l2's bias 0 (VDM's initialisers), from `normal`.
    pub fn initial_params(&self, mut normal: impl FnMut() -> f64) -> Vec<f64> {
        match self.gamma {
            GammaKind::Learned => {
                let n = self.features;
                let mut p = vec![self.gamma_min, self.gamma_max, 1.0];
                p.extend((0..n).map(|_| normal()));
                p.extend(std::iter::repeat_n(0.0, n));
                p.extend((0..n).map(|_| normal()));
                p
            }
            _ => Vec::new(),
        }
    }

    /// The schedule, a learned one from its flat parameters (`params`, as
    /// [`ContinuousTime::param_shapes`] lays them out).
    pub fn schedule(&self, params: &[f64]) -> Result<Gamma> {
        let (a, b) = (self.gamma_min, self.gamma_max);
        Ok(match self.gamma {
            GammaKind::Linear => Gamma::Linear { g0: a, g1: b },
            GammaKind::Cosine => Gamma::Cosine { g0: a, g1: b },
            GammaKind::Learned => Gamma::Learned(MonotoneNet::from_params(params, self.features)?),
        })
    }
}

/// The name of the learned endpoints `[gamma_0, gamma_1]`.
pub const PARAM_ENDPOINTS: &str = "gamma.endpoints";

/// gamma(t) = -log SNR(t) on [0, 1], increasing.
#[derive(Debug, Clone, PartialEq)]
pub enum Gamma {
    Linear { g0: f64, g1: f64 },
    Cosine { g0: f64, g1: f64 },
    Learned(MonotoneNet),
}

impl Gamma {
    /// (gamma(t), gamma'(t)).
    pub fn value_and_slope(&self, t: f64) -> (f64, f64) {
        match self {
            Gamma::Linear { g0, g1 } => (g0 + (g1 - g0) * t, g1 - g0),
            Gamma::Cosine { g0, g1 } => {
                let (a, b) = cosine_angles(*g0, *g1);
                let th = a + (b - a) * t;
                // gamma = 2 log tan th, gamma' = 2 (b - a) / (sin th cos th).
                (2.0 * th.tan().ln(), 4.0 * (b - a) / (2.0 * th).sin())
            }
            Gamma::Learned(net) => net.value_and_slope(t),
        }
    }

    pub fn value(&self, t: f64) -> f64 {
        self.value_and_slope(t).0
    }

    /// (gamma_0, gamma_1).
    pub fn endpoints(&self) -> (f64, f64) {
        match self {
            Gamma::Linear { g0, g1 } | Gamma::Cosine { g0, g1 } => (*g0, *g1),
            Gamma::Learned(n) => (n.g0, n.g1),
        }
    }
}

/// The angles a, b with tan a = e^{g0/2}, tan b = e^{g1/2}.
fn cosine_angles(g0: f64, g1: f64) -> (f64, f64) {
    ((0.5 * g0).exp().atan(), (0.5 * g1).exp().atan())
}

/// VDM's `NoiseSchedule_NNet` with its endpoints made parameters:
///
/// ```text
/// h(t) = |w1| t + 1/n sum_j |w3_j| (2 sigmoid(|w2_j| (2t - 1) + b2_j) - 1)
/// gamma(t) = g0 + (g1 - g0) (h(t) - h(0)) / (h(1) - h(0))
/// ```
///
/// h is increasing for any weights (every path from t to h has positive weights and
/// increasing activations), so gamma increases from g0 to g1 when g1 > g0. Flat parameters:
/// `[g0, g1, w1, w2 (n), b2 (n), w3 (n)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MonotoneNet {
    pub g0: f64,
    pub g1: f64,
    pub w1: f64,
    pub w2: Vec<f64>,
    pub b2: Vec<f64>,
    pub w3: Vec<f64>,
}

/// h(t), h'(t) and, when asked, their gradients with respect to eta = `[w1, w2, b2, w3]`.
struct HEval {
    h: f64,
    dh: f64,
    grad_h: Vec<f64>,
    grad_dh: Vec<f64>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl MonotoneNet {
    pub fn num_params(features: usize) -> usize {
        3 + 3 * features
    }

    pub fn from_params(p: &[f64], n: usize) -> Result<Self> {
        if p.len() != Self::num_params(n) {
            bail!(
                "the learned schedule has {} parameters, expected {} for {n} features",
                p.len(),
                Self::num_params(n)
            );
        }
        if p.iter().any(|v| !v.is_finite()) {
            bail!("the learned schedule's parameters are not all finite");
        }
        if p[1] <= p[0] {
            bail!(
                "the learned schedule's endpoints are not increasing: gamma_0 = {}, gamma_1 = {}",
                p[0],
                p[1]
            );
        }
        Ok(Self {
            g0: p[0],
            g1: p[1],
            w1: p[2],
            w2: p[3..3 + n].to_vec(),
            b2: p[3 + n..3 + 2 * n].to_vec(),
            w3: p[3 + 2 * n..3 + 3 * n].to_vec(),
        })
    }

    fn features(&self) -> usize {
        self.w2.len()
    }

    fn eval(&self, t: f64, grads: bool) -> HEval {
        let n = self.features();
        let inv = 1.0 / n as f64;
        let mut e = HEval {
            h: self.w1.abs() * t,
            dh: self.w1.abs(),
            grad_h: Vec::new(),
            grad_dh: Vec::new(),
        };
        if grads {
            e.grad_h = vec![0.0; 1 + 3 * n];
            e.grad_dh = vec![0.0; 1 + 3 * n];
            e.grad_h[0] = self.w1.signum() * t;
            e.grad_dh[0] = self.w1.signum();
        }
        let x = 2.0 * t - 1.0;
        for j in 0..n {
            let (a2, a3) = (self.w2[j].abs(), self.w3[j].abs());
            let u = a2 * x + self.b2[j];
            let s = sigmoid(u);
            let q = s * (1.0 - s);
            e.h += inv * a3 * (2.0 * s - 1.0);
            // d/dt: |w3| / n 2 s'(u) 2 |w2|.
            e.dh += inv * a3 * 4.0 * a2 * q;
            if grads {
                let dq = q * (1.0 - 2.0 * s);
                let (s2, s3) = (self.w2[j].signum(), self.w3[j].signum());
                // h: d/dw2 = |w3|/n 2 q x sgn(w2); d/db2 = |w3|/n 2 q; d/dw3 = sgn(w3)/n (2s - 1).
                e.grad_h[1 + j] = inv * a3 * 2.0 * q * x * s2;
                e.grad_h[1 + n + j] = inv * a3 * 2.0 * q;
                e.grad_h[1 + 2 * n + j] = inv * s3 * (2.0 * s - 1.0);
                // h': 4/n |w3| (|w2| q)' with q' = dq du/d(.).
                e.grad_dh[1 + j] = inv * a3 * 4.0 * s2 * (q + a2 * dq * x);
                e.grad_dh[1 + n + j] = inv * a3 * 4.0 * a2 * dq;
                e.grad_dh[1 + 2 * n + j] = inv * s3 * 4.0 * a2 * q;
            }
        }
        e
    }

    /// (gamma(t), gamma'(t)).
    pub fn value_and_slope(&self, t: f64) -> (f64, f64) {
        let (h0, h1, ht) = (
            self.eval(0.0, false),
            self.eval(1.0, false),
            self.eval(t, false),
        );
        let d = h1.h - h0.h;
        let span = self.g1 - self.g0;
        (self.g0 + span * (ht.h - h0.h) / d, span * ht.dh / d)
    }

    /// Adds to `grad` (the flat parameters' layout) the gradient of
    /// `sum_b (bound_b + var_b)` where each example b has its time `t[b]`, and
    /// `d_gamma[b]`, `d_slope[b]` are dL/d gamma(t_b) and dL/d gamma'(t_b) of two losses: the
    /// bound's (reaching the endpoints) and the variance's (reaching eta). `bound` and
    /// `variance` hold (d_gamma, d_slope) for each example.
    pub fn backward(
        &self,
        t: &[f64],
        bound: &[(f64, f64)],
        variance: &[(f64, f64)],
        grad: &mut [f64],
    ) -> Result<()> {
        let n = self.features();
        if grad.len() != Self::num_params(n) || bound.len() != t.len() || variance.len() != t.len()
        {
            bail!("the learned schedule's gradient: sizes do not match");
        }
        let (h0, h1) = (self.eval(0.0, true), self.eval(1.0, true));
        let d = h1.h - h0.h;
        let span = self.g1 - self.g0;
        for ((&t, &(bg, bs)), &(vg, vs)) in t.iter().zip(bound).zip(variance) {
            let ht = self.eval(t, true);
            let r = (ht.h - h0.h) / d; // normalised h
            let r_slope = ht.dh / d;
            // gamma = g0 + span r, gamma' = span r': endpoints from the bound's loss.
            grad[0] += bg * (1.0 - r) - bs * r_slope;
            grad[1] += bg * r + bs * r_slope;
            // eta from the variance's loss: d r = (d(h_t - h_0) - r d D) / D, d r' = (d h'_t - r' d D) / D.
            for k in 0..1 + 3 * n {
                let dd = h1.grad_h[k] - h0.grad_h[k];
                let dr = (ht.grad_h[k] - h0.grad_h[k] - r * dd) / d;
                let drs = (ht.grad_dh[k] - r_slope * dd) / d;
                grad[2 + k] += span * (vg * dr + vs * drs);
            }
        }
        Ok(())
    }
}

/// alpha_t and sigma_t for gamma: (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma))).
pub fn alpha_sigma(gamma: f64) -> (f64, f64) {
    (sigmoid(-gamma).sqrt(), sigmoid(gamma).sqrt())
}

/// d alpha / d gamma = -alpha sigma^2 / 2 and d sigma / d gamma = sigma alpha^2 / 2.
pub fn alpha_sigma_slopes(gamma: f64) -> (f64, f64) {
    let (a, s) = alpha_sigma(gamma);
    (-0.5 * a * s * s, 0.5 * s * a * a)
}

/// Antithetic (low-discrepancy) times over a batch of `b`: `(u + i/b) mod 1`, u ~ U(0, 1)
/// (VDM's `antithetic_time_sampling`).
pub fn antithetic_times(b: usize, u: f64) -> Vec<f64> {
    (0..b)
        .map(|i| (u + i as f64 / b as f64).rem_euclid(1.0))
        .collect()
}

/// The level k of an image value v in [-1, 1] written as `2 k/255 - 1` (elbo's image batches).
pub fn level_of(v: f32) -> usize {
    (((v as f64 + 1.0) * 127.5).round()).clamp(0.0, 255.0) as usize
}

/// VDM's encoding of level k: `(2k + 1)/256 - 1`, the centre of its bin in [-1, 1].
pub fn encode_level(k: usize) -> f64 {
    (2.0 * k as f64 + 1.0) / LEVELS as f64 - 1.0
}

/// -log p(x_i = k | z_0) for one pixel, and its derivative with respect to gamma_0, with
/// `z_0 / alpha_0 = f_k + e^{gamma_0/2} eps0` (VDM's `z_0_rescaled`) and
/// `p(k' | z_0) = softmax_k'(-(z - f_k')^2 / (2 e^{gamma_0}))` over all 256 levels.
///
/// The logits fall with the distance |z - f_j|, so the sum over levels starts at the nearest
/// and walks outwards until a term is below e^{-50} of the largest (at gamma_0 = -13.3 two or
/// three levels): the levels left out add less than 256 e^{-50} ~ 5e-20 of the sum, far below
/// f64's rounding, so the result is the full softmax's to the last bit (checked against the sum
/// over all 256 in the tests).
pub fn decoder_nll(k: usize, eps0: f64, gamma0: f64) -> (f64, f64) {
    const CUT: f64 = 50.0;
    let scale = (0.5 * gamma0).exp();
    let z = encode_level(k) + scale * eps0;
    let inv_var = (-gamma0).exp();
    let dz = 0.5 * scale * eps0;
    // logit_j = -0.5 (z - f_j)^2 e^{-gamma0};
    // d logit_j / d gamma0 = 0.5 (z - f_j)^2 e^{-gamma0} - (z - f_j) e^{-gamma0} dz.
    let logit = |j: usize| {
        let d = z - encode_level(j);
        (
            -0.5 * d * d * inv_var,
            0.5 * d * d * inv_var - d * inv_var * dz,
        )
    };
    let nearest = ((z + 1.0) * (LEVELS as f64 / 2.0) - 0.5)
        .round()
        .clamp(0.0, (LEVELS - 1) as f64) as usize;
    let max = logit(nearest).0;
    let (mut sum, mut dsum) = (0.0, 0.0);
    let mut add = |j: usize| -> bool {
        let (l, dl) = logit(j);
        if l - max < -CUT {
            return false;
        }
        let w = (l - max).exp();
        sum += w;
        dsum += w * dl;
        true
    };
    add(nearest);
    for j in (0..nearest).rev() {
        if !add(j) {
            break;
        }
    }
    for j in nearest + 1..LEVELS {
        if !add(j) {
            break;
        }
    }
    let (lk, dlk) = logit(k);
    (max + sum.ln() - lk, dsum / sum - dlk)
}

/// The probabilities p(k | z_0) of the 256 levels for a value z = z_0 / alpha_0.
pub fn decoder_probs(z: f64, gamma0: f64) -> Vec<f64> {
    let inv_var = (-gamma0).exp();
    let logits: Vec<f64> = (0..LEVELS)
        .map(|j| {
            let d = z - encode_level(j);
            -0.5 * d * d * inv_var
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// KL(q(z_1 | x) || N(0, I)) = 1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1) and
/// its derivative with respect to gamma_1, for one example `x`.
pub fn prior_kl(x: &[f64], gamma1: f64) -> (f64, f64) {
    let (a, s) = alpha_sigma(gamma1);
    let (a2, s2) = (a * a, s * s);
    let log_s2 = -(-gamma1).exp().ln_1p(); // log sigmoid(gamma1), stable
    let sq: f64 = x.iter().map(|v| v * v).sum();
    let d = x.len() as f64;
    let kl = 0.5 * (a2 * sq + d * (s2 - log_s2 - 1.0));
    // d a2 = -a2 s2, d s2 = a2 s2, d log s2 = a2 (per unit of gamma1).
    let dkl = 0.5 * (-a2 * s2 * sq + d * (a2 * s2 - a2));
    (kl, dkl)
}

/// The diffusion term's weight on ||eps - eps_hat||^2 at time t: 1/2 gamma'(t) in continuous
/// time; `T/2 expm1(gamma(t) - gamma(t - 1/T))` in the T-step model (t on its grid).
pub fn diffusion_weight(gamma: &Gamma, t: f64, steps: Option<usize>) -> f64 {
    match steps {
        None => 0.5 * gamma.value_and_slope(t).1,
        Some(n) => {
            let s = t - 1.0 / n as f64;
            0.5 * n as f64 * (gamma.value(t) - gamma.value(s)).exp_m1()
        }
    }
}

/// t drawn as u ~ U(0, 1) moved to the T-step grid: `ceil(u T) / T` in {1/T, ..., 1} (VDM), or
/// `u` itself in continuous time.
pub fn on_grid(u: f64, steps: Option<usize>) -> f64 {
    match steps {
        None => u,
        Some(n) => ((u * n as f64).ceil().max(1.0)) / n as f64,
    }
}

/// A continuous-time model for evaluation and sampling: its schedule settings, the schedule
/// itself and what the network predicts (eps, or v = alpha eps - sigma x).
#[derive(Debug, Clone)]
pub struct ContinuousModel {
    pub spec: ContinuousTime,
    pub gamma: Gamma,
    pub prediction: super::Prediction,
}

/// One example's bound in nats: `prior + reconstruction + diffusion`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContinuousTerms {
    pub prior: f64,
    pub reconstruction: f64,
    pub diffusion: f64,
}

impl ContinuousTerms {
    pub fn total(&self) -> f64 {
        self.prior + self.reconstruction + self.diffusion
    }
}

impl ContinuousModel {
    /// eps_hat from the network's output at z_t (v: `eps = sigma z + alpha v`).
    fn eps_hat(&self, out: &[f32], z: &[f32], alpha: f64, sigma: f64, into: &mut Vec<f64>) {
        into.clear();
        match self.prediction {
            super::Prediction::V => into.extend(
                out.iter()
                    .zip(z)
                    .map(|(&v, &z)| sigma * z as f64 + alpha * v as f64),
            ),
            _ => into.extend(out.iter().map(|&e| e as f64)),
        }
    }

    /// The bound's terms for each example of `x` (`[B, C, H, W]` in elbo's [-1, 1] image
    /// scale, read as 8-bit levels and encoded by [`encode_level`]): the prior KL exactly,
    /// the reconstruction from one draw of z_0, and the diffusion term from `draws` times per
    /// example, stratified (`(u_b + j) / draws`, u_b ~ U(0, 1)), in continuous time
    /// (`steps = None`) or in the T-step model on its grid. Every draw comes from `noise` and
    /// `rng`; the expectation over them is the bound.
    pub fn bound_terms(
        &self,
        net: &dyn super::Denoiser,
        x: &candle_core::Tensor,
        draws: usize,
        steps: Option<usize>,
        noise: &mut crate::distributions::Noise,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<Vec<ContinuousTerms>> {
        use candle_core::Tensor;
        use rand::Rng;
        let (b, dev) = (x.dim(0)?, x.device().clone());
        let shape = x.dims().to_vec();
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let n = values.len() / b.max(1);
        let levels: Vec<usize> = values.iter().map(|&v| level_of(v)).collect();
        let f: Vec<f64> = levels.iter().map(|&k| encode_level(k)).collect();
        let (g0, g1) = self.gamma.endpoints();
        let eps0 = noise
            .randn(x.shape(), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        use rayon::prelude::*;
        let mut terms: Vec<ContinuousTerms> = (0..b)
            .into_par_iter()
            .map(|e| {
                let r = e * n..(e + 1) * n;
                let reconstruction = r
                    .clone()
                    .map(|i| decoder_nll(levels[i], eps0[i] as f64, g0).0)
                    .sum();
                ContinuousTerms {
                    prior: prior_kl(&f[r], g1).0,
                    reconstruction,
                    diffusion: 0.0,
                }
            })
            .collect();
        let u: Vec<f64> = (0..b).map(|_| rng.random::<f64>()).collect();
        let mut eps_hat = Vec::with_capacity(n);
        for j in 0..draws.max(1) {
            let eps = noise
                .randn(x.shape(), &dev)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut z = vec![0f32; b * n];
            let mut c = Vec::with_capacity(b);
            let mut weights = Vec::with_capacity(b);
            let mut coef = Vec::with_capacity(b);
            for (e, &ue) in u.iter().enumerate() {
                let t = on_grid((ue + j as f64) / draws.max(1) as f64, steps);
                let g = self.gamma.value(t);
                let (a, s) = alpha_sigma(g);
                for i in e * n..(e + 1) * n {
                    z[i] = (a * f[i] + s * eps[i] as f64) as f32;
                }
                c.push(self.spec.model_time(g) as f32);
                weights.push(diffusion_weight(&self.gamma, t, steps));
                coef.push((a, s));
            }
            let zt = Tensor::from_slice(&z, shape.as_slice(), &dev)?;
            let ct = Tensor::from_vec(c, b, &dev)?;
            let out = net.forward(&zt, &ct)?.flatten_all()?.to_vec1::<f32>()?;
            if out.len() != z.len() {
                bail!(
                    "the network gives {} values for {} inputs",
                    out.len(),
                    z.len()
                );
            }
            for e in 0..b {
                let r = e * n..(e + 1) * n;
                let (a, s) = coef[e];
                self.eps_hat(&out[r.clone()], &z[r.clone()], a, s, &mut eps_hat);
                let sse: f64 = eps_hat
                    .iter()
                    .zip(&eps[r])
                    .map(|(h, &e)| (e as f64 - h).powi(2))
                    .sum();
                terms[e].diffusion += weights[e] * sse / draws.max(1) as f64;
            }
        }
        Ok(terms)
    }

    /// The T-step model as a discrete process, for the samplers: T + 1 noise levels
    /// `t_i = i/T`, i = 0..T, with `abar_i = sigmoid(-gamma(t_i))` (level 0 is z_0, with
    /// sigma_0^2 = sigmoid(gamma_0)) and the network given `model_time(gamma(t_i))`. DDPM's
    /// ancestral step with the posterior variance of this process is VDM's p(z_s | z_t).
    pub fn discretized(&self, steps: usize) -> Result<super::GaussianDiffusion> {
        use super::schedule::{BetaSchedule, Schedule};
        let levels = steps + 1;
        Schedule::check_size(levels)?;
        let gammas: Vec<f64> = (0..levels)
            .map(|i| self.gamma.value(i as f64 / steps as f64))
            .collect();
        let abar: Vec<f64> = gammas.iter().map(|&g| sigmoid(-g)).collect();
        let betas: Vec<f64> = (0..levels)
            .map(|i| match i {
                0 => 1.0 - abar[0],
                _ => 1.0 - abar[i] / abar[i - 1],
            })
            .collect();
        let schedule = Schedule::custom(BetaSchedule::Linear, betas)?;
        let mut p = super::GaussianDiffusion::new(schedule, self.prediction);
        p.model_times = Some(gammas.iter().map(|&g| self.spec.model_time(g)).collect());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_net(n: usize, seed: u64) -> MonotoneNet {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = || {
            let (u, v): (f64, f64) = (rng.random(), rng.random());
            (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        let mut p = ContinuousTime {
            gamma: GammaKind::Learned,
            features: n,
            ..Default::default()
        }
        .initial_params(&mut normal);
        // Random biases and a random linear part, so the test is not of the initialisation.
        for b in &mut p[3 + n..3 + 2 * n] {
            *b = 2.0 * normal();
        }
        p[2] = normal();
        MonotoneNet::from_params(&p, n).unwrap()
    }

    #[test]
    fn the_schedules_run_between_their_endpoints() {
        for g in [
            Gamma::Linear { g0: -13.3, g1: 5.0 },
            Gamma::Cosine { g0: -13.3, g1: 5.0 },
            Gamma::Learned(random_net(16, 1)),
        ] {
            let (g0, g1) = g.endpoints();
            assert!((g.value(0.0) - g0).abs() < 1e-9, "{g:?}");
            assert!((g.value(1.0) - g1).abs() < 1e-9, "{g:?}");
            // gamma' against a central difference.
            for t in [0.1, 0.5, 0.93] {
                let h = 1e-6;
                let fd = (g.value(t + h) - g.value(t - h)) / (2.0 * h);
                let slope = g.value_and_slope(t).1;
                assert!(
                    (fd - slope).abs() < 1e-5 * slope.abs().max(1.0),
                    "{g:?} {t}"
                );
            }
        }
    }

    #[test]
    fn decoder_probabilities_sum_to_one() {
        for (z, g0) in [(0.3, -13.3), (-0.99, -8.0), (1.2, -2.0), (0.0, 3.0)] {
            let p = decoder_probs(z, g0);
            let s: f64 = p.iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "{s}");
        }
        // The nll is -log of the same probabilities.
        let (k, eps0, g0) = (77, 0.4, -6.0f64);
        let z = encode_level(k) + (0.5 * g0).exp() * eps0;
        let p = decoder_probs(z, g0);
        assert!((decoder_nll(k, eps0, g0).0 + p[k].ln()).abs() < 1e-9);
    }

    /// The truncated sum against the softmax over all 256 levels, from a sharp decoder to
    /// a broad one.
    #[test]
    fn the_decoder_walk_equals_the_full_softmax() {
        for g0 in [-13.3, -9.0, -5.0, -1.0, 2.0] {
            for (k, eps0) in [
                (0, -2.5),
                (0, 1.0),
                (17, 0.3),
                (128, -0.7),
                (255, 2.0),
                (254, -3.0),
            ] {
                let z = encode_level(k) + (0.5f64 * g0).exp() * eps0;
                let full = -decoder_probs(z, g0)[k].ln();
                let got = decoder_nll(k, eps0, g0).0;
                assert!(
                    (got - full).abs() <= 1e-12 * full.abs().max(1.0),
                    "{g0} {k}: {got} vs {full}"
                );
            }
        }
    }

    #[test]
    fn decoder_and_prior_derivatives_match_finite_differences() {
        let h = 1e-5;
        for (k, eps0, g0) in [(3, 0.7, -5.0), (128, -1.3, -2.0), (255, 0.2, -9.0)] {
            let fd = (decoder_nll(k, eps0, g0 + h).0 - decoder_nll(k, eps0, g0 - h).0) / (2.0 * h);
            let d = decoder_nll(k, eps0, g0).1;
            assert!((fd - d).abs() < 1e-6 * d.abs().max(1.0), "{fd} {d}");
        }
        let x = [0.3, -0.9, 0.01];
        for g1 in [-2.0, 0.0, 5.0] {
            let fd = (prior_kl(&x, g1 + h).0 - prior_kl(&x, g1 - h).0) / (2.0 * h);
            let d = prior_kl(&x, g1).1;
            assert!((fd - d).abs() < 1e-7, "{fd} {d}");
        }
    }

    #[test]
    fn the_monotone_network_is_monotone_for_random_weights() {
        for seed in 0..20 {
            let g = Gamma::Learned(random_net(32, seed));
            let mut last = f64::NEG_INFINITY;
            for i in 0..=1000 {
                let (v, slope) = g.value_and_slope(i as f64 / 1000.0);
                assert!(v > last && slope > 0.0, "seed {seed} at {i}");
                last = v;
            }
        }
    }

    /// The hand-written parameter gradient against central differences of
    /// F(p) = sum_b a_b gamma_p(t_b) + c_b gamma'_p(t_b), every parameter.
    #[test]
    fn the_schedule_gradient_matches_finite_differences() {
        let n = 8;
        let net = random_net(n, 7);
        let mut p = vec![net.g0, net.g1, net.w1];
        p.extend(&net.w2);
        p.extend(&net.b2);
        p.extend(&net.w3);
        let t = [0.05, 0.4, 0.77, 1.0];
        let w = [(0.3, -1.1), (-0.7, 0.2), (1.5, 0.9), (0.4, -0.3)];
        let f = |p: &[f64]| -> f64 {
            let g = MonotoneNet::from_params(p, n).unwrap();
            t.iter()
                .zip(&w)
                .map(|(&t, &(a, c))| {
                    let (v, s) = g.value_and_slope(t);
                    a * v + c * s
                })
                .sum()
        };
        let mut grad = vec![0.0; p.len()];
        net.backward(&t, &w, &w, &mut grad).unwrap();
        for k in 0..p.len() {
            let h = 1e-6;
            let (mut up, mut down) = (p.clone(), p.clone());
            up[k] += h;
            down[k] -= h;
            let fd = (f(&up) - f(&down)) / (2.0 * h);
            assert!(
                (fd - grad[k]).abs() < 1e-5 * fd.abs().max(1.0),
                "parameter {k}: {fd} vs {}",
                grad[k]
            );
        }
    }
}
