//! Aggregating per-example evaluation results: means, standard errors, bits per dimension.

/// The mean of `values` (0 for none).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// The standard error of the mean, `sqrt(s^2 / n)` with the unbiased sample variance
/// `s^2 = sum (x - mean)^2 / (n - 1)` (0 for fewer than two values).
pub fn standard_error(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt()
}

/// Nats per example to bits per dimension: `nats / (dims ln 2)`, `dims` = C x H x W.
pub fn bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// Running per-dimension variances of posterior means across examples, for the active units
/// of Burda et al. (2015): a latent dimension u is active when `Cov_x(E_q[u|x]) > 10^-2`.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    n: usize,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl Activity {
    /// Adds the rows of `means` `[rows, dims]`.
    pub fn add(&mut self, means: &[f32], dims: usize) {
        self.sum.resize(dims, 0.0);
        self.sum_sq.resize(dims, 0.0);
        for row in means.chunks(dims) {
            for (i, &m) in row.iter().enumerate() {
                self.sum[i] += m as f64;
                self.sum_sq[i] += (m as f64) * (m as f64);
            }
            self.n += 1;
        }
    }

    /// The variance of each dimension's mean across the examples added.
    pub fn variances(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(s, q)| (q / n - (s / n).powi(2)).max(0.0))
            .collect()
    }

    /// The number of dimensions whose variance exceeds `threshold` (the paper's 10^-2).
    pub fn active(&self, threshold: f64) -> usize {
        self.variances().iter().filter(|&&v| v > threshold).count()
    }

    /// Sums the counts and sums of every rank (data parallelism, [`crate::collective`]): each then
    /// holds what one process adding every rank's rows holds. `dims`: the dimensions (a rank
    /// may have added no rows).
    pub fn all_reduce(&mut self, dims: usize) -> anyhow::Result<()> {
        self.sum.resize(dims, 0.0);
        self.sum_sq.resize(dims, 0.0);
        let mut v = vec![self.n as f64];
        v.extend(&self.sum);
        v.extend(&self.sum_sq);
        crate::collective::world().all_reduce_sum_f64(&mut v)?;
        self.n = v[0] as usize;
        self.sum.copy_from_slice(&v[1..1 + dims]);
        self.sum_sq.copy_from_slice(&v[1 + dims..]);
        Ok(())
    }
}

/// What [`evaluate_vae`] gives: per test example, the importance-sampled log p(x), the
/// K-sample reconstruction term and the KL of each stochastic layer; per layer, the activity
/// of the posterior means.
#[derive(Debug, Clone)]
pub struct VaeEvaluation {
    pub log_px: Vec<f64>,
    pub reconstruction: Vec<f64>,
    /// `[layer][example]`.
    pub kl_layers: Vec<Vec<f64>>,
    pub activity: Vec<Activity>,
}

/// What `elbo eval vae` reports, per example in nats: the -ELBO and its parts (from the K
/// samples of the log p(x) estimate), the importance-sampled NLL with its standard error and
/// in bits/dim, the gap -ELBO - NLL (= KL(q(z|x) || p(z|x)) on average), and the active units
/// of each stochastic layer (Cov_x(E_q[u|x]) > 0.01, Burda et al. 2015).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VaeSummary {
    pub neg_elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
    pub kl_layers: Vec<f64>,
    pub nll: f64,
    pub gap: f64,
    pub nll_stderr: f64,
    pub nll_bits_per_dim: f64,
    pub active_units: Vec<usize>,
    pub iw_samples: usize,
    pub n: usize,
}

impl VaeEvaluation {
    /// The means of the evaluation, `k` its importance samples, `dims` the values per example.
    pub fn summary(&self, k: usize, dims: usize) -> VaeSummary {
        let kl_layers: Vec<f64> = self.kl_layers.iter().map(|l| mean(l)).collect();
        let (nll, reconstruction) = (-mean(&self.log_px), -mean(&self.reconstruction));
        let kl = kl_layers.iter().sum::<f64>();
        let neg_elbo = reconstruction + kl;
        VaeSummary {
            neg_elbo,
            reconstruction,
            kl,
            kl_layers,
            nll,
            gap: neg_elbo - nll,
            nll_stderr: standard_error(&self.log_px),
            nll_bits_per_dim: bits_per_dim(nll, dims),
            active_units: self.activity.iter().map(|a| a.active(1e-2)).collect(),
            iw_samples: k,
            n: self.log_px.len(),
        }
    }
}

