//! The Gaussian diffusion process as a hierarchical VAE (Ho et al. 2020): the fixed forward
//! process q is the encoder, the learned reverse process p_theta the decoder.
//!
//! Tensors are `[B, ...]` (images `[B, 1, 28, 28]`, points `[B, 2]`); `t` holds one timestep
//! per example, `0..T-1`, where `t = 0` means one step of noise.

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor};

use super::schedule::Schedule;
use crate::distributions::LOG_2PI;

/// What the network predicts (diffusers' `prediction_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The noise eps (diffusers `epsilon`): the text's L_simple.
    Eps,
    /// The clean sample x_0 (diffusers `sample`).
    X0,
    /// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022; diffusers `v_prediction`).
    V,
}

/// The variance of p_theta(x_{t-1} | x_t) (diffusers' `variance_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum VarianceType {
    /// The posterior variance beta~_t (the lower bound of Ho et al.).
    FixedSmall,
    /// beta_t (the upper bound of Ho et al.), with beta~_1 at t = 0 as improved-diffusion does.
    FixedLarge,
    /// The network's second C output channels are log sigma_t^2 (improved-diffusion
    /// `LEARNED`, diffusers `learned`).
    Learned,
    /// The network's second C output channels v interpolate in the log domain (Nichol &
    /// Dhariwal 2021, eq. 15): `log sigma^2 = (v + 1)/2 log beta_t + (1 - v)/2 log beta~_t`
    /// (beta~ clipped at t = 0; improved-diffusion `LEARNED_RANGE`, diffusers `learned_range`).
    LearnedRange,
}

impl VarianceType {
    /// Whether the network gives it (2C output channels).
    pub fn is_learned(self) -> bool {
        matches!(self, VarianceType::Learned | VarianceType::LearnedRange)
    }
}

/// The process: a schedule and what the model predicts.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    pub schedule: Schedule,
    pub prediction: Prediction,
    /// What the network is given for timestep t (see `DiffusionConfig::model_times`); `None`:
    /// t itself.
    pub model_times: Option<Vec<f64>>,
    /// The variance the model was made with (see `DiffusionConfig::variance`); learned ones
    /// (the network's second C output channels) take the place of any fixed variance asked for.
    pub variance: Option<VarianceType>,
}

