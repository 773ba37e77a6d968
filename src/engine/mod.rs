//! Which implementation runs a model: the one step contract ([`TrainStep`]), the one place
//! the choice is made ([`vae_step`], [`denoiser_step`], [`FrozenNet`]), and the engines
//! themselves: candle's tensors and autodiff ([`CandleStep`], any device) and the fused CPU
//! engines ([`vae`]: the VAE family; [`unet`]: the U-Net; hand-derived backward passes in
//! reused buffers). Models do not know their engine. `--engine` forces either; the choice is
//! printed once at the start of a run. A GPU or XLA engine is one more [`TrainStep`].

use std::ops::Range;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};

pub mod unet;
pub mod vae;
pub mod vdm;
pub mod xla;

use self::unet::FusedUnet;
use self::vae::{FusedVae, VaeBatch};
use crate::diffusion::learned::LearnedHead;
use crate::diffusion::nets::Net;
use crate::diffusion::process::{Denoiser, timestep_tensor};
use crate::distributions::Noise;
use crate::optim::{AdamScalars, ParamTable};
use crate::vae::estimate::LikelihoodEstimate;
use crate::vae::model::Vae;
use crate::vae::objective::{KlEstimator, LatentVariableModel, Objective};

/// One training step's arithmetic, whatever computes it: the loss of a batch and its gradient
/// with respect to parameters held in one flat buffer (laid out by [`TrainStep::table`]).
/// The training loop (`train::run_epochs`) owns the buffer and the one Adam
/// ([`crate::optim::Adam`]); a step owns no optimiser.
///
/// Data parallelism ([`crate::collective`]): every rank draws the whole global batch and runs
/// its rows `rows`; the loss is the global batch's mean, so the ranks' gradients and sums add
/// up to one process's.
pub trait TrainStep {
    /// A global batch, with every random draw of the step made already.
    type Batch;

    /// The layout of the parameter buffer.
    fn table(&self) -> &ParamTable;

    /// The model's current parameters as a buffer of the table's layout.
    fn read_params(&self) -> Result<Vec<f32>>;

    /// Forward and backward of rows `rows` of `batch` with `params`: writes this rank's share
    /// of the gradient of the batch's mean loss into `grads` (every value) and returns this
    /// rank's share of the step's sums, the loss first.
    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &Self::Batch,
        rows: Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>>;

    /// Called after each update, for a model that keeps its own copy of the parameters
    /// (candle writes its variables).
    fn updated(&mut self, _params: &[f32]) -> Result<()> {
        Ok(())
    }

    /// Threads for the update of the parameters.
    fn update_threads(&self) -> usize {
        rayon::current_num_threads()
    }

    /// Whether the step can also run the optimiser where it computes, the parameters, Adam's
    /// moments and the family's average of the weights resident there
    /// ([`TrainStep::step_resident`]): one call a step and no copies in between (a compiled XLA
    /// step on a device). The loop uses it on one process.
    fn resident(&self) -> bool {
        false
    }

    /// Copies the parameters, Adam's moments and the average to where the step runs.
    fn load_resident(&mut self, _state: &Resident<'_>) -> Result<()> {
        bail!("this training step keeps no resident parameters")
    }

    /// Forward and backward on every row of `batch`, then the update `adam` of the resident
    /// parameters and moments, and with `average_decay` d the average `a = d a + (1 - d) p` of
    /// the updated parameters; returns the sums. The loop stops on a non-finite loss and
    /// discards the resident state (the last commit is kept).
    fn step_resident(
        &mut self,
        _batch: &Self::Batch,
        _adam: AdamScalars,
        _average_decay: Option<f32>,
    ) -> Result<Vec<f64>> {
        bail!("this training step keeps no resident parameters")
    }

    /// Copies the resident parameters, moments and average back.
    fn store_resident(&mut self, _state: &mut Resident<'_>) -> Result<()> {
        bail!("this training step keeps no resident parameters")
    }
}

/// What a resident step ([`TrainStep::resident`]) keeps where it runs: the parameters, Adam's
/// moments, and the family's running average of the weights where it keeps one (the diffusion
/// EMA), each laid out by the step's table.
pub struct Resident<'a> {
    pub params: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub average: Option<&'a mut [f32]>,
}

/// What a candle training step computes from this rank's rows of a batch: the loss to
/// differentiate (`None`: no rows), the sums the step returns (the loss first) and, where a
/// step reads more of the backward pass than the variables' gradients, what it reads
/// ([`AfterBackward`]).
pub type CandleLoss<'a, B> = dyn FnMut(&B, Range<usize>) -> Result<CandleOut> + 'a;

