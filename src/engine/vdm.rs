//! The continuous-time (VDM) training step on either engine: the schedule's arithmetic in
//! f64 here, the network's through the engine's weighted-SSE batches
//! ([`super::WeightedRows`]).
//!
//! For a batch of B examples with times t_b (antithetic), the loss is the bound's estimate
//! (nats per example, `diffusion::vdm`):
//!
//! ```text
//! L = 1/B sum_b [ KL(q(z_1|x_b) || N(0, I)) - log p(x_b | z_0) + 1/2 gamma'(t_b) ||eps_b - eps_hat(z_t_b, gamma_b)||^2 ]
//! ```
//!
//! With a learned schedule its parameters get two gradients: the endpoints (gamma_0, gamma_1)
//! the bound's, through the prior, the decoder, gamma' and gamma (x_t and the network's time
//! input, from the engine's backward pass); the inner shape eta the gradient of the diffusion
//! term's second moment, `1/B sum_b 2 L_d,b dL_d,b/d eta` (VDM Section 5.3).

use std::ops::Range;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

use super::{DenoiseBatch, TrainStep, WeightedRows};
use crate::diffusion::Prediction;
use crate::diffusion::vdm::{
    ContinuousTime, Gamma, alpha_sigma, alpha_sigma_slopes, decoder_nll, diffusion_weight,
    encode_level, level_of, prior_kl,
};
use crate::optim::{ParamEntry, ParamTable};

/// A continuous-time batch, every draw made: the images `[B, C, H, W]` in elbo's [-1, 1]
/// scale (read as 8-bit levels), each example's time t in [0, 1], eps for z_t, eps_0 for
/// z_0 (the reconstruction), and the dropout seed.
pub struct ContinuousBatch {
    pub x: Tensor,
    pub t: Vec<f64>,
    pub eps: Tensor,
    pub eps0: Vec<f32>,
    pub dropout_seed: Option<u64>,
}

/// A diffusion model's training batch: discrete timesteps or continuous time.
pub enum DiffusionBatch {
    Discrete(DenoiseBatch),
    Continuous(ContinuousBatch),
}

/// The sums of a continuous step: `[loss, diffusion, reconstruction, prior]` (this rank's
/// share of the batch's means, nats per example), then each example's diffusion term
/// `w_b SSE_b` (zeros outside this rank's rows).
pub const CONTINUOUS_SUMS: usize = 4;

/// A discrete step ([`DenoiseBatch`]) as a step of [`DiffusionBatch`]es.
pub struct Discrete<'a>(pub Box<dyn TrainStep<Batch = DenoiseBatch> + 'a>);

impl TrainStep for Discrete<'_> {
    type Batch = DiffusionBatch;

    fn table(&self) -> &ParamTable {
        self.0.table()
    }

    fn read_params(&self) -> Result<Vec<f32>> {
        self.0.read_params()
    }

    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &DiffusionBatch,
        rows: Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        match batch {
            DiffusionBatch::Discrete(b) => self.0.loss_and_grads(params, b, rows, grads),
            DiffusionBatch::Continuous(_) => {
                bail!("a discrete-time step was given continuous time")
            }
        }
    }

    fn updated(&mut self, params: &[f32]) -> Result<()> {
        self.0.updated(params)
    }

    fn update_threads(&self) -> usize {
        self.0.update_threads()
    }

    fn resident(&self) -> bool {
        self.0.resident()
    }

    fn load_resident(&mut self, state: &crate::engine::Resident<'_>) -> Result<()> {
        self.0.load_resident(state)
    }

    fn step_resident(
        &mut self,
        batch: &DiffusionBatch,
        adam: crate::optim::AdamScalars,
        average_decay: Option<f32>,
    ) -> Result<Vec<f64>> {
        match batch {
            DiffusionBatch::Discrete(b) => self.0.step_resident(b, adam, average_decay),
            DiffusionBatch::Continuous(_) => {
                bail!("a discrete-time step was given continuous time")
            }
        }
    }

    fn store_resident(&mut self, state: &mut crate::engine::Resident<'_>) -> Result<()> {
        self.0.store_resident(state)
    }
}

/// The continuous-time step: the network's step (`inner`, either engine) and the learned
/// schedule's parameters after the network's in the buffer.
pub struct ContinuousStep<'a> {
    inner: Box<dyn TrainStep<Batch = DenoiseBatch> + 'a>,
    spec: ContinuousTime,
    prediction: Prediction,
    table: ParamTable,
    /// Where the schedule's parameters start: the inner step's buffer length.
    at: usize,
    /// The schedule's parameters at the start (read_params).
    gamma_params: Vec<f32>,
    /// A resident step's schedule: its parameters, Adam's moments and EMA on the host, while
    /// the network's stay on the inner step's device.
    host: Option<HostSchedule>,
}