/// Per-example coefficients `arr[t_b]`, shaped `[B, 1, ..., 1]` to broadcast against `like`.
pub fn extract(arr: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = t.iter().map(|&ti| arr[ti] as f32).collect();
    let mut shape = vec![t.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    Ok(Tensor::from_vec(v, shape, like.device())?)
}

impl GaussianDiffusion {
    pub fn new(schedule: Schedule, prediction: Prediction) -> Self {
        Self {
            schedule,
            prediction,
            model_times: None,
            variance: None,
        }
    }

    /// The process that keeps only the steps `kept` (increasing, of 0..T) of this one, as
    /// improved-diffusion's `SpacedDiffusion` (Nichol & Dhariwal 2021, Section 4): betas
    /// `1 - abar_{kept_i} / abar_{kept_{i-1}}`, so abar at each kept step is unchanged, and the
    /// network still given the original steps' times. Learned variances interpolate between
    /// the new process's beta and beta~.
    pub fn respaced(&self, kept: &[usize]) -> Result<Self> {
        let t = self.num_timesteps();
        if kept.is_empty() || kept.windows(2).any(|w| w[0] >= w[1]) || kept[kept.len() - 1] >= t {
            bail!("respacing: increasing steps of 0..{t} expected");
        }
        let (betas, _) = super::schedule::respaced_betas(&self.schedule.alphas_cumprod, kept);
        let schedule = Schedule::custom(self.schedule.beta_schedule, betas)?;
        let times: Vec<f64> = kept
            .iter()
            .map(|&s| self.model_times.as_ref().map_or(s as f64, |m| m[s]))
            .collect();
        Ok(Self {
            schedule,
            prediction: self.prediction,
            model_times: Some(times),
            variance: self.variance,
        })
    }

    /// The network's time input for timesteps `t` (`[B]` f32).
    pub fn model_t(&self, t: &[usize], device: &Device) -> Result<Tensor> {
        match &self.model_times {
            None => timestep_tensor(t, device),
            Some(m) => Ok(Tensor::from_vec(
                t.iter().map(|&v| m[v] as f32).collect::<Vec<_>>(),
                t.len(),
                device,
            )?),
        }
    }

    /// A network output `[B, C', ...]` as (the prediction, the variance values): with learned
    /// variances C' = 2C and the second half is the variances'; else the whole output.
    pub fn split_output(&self, output: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if !self.variance.is_some_and(VarianceType::is_learned) {
            return Ok((output.clone(), None));
        }
        let c2 = output.dim(1)?;
        if c2 % 2 != 0 {
            bail!("learned variances: an even number of output channels expected, got {c2}");
        }
        Ok((
            output.narrow(1, 0, c2 / 2)?,
            Some(output.narrow(1, c2 / 2, c2 / 2)?),
        ))
    }

    /// The cotangent of a whole network output for a cotangent `v` `[B, C, ...]` of its
    /// prediction: `v`, and zeros for the variance channels (the inverse of
    /// [`GaussianDiffusion::split_output`]).
    pub fn output_cotangent(&self, v: &Tensor) -> Result<Tensor> {
        if !self.variance.is_some_and(VarianceType::is_learned) {
            return Ok(v.clone());
        }
        Ok(Tensor::cat(&[v, &v.zeros_like()?], 1)?)
    }

    pub fn num_timesteps(&self) -> usize {
        self.schedule.len()
    }

    fn check(&self, x: &Tensor, t: &[usize]) -> Result<()> {
        if x.dim(0)? != t.len() {
            bail!("{} timesteps for a batch of {}", t.len(), x.dim(0)?);
        }
        if let Some(&bad) = t.iter().find(|&&ti| ti >= self.num_timesteps()) {
            bail!("timestep {bad} out of range 0..{}", self.num_timesteps());
        }
        Ok(())
    }

    /// x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) by the
    /// reparameterization of the text.
    pub fn q_sample(&self, x0: &Tensor, t: &[usize], eps: &Tensor) -> Result<Tensor> {
        self.check(x0, t)?;
        let s = &self.schedule;
        let a = extract(&s.sqrt_alphas_cumprod, t, x0)?;
        let b = extract(&s.sqrt_one_minus_alphas_cumprod, t, x0)?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&b)?)?)
    }

    /// Mean and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
    pub fn q_mean_log_variance(&self, x0: &Tensor, t: &[usize]) -> Result<(Tensor, Tensor)> {
        let s = &self.schedule;
        let mean = x0.broadcast_mul(&extract(&s.sqrt_alphas_cumprod, t, x0)?)?;
        let lv: Vec<f64> = s.alphas_cumprod.iter().map(|a| (1.0 - a).ln()).collect();
        Ok((
            mean,
            extract(&lv, t, x0)?
                .broadcast_as(x0.shape())?
                .contiguous()?,
        ))
    }

    /// q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t I): (mean, log-variance
    /// clipped at t = 0), each `[B, ...]`.
    pub fn q_posterior_mean_log_variance(
        &self,
        x0: &Tensor,
        xt: &Tensor,
        t: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        self.check(x0, t)?;
        let s = &self.schedule;
        let mean = (x0.broadcast_mul(&extract(&s.posterior_mean_coef1, t, x0)?)?
            + xt.broadcast_mul(&extract(&s.posterior_mean_coef2, t, x0)?)?)?;
        let lv = extract(&s.posterior_log_variance_clipped, t, x0)?;
        Ok((mean, lv.broadcast_as(x0.shape())?.contiguous()?))
    }

    /// The regression target of the chosen prediction type for x_t made from (x_0, eps).
    pub fn target(&self, x0: &Tensor, eps: &Tensor, t: &[usize]) -> Result<Tensor> {
        let s = &self.schedule;
        Ok(match self.prediction {
            Prediction::Eps => eps.clone(),
            Prediction::X0 => x0.clone(),
            Prediction::V => {
                (eps.broadcast_mul(&extract(&s.sqrt_alphas_cumprod, t, x0)?)?
                    - x0.broadcast_mul(&extract(&s.sqrt_one_minus_alphas_cumprod, t, x0)?)?)?
            }
        })
    }

    /// x_0 implied by a model output at (x_t, t):
    /// eps: `x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)`; v: `x_0 = sqrt(abar) x_t - sqrt(1-abar) v`.
    pub fn predict_x0(&self, xt: &Tensor, t: &[usize], output: &Tensor) -> Result<Tensor> {
        let s = &self.schedule;
        Ok(match self.prediction {
            Prediction::Eps => {
                (xt.broadcast_mul(&extract(&s.sqrt_recip_alphas_cumprod, t, xt)?)?
                    - output.broadcast_mul(&extract(&s.sqrt_recipm1_alphas_cumprod, t, xt)?)?)?
            }
            Prediction::X0 => output.clone(),
            Prediction::V => {
                (xt.broadcast_mul(&extract(&s.sqrt_alphas_cumprod, t, xt)?)?
                    - output.broadcast_mul(&extract(&s.sqrt_one_minus_alphas_cumprod, t, xt)?)?)?
            }
        })
    }

    /// x_0_hat = a x_t + b y at timestep `ti` (0-based, below T): [`GaussianDiffusion::predict_x0`]'s
    /// coefficients (a, b) for the prediction y.
    pub fn x0_coefficients(&self, ti: usize) -> (f64, f64) {
        let s = &self.schedule;
        match self.prediction {
            Prediction::Eps => (
                s.sqrt_recip_alphas_cumprod[ti],
                -s.sqrt_recipm1_alphas_cumprod[ti],
            ),
            Prediction::X0 => (0.0, 1.0),
            Prediction::V => (
                s.sqrt_alphas_cumprod[ti],
                -s.sqrt_one_minus_alphas_cumprod[ti],
            ),
        }
    }

    /// eps implied by x_t and a predicted x_0: `eps = (x_t / sqrt(abar) - x_0) / sqrt(1/abar - 1)`.
    pub fn predict_eps_from_x0(&self, xt: &Tensor, t: &[usize], x0: &Tensor) -> Result<Tensor> {
        let s = &self.schedule;
        let num = (xt.broadcast_mul(&extract(&s.sqrt_recip_alphas_cumprod, t, xt)?)? - x0)?;
        Ok(num.broadcast_div(&extract(&s.sqrt_recipm1_alphas_cumprod, t, xt)?)?)
    }

    /// p_theta(x_{t-1} | x_t) = N(mu~(x_0_hat, x_t), sigma_t^2 I): returns (mean, log-variance,
    /// x_0_hat), x_0_hat clipped to [-1, 1] when `clip`.
    pub fn p_mean_log_variance(
        &self,
        output: &Tensor,
        xt: &Tensor,
        t: &[usize],
        variance: VarianceType,
        clip: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (output, var_values) = self.split_output(output)?;
        let mut x0 = self.predict_x0(xt, t, &output)?;
        if clip {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let (mean, posterior_lv) = self.q_posterior_mean_log_variance(&x0, xt, t)?;
        let s = &self.schedule;
        let variance = match self.variance {
            Some(own) if own.is_learned() => own,
            _ => variance,
        };
        let learned = || {
            var_values.clone().ok_or_else(|| {
                anyhow::anyhow!("{variance:?} variances need a network that gives them")
            })
        };
        let lv = match variance {
            VarianceType::Learned => learned()?,
            VarianceType::LearnedRange => {
                let frac = ((learned()? + 1.0)? * 0.5)?;
                let log_beta: Vec<f64> = s.betas.iter().map(|b| b.ln()).collect();
                let max_log = extract(&log_beta, t, xt)?;
                let min_log = extract(&s.posterior_log_variance_clipped, t, xt)?;
                (frac.broadcast_mul(&max_log)?
                    + frac.affine(-1.0, 1.0)?.broadcast_mul(&min_log)?)?
            }
            VarianceType::FixedSmall => posterior_lv,
            VarianceType::FixedLarge => {
                let lv: Vec<f64> = (0..s.len())
                    .map(|i| {
                        if i == 0 {
                            s.posterior_variance[1]
                        } else {
                            s.betas[i]
                        }
                        .ln()
                    })
                    .collect();
                extract(&lv, t, xt)?
                    .broadcast_as(xt.shape())?
                    .contiguous()?
            }
        };
        Ok((mean, lv, x0))
    }
}