/// Evaluates a frozen VAE on `data` in batches of `batch_size` with K = `k` importance
/// samples (in pieces of about 250,000 decoded rows, combined exactly:
/// `log p(x) = logsumexp_pieces(log p_piece(x) + ln K_piece) - ln K`). The pixels are drawn
/// (for binarized data) from one generator seeded 0 over the whole set in order; batch j's
/// noise from `derive_seed(seed, 0, j)` and its posterior means' from `derive_seed(seed, 1, j)`.
/// With several ranks ([`crate::collective`]) each runs its share of the batches (all of them draw
/// every batch's pixels) and the per-example values are summed into every rank's vectors, so
/// every rank returns what one process returns. `engine` computes the estimate
/// ([`crate::engine::LikelihoodEstimator`]). `progress` is told each importance sample.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_vae(
    vae: &crate::vae::Vae,
    data: &crate::data::Dataset,
    pixels: crate::data::PixelMode,
    k: usize,
    batch_size: usize,
    seed: u64,
    engine: crate::engine::Engine,
    progress: &dyn Fn(u64),
) -> anyhow::Result<VaeEvaluation> {
    use crate::distributions::{Noise, derive_seed};
    use crate::vae::objective::{log_add_exp, posterior_means};
    use rand::SeedableRng;
    anyhow::ensure!(
        k > 0 && batch_size > 0,
        "K and the batch size must be at least 1"
    );
    let n = data.len();
    let layers = vae.config.layers();
    let dims = vae.config.latent_dims.clone();
    let mut out = VaeEvaluation {
        log_px: vec![0.0; n],
        reconstruction: vec![0.0; n],
        kl_layers: vec![vec![0.0; n]; layers],
        activity: vec![Activity::default(); layers],
    };
    let mut pixel_rng = rand::rngs::StdRng::seed_from_u64(0);
    let idx: Vec<usize> = (0..n).collect();
    let batches: Vec<&[usize]> = idx.chunks(batch_size).collect();
    let mine = crate::collective::my_shard(batches.len());
    let mut estimator = crate::engine::LikelihoodEstimator::new(vae, engine)?;
    for (j, chunk) in batches.iter().enumerate() {
        let values = data.batch_values(chunk, pixels, &mut pixel_rng);
        if !mine.contains(&j) {
            continue;
        }
        let b = chunk.len();
        let x = candle_core::Tensor::from_vec(values, (b, data.shape.dim()), vae.device())?;
        let mut noise = Noise::new(derive_seed(seed, 0, j as u64));
        let piece = (250_000 / b).max(1);
        let (mut lse, mut rec_sum) = (vec![f64::NEG_INFINITY; b], vec![0.0; b]);
        let mut kl_sum = vec![vec![0.0; b]; layers];
        let mut done = 0;
        while done < k {
            let kc = piece.min(k - done);
            let est = estimator.estimate(&x, kc, 25_000, &mut noise)?;
            let ln_kc = (kc as f64).ln();
            for i in 0..b {
                lse[i] = log_add_exp(lse[i], est.log_px[i] + ln_kc);
                rec_sum[i] += est.reconstruction[i] * kc as f64;
                for (sum, layer) in kl_sum.iter_mut().zip(&est.kl_layers) {
                    sum[i] += layer[i] * kc as f64;
                }
            }
            done += kc;
            progress((kc * b) as u64);
        }
        let ln_k = (k as f64).ln();
        for (i, &e) in chunk.iter().enumerate() {
            out.log_px[e] = lse[i] - ln_k;
            out.reconstruction[e] = rec_sum[i] / k as f64;
            for (dst, sum) in out.kl_layers.iter_mut().zip(&kl_sum) {
                dst[e] = sum[i] / k as f64;
            }
        }
        let mut means_noise = Noise::new(derive_seed(seed, 1, j as u64));
        let means = posterior_means(vae, &x, 100, &mut means_noise)?;
        for (acc, m) in out.activity.iter_mut().zip(&means) {
            acc.add(&m.flatten_all()?.to_vec1::<f32>()?, m.dim(1)?);
        }
    }
    let world = crate::collective::world();
    if world.world_size() > 1 {
        world.all_reduce_sum_f64(&mut out.log_px)?;
        world.all_reduce_sum_f64(&mut out.reconstruction)?;
        for l in &mut out.kl_layers {
            world.all_reduce_sum_f64(l)?;
        }
        for (a, &d) in out.activity.iter_mut().zip(&dims) {
            a.all_reduce(d)?;
        }
    }
    Ok(out)
}