/// Reads gradients of tensors other than the variables from the backward pass into the sums.
pub type AfterBackward =
    Box<dyn FnOnce(&candle_core::backprop::GradStore, &mut [f64]) -> Result<()>>;

/// A candle loss of a batch's rows ([`CandleLoss`]).
pub struct CandleOut {
    pub loss: Option<Tensor>,
    pub sums: Vec<f64>,
    pub after: Option<AfterBackward>,
}

impl From<(Option<Tensor>, Vec<f64>)> for CandleOut {
    fn from((loss, sums): (Option<Tensor>, Vec<f64>)) -> Self {
        Self {
            loss,
            sums,
            after: None,
        }
    }
}

/// candle's tensors and autodiff as a [`TrainStep`]: any model made of candle variables, on
/// any device. The parameter buffer is the variables' concatenation in the order given;
/// `loss_and_grads` writes it into the variables, builds the loss, and reads back
/// `loss.backward()`'s gradients.
pub struct CandleStep<'a, B> {
    vars: Vec<(String, Var)>,
    table: ParamTable,
    loss: Box<CandleLoss<'a, B>>,
}

impl<'a, B> CandleStep<'a, B> {
    pub fn new(vars: Vec<(String, Var)>, loss: Box<CandleLoss<'a, B>>) -> Self {
        let table = ParamTable::of_vars(&vars);
        Self { vars, table, loss }
    }
}

impl<B> TrainStep for CandleStep<'_, B> {
    type Batch = B;

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn read_params(&self) -> Result<Vec<f32>> {
        self.table.gather(&self.vars)
    }

    fn loss_and_grads(
        &mut self,
        _params: &[f32],
        batch: &B,
        rows: Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        // The variables hold `params` already: every update writes them (`updated`).
        let CandleOut {
            loss,
            mut sums,
            after,
        } = (self.loss)(batch, rows)?;
        match loss {
            Some(loss) => {
                let store = loss.backward()?;
                self.table.gather_grads(&self.vars, &store, grads)?;
                if let Some(after) = after {
                    after(&store, &mut sums)?;
                }
            }
            None => grads.fill(0.0),
        }
        Ok(sums)
    }

    fn updated(&mut self, params: &[f32]) -> Result<()> {
        self.table.scatter(params, &self.vars)
    }

    fn update_threads(&self) -> usize {
        1
    }
}

/// What a VAE training step maximises: the (beta-)ELBO with K samples and its top-layer KL
/// estimator, or the IWAE bound with K samples.
#[derive(Debug, Clone, Copy)]
pub struct VaeObjective {
    pub objective: Objective,
    pub kl: KlEstimator,
    pub beta: f64,
}

/// The training step of a VAE on `engine` (`Engine::Auto`: the fused CPU engine where it
/// applies) and its description. Both compute the same loss and gradients from the same
/// [`VaeBatch`].
pub fn vae_step<'a>(
    engine: Engine,
    vae: &'a Vae,
    objective: VaeObjective,
) -> Result<(Box<dyn TrainStep<Batch = VaeBatch> + 'a>, String)> {
    if engine == Engine::Xla {
        if !self::xla::vae::supports(vae) {
            bail!("--engine xla: takes --likelihood bernoulli, and no --residual, for now");
        }
        let (runtime, name) = xla_runtime()?;
        let mut x = self::xla::vae::XlaVae::from_vae(vae, runtime)?;
        x.set_objective(objective.objective);
        x.set_kl_estimator(objective.kl);
        x.set_beta(objective.beta);
        return Ok((Box::new(x), name));
    }
    let (fused, name) = vae_training(engine, vae)?;
    if fused {
        let mut f = FusedVae::from_vae(vae)?;
        f.set_objective(objective.objective);
        f.set_kl_estimator(objective.kl);
        f.set_beta(objective.beta);
        return Ok((Box::new(f), name));
    }
    let step = candle_vae_step(vae, vae.params().to_vec(), objective, vae.config.input_dim);
    Ok((Box::new(step), name))
}

/// The XLA engine's runtime (`--engine xla`) and its description.
fn xla_runtime() -> Result<(std::sync::Arc<self::xla::Runtime>, String)> {
    let runtime = self::xla::runtime().context("--engine xla")?;
    let (major, minor) = runtime.api_version();
    let name = format!(
        "XLA through PJRT ({}, API {major}.{minor}) (--engine)",
        runtime.platform()
    );
    Ok((runtime, name))
}