/// KL(N(m1, e^lv1) || N(m2, e^lv2)) elementwise:
/// `0.5 (lv2 - lv1 + e^{lv1 - lv2} + (m1 - m2)^2 e^{-lv2} - 1)`.
pub fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let t = ((lv2 - lv1)? + (lv1 - lv2)?.exp()?)?;
    let t = (t + ((m1 - m2)?.sqr()? * lv2.neg()?.exp()?)?)?;
    Ok(t.affine(0.5, -0.5)?)
}

/// Sums every dimension but the first: `[B, ...] -> [B]`.
pub fn sum_per_example(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.sum(D::Minus1)?)
}

/// Gaussian log-density elementwise, `-0.5 (log 2pi + lv + (x - m)^2 e^{-lv})`.
pub fn gaussian_log_density(x: &Tensor, mean: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    let q = ((x - mean)?.sqr()? * log_var.neg()?.exp()?)?;
    Ok((q + log_var)?.affine(-0.5, -0.5 * LOG_2PI)?)
}

/// Standard normal CDF, Phi(x) = erfc(-x / sqrt 2) / 2, in f64.
pub fn std_normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// The discretized Gaussian decoder of Ho et al. (2020), eq. 13: data in [-1, 1] on 256 levels
/// (bins of width 2/255); the edge bins extend to -inf and +inf, so the 256 probabilities sum
/// to 1. Returns log p(x) per element, computed in f64. `x`, `mean`, `log_var`: equal length.
pub fn discretized_gaussian_log_likelihood(x: &[f32], mean: &[f32], log_var: &[f32]) -> Vec<f64> {
    let half = 1.0 / 255.0;
    x.iter()
        .zip(mean)
        .zip(log_var)
        .map(|((&x, &m), &lv)| {
            // Snap to the nearest of the 256 levels in f64, so that neighbouring bins share
            // their edges exactly and the probabilities telescope to 1.
            let level = ((x as f64 + 1.0) * 127.5).round().clamp(0.0, 255.0);
            let (x, m) = (level / 127.5 - 1.0, m as f64);
            let inv_std = (-0.5 * lv as f64).exp();
            let hi = if x > 0.999 {
                f64::INFINITY
            } else {
                inv_std * (x - m + half)
            };
            let lo = if x < -0.999 {
                f64::NEG_INFINITY
            } else {
                inv_std * (x - m - half)
            };
            // Phi(hi) - Phi(lo), in the upper-tail form where both are near 1 and would cancel.
            let p = if lo > 0.0 {
                std_normal_cdf(-lo) - std_normal_cdf(-hi)
            } else {
                std_normal_cdf(hi) - std_normal_cdf(lo)
            };
            p.max(1e-300).ln()
        })
        .collect()
}