/// The diffusion bound's terms averaged over the examples (nats per example): L_0, each
/// L_t for t = 2..T (index t - 2), L_T; see [`bound_terms`].
#[derive(Debug, Clone)]
pub struct BoundMeans {
    /// L_0 and each L_t (empty when the sum over t was estimated, `t_samples`).
    pub l0: Option<f64>,
    pub lt: Vec<f64>,
    pub l_prior: f64,
    pub n: usize,
    /// Each example's whole bound (nats), for the standard error over the examples.
    pub totals: Vec<f64>,
    /// K: the sum over t estimated from K stratified timesteps per example.
    pub t_samples: Option<usize>,
}

/// What `elbo eval diffusion` reports, per example: the bound `L_0 + sum_t L_t + L_T` in nats
/// and bits/dim with its standard error over the examples, its parts, each L_t (t = 2..T),
/// and the decoder of L_0. With `--t-samples K` the sum over t is an unbiased estimate from K
/// timesteps per example, and L_0 and the L_t are not reported one by one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BoundSummary {
    pub bpd: f64,
    pub bpd_stderr: f64,
    pub nll_bound_nats: f64,
    pub nll_bound_stderr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l0: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lt_sum: Option<f64>,
    #[serde(rename = "lT")]
    pub l_prior: f64,
    pub n: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lt: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t_samples: Option<usize>,
    /// `discretized` (8-bit images) or `continuous` (points).
    pub decoder: String,
}

impl BoundMeans {
    /// The bound's summary for examples of `dims` values, its L_0 from `decoder` (a name).
    pub fn summary(&self, dims: usize, decoder: &str) -> BoundSummary {
        let exact = self.l0.map(|l0| (l0, self.lt.iter().sum::<f64>()));
        let total = match exact {
            Some((l0, lt_sum)) => l0 + lt_sum + self.l_prior,
            None => mean(&self.totals),
        };
        let se = standard_error(&self.totals);
        BoundSummary {
            bpd: bits_per_dim(total, dims),
            bpd_stderr: bits_per_dim(se, dims),
            nll_bound_nats: total,
            nll_bound_stderr: se,
            l0: exact.map(|e| e.0),
            lt_sum: exact.map(|e| e.1),
            l_prior: self.l_prior,
            n: self.n,
            lt: self.lt.clone(),
            t_samples: self.t_samples,
            decoder: decoder.to_lowercase(),
        }
    }
}