/// candle's training step for any latent variable model of `d` values per example whose
/// parameters are `vars` (sums: [`vae::VAE_SUMS`]).
pub fn candle_vae_step<'a, M: LatentVariableModel + ?Sized>(
    model: &'a M,
    vars: Vec<(String, Var)>,
    objective: VaeObjective,
    d: usize,
) -> CandleStep<'a, VaeBatch> {
    let loss = move |batch: &VaeBatch, rows: Range<usize>| -> Result<CandleOut> {
        candle_vae_loss(model, objective, batch, d, rows).map(CandleOut::from)
    };
    CandleStep::new(vars, Box::new(loss))
}

/// The candle VAE loss of rows `rows` of a batch: `-(1/B) sum_rows f(x_b)` with f the
/// (beta-)ELBO or IWAE_K, and the sums [`vae::VAE_SUMS`].
fn candle_vae_loss<M: LatentVariableModel + ?Sized>(
    model: &M,
    objective: VaeObjective,
    batch: &VaeBatch,
    d: usize,
    rows: Range<usize>,
) -> Result<(Option<Tensor>, Vec<f64>)> {
    use crate::vae::objective::{pass_with, sum_f64};
    let latents = model.latent_dims();
    let mut sums = vec![0.0; 3 + latents.len()];
    if rows.is_empty() {
        return Ok((None, sums));
    }
    let (b, k, n) = (batch.len(d), batch.k, rows.len());
    let device = model.device();
    let x = Tensor::from_slice(&batch.x[rows.start * d..rows.end * d], (n, d), device)?;
    let mut eps = Vec::with_capacity(batch.eps.len());
    for (e, &l) in batch.eps.iter().zip(&latents) {
        let all = Tensor::from_slice(e, (k, b, l), device)?;
        eps.push(all.narrow(1, rows.start, n)?);
    }
    let pass = pass_with(model, &x, &eps)?;
    let terms = match objective.objective {
        Objective::Elbo => pass.elbo_terms_with(objective.kl)?,
        Objective::Iwae => pass.elbo_terms()?,
    };
    let per_example = match objective.objective {
        Objective::Elbo => terms.elbo(objective.beta)?,
        Objective::Iwae => pass
            .log_weights()?
            .log_sum_exp(0)?
            .affine(1.0, -(k as f64).ln())?,
    };
    // -(1/B) sum over this rank's rows: the shards add up to the batch's mean.
    let loss = (per_example.sum_all()? * (-1.0 / b as f64))?;
    sums[0] = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    sums[1] = sum_f64(&per_example.detach())?;
    sums[2] = sum_f64(&terms.reconstruction.detach())?;
    for (sum, layer) in sums[3..].iter_mut().zip(&terms.kl_layers) {
        *sum = sum_f64(&layer.detach())?;
    }
    Ok((Some(loss), sums))
}

/// A denoiser's training batch, every draw made: `x_t` `[B, ...]`, the timesteps, the target
/// (eps, x_0 or v), the dropout seed (`None` without dropout) and, for the learned-variance
/// losses (which read q(x_{t-1} | x_t, x_0)), x_0.
pub struct DenoiseBatch {
    pub xt: Tensor,
    pub t: Vec<usize>,
    pub target: Tensor,
    pub dropout_seed: Option<u64>,
    pub x0: Option<Tensor>,
    /// Each example's importance weight 1 / (T p_t) when t was drawn from the loss-aware
    /// sampler (`None`: uniform t).
    pub weights: Option<Vec<f64>>,
    /// Continuous time: the loss is a weighted sum of squared errors ([`WeightedRows`]), `t`
    /// unused.
    pub weighted: Option<WeightedRows>,
}

/// A batch of continuous time (`diffusion::vdm`): the loss is
/// `(1/B) sum_b w_b ||target_b - f(x_t_b, c_b)||^2` with each example's time value c_b given.
/// Sums: `[loss, SSE_b of each example of the global batch]`, and with a `tangent`
/// `[.., g_b of each example]`, `g_b = w_b d SSE_b / d gamma_b` through the network's input
/// (`dx_t/d gamma_b`, the tangent's rows) and its time value (`dc/d gamma`, the same for all):
/// what a learned schedule's gradient needs. Zeros outside this rank's rows. Where the target
/// moves with gamma too (v = alpha eps - sigma x), `target_tangent` holds d target_b/d gamma_b
/// and g_b includes `-2 w_b (f_b - target_b) . d target_b/d gamma_b`.
pub struct WeightedRows {
    pub model_t: Vec<f32>,
    pub weights: Vec<f64>,
    pub tangent: Option<(Tensor, f64)>,
    pub target_tangent: Option<Tensor>,
}