/// The pixel values (in [-1, 1]) of the 256 levels.
pub fn pixel_levels() -> Vec<f32> {
    (0..256).map(|k| k as f32 / 127.5 - 1.0).collect()
}

/// Terms of the variational bound for one batch, each `[B]`, in nats.
pub struct BoundTerms {
    /// L_0 = -log p_theta(x_0 | x_1) (discretized, or continuous density).
    pub l0: Vec<f64>,
    /// L_{t} = KL(q(x_{t}|x_{t+1}, x_0) || p_theta(x_{t}|x_{t+1})) for index t = 1..T-1,
    /// `lt[t-1][b]` (the text's L_{t-1}, t = 2..T).
    pub lt: Vec<Vec<f64>>,
    /// L_T = KL(q(x_T | x_0) || N(0, I)).
    pub l_prior: Vec<f64>,
}

impl BoundTerms {
    /// -log p(x_0) <= L_0 + sum_t L_t + L_T, per example.
    pub fn total(&self) -> Vec<f64> {
        (0..self.l0.len())
            .map(|b| self.l0[b] + self.lt.iter().map(|l| l[b]).sum::<f64>() + self.l_prior[b])
            .collect()
    }
}

/// One sampler step whose update is linear in x_t and the network's prediction y (the first C
/// channels of its output) but for the clip of x_0_hat:
///
/// ```text
/// x_0_hat = clip(x0_from_x x_t + x0_from_y y)          (clip to [-1, 1] when `clip`)
/// x'      = from_x0 x_0_hat + from_x x_t + from_y y + sigma z,   z ~ N(0, I)
/// ```
///
/// DDIM's eq. 12 (eps = (x_t / sqrt(abar) - x_0_raw) / sqrt(1/abar - 1), linear too) and DDPM's
/// ancestral step with a fixed variance (the posterior mean c1 x_0_hat + c2 x_t) both take
/// this form (the samplers' `ddim_step` and `ddpm_step`). With learned variances
/// (`log_variance` = (lo, span)), sigma is each value's `e^{lv/2}`, lv = lo + span (v + 1) / 2
/// of the output's second C channels v (Nichol & Dhariwal's eq. 15; lo = -1, span = 2 gives
/// lv = v).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearStep {
    pub x0_from_x: f64,
    pub x0_from_y: f64,
    pub clip: bool,
    pub from_x0: f64,
    pub from_x: f64,
    pub from_y: f64,
    pub sigma: f64,
    pub log_variance: Option<(f64, f64)>,
}

