//! Distributions of the VAE: the mean-field diagonal Gaussian q(z|x), the standard normal
//! prior p(z), and the likelihoods p(x|z) (Bernoulli from logits, Gaussian, discretized
//! logistic over 256 levels).
//!
//! Every `log_prob` sums over the last (event) dimension, so a `[..., D]` input gives `[...]`.

use candle_core::{D, Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// log(2 pi), the constant of every Gaussian log-density.
pub const LOG_2PI: f64 = 1.837_877_066_409_345_3;

/// A seeded source of noise. candle's CPU random tensors cannot be seeded, so every random
/// draw in elbo comes from here: same seed, same numbers, on any device.
pub struct Noise {
    pub rng: StdRng,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// eps ~ N(0, I) of the given shape, f32.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let mut v = vec![0f32; shape.elem_count()];
        self.fill_randn(&mut v);
        Tensor::from_vec(v, shape, device)
    }

    /// u ~ U[0, 1) of the given shape, f32 (dequantization noise).
    pub fn rng_uniform<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        use rand::Rng;
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| self.rng.random::<f32>())
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Fills `out` with eps ~ N(0, I), in the order [`Noise::randn`] draws them.
    pub fn fill_randn(&mut self, out: &mut [f32]) {
        for e in out {
            *e = StandardNormal.sample(&mut self.rng);
        }
    }
}

/// log N(z; 0, I) summed over the last dimension: `-0.5 * sum(z^2 + log 2pi)`. `[..., D] -> [...]`.
pub fn standard_normal_log_prob(z: &Tensor) -> Result<Tensor> {
    let d = z.dim(D::Minus1)? as f64;
    z.sqr()?.sum(D::Minus1)?.affine(-0.5, -0.5 * d * LOG_2PI)
}

/// softplus(l) = log(1 + e^l), computed as `max(l, 0) + log(1 + e^{-|l|})` so it never overflows.
pub fn softplus(logits: &Tensor) -> Result<Tensor> {
    let tail = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    logits.relu()? + tail
}

/// Bernoulli log-likelihood from logits, summed over the last dimension:
/// `log p(x | l) = sum x*l - softplus(l)` = `-BCE(sigmoid(l), x)`, finite for any finite l
/// (the text's `sigmoid` + `binary_cross_entropy`, without the overflow).
/// `x`, `logits`: broadcastable `[..., D]`; returns `[...]`.
pub fn bernoulli_log_prob_logits(x: &Tensor, logits: &Tensor) -> Result<Tensor> {
    (logits.broadcast_mul(x)? - softplus(logits)?)?.sum(D::Minus1)
}

/// Gaussian log-likelihood with per-element mean and a log-variance broadcast to it,
/// summed over the last dimension: `-0.5 * sum(log 2pi + log_var + (x - mean)^2 / var)`.
pub fn gaussian_log_prob(x: &Tensor, mean: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    let diff2 = x.broadcast_sub(mean)?.sqr()?;
    let scaled = diff2.broadcast_mul(&log_var.neg()?.exp()?)?;
    let terms = scaled.broadcast_add(log_var)?.affine(1.0, LOG_2PI)?;
    terms.sum(D::Minus1)?.affine(-0.5, 0.0)
}

/// The discretized logistic likelihood of 8-bit pixels (Salimans et al. 2017, PixelCNN++; Kingma
/// et al. 2016, IAF), summed over the last dimension. Pixel values v/255 (`x` in [0, 1]) are
/// mapped to x' = 2x - 1 in [-1, 1], bins of width 2/255 around them, and
///
/// ```text
/// P(x') = sigma(a) - sigma(b),  a = (x' + 1/255 - mean) / s,  b = (x' - 1/255 - mean) / s
///       = sigma(a) sigma(-b) (1 - e^{-(a - b)})          (stable: no difference of CDFs)
/// P(-1) = sigma(a),   P(1) = sigma(-b)                    (the edge bins take the tails)
/// ```
///
/// so the 256 probabilities of a pixel sum to 1. `x` `[B, D]`; `mean`, `log_scale`
/// `[..., B, D]` (log s clamped below at -7, as PixelCNN++ does); returns `[..., B]`.
pub fn discretized_logistic_log_prob(
    x: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    discretized_logistic_log_prob_values(x, mean, log_scale)?.sum(D::Minus1)
}

/// [`discretized_logistic_log_prob`] value by value, not summed: `[..., B, D]`.
pub fn discretized_logistic_log_prob_values(
    x: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    let x = x.affine(2.0, -1.0)?;
    let log_scale = log_scale.maximum(-7.0)?;
    let inv_s = log_scale.neg()?.exp()?;
    let centred = x.broadcast_sub(mean)?;
    let a = ((&centred + 1.0 / 255.0)? * &inv_s)?;
    let b = ((&centred - 1.0 / 255.0)? * &inv_s)?;
    let log_sig_a = softplus(&a.neg()?)?.neg()?; // log sigma(a)
    let log_sig_neg_b = softplus(&b)?.neg()?; // log sigma(-b)
    // log(1 - e^{-(a - b)}), a - b = (2/255) / s > 0.
    let width = (&inv_s * (2.0 / 255.0))?;
    let log_width = width.neg()?.exp()?.affine(-1.0, 1.0)?.log()?;
    let mid = ((&log_sig_a + &log_sig_neg_b)? + log_width)?;
    let low = x.broadcast_as(mid.shape())?.lt(-0.999)?;
    let high = x.broadcast_as(mid.shape())?.gt(0.999)?;
    low.where_cond(&log_sig_a, &high.where_cond(&log_sig_neg_b, &mid)?)
}