/// The full variational bound of a diffusion model (every timestep) over `x` `[N, ...]` in
/// batches of `batch_size`, batch j's x_t drawn with `derive_seed(seed, 2, j)`. With several
/// ranks ([`crate::collective`]) each runs its share of the batches and the sums are added over the
/// ranks, so every rank returns what one process returns (up to the order of the sums).
/// `progress` is told each network call.
#[allow(clippy::too_many_arguments)]
pub fn bound_terms(
    process: &crate::diffusion::GaussianDiffusion,
    net: &dyn crate::diffusion::Denoiser,
    x: &candle_core::Tensor,
    opts: crate::diffusion::process::BoundOptions,
    batch_size: usize,
    seed: u64,
    progress: &dyn Fn(),
) -> anyhow::Result<BoundMeans> {
    use crate::distributions::{Noise, derive_seed};
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let n = x.dim(0)?;
    let t_max = process.num_timesteps();
    // [L_0, L_T, L_2 .. L_T-1... as t = 2..T]: summed over examples, then over ranks; and each
    // example's total at its place (zero elsewhere), summed over ranks.
    let mut sums = vec![0.0; 2 + t_max - 1];
    let mut totals = vec![0.0; n];
    let starts: Vec<usize> = (0..n).step_by(batch_size).collect();
    for j in crate::collective::my_shard(starts.len()) {
        let start = starts[j];
        let len = batch_size.min(n - start);
        let x0 = x.narrow(0, start, len)?;
        let mut noise = Noise::new(derive_seed(seed, 2, j as u64));
        let terms = process.variational_bound_with(net, &x0, opts, &mut noise, progress)?;
        sums[0] += terms.l0.iter().sum::<f64>();
        sums[1] += terms.l_prior.iter().sum::<f64>();
        for (acc, v) in sums[2..].iter_mut().zip(&terms.lt) {
            *acc += v.iter().sum::<f64>();
        }
        for (i, total) in totals[start..start + len].iter_mut().enumerate() {
            *total = terms.l0[i] + terms.l_prior[i] + terms.lt.iter().map(|l| l[i]).sum::<f64>();
        }
    }
    let world = crate::collective::world();
    world.all_reduce_sum_f64(&mut sums)?;
    world.all_reduce_sum_f64(&mut totals)?;
    let nf = n.max(1) as f64;
    Ok(BoundMeans {
        l0: Some(sums[0] / nf),
        l_prior: sums[1] / nf,
        lt: sums[2..].iter().map(|v| v / nf).collect(),
        n,
        totals,
        t_samples: None,
    })
}

/// A continuous-time model's bound over a set of images ([`continuous_bound`]), nats per
/// example: the terms' means and each example's total (for the standard error, which then
/// includes the draws of t).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContinuousSummary {
    /// `None`: continuous time; `Some(T)`: the T-step discrete model.
    pub steps: Option<usize>,
    pub bpd: f64,
    pub bpd_stderr: f64,
    pub nll_bound_nats: f64,
    pub nll_bound_stderr: f64,
    pub prior: f64,
    pub reconstruction: f64,
    pub diffusion: f64,
    /// Draws of t per example.
    pub t_samples: usize,
    pub n: usize,
}

/// The bound of a continuous-time model ([`crate::diffusion::vdm::ContinuousModel::bound_terms`])
/// over the images `x` (`[N, C, H, W]`, [-1, 1]), `draws` times t per example, in continuous
/// time or the T-step model (`steps`); batches are shared among the ranks, batch j's draws
/// from `derive_seed(seed, 4, j)` (the same for both, so the two bounds' difference has
/// little noise).
#[allow(clippy::too_many_arguments)]
pub fn continuous_bound(
    model: &crate::diffusion::vdm::ContinuousModel,
    net: &dyn crate::diffusion::Denoiser,
    x: &candle_core::Tensor,
    draws: usize,
    steps: Option<usize>,
    batch_size: usize,
    seed: u64,
    progress: &dyn Fn(),
) -> anyhow::Result<ContinuousSummary> {
    use crate::distributions::{Noise, derive_seed};
    use rand::SeedableRng;
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let n = x.dim(0)?;
    let dims = x.elem_count() / n.max(1);
    // [prior, reconstruction, diffusion] summed, and each example's total at its place.
    let mut sums = vec![0.0; 3];
    let mut totals = vec![0.0; n];
    let starts: Vec<usize> = (0..n).step_by(batch_size).collect();
    for j in crate::collective::my_shard(starts.len()) {
        let start = starts[j];
        let len = batch_size.min(n - start);
        let x0 = x.narrow(0, start, len)?;
        let mut noise = Noise::new(derive_seed(seed, 4, 2 * j as u64));
        let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(seed, 4, 2 * j as u64 + 1));
        let terms = model.bound_terms(net, &x0, draws, steps, &mut noise, &mut rng)?;
        for (i, t) in terms.iter().enumerate() {
            sums[0] += t.prior;
            sums[1] += t.reconstruction;
            sums[2] += t.diffusion;
            totals[start + i] = t.total();
        }
        progress();
    }
    let world = crate::collective::world();
    world.all_reduce_sum_f64(&mut sums)?;
    world.all_reduce_sum_f64(&mut totals)?;
    let nf = n.max(1) as f64;
    let total = mean(&totals);
    let se = standard_error(&totals);
    Ok(ContinuousSummary {
        steps,
        bpd: bits_per_dim(total, dims),
        bpd_stderr: bits_per_dim(se, dims),
        nll_bound_nats: total,
        nll_bound_stderr: se,
        prior: sums[0] / nf,
        reconstruction: sums[1] / nf,
        diffusion: sums[2] / nf,
        t_samples: draws,
        n,
    })
}