/// An engine that keeps a sampler's x_t on its device between steps and runs each
/// [`LinearStep`], the network and the update, as one program (the XLA engine).
pub trait StepRunner {
    /// Starts from `x` `[B, C, H, W]`.
    fn start(&mut self, x: &Tensor) -> Result<()>;
    /// One step at the network's time values `t` `[B]`, with the noise `z` (x's shape) where
    /// sigma > 0.
    fn step(&mut self, t: &Tensor, step: &LinearStep, z: Option<&Tensor>) -> Result<()>;
    /// The current x_t, on `like`'s device and dtype.
    fn finish(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// A network that maps (x_t, t) to the chosen prediction; `t` is `[B]` f32 timesteps.
pub trait Denoiser {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;

    /// The engine's own sampler loop, where it has one ([`StepRunner`]); `None`: the sampler
    /// calls [`Denoiser::forward`] and updates x_t itself.
    fn step_runner(&self) -> Option<Box<dyn StepRunner + '_>> {
        None
    }

    /// Each example's bound term ([`GaussianDiffusion::bound_term`]) from x_0 and x_t `[B, C,
    /// H, W]`, the network's time values `t` `[B]` and each example's constants `rows`,
    /// computed by the engine with the network in one program, where it does that; `None`:
    /// the bound calls [`Denoiser::forward`] and computes the terms itself.
    fn bound_terms(
        &self,
        _x0: &Tensor,
        _xt: &Tensor,
        _t: &Tensor,
        _rows: &[BoundRow],
        _how: BoundProgram,
    ) -> Option<Result<Vec<f64>>> {
        None
    }

    /// A forward pass that candle's autodiff differentiates with respect to `xt` (the
    /// probability-flow ODE's divergence): `forward` itself, unless that runs an engine
    /// outside the autodiff graph (the fused CPU engine), which then gives way to candle's ops.
    fn forward_differentiable(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(xt, t)
    }

    /// The output `[B, C', ...]` and, for each cotangent v (the output's shape), the
    /// vector-Jacobian product `(d out / d xt)^T v` `[B, C, ...]` (row b depends on example b
    /// only: each example's Jacobian). By default candle's autodiff of
    /// [`Denoiser::forward_differentiable`], one backward pass per cotangent.
    fn vjp(
        &self,
        xt: &Tensor,
        t: &Tensor,
        cotangents: &[Tensor],
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let xv = candle_core::Var::from_tensor(xt)?;
        let x = xv.as_tensor();
        let out = self.forward_differentiable(x, t)?;
        let mut vjps = Vec::with_capacity(cotangents.len());
        for v in cotangents {
            let grads = (&out * v)?.sum_all()?.backward()?;
            match grads.get(x) {
                Some(g) => vjps.push(g.clone()),
                None => vjps.push(x.zeros_like()?),
            }
        }
        Ok((out.detach(), vjps))
    }

    /// The training forward pass: `forward` with dropout where the network has it, its masks
    /// drawn from `rng` (which a network without dropout leaves untouched).
    fn forward_train(
        &self,
        xt: &Tensor,
        t: &Tensor,
        _rng: &mut rand::rngs::StdRng,
    ) -> candle_core::Result<Tensor> {
        self.forward(xt, t)
    }
}

/// `[B]` f32 tensor of timesteps.
pub fn timestep_tensor(t: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        t.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        t.len(),
        device,
    )?)
}

/// How `--t-samples` draws its timesteps (see [`GaussianDiffusion::sampled_bound_sum`] and
/// [`GaussianDiffusion::importance_bound_sum`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TSampling {
    /// One t uniform in each of K equal strata, weighted by the stratum's width.
    Stratified,
    /// K i.i.d. draws from q(t) proportional to a pilot estimate of sqrt(E[L_t^2]) (the
    /// second-moment sampler of improved-diffusion's training), each weighted by 1 / q(t).
    Importance,
}

/// The importance distribution q(t) over t = 1..T-1 of [`TSampling::Importance`]: piecewise
/// constant over the pilot's strata, `q(t) = m_j / Z` for t in stratum j, with m_j the root
/// mean square of the pilot's L_t there (floored at 1e-3 of the largest, so that every t keeps
/// a chance and the estimate stays unbiased) and `Z = sum_j m_j width_j`.
#[derive(Debug, Clone)]
pub struct TWeights {
    /// q(t) for t = 1..T-1 (`q[t - 1]`).
    pub q: Vec<f64>,
    /// The cumulative sums of `q`, for drawing by inversion.
    cdf: Vec<f64>,
}