impl WeightedRows {
    /// The length of a step's sums for a batch of `b`.
    pub fn sums_len(&self, b: usize) -> usize {
        1 + b + if self.tangent.is_some() { b } else { 0 }
    }

    /// The tangent's values, flattened (empty without one).
    pub fn tangent_values(&self) -> Result<Vec<f32>> {
        match &self.tangent {
            Some((t, _)) => Ok(t.flatten_all()?.to_vec1::<f32>()?),
            None => Ok(Vec::new()),
        }
    }
}

/// The values a learned-variance loss reads from a batch, taken out of their tensors once.
pub struct LearnedValues {
    x0: Vec<f32>,
    xt: Vec<f32>,
    target: Vec<f32>,
    t: Vec<usize>,
    weights: Option<Vec<f64>>,
    /// Values per example.
    n: usize,
}

impl LearnedValues {
    pub fn new(batch: &DenoiseBatch) -> Result<Self> {
        let Some(x0) = &batch.x0 else {
            bail!("a learned-variance loss needs the batch's x_0");
        };
        let values = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
        let (x0, xt, target) = (values(x0)?, values(&batch.xt)?, values(&batch.target)?);
        let b = batch.t.len();
        let n = xt.len() / b.max(1);
        if x0.len() != xt.len() || target.len() != xt.len() || n * b != xt.len() {
            bail!("a learned-variance batch: x_0, x_t and the target differ in size");
        }
        Ok(Self {
            x0,
            xt,
            target,
            t: batch.t.clone(),
            weights: batch.weights.clone(),
            n,
        })
    }