/// The learned schedule's share of a resident step's state ([`ContinuousStep`]).
struct HostSchedule {
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    average: Option<Vec<f32>>,
}

/// A continuous batch made ready for the network's step: the inner step's batch and what
/// the schedule's gradient reads after it.
struct Prepared {
    gamma: Gamma,
    inner: DenoiseBatch,
    weights: Vec<f64>,
    levels: Vec<usize>,
    f: Vec<f64>,
    n: usize,
}

impl<'a> ContinuousStep<'a> {
    /// `gamma_params`: the learned schedule's parameters (empty for a fixed one), laid out as
    /// [`ContinuousTime::param_shapes`].
    pub fn new(
        inner: Box<dyn TrainStep<Batch = DenoiseBatch> + 'a>,
        spec: ContinuousTime,
        prediction: Prediction,
        gamma_params: Vec<f32>,
    ) -> Result<Self> {
        if prediction == Prediction::X0 {
            bail!("continuous time trains the eps or v prediction, not x_0");
        }
        let at = inner.table().len();
        let mut entries = inner.table().entries().to_vec();
        let mut offset = at;
        for (name, shape) in spec.param_shapes() {
            let e = ParamEntry {
                name,
                shape,
                offset,
            };
            offset += e.len();
            entries.push(e);
        }
        if offset - at != gamma_params.len() {
            bail!(
                "the learned schedule: {} parameters given, {} expected",
                gamma_params.len(),
                offset - at
            );
        }
        let table = ParamTable::with_offsets(entries, offset)?;
        Ok(Self {
            inner,
            spec,
            prediction,
            table,
            at,
            gamma_params,
            host: None,
        })
    }