impl TWeights {
    /// q from each stratum's pilot values of L_t (`strata[j]`: the stratum's range of t and
    /// its values).
    pub fn from_pilot(t_max: usize, strata: &[(std::ops::Range<usize>, Vec<f64>)]) -> Self {
        let rms: Vec<f64> = strata
            .iter()
            .map(|(_, v)| (v.iter().map(|l| l * l).sum::<f64>() / v.len().max(1) as f64).sqrt())
            .collect();
        let top = rms.iter().copied().fold(0.0, f64::max);
        let floor = if top > 0.0 { 1e-3 * top } else { 1.0 };
        let mut q = vec![0.0; t_max - 1];
        for ((range, _), m) in strata.iter().zip(&rms) {
            let m = if m.is_finite() { m.max(floor) } else { floor };
            for t in range.clone() {
                q[t - 1] = m;
            }
        }
        // Any t the strata missed keeps the floor.
        q.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = floor);
        let z: f64 = q.iter().sum();
        q.iter_mut().for_each(|v| *v /= z);
        let mut acc = 0.0;
        let cdf = q
            .iter()
            .map(|v| {
                acc += v;
                acc
            })
            .collect();
        Self { q, cdf }
    }

    /// One t in 1..T-1 drawn from q.
    pub fn draw(&self, rng: &mut rand::rngs::StdRng) -> usize {
        use rand::Rng;
        let u: f64 = rng.random::<f64>() * self.cdf.last().copied().unwrap_or(1.0);
        let i = self.cdf.partition_point(|&c| c <= u).min(self.q.len() - 1);
        i + 1
    }
}

/// How the bound is evaluated: p's variance, L_0's decoder, and whether the predicted x_0 is
/// clipped to [-1, 1] before the posterior mean (`clip_denoised`: improved-diffusion's
/// `calc_bpd_loop` default; elbo's default evaluates the network's own prediction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundOptions {
    pub variance: VarianceType,
    pub decoder: Decoder,
    pub clip_denoised: bool,
}

/// One example's constants of its bound term at timestep t ([`GaussianDiffusion::bound_term`]),
/// for an engine that computes the term itself:
///
/// ```text
/// x_0_hat = clip(x0_from_x x_t + x0_from_y y),  mu = c1 x_0_hat + c2 x_t,  mu~ = c1 x_0 + c2 x_t
/// lv = log_variance, or with learned variances lo + span (v + 1) / 2
/// term = first ? -log p(x_0 | mu, lv) : KL(N(mu~, e^q_log_variance) || N(mu, e^lv))
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundRow {
    pub x0_from_x: f64,
    pub x0_from_y: f64,
    pub c1: f64,
    pub c2: f64,
    pub q_log_variance: f64,
    pub log_variance: f64,
    pub lo: f64,
    pub span: f64,
    pub first: bool,
}

/// What a bound program computes besides its rows' constants: the clip of x_0_hat, whether
/// the variance comes from the network's second C channels, and L_0's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BoundProgram {
    pub clip: bool,
    pub learned: bool,
    pub continuous: bool,
}

/// How L_0 is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// Ho et al.'s discretized Gaussian over 256 levels: a bound on the discrete log-likelihood.
    Discretized,
    /// The continuous Gaussian density: a bound on the continuous log-density.
    Continuous,
}

impl GaussianDiffusion {
    /// The full variational bound, term by term, for x_0 `[B, ...]` with every timestep
    /// evaluated (T network calls). `noise` draws x_t ~ q(x_t | x_0) per term.
    pub fn variational_bound(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        variance: VarianceType,
        decoder: Decoder,
        noise: &mut crate::distributions::Noise,
        on_step: impl FnMut(),
    ) -> Result<BoundTerms> {
        let opts = BoundOptions {
            variance,
            decoder,
            clip_denoised: false,
        };
        self.variational_bound_with(model, x0, opts, noise, on_step)
    }

    /// [`GaussianDiffusion::variational_bound`] with every option of [`BoundOptions`].
    pub fn variational_bound_with(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        opts: BoundOptions,
        noise: &mut crate::distributions::Noise,
        mut on_step: impl FnMut(),
    ) -> Result<BoundTerms> {
        let b = x0.dim(0)?;
        let t_max = self.num_timesteps();
        let mut lt = vec![Vec::new(); t_max - 1];
        let mut l0 = Vec::new();
        for ti in 0..t_max {
            let terms = self.bound_term(model, x0, &vec![ti; b], opts, noise)?;
            match ti {
                0 => l0 = terms,
                _ => lt[ti - 1] = terms,
            }
            on_step();
        }
        Ok(BoundTerms {
            l0,
            lt,
            l_prior: self.prior_term(x0)?,
        })
    }