    /// The number of examples of the global batch.
    pub fn len(&self) -> usize {
        self.t.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// The loss of rows `rows` from the network's output `out` `[rows, 2C, ...]`
    /// ([`LearnedHead::example`], as the global batch's mean): (this share of the loss, each
    /// row's L_t in nats, and dL/d(out)).
    pub fn rows(
        &self,
        head: &LearnedHead,
        rows: Range<usize>,
        out: &[f32],
    ) -> Result<(f64, Vec<f64>, Vec<f32>)> {
        let mut dy = vec![0f32; out.len()];
        let (loss, vb) = self.rows_into(head, rows, out, &mut dy)?;
        Ok((loss, vb, dy))
    }

    /// [`LearnedValues::rows`] writing dL/d(out) into `dy` (`out`'s length): the fused
    /// engine's buffer, reused from example to example.
    pub fn rows_into(
        &self,
        head: &LearnedHead,
        rows: Range<usize>,
        out: &[f32],
        dy: &mut [f32],
    ) -> Result<(f64, Vec<f64>)> {
        let n = self.n;
        if out.len() != 2 * n * rows.len() || dy.len() != out.len() {
            bail!(
                "a learned-variance loss needs 2C output channels: {} outputs for {} rows of {n} values",
                out.len(),
                rows.len()
            );
        }
        let scale = 1.0 / self.t.len().max(1) as f64;
        let mut loss = 0f64;
        let mut vb = Vec::with_capacity(rows.len());
        for (k, row) in rows.enumerate() {
            let w = self.weights.as_ref().and_then(|w| w.get(row)).copied();
            let weight = head.vb_weight(w.unwrap_or(1.0));
            let v = row * n..(row + 1) * n;
            let o = 2 * n * k..2 * n * (k + 1);
            let e = head.example(
                self.t[row],
                &self.x0[v.clone()],
                &self.xt[v.clone()],
                &self.target[v],
                &out[o.clone()],
                weight,
                scale,
                &mut dy[o],
            );
            loss += e.loss;
            vb.push(e.vb_nats);
        }
        Ok((loss, vb))
    }
}

/// A learned-variance step's sums for rows `rows` of a batch of `b`: `[loss, mean L_t (nats),
/// L_t of each example of the global batch]`, zeros outside the rows (so the ranks' sums add
/// up to the whole batch's, for the loss-aware sampler).
pub fn learned_sums(b: usize, rows: Range<usize>, loss: f64, vb: &[f64]) -> Vec<f64> {
    let mut sums = vec![0.0; 2 + b];
    sums[0] = loss;
    sums[1] = vb.iter().sum::<f64>() / b.max(1) as f64;
    for (row, v) in rows.zip(vb) {
        sums[2 + row] = *v;
    }
    sums
}

/// The training step of the simple loss `mean ||target - f(x_t, t)||^2` for `net` (whose
/// variables are `vars`) on `engine` (`Engine::Auto`: the fused CPU engine for a U-Net on the
/// CPU) and its description. Sums: `[loss]`.
///
/// With a `head` (learned variances), the loss is [`LearnedHead`]'s, and the sums
/// [`learned_sums`]: on the fused engine its closed-form gradient enters the
/// engine's backward pass; on candle, through the surrogate `sum(out * dL/d(out))`, whose
/// gradient is the same.
pub fn denoiser_step<'a>(
    engine: Engine,
    net: &'a Net,
    vars: Vec<(String, Var)>,
    head: Option<LearnedHead>,
) -> Result<(Box<dyn TrainStep<Batch = DenoiseBatch> + 'a>, String)> {
    if engine == Engine::Xla {
        let Net::Unet(u) = net else {
            bail!("--engine xla: takes the U-Net (the toys' MLP trains on candle)");
        };
        let (runtime, name) = xla_runtime()?;
        let step = self::xla::unet::XlaUnetStep::new(u, &vars, head, runtime)?;
        return Ok((Box::new(step), name));
    }
    let (fused, name) = unet_training(engine, net)?;
    if let Some(fused) = fused {
        return Ok((
            Box::new(unet::FusedUnetStep::new(fused, &vars, head)?),
            name,
        ));
    }
    let loss = move |batch: &DenoiseBatch, rows: Range<usize>| -> Result<CandleOut> {
        let total = batch.xt.elem_count() as f64;
        if let Some(wr) = &batch.weighted {
            return candle_weighted_loss(net, batch, wr, rows);
        }
        if rows.is_empty() {
            let len = if head.is_some() { 2 + batch.t.len() } else { 1 };
            return Ok((None, vec![0.0; len]).into());
        }
        let (first, n) = (rows.start, rows.len());
        let xs = batch.xt.narrow(0, first, n)?;
        let ts = timestep_tensor(&batch.t[rows.clone()], batch.xt.device())?;
        let out = net.forward_train_seeded(&xs, &ts, batch.dropout_seed, first)?;
        if let Some(head) = &head {
            let values = out.flatten_all()?.to_vec1::<f32>()?;
            let (loss, vb, dy) = LearnedValues::new(batch)?.rows(head, rows.clone(), &values)?;
            let dy = Tensor::from_vec(dy, out.shape(), out.device())?;
            let surrogate = (out * dy)?.sum_all()?;
            return Ok((
                Some(surrogate),
                learned_sums(batch.t.len(), rows, loss, &vb),
            )
                .into());
        }
        let sse = (out - batch.target.narrow(0, first, n)?)?
            .sqr()?
            .sum_all()?;
        let sum = sse.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((Some((sse / total)?), vec![sum / total]).into())
    };
    Ok((Box::new(CandleStep::new(vars, Box::new(loss))), name))
}