    /// The network's batch of `batch` under the schedule of parameters `gp`.
    fn prepare(&self, gp: &[f32], batch: &ContinuousBatch) -> Result<Prepared> {
        let gp: Vec<f64> = gp.iter().map(|&v| v as f64).collect();
        let gamma = self.spec.schedule(&gp)?;
        let learned = matches!(gamma, Gamma::Learned(_));
        let b = batch.t.len();
        let (dims, dev) = (batch.x.dims().to_vec(), batch.x.device().clone());
        let x = batch.x.flatten_all()?.to_vec1::<f32>()?;
        let eps = batch.eps.flatten_all()?.to_vec1::<f32>()?;
        let n = x.len() / b.max(1);
        if n * b != x.len() || eps.len() != x.len() || batch.eps0.len() != x.len() {
            bail!("a continuous batch: x, eps and eps_0 differ in size");
        }
        let levels: Vec<usize> = x.iter().map(|&v| level_of(v)).collect();
        let f: Vec<f64> = levels.iter().map(|&k| encode_level(k)).collect();
        // z_t = alpha f + sigma eps, the target (eps, or v = alpha eps - sigma f), the weight of
        // ||target - output||^2 (1/2 gamma', times alpha^2 for v) and dz/dgamma.
        let mut z = vec![0f32; x.len()];
        let mut target = vec![0f32; x.len()];
        let mut tangent = if learned {
            vec![0f32; x.len()]
        } else {
            Vec::new()
        };
        // v's d target/d gamma = d alpha/d gamma eps - d sigma/d gamma f (learned, v only).
        let moving_target = learned && self.prediction == Prediction::V;
        let mut target_tangent = if moving_target {
            vec![0f32; x.len()]
        } else {
            Vec::new()
        };
        let mut weights = Vec::with_capacity(b);
        let mut model_t = Vec::with_capacity(b);
        for e in 0..b {
            let g = gamma.value(batch.t[e]);
            let (a, s) = alpha_sigma(g);
            let (da, ds) = alpha_sigma_slopes(g);
            let w = diffusion_weight(&gamma, batch.t[e], None);
            for i in e * n..(e + 1) * n {
                let (fi, ei) = (f[i], eps[i] as f64);
                z[i] = (a * fi + s * ei) as f32;
                target[i] = match self.prediction {
                    Prediction::V => (a * ei - s * fi) as f32,
                    _ => ei as f32,
                };
                if learned {
                    tangent[i] = (da * fi + ds * ei) as f32;
                }
                if moving_target {
                    target_tangent[i] = (da * ei - ds * fi) as f32;
                }
            }
            weights.push(match self.prediction {
                Prediction::V => w * a * a,
                _ => w,
            });
            model_t.push(self.spec.model_time(g) as f32);
        }
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, dims.as_slice(), &dev);
        let inner_batch = DenoiseBatch {
            xt: tensor(z)?,
            t: Vec::new(),
            target: tensor(target)?,
            dropout_seed: batch.dropout_seed,
            x0: None,
            weights: None,
            weighted: Some(WeightedRows {
                model_t,
                weights: weights.clone(),
                tangent: if learned {
                    Some((tensor(tangent)?, self.spec.model_time_slope()))
                } else {
                    None
                },
                target_tangent: if moving_target {
                    Some(tensor(target_tangent)?)
                } else {
                    None
                },
            }),
        };
        Ok(Prepared {
            gamma,
            inner: inner_batch,
            weights,
            levels,
            f,
            n,
        })
    }

    /// The step's sums from the network's `sums` on rows `rows` (`[loss, diffusion term,
    /// reconstruction, prior, each row's weighted SSE]`), the schedule's gradient in
    /// `schedule_grads`.
    fn finish(
        &self,
        prepared: &Prepared,
        batch: &ContinuousBatch,
        sums: &[f64],
        rows: Range<usize>,
        schedule_grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        let Prepared {
            gamma,
            weights,
            levels,
            f,
            n,
            ..
        } = prepared;
        let (gamma, weights, levels, f, n) = (gamma, weights, levels, f, *n);
        let b = batch.t.len();
        let diffusion = sums[0];
        let (g0, g1) = gamma.endpoints();
        let scale = 1.0 / b.max(1) as f64;
        // Each row's [-log p(x | z_0), its d/d gamma_0, the prior KL, its d/d gamma_1], the
        // rows in parallel and added in order.
        use rayon::prelude::*;
        let per_row: Vec<[f64; 4]> = rows
            .clone()
            .into_par_iter()
            .map(|e| {
                let r = e * n..(e + 1) * n;
                let (mut nll, mut d0) = (0.0, 0.0);
                for i in r.clone() {
                    let (l, d) = decoder_nll(levels[i], batch.eps0[i] as f64, g0);
                    nll += l;
                    d0 += d;
                }
                let (kl, d1) = prior_kl(&f[r], g1);
                [nll, d0, kl, d1]
            })
            .collect();
        let (mut reconstruction, mut prior) = (0.0, 0.0);
        let (mut d_g0, mut d_g1) = (0.0, 0.0);
        for [nll, d0, kl, d1] in per_row {
            reconstruction += nll * scale;
            d_g0 += d0 * scale;
            prior += kl * scale;
            d_g1 += d1 * scale;
        }
        schedule_grads.fill(0.0);
        if let Gamma::Learned(net) = &gamma {
            // Each row's dL_b/d gamma_b (through the network, from the engine) and
            // dL_b/d gamma'_b = 1/2 SSE_b; the bound's pair and the second moment's.
            let mut bound = Vec::with_capacity(rows.len());
            let mut variance = Vec::with_capacity(rows.len());
            for e in rows.clone() {
                let sse = sums[1 + e];
                // v: w = 1/2 gamma' alpha^2 also moves with gamma (d alpha^2/d gamma =
                // -alpha^2 sigma^2) and with gamma' by alpha^2 / 2.
                let (d_gamma, d_slope) = match self.prediction {
                    Prediction::V => {
                        let (g, slope) = gamma.value_and_slope(batch.t[e]);
                        let (a, s) = alpha_sigma(g);
                        let dw = -0.5 * slope * a * a * s * s;
                        (sums[1 + b + e] + dw * sse, 0.5 * a * a * sse)
                    }
                    _ => (sums[1 + b + e], 0.5 * sse),
                };
                let l = weights[e] * sse;
                bound.push((d_gamma * scale, d_slope * scale));
                variance.push((2.0 * l * d_gamma * scale, 2.0 * l * d_slope * scale));
            }
            let t = &batch.t[rows.clone()];
            let mut g = vec![0f64; schedule_grads.len()];
            net.backward(t, &bound, &variance, &mut g)?;
            g[0] += d_g0;
            g[1] += d_g1;
            for (o, v) in schedule_grads.iter_mut().zip(g) {
                *o = v as f32;
            }
        }
        let mut out = vec![
            diffusion + reconstruction + prior,
            diffusion,
            reconstruction,
            prior,
        ];
        out.extend((0..b).map(|e| match rows.contains(&e) {
            true => weights[e] * sums[1 + e],
            false => 0.0,
        }));
        Ok(out)
    }
}