    /// The bound's term at timestep `t[b]` (0-based) of each example of x_0 `[B, ...]` under
    /// `opts`, with
    /// one draw of x_{t+1} ~ q(x_{t+1} | x_0) from `noise` (one network call): at t = 0,
    /// L_0 = -log p(x_0 | x_1) with `decoder`; above, L_t = KL(q(x_t | x_{t+1}, x_0) ||
    /// p(x_t | x_{t+1})). `[B]` in nats.
    pub fn bound_term(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        t: &[usize],
        opts: BoundOptions,
        noise: &mut crate::distributions::Noise,
    ) -> Result<Vec<f64>> {
        let b = x0.dim(0)?;
        let eps = noise.randn(x0.shape(), x0.device())?;
        let xt = self.q_sample(x0, t, &eps)?;
        let (rows, how) = self.bound_rows(t, opts)?;
        let times = self.model_t(t, x0.device())?;
        if let Some(terms) = model.bound_terms(x0, &xt, &times, &rows, how) {
            return terms;
        }
        let out = model.forward(&xt, &times)?;
        let (mean, lv, _) =
            self.p_mean_log_variance(&out, &xt, t, opts.variance, opts.clip_denoised)?;
        let (qm, qlv) = self.q_posterior_mean_log_variance(x0, &xt, t)?;
        let kl = sum_per_example(&normal_kl(&qm, &qlv, &mean, &lv)?)?;
        let mut terms = kl.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if t.contains(&0) {
            let l0: Vec<f64> = match opts.decoder {
                Decoder::Discretized => {
                    let ll = discretized_gaussian_log_likelihood(
                        &x0.flatten_all()?.to_vec1::<f32>()?,
                        &mean.flatten_all()?.to_vec1::<f32>()?,
                        &lv.flatten_all()?.to_vec1::<f32>()?,
                    );
                    let d = ll.len() / b.max(1);
                    (0..b)
                        .map(|i| -ll[i * d..(i + 1) * d].iter().sum::<f64>())
                        .collect()
                }
                Decoder::Continuous => {
                    let ll = sum_per_example(&gaussian_log_density(x0, &mean, &lv)?)?;
                    let ll = ll.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    ll.iter().map(|v| -v).collect()
                }
            };
            for ((term, &ti), l0) in terms.iter_mut().zip(t).zip(l0) {
                if ti == 0 {
                    *term = l0;
                }
            }
        }
        Ok(terms)
    }

    /// The constants of [`GaussianDiffusion::bound_term`] at each example's timestep `t[b]`
    /// under `opts`, with the variance [`GaussianDiffusion::p_mean_log_variance`] takes (the
    /// network's own where it learns one).
    pub fn bound_rows(
        &self,
        t: &[usize],
        opts: BoundOptions,
    ) -> Result<(Vec<BoundRow>, BoundProgram)> {
        let s = &self.schedule;
        let variance = match self.variance {
            Some(own) if own.is_learned() => own,
            _ => opts.variance,
        };
        let mut rows = Vec::with_capacity(t.len());
        for &ti in t {
            if ti >= s.len() {
                bail!("timestep {ti} of a {}-step process", s.len());
            }
            let (x0_from_x, x0_from_y) = self.x0_coefficients(ti);
            let q_log_variance = s.posterior_log_variance_clipped[ti];
            let (log_variance, lo, span) = match variance {
                VarianceType::FixedSmall => (q_log_variance, 0.0, 0.0),
                VarianceType::FixedLarge if ti == 0 => (s.posterior_variance[1].ln(), 0.0, 0.0),
                VarianceType::FixedLarge => (s.betas[ti].ln(), 0.0, 0.0),
                VarianceType::Learned => (0.0, -1.0, 2.0),
                VarianceType::LearnedRange => {
                    (0.0, q_log_variance, s.betas[ti].ln() - q_log_variance)
                }
            };
            rows.push(BoundRow {
                x0_from_x,
                x0_from_y,
                c1: s.posterior_mean_coef1[ti],
                c2: s.posterior_mean_coef2[ti],
                q_log_variance,
                log_variance,
                lo,
                span,
                first: ti == 0,
            });
        }
        let how = BoundProgram {
            clip: opts.clip_denoised,
            learned: variance.is_learned(),
            continuous: opts.decoder == Decoder::Continuous,
        };
        Ok((rows, how))
    }

    /// The pilot of [`TSampling::Importance`]: L_t of each example of `x0` at one t uniform in
    /// each of `k` equal strata of 1..T-1 (k network calls), gathered per stratum.
    #[allow(clippy::too_many_arguments)]
    pub fn pilot_weights(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        k: usize,
        opts: BoundOptions,
        rng: &mut rand::rngs::StdRng,
        noise: &mut crate::distributions::Noise,
        mut on_step: impl FnMut(),
    ) -> Result<TWeights> {
        let strata = self.stratified_terms(model, x0, k, opts, rng, noise, &mut on_step)?;
        Ok(TWeights::from_pilot(self.num_timesteps(), &strata))
    }