/// The probability-flow ODE likelihood of a set of examples ([`ode_likelihood`]): each
/// example's negative log-likelihood in nats (averaged over its probes and dequantization
/// draws), and the function evaluations per solve.
#[derive(Debug, Clone)]
pub struct OdeMeans {
    pub totals: Vec<f64>,
    pub evals_per_solve: f64,
    pub solves: usize,
}

/// How [`ode_likelihood`] runs.
#[derive(Debug, Clone, Copy)]
pub struct OdeRun {
    pub ode: crate::diffusion::ode::OdeOptions,
    /// Independent trajectories (probes) per example and dequantization draw.
    pub probes: usize,
    /// Dequantization draws per image (ignored for points).
    pub repeats: usize,
    /// Images on 256 levels in [-1, 1] are dequantized: x = 2 (k + U) / 256 - 1, U ~ U[0, 1)^D.
    pub dequantize: bool,
}

/// -log p(x) of each example of `x` `[B, ...]` by the probability-flow ODE
/// ([`crate::diffusion::ode::log_likelihood`]; a continuous-time model's on its own schedule),
/// in nats of the model's scale, averaged over
/// `run.probes` probes and, for images, `run.repeats` uniform dequantizations of the 8-bit
/// values (so that the result, plus D ln 128, bounds the 8-bit data's -log P: score_sde's 7
/// bits/dim offset for data in [-1, 1]). Batch j draws from `derive_seed(seed, 7, j)`; sharded
/// over ranks as [`bound_terms`]; `progress` is told each solve.
#[allow(clippy::too_many_arguments)]
pub fn ode_likelihood(
    process: &crate::diffusion::GaussianDiffusion,
    continuous: Option<&crate::diffusion::vdm::ContinuousModel>,
    net: &dyn crate::diffusion::Denoiser,
    x: &candle_core::Tensor,
    run: OdeRun,
    batch_size: usize,
    seed: u64,
    progress: &dyn Fn(),
) -> anyhow::Result<OdeMeans> {
    use crate::distributions::{Noise, derive_seed};
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let n = x.dim(0)?;
    let mut totals = vec![0.0; n];
    let mut counts = [0.0, 0.0]; // evaluations, solves
    let draws = if run.dequantize {
        run.repeats.max(1)
    } else {
        1
    };
    let per = (draws * run.probes.max(1)) as f64;
    use crate::diffusion::ode::ContinuousSchedule;
    let sched = match continuous {
        Some(m) => ContinuousSchedule::Gamma(m.clone()),
        None => ContinuousSchedule::new(process),
    };
    let starts: Vec<usize> = (0..n).step_by(batch_size).collect();
    for j in crate::collective::my_shard(starts.len()) {
        let start = starts[j];
        let len = batch_size.min(n - start);
        let x0 = x.narrow(0, start, len)?;
        let mut noise = Noise::new(derive_seed(seed, 7, j as u64));
        for _ in 0..draws {
            let xd = if run.dequantize {
                // The 8-bit level k of each value, then (k + U) / 256 on [-1, 1].
                let k = ((&x0 + 1.0)? * 127.5)?.round()?.clamp(0f32, 255f32)?;
                let u = noise.rng_uniform(x0.shape(), x0.device())?;
                ((k + u)? * (2.0 / 256.0))?.affine(1.0, -1.0)?
            } else {
                x0.clone()
            };
            for _ in 0..run.probes.max(1) {
                let (logp, evals) = crate::diffusion::ode::log_likelihood_on(
                    process, &sched, net, &xd, run.ode, &mut noise,
                )?;
                for (t, lp) in totals[start..start + len].iter_mut().zip(logp) {
                    *t -= lp / per;
                }
                counts[0] += evals as f64;
                counts[1] += 1.0;
                progress();
            }
        }
    }
    let world = crate::collective::world();
    world.all_reduce_sum_f64(&mut totals)?;
    world.all_reduce_sum_f64(&mut counts)?;
    Ok(OdeMeans {
        totals,
        evals_per_solve: counts[0] / counts[1].max(1.0),
        solves: counts[1] as usize,
    })
}