/// candle's loss of a [`WeightedRows`] batch: the input and the time values are variables of
/// the graph, so the backward pass also gives d/dx_t and d/dc, which `after` projects on the
/// tangent.
fn candle_weighted_loss(
    net: &Net,
    batch: &DenoiseBatch,
    wr: &WeightedRows,
    rows: Range<usize>,
) -> Result<CandleOut> {
    let b = wr.weights.len();
    let mut sums = vec![0.0; wr.sums_len(b)];
    if rows.is_empty() {
        return Ok((None, sums).into());
    }
    if wr.model_t.len() != b || batch.xt.dim(0)? != b {
        bail!(
            "a weighted batch: {} times and {} weights for {} examples",
            wr.model_t.len(),
            b,
            batch.xt.dim(0)?
        );
    }
    let (first, n) = (rows.start, rows.len());
    let dev = batch.xt.device();
    let xs = Var::from_tensor(&batch.xt.narrow(0, first, n)?)?;
    let ts = Var::from_tensor(&Tensor::from_slice(&wr.model_t[rows.clone()], n, dev)?)?;
    let out =
        net.forward_train_seeded(xs.as_tensor(), ts.as_tensor(), batch.dropout_seed, first)?;
    let sse = (&out - batch.target.narrow(0, first, n)?)?
        .sqr()?
        .flatten_from(1)?
        .sum(1)?;
    let w: Vec<f32> = wr.weights[rows.clone()].iter().map(|&w| w as f32).collect();
    let w = Tensor::from_vec(w, n, dev)?;
    let loss = ((&sse * w)?.sum_all()? / b as f64)?;
    // -2 w_b (f_b - target_b) . d target_b/d gamma_b of each row (zero without one).
    let through_target: Vec<f64> = match &wr.target_tangent {
        Some(tt) => {
            let diff = (out.detach() - batch.target.narrow(0, first, n)?)?;
            let dot = (diff * tt.narrow(0, first, n)?)?.flatten_from(1)?.sum(1)?;
            let dot = dot.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            dot.iter()
                .zip(&wr.weights[rows.clone()])
                .map(|(d, w)| -2.0 * w * d)
                .collect()
        }
        None => vec![0.0; n],
    };
    sums[0] = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let per = sse.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    sums[1 + first..1 + first + n].copy_from_slice(&per);
    let after: Option<AfterBackward> = match &wr.tangent {
        None => None,
        Some((tangent, dc)) => {
            let (tangent, dc) = (tangent.narrow(0, first, n)?.flatten_from(1)?, *dc);
            Some(Box::new(move |store, sums| {
                let zero = |v: &Var| v.as_tensor().zeros_like();
                let gx = store
                    .get(xs.as_tensor())
                    .cloned()
                    .map_or_else(|| zero(&xs), Ok)?;
                let gt = store
                    .get(ts.as_tensor())
                    .cloned()
                    .map_or_else(|| zero(&ts), Ok)?;
                let along = (gx.flatten_from(1)? * tangent)?.sum(1)?;
                let g = ((along + (gt * dc)?)? * b as f64)?;
                let g = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                for (i, (g, extra)) in g.iter().zip(&through_target).enumerate() {
                    sums[1 + b + first + i] = g + extra;
                }
                Ok(())
            }))
        }
    };
    Ok(CandleOut {
        loss: Some(loss),
        sums,
        after,
    })
}

/// Which implementation computes a VAE training step. Both compute the same numbers from the
/// same noise; they differ in speed and reach.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// `fused` where it applies, else `candle`: for the VAE the CPU and the Bernoulli
    /// likelihood; for diffusion the U-Net on the CPU.
    #[default]
    Auto,
    /// candle tensors and autodiff: any device, likelihood and objective.
    Candle,
    /// The hand-derived fused CPU step of [`vae`] or [`unet`].
    Fused,
    /// The step traced, differentiated and compiled by XLA into one program ([`xla`]),
    /// run by the PJRT plugin at `$ELBO_PJRT_PLUGIN` (`scripts/xla-plugin` installs the CPU
    /// one): the VAE family's MLP models with the Bernoulli likelihood, for now.
    Xla,
}

/// The engine of a VAE training step: `(fused, description)`. The fused engine takes the
/// CPU and the Bernoulli likelihood (any depth, activation, stochastic layers, objective).
pub fn vae_training(engine: Engine, vae: &Vae) -> Result<(bool, String)> {
    let applies = self::vae::supports(vae);
    let fused = match engine {
        Engine::Auto => applies,
        Engine::Candle => false,
        Engine::Fused if applies => true,
        Engine::Fused => {
            bail!("--engine fused: needs the CPU and --likelihood bernoulli")
        }
        Engine::Xla => bail!("--engine xla: not for this model"),
    };
    Ok((fused, describe(fused, engine)))
}

/// The engine of a diffusion training step: the fused U-Net engine, or `None` for candle's
/// autodiff, and a description. The fused engine takes any U-Net on the CPU (either layout,
/// any channels, attention levels and dropout); the toys' MLP trains on candle.
pub fn unet_training(engine: Engine, net: &Net) -> Result<(Option<FusedUnet>, String)> {
    let on_cpu = |u: &crate::diffusion::nets::UNet| u.conv_in.parts().0.device().is_cpu();
    let fused = match (net, engine) {
        (_, Engine::Candle) => None,
        (Net::Unet(u), Engine::Auto) if on_cpu(u) => FusedUnet::new(u).ok(),
        (Net::Unet(u), Engine::Fused) if on_cpu(u) => {
            Some(FusedUnet::new(u).context("--engine fused")?)
        }
        (_, Engine::Auto) => None,
        (_, Engine::Fused) => bail!("--engine fused: needs the U-Net and the CPU"),
        (_, Engine::Xla) => {
            bail!("--engine xla: takes the VAE family for now (the U-Net is on fused or candle)")
        }
    };
    let name = describe(fused.is_some(), engine);
    Ok((fused, name))
}