    /// An unbiased estimate of each example's `sum_{t=0}^{T-1} L_t` from `k` timesteps drawn
    /// i.i.d. from `weights`' q(t) (`k + 1` network calls): `L_0 + (1/k) sum_i L_{t_i} / q(t_i)`
    /// (importance sampling; its variance is least when q(t) follows sqrt(E[L_t^2])). `[B]` in
    /// nats, without L_T.
    #[allow(clippy::too_many_arguments)]
    pub fn importance_bound_sum(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        k: usize,
        weights: &TWeights,
        opts: BoundOptions,
        rng: &mut rand::rngs::StdRng,
        noise: &mut crate::distributions::Noise,
        mut on_step: impl FnMut(),
    ) -> Result<Vec<f64>> {
        let b = x0.dim(0)?;
        if weights.q.len() + 1 != self.num_timesteps() {
            bail!(
                "importance weights for {} timesteps, the process has {}",
                weights.q.len() + 1,
                self.num_timesteps()
            );
        }
        let mut sums = self.bound_term(model, x0, &vec![0; b], opts, noise)?;
        on_step();
        let k = k.max(1);
        for _ in 0..k {
            let t: Vec<usize> = (0..b).map(|_| weights.draw(rng)).collect();
            let terms = self.bound_term(model, x0, &t, opts, noise)?;
            for ((s, v), &ti) in sums.iter_mut().zip(terms).zip(&t) {
                *s += v / (k as f64 * weights.q[ti - 1]);
            }
            on_step();
        }
        Ok(sums)
    }

    /// L_T = KL(q(x_T | x_0) || N(0, I)) per example of x_0 `[B, ...]` (no draw).
    pub fn prior_term(&self, x0: &Tensor) -> Result<Vec<f64>> {
        let b = x0.dim(0)?;
        let (m, lv) = self.q_mean_log_variance(x0, &vec![self.num_timesteps() - 1; b])?;
        let zeros = m.zeros_like()?;
        let prior = sum_per_example(&normal_kl(&m, &lv, &zeros, &zeros)?)?;
        Ok(prior.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    /// An unbiased estimate of each example's `sum_{t=0}^{T-1} L_t` from `k` timesteps
    /// instead of T (`k + 1` network calls): L_0, which dwarfs its neighbours, exactly; then
    /// {1..T-1} cut into k strata of (nearly) equal width `w_j`, one t_j drawn uniformly in
    /// each per example (from `rng`), and `L_0 + sum_j w_j L_{t_j}` estimates the sum
    /// (stratified sampling: unbiased, and its variance falls as 1/k where L_t varies smoothly
    /// in t). `[B]` in nats, without L_T.
    #[allow(clippy::too_many_arguments)]
    pub fn sampled_bound_sum(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        k: usize,
        opts: BoundOptions,
        rng: &mut rand::rngs::StdRng,
        noise: &mut crate::distributions::Noise,
        mut on_step: impl FnMut(),
    ) -> Result<Vec<f64>> {
        let b = x0.dim(0)?;
        let mut sums = self.bound_term(model, x0, &vec![0; b], opts, noise)?;
        on_step();
        for (range, terms) in self.stratified_terms(model, x0, k, opts, rng, noise, &mut on_step)? {
            for (s, v) in sums.iter_mut().zip(terms) {
                *s += range.len() as f64 * v;
            }
        }
        Ok(sums)
    }

    /// {1..T-1} cut into `k` strata of (nearly) equal width (k at most T - 1), one t drawn
    /// uniformly in each per example of `x0` (from `rng`), and its term: (stratum, `[B]`
    /// nats) per stratum, one network call each.
    #[allow(clippy::too_many_arguments)]
    fn stratified_terms(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        k: usize,
        opts: BoundOptions,
        rng: &mut rand::rngs::StdRng,
        noise: &mut crate::distributions::Noise,
        on_step: &mut impl FnMut(),
    ) -> Result<Vec<(std::ops::Range<usize>, Vec<f64>)>> {
        use rand::Rng;
        let (b, rest) = (x0.dim(0)?, self.num_timesteps() - 1);
        let k = k.clamp(1, rest.max(1));
        let mut strata = Vec::with_capacity(k);
        for j in 0..k {
            let (lo, hi) = (1 + j * rest / k, 1 + (j + 1) * rest / k);
            let t: Vec<usize> = (0..b).map(|_| rng.random_range(lo..hi)).collect();
            strata.push((lo..hi, self.bound_term(model, x0, &t, opts, noise)?));
            on_step();
        }
        Ok(strata)
    }
}