/// The examples the importance sampler's pilot runs on.
pub const PILOT_EXAMPLES: usize = 16;

/// The bound of [`bound_terms`] with its sum over t estimated from `k` stratified timesteps
/// per example ([`crate::diffusion::GaussianDiffusion::sampled_bound_sum`]): k network calls
/// per batch instead of T, unbiased; batch j draws its timesteps from `derive_seed(seed, 4, j)`
/// and its x_t from `derive_seed(seed, 2, j)`. Sharded over ranks as [`bound_terms`].
///
/// With [`TSampling::Importance`](crate::diffusion::process::TSampling) the timesteps are
/// drawn from q(t) of a pilot ([`crate::diffusion::GaussianDiffusion::pilot_weights`]: k
/// stratified calls on the first [`PILOT_EXAMPLES`] examples, from `derive_seed(seed, 5, 0)`;
/// every rank computes the same) instead.
#[allow(clippy::too_many_arguments)]
pub fn bound_sampled(
    process: &crate::diffusion::GaussianDiffusion,
    net: &dyn crate::diffusion::Denoiser,
    x: &candle_core::Tensor,
    k: usize,
    sampling: crate::diffusion::process::TSampling,
    opts: crate::diffusion::process::BoundOptions,
    batch_size: usize,
    seed: u64,
    progress: &dyn Fn(),
) -> anyhow::Result<BoundMeans> {
    use crate::diffusion::process::TSampling;
    use crate::distributions::{Noise, derive_seed};
    use rand::SeedableRng;
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let n = x.dim(0)?;
    let weights = match sampling {
        TSampling::Stratified => None,
        TSampling::Importance => {
            let pilot = x.narrow(0, 0, PILOT_EXAMPLES.min(n))?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(seed, 5, 0));
            let mut noise = Noise::new(derive_seed(seed, 6, 0));
            Some(process.pilot_weights(net, &pilot, k, opts, &mut rng, &mut noise, progress)?)
        }
    };
    let mut totals = vec![0.0; n];
    let mut prior_sum = [0.0];
    let starts: Vec<usize> = (0..n).step_by(batch_size).collect();
    for j in crate::collective::my_shard(starts.len()) {
        let start = starts[j];
        let len = batch_size.min(n - start);
        let x0 = x.narrow(0, start, len)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(seed, 4, j as u64));
        let mut noise = Noise::new(derive_seed(seed, 2, j as u64));
        let sums = match &weights {
            None => process.sampled_bound_sum(net, &x0, k, opts, &mut rng, &mut noise, progress)?,
            Some(w) => process
                .importance_bound_sum(net, &x0, k, w, opts, &mut rng, &mut noise, progress)?,
        };
        let prior = process.prior_term(&x0)?;
        prior_sum[0] += prior.iter().sum::<f64>();
        for (i, total) in totals[start..start + len].iter_mut().enumerate() {
            *total = sums[i] + prior[i];
        }
    }
    let world = crate::collective::world();
    world.all_reduce_sum_f64(&mut prior_sum)?;
    world.all_reduce_sum_f64(&mut totals)?;
    Ok(BoundMeans {
        l0: None,
        lt: Vec::new(),
        l_prior: prior_sum[0] / n.max(1) as f64,
        n,
        totals,
        t_samples: Some(k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        // s^2 = 1, n = 3: sqrt(1/3).
        assert!((standard_error(&[1.0, 2.0, 3.0]) - (1.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(standard_error(&[5.0]), 0.0);
        // 784 ln 2 nats are one bit per pixel.
        assert!((bits_per_dim(784.0 * std::f64::consts::LN_2, 784) - 1.0).abs() < 1e-15);
        // Dimension 0 varies (variance 1), dimension 1 is constant: one active unit.
        let mut a = Activity::default();
        a.add(&[1.0, 5.0, -1.0, 5.0], 2);
        assert_eq!(a.variances(), vec![1.0, 0.0]);
        assert_eq!(a.active(1e-2), 1);
    }
}