fn describe(fused: bool, engine: Engine) -> String {
    let forced = if engine == Engine::Auto {
        ""
    } else {
        " (--engine)"
    };
    if fused {
        format!("fused CPU engine{forced}")
    } else {
        format!("candle (tensors and autodiff){forced}")
    }
}

/// A network of plain tensors for sampling and evaluation, with its engine chosen once, here:
/// the fused CPU engine for a U-Net on the CPU, else the network's candle path (any device,
/// the MLP).
pub struct FrozenNet {
    pub net: Net,
    fused: Option<FusedUnet>,
    /// The U-Net's forward pass on XLA (`--engine xla`); its programs are compiled on first
    /// use, one per batch shape.
    xla: Option<std::sync::Mutex<self::xla::unet::XlaUnet>>,
}

impl FrozenNet {
    pub fn new(net: Net) -> Self {
        // `Engine::Auto` never fails: it falls back to candle.
        let fused = unet_training(Engine::Auto, &net).ok().and_then(|(f, _)| f);
        Self {
            net,
            fused,
            xla: None,
        }
    }

    /// The network's forward pass on `engine`: `auto` as [`FrozenNet::new`]; `fused` the fused
    /// U-Net (the CPU); `candle` candle's ops; `xla` the U-Net traced and compiled by XLA (its
    /// forward pass and the ODE likelihood's vector-Jacobian products).
    pub fn with_engine(net: Net, engine: Engine) -> Result<Self> {
        match engine {
            Engine::Auto => Ok(Self::new(net)),
            Engine::Candle => Ok(Self {
                net,
                fused: None,
                xla: None,
            }),
            Engine::Fused => {
                let (fused, _) = unet_training(Engine::Fused, &net)?;
                Ok(Self {
                    net,
                    fused,
                    xla: None,
                })
            }
            Engine::Xla => {
                let Net::Unet(u) = &net else {
                    bail!("--engine xla: takes the U-Net (the toys' MLP runs on candle)");
                };
                let runtime = self::xla::runtime().context("--engine xla")?;
                let xla = self::xla::unet::XlaUnet::new(u, runtime)?;
                let mut frozen = Self::new(net);
                frozen.xla = Some(std::sync::Mutex::new(xla));
                Ok(frozen)
            }
        }
    }
}

/// The XLA engine's sampler loop: x_t stays on the device, one program a step.
struct XlaRunner<'a> {
    unet: std::sync::MutexGuard<'a, self::xla::unet::XlaUnet>,
    state: Option<(self::xla::pjrt::Buffer, (usize, usize, usize, usize))>,
}

impl crate::diffusion::process::StepRunner for XlaRunner<'_> {
    fn start(&mut self, x: &Tensor) -> Result<()> {
        self.state = Some((self.unet.upload_state(x)?, x.dims4()?));
        Ok(())
    }

    fn step(
        &mut self,
        t: &Tensor,
        step: &crate::diffusion::process::LinearStep,
        z: Option<&Tensor>,
    ) -> Result<()> {
        let Some((x, dims)) = self.state.take() else {
            bail!("XLA sampler: a step before the start");
        };
        self.state = Some((self.unet.linear_step(x, dims, t, step, z)?, dims));
        Ok(())
    }

    fn finish(&mut self, like: &Tensor) -> Result<Tensor> {
        let Some((x, dims)) = &self.state else {
            bail!("XLA sampler: no state to read");
        };
        self.unet.read_state(x, *dims, like)
    }
}