impl TrainStep for ContinuousStep<'_> {
    type Batch = DiffusionBatch;

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn read_params(&self) -> Result<Vec<f32>> {
        let mut p = self.inner.read_params()?;
        p.extend_from_slice(&self.gamma_params);
        Ok(p)
    }

    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &DiffusionBatch,
        rows: Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        let DiffusionBatch::Continuous(batch) = batch else {
            bail!("a continuous-time step was given discrete timesteps");
        };
        let at = self.at;
        let prepared = self.prepare(&params[at..], batch)?;
        let (net_grads, schedule_grads) = grads.split_at_mut(at);
        let sums =
            self.inner
                .loss_and_grads(&params[..at], &prepared.inner, rows.clone(), net_grads)?;
        self.finish(&prepared, batch, &sums, rows, schedule_grads)
    }

    fn updated(&mut self, params: &[f32]) -> Result<()> {
        self.inner.updated(&params[..self.at])
    }

    fn update_threads(&self) -> usize {
        self.inner.update_threads()
    }

    /// Resident where the network's step is: the network's parameters, moments and EMA stay
    /// on its device, the learned schedule's (a few values) on the host.
    fn resident(&self) -> bool {
        self.inner.resident()
    }

    fn load_resident(&mut self, state: &crate::engine::Resident<'_>) -> Result<()> {
        let at = self.at;
        let len = self.table.len();
        let sizes = [state.params.len(), state.m.len(), state.v.len()];
        if sizes.iter().any(|&n| n != len) || state.average.as_ref().is_some_and(|a| a.len() != len)
        {
            bail!("the continuous-time step: resident buffers for {len} parameters expected");
        }
        let mut average = state.average.as_ref().map(|a| a[..at].to_vec());
        self.inner.load_resident(&crate::engine::Resident {
            params: &mut state.params[..at].to_vec(),
            m: &mut state.m[..at].to_vec(),
            v: &mut state.v[..at].to_vec(),
            average: average.as_deref_mut(),
        })?;
        self.host = Some(HostSchedule {
            params: state.params[at..].to_vec(),
            m: state.m[at..].to_vec(),
            v: state.v[at..].to_vec(),
            average: state.average.as_ref().map(|a| a[at..].to_vec()),
        });
        Ok(())
    }

    /// The network's step and update on its device; the schedule's gradient, Adam update and
    /// EMA here, with the same scalars.
    fn step_resident(
        &mut self,
        batch: &DiffusionBatch,
        adam: crate::optim::AdamScalars,
        average_decay: Option<f32>,
    ) -> Result<Vec<f64>> {
        let DiffusionBatch::Continuous(batch) = batch else {
            bail!("a continuous-time step was given discrete timesteps");
        };
        let Some(mut host) = self.host.take() else {
            bail!("the continuous-time step: step_resident before load_resident");
        };
        let prepared = self.prepare(&host.params, batch)?;
        let sums = self
            .inner
            .step_resident(&prepared.inner, adam, average_decay)?;
        let mut grads = vec![0f32; host.params.len()];
        let b = batch.t.len();
        let out = self.finish(&prepared, batch, &sums, 0..b, &mut grads)?;
        crate::optim::adam_apply(&mut host.params, &grads, &mut host.m, &mut host.v, adam)?;
        if let (Some(average), Some(d)) = (host.average.as_mut(), average_decay) {
            for (e, &p) in average.iter_mut().zip(&host.params) {
                *e = *e * d + p * (1.0 - d);
            }
        }
        self.host = Some(host);
        Ok(out)
    }

    fn store_resident(&mut self, state: &mut crate::engine::Resident<'_>) -> Result<()> {
        let at = self.at;
        let Some(host) = &self.host else {
            bail!("the continuous-time step: store_resident before load_resident");
        };
        let len = self.table.len();
        let sizes = [state.params.len(), state.m.len(), state.v.len()];
        if sizes.iter().any(|&n| n != len) || state.average.as_ref().is_some_and(|a| a.len() != len)
        {
            bail!("the continuous-time step: resident buffers for {len} parameters expected");
        }
        let (p, p_host) = state.params.split_at_mut(at);
        let (m, m_host) = state.m.split_at_mut(at);
        let (v, v_host) = state.v.split_at_mut(at);
        let (average, average_host) = match state.average.as_deref_mut() {
            Some(a) => {
                let (a, b) = a.split_at_mut(at);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        self.inner.store_resident(&mut crate::engine::Resident {
            params: p,
            m,
            v,
            average,
        })?;
        p_host.copy_from_slice(&host.params);
        m_host.copy_from_slice(&host.m);
        v_host.copy_from_slice(&host.v);
        if let (Some(a), Some(h)) = (average_host, &host.average) {
            a.copy_from_slice(h);
        }
        Ok(())
    }
}

/// A continuous batch of images `x` (`[B, C, H, W]`, [-1, 1]): antithetic times from one
/// uniform draw, eps and eps_0 from `noise`.
pub fn continuous_batch(
    x: Tensor,
    u: f64,
    dropout_seed: Option<u64>,
    noise: &mut crate::distributions::Noise,
    device: &Device,
) -> Result<ContinuousBatch> {
    let b = x.dim(0)?;
    let eps = noise.randn(x.shape(), device)?;
    let eps0 = noise
        .randn(x.shape(), device)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(ContinuousBatch {
        t: crate::diffusion::vdm::antithetic_times(b, u),
        x,
        eps,
        eps0,
        dropout_seed,
    })
}