/// A mixture of M discretized logistics per value (PixelCNN++'s mixture, each channel on its
/// own): `log p(x) = sum_values log sum_m pi_m P_m(x)`, with `pi = softmax(logits)` over m.
/// `x` `[B, D]`; `logits`, `mean`, `log_scale` `[..., B, M, D]`; returns `[..., B]`.
pub fn discretized_logistic_mixture_log_prob(
    x: &Tensor,
    logits: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    let m_dim = logits.rank() - 2;
    let x = x.unsqueeze(x.rank() - 1)?; // [B, 1, D] against [..., B, M, D]
    let per = discretized_logistic_log_prob_values(&x, mean, log_scale)?;
    let log_pi = candle_nn::ops::log_softmax(logits, m_dim)?;
    (per + log_pi)?.log_sum_exp(m_dim)?.sum(D::Minus1)
}

/// A diagonal Gaussian N(mean, diag(exp(log_var))): the mean-field posterior q(z|x).
/// `mean`, `log_var`: `[..., D]` of equal shape (for the VAE, `[B, latent_dim]`).
#[derive(Debug, Clone)]
pub struct DiagGaussian {
    pub mean: Tensor,
    pub log_var: Tensor,
}

impl DiagGaussian {
    pub fn new(mean: Tensor, log_var: Tensor) -> Result<Self> {
        if mean.shape() != log_var.shape() {
            candle_core::bail!(
                "DiagGaussian: mean {:?} and log_var {:?} differ in shape",
                mean.shape(),
                log_var.shape()
            );
        }
        Ok(Self { mean, log_var })
    }

    /// sigma = exp(log_var / 2).
    pub fn std(&self) -> Result<Tensor> {
        (&self.log_var * 0.5)?.exp()
    }

    /// The reparameterization trick (Kingma & Welling 2014): `z = mean + sigma * eps`.
    /// `eps`: `[K, ..., D]` standard normal; returns `[K, ..., D]`, differentiable in mean
    /// and log_var.
    pub fn rsample_with(&self, eps: &Tensor) -> Result<Tensor> {
        eps.broadcast_mul(&self.std()?)?.broadcast_add(&self.mean)
    }

    /// K reparameterized samples, `[K, ..., D]`.
    pub fn rsample(&self, k: usize, noise: &mut Noise) -> Result<Tensor> {
        let mut dims = vec![k];
        dims.extend_from_slice(self.mean.dims());
        let eps = noise.randn(dims, self.mean.device())?;
        self.rsample_with(&eps)
    }

    /// log q(z) summed over the last dimension; `z`: `[..., D]` broadcastable against
    /// mean (e.g. `[K, B, D]` against `[B, D]`), returns the broadcast shape without D.
    pub fn log_prob(&self, z: &Tensor) -> Result<Tensor> {
        gaussian_log_prob(z, &self.mean, &self.log_var)
    }

    /// Closed-form KL(q || N(0, I)) = `-0.5 * sum(1 + log_var - mean^2 - exp(log_var))`;
    /// `[..., D] -> [...]`.
    pub fn kl_standard_normal(&self) -> Result<Tensor> {
        let inner = ((self.log_var.affine(1.0, 1.0)? - self.mean.sqr()?)? - self.log_var.exp()?)?;
        inner.sum(D::Minus1)?.affine(-0.5, 0.0)
    }

    /// Closed-form KL(self || other) between diagonal Gaussians:
    /// `0.5 * sum(log_var_p - log_var_q + (var_q + (mean_q - mean_p)^2) / var_p - 1)`.
    pub fn kl(&self, other: &DiagGaussian) -> Result<Tensor> {
        let var_q = self.log_var.exp()?;
        let diff2 = (&self.mean - &other.mean)?.sqr()?;
        let ratio = ((var_q + diff2)? * other.log_var.neg()?.exp()?)?;
        let terms = ((&other.log_var - &self.log_var)? + ratio)?.affine(1.0, -1.0)?;
        terms.sum(D::Minus1)?.affine(0.5, 0.0)
    }
}

/// A distinct, reproducible seed for each purpose and epoch (SplitMix64 finaliser).
pub fn derive_seed(seed: u64, stream: u64, epoch: u64) -> u64 {
    let mut z = seed
        ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ epoch.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    #[test]
    fn log_2pi_constant() {
        assert!((LOG_2PI - (2.0 * PI).ln()).abs() < 1e-15);
    }
}