impl Denoiser for FrozenNet {
    /// On XLA, the samplers' steps run on the device ([`XlaRunner`]).
    fn step_runner(&self) -> Option<Box<dyn crate::diffusion::process::StepRunner + '_>> {
        let unet = self.xla.as_ref()?.lock().ok()?;
        Some(Box::new(XlaRunner { unet, state: None }))
    }

    /// On XLA, the bound's terms in one program with the network.
    fn bound_terms(
        &self,
        x0: &Tensor,
        xt: &Tensor,
        t: &Tensor,
        rows: &[crate::diffusion::process::BoundRow],
        how: crate::diffusion::process::BoundProgram,
    ) -> Option<Result<Vec<f64>>> {
        let xla = self.xla.as_ref()?;
        Some(match xla.lock() {
            Ok(mut unet) => unet.bound_terms(x0, xt, t, rows, how),
            Err(_) => Err(anyhow::anyhow!("XLA U-Net: a poisoned lock")),
        })
    }

    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(xla) = &self.xla {
            let mut xla = xla
                .lock()
                .map_err(|_| candle_core::Error::Msg("XLA U-Net: a poisoned lock".into()))?;
            return xla
                .forward(xt, t)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")));
        }
        match &self.fused {
            Some(engine) if xt.device().is_cpu() && xt.dtype() == DType::F32 => {
                engine.forward(xt, t)
            }
            _ => self.net.forward(xt, t),
        }
    }

    /// The fused engine's output is a fresh tensor outside the autodiff graph: candle's ops.
    fn forward_differentiable(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.net.forward(xt, t)
    }

    /// The fused engine's own backward pass (dx only) where it runs, else candle's autodiff.
    fn vjp(
        &self,
        xt: &Tensor,
        t: &Tensor,
        cotangents: &[Tensor],
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        if let Some(xla) = &self.xla {
            let mut xla = xla
                .lock()
                .map_err(|_| candle_core::Error::Msg("XLA U-Net: a poisoned lock".into()))?;
            return xla
                .vjp(xt, t, cotangents)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")));
        }
        match &self.fused {
            Some(engine) if xt.device().is_cpu() && xt.dtype() == DType::F32 => {
                engine.vjp(xt, t, cotangents)
            }
            _ => self.net.vjp(xt, t, cotangents),
        }
    }
}

/// The importance-sampled log p(x) of `vae::objective::estimate_log_likelihood_candle`
/// (K samples, chunks of at most `max_rows` decoded rows), on the fused CPU engine where it
/// applies (the CPU and the Bernoulli likelihood), else on candle. Both draw the same noise and
/// agree to float rounding. `x` `[B, D]`; run on a frozen model.
pub fn estimate_log_likelihood(
    vae: &Vae,
    x: &Tensor,
    k: usize,
    max_rows: usize,
    noise: &mut Noise,
) -> Result<LikelihoodEstimate> {
    LikelihoodEstimator::new(vae, Engine::Auto)?.estimate(x, k, max_rows, noise)
}

/// The importance-sampled log p(x) of a VAE on one engine, made once for many batches (the
/// XLA engine compiles one program per shape and keeps it): the fused engine (`auto` where it
/// applies), the XLA engine, or candle. Every engine draws the same noise in the same order.
pub struct LikelihoodEstimator<'a> {
    vae: &'a Vae,
    how: Estimator,
}

enum Estimator {
    Fused(Box<FusedVae>),
    Xla(Box<self::xla::vae::XlaVae>),
    Candle,
}

impl<'a> LikelihoodEstimator<'a> {
    pub fn new(vae: &'a Vae, engine: Engine) -> Result<Self> {
        let fused = self::vae::supports(vae);
        let how = match engine {
            Engine::Auto if fused => Estimator::Fused(Box::new(FusedVae::from_vae(vae)?)),
            Engine::Auto | Engine::Candle => Estimator::Candle,
            Engine::Fused if fused => Estimator::Fused(Box::new(FusedVae::from_vae(vae)?)),
            Engine::Fused => bail!("--engine fused: needs the CPU and --likelihood bernoulli"),
            Engine::Xla => {
                if !self::xla::vae::supports(vae) {
                    bail!("--engine xla: takes --likelihood bernoulli, and no --residual, for now");
                }
                let runtime = self::xla::runtime().context("--engine xla")?;
                Estimator::Xla(Box::new(self::xla::vae::XlaVae::from_vae(vae, runtime)?))
            }
        };
        Ok(Self { vae, how })
    }

    /// log p(x) of the examples `x` `[B, D]` with K = `k` importance samples, in chunks of at
    /// most `max_rows` decoded rows.
    pub fn estimate(
        &mut self,
        x: &Tensor,
        k: usize,
        max_rows: usize,
        noise: &mut Noise,
    ) -> Result<LikelihoodEstimate> {
        let values =
            || -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
        match &mut self.how {
            Estimator::Fused(f) => f.estimate_log_likelihood(&values()?, k, max_rows, noise),
            Estimator::Xla(e) => e.estimate_log_likelihood(&values()?, k, max_rows, noise),
            Estimator::Candle => crate::vae::objective::estimate_log_likelihood_candle(
                self.vae, x, k, max_rows, noise,
            ),
        }
    }
}
