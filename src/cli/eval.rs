//! `elbo eval vae|diffusion`: the evaluations, printed as a table or JSON and saved into a run's report.

use super::*;

#[derive(Args)]
pub struct EvalVaeArgs {
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Importance samples K per example for the log p(x) estimate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 5000)]
    pub iw_samples: usize,
    /// Evaluate only the first N examples.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub limit: Option<usize>,
    /// Examples per batch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 100)]
    pub batch_size: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results into RUN_DIR/eval.json and refresh RUN_DIR/report.html.
    #[arg(long, value_name = "RUN_DIR")]
    pub report: Option<PathBuf>,
    /// What computes the estimate: the fused CPU engine where it applies, candle, or XLA.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: elbo::train::Engine,
}

#[derive(Args)]
pub struct EvalDiffusionArgs {
    /// elbo's model.safetensors or run folder, a folder diffusers' save_pretrained wrote (a DDPM or DDIM
    /// pipeline, or a UNet2DModel), or an improved-diffusion / guided-diffusion model.pt with
    /// its MODEL_FLAGS and DIFFUSION_FLAGS (below).
    #[arg(long, value_name = "FILE|DIR")]
    pub checkpoint: PathBuf,
    /// A named image set (mnist-10k, mnist, fashion-mnist, cifar10, cifar100) or toy:NAME
    /// (default: mnist-10k for image models).
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Evaluate the first N examples (every one costs T network calls).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 100
    )]
    pub limit: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    pub batch_size: usize,
    /// The variance of p_theta(x_{t-1} | x_t): fixed-small (posterior variance) or fixed-large
    /// (beta); default: the model's own (fixed-small for elbo's models, the scheduler's or the
    /// flags' for other projects'; learned variances are always the network's).
    #[arg(long, value_enum)]
    pub variance: Option<VarianceType>,
    /// Also draw L_t against t on log axes, with labels and units, as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Clip the predicted x_0 to [-1, 1] before the posterior mean (improved-diffusion's
    /// `calc_bpd_loop` / `image_nll.py` default); without it, the network's own prediction.
    #[arg(long)]
    pub clip_denoised: bool,
    /// Estimate the sum over t from K timesteps per example (L_0 exactly, the rest stratified;
    /// unbiased; K + 1 network calls instead of T), with a standard error that includes the
    /// t-sampling.
    #[arg(long, allow_negative_numbers = true, value_name = "K")]
    pub t_samples: Option<usize>,
    /// How --t-samples draws its K timesteps: one in each of K strata, or K from a pilot's
    /// importance distribution q(t) ~ sqrt(E[L_t^2]) (K more calls on 16 examples first).
    /// (default: stratified).
    #[arg(long, value_enum)]
    pub t_sampling: Option<elbo::diffusion::process::TSampling>,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
    /// Also write the results into RUN_DIR/eval.json and refresh RUN_DIR/report.html.
    #[arg(long, value_name = "RUN_DIR")]
    pub report: Option<PathBuf>,
    /// What to compute: the variational bound, the exact likelihood of the probability-flow
    /// ODE, or both side by side.
    #[arg(long, value_enum, default_value = "bound")]
    pub likelihood: Likelihood,
    /// The ODE's divergence: Hutchinson's estimator with Rademacher or Gaussian probes, or
    /// exact (one backward pass per dimension; 2-D models).
    #[arg(long, value_enum, default_value = "rademacher")]
    pub probe: elbo::diffusion::ode::Probe,
    /// Independent ODE solves (probes) per example and dequantization draw.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub probes: usize,
    /// The RK45 solver's relative tolerance (score_sde's 1e-5).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-5)]
    pub rtol: f64,
    /// The RK45 solver's absolute tolerance.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-5)]
    pub atol: f64,
    /// Uniform dequantization draws per image for the ODE likelihood (score_sde: 5 passes).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub dequant_repeats: usize,
    /// Continuous-time models: also the bound of the same model with T discrete steps (VDM
    /// eq. 13; in expectation never below the continuous one), from the same draws.
    #[arg(long, allow_negative_numbers = true, value_name = "T")]
    pub steps: Option<usize>,
    /// What runs the network: the fused CPU engine for the U-Net on the CPU (auto), candle, or
    /// XLA (the U-Net's forward pass compiled once per batch shape; docs/xla.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: elbo::train::Engine,
    #[command(flatten)]
    pub model_flags: Box<elbo::interop::improved_diffusion::ModelFlags>,
}

pub fn eval_vae(a: EvalVaeArgs, device: &Device) -> Result<()> {
    use elbo::limits::{COUNT_CEILING, count};
    count("--iw-samples", a.iw_samples, 10_000_000)?;
    count("--batch-size", a.batch_size, 1_000_000)?;
    count("--limit", a.limit.unwrap_or(1), COUNT_CEILING)?;
    if let Some(dir) = &a.report {
        check_report_run(dir, "vae")?;
    }
    let vae = Vae::load(&a.checkpoint, device)?.frozen()?;
    let mut data = a.data.source().load(a.split)?;
    check_model_takes(&vae, &data, &a.data.source().describe())?;
    if let Some(n) = a.limit {
        data = data.take(n);
    }
    if data.is_empty() {
        bail!("--limit 0: nothing to evaluate");
    }
    // One importance sample costs about a pass through the networks: 2 multiply-adds a weight.
    elbo::limits::check_work(
        &format!(
            "--iw-samples {} x {} examples (--limit)",
            a.iw_samples,
            data.len()
        ),
        (data.len() as u64).checked_mul(a.iw_samples as u64),
        2 * vae.config.parameter_count_checked().unwrap_or(u64::MAX / 4),
    )?;
    let bar = progress(
        (data.len() as u64).saturating_mul(a.iw_samples as u64),
        "importance samples",
    );
    if !elbo::collective::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let ev = elbo::eval::evaluate_vae(
        &vae,
        &data,
        a.data.pixels(),
        a.iw_samples,
        a.batch_size,
        a.seed,
        a.engine,
        &|n| bar.inc(n),
    )?;
    bar.finish_and_clear();
    let summary = ev.summary(a.iw_samples, vae.config.input_dim);
    let checks = [("-ELBO", summary.neg_elbo), ("NLL", summary.nll)];
    check_finite_result(&a.checkpoint, &checks)?;
    if !elbo::collective::is_main() {
        return Ok(()); // rank 0 reports what every rank computed
    }
    let mut results = serde_json::to_value(&summary)?;
    results["split"] = serde_json::to_value(a.split)?;
    results["checkpoint"] = serde_json::to_value(&a.checkpoint)?;
    if let Some(dir) = &a.report {
        save_eval_report(dir, "vae", &results)?;
    }
    if a.json {
        println!("{results}");
    } else {
        let data = format!("{} ({:?})", a.data.source().describe(), a.split);
        print_vae_table(&summary, &vae.config, &a.checkpoint, &data);
    }
    Ok(())
}

/// `elbo eval vae`'s table.
fn print_vae_table(
    s: &elbo::eval::VaeSummary,
    config: &VaeConfig,
    checkpoint: &std::path::Path,
    data: &str,
) {
    let layers = config.layers();
    let k = s.iw_samples;
    println!("checkpoint      {}", checkpoint.display());
    println!("model           VAE {}", config.describe());
    println!("data            {data}, n = {}", s.n);
    println!("-ELBO           {:10.3} nats per example", s.neg_elbo);
    println!(
        "  reconstruction{:10.3}   -E_q[log p(x|z)], K = {k} samples",
        s.reconstruction
    );
    if layers == 1 {
        println!(
            "  KL            {:10.3}   KL(q(z|x) || p(z)), closed form",
            s.kl
        );
    } else {
        for (l, kl) in s.kl_layers.iter().enumerate() {
            let how = if l + 1 == layers {
                format!("closed form given the sampled z_{l}")
            } else {
                "Monte Carlo, E_q[log q(z|.) - log p(z|.)]".to_string()
            };
            println!("  KL layer {}    {kl:10.3}   {how}", l + 1);
        }
    }
    println!(
        "NLL (IS)        {:10.3}   -log p(x), importance sampling, K = {k} (+- {:.3})",
        s.nll, s.nll_stderr
    );
    println!(
        "                {:10.4}   bits/dim (NLL / ({} ln 2))",
        s.nll_bits_per_dim, config.input_dim
    );
    println!(
        "gap             {:10.3}   -ELBO - NLL = KL(q(z|x) || p(z|x))",
        s.gap
    );
    let units: Vec<String> = s
        .active_units
        .iter()
        .zip(&config.latent_dims)
        .map(|(a, l)| format!("{a} of {l}"))
        .collect();
    println!(
        "active units    {}   Cov_x(E_q[u|x]) > 0.01 per layer",
        units.join(", ")
    );
}

/// `eval diffusion --likelihood`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Likelihood {
    Bound,
    Ode,
    Both,
}

/// The probability-flow ODE likelihood of `x` (see `elbo::eval::ode_likelihood`) as the
/// `ode` object of `eval diffusion --json`: -log p in nats (8-bit images: dequantized, with the
/// D ln 128 of the [-1, 1] scaling, so that it bounds the discrete -log P), bits/dim, their
/// standard errors over the examples (which include the probes and the dequantization),
/// function evaluations and seconds.
fn ode_results(
    a: &EvalDiffusionArgs,
    config: &DiffusionConfig,
    process: &elbo::diffusion::GaussianDiffusion,
    net: &dyn elbo::diffusion::Denoiser,
    x: &candle_core::Tensor,
    dims: usize,
    continuous: Option<&elbo::diffusion::vdm::ContinuousModel>,
) -> Result<serde_json::Value> {
    use elbo::diffusion::ode::{OdeOptions, Rk45};
    elbo::limits::count("--probes", a.probes, 10_000)?;
    elbo::limits::count("--dequant-repeats", a.dequant_repeats, 10_000)?;
    for (flag, v) in [("--rtol", a.rtol), ("--atol", a.atol)] {
        if !(v.is_finite() && v > 0.0 && v < 1.0) {
            bail!("{flag} {v}: a tolerance in (0, 1) expected");
        }
    }
    let image = config.is_image();
    let run = elbo::eval::OdeRun {
        ode: OdeOptions {
            solver: Rk45 {
                rtol: a.rtol,
                atol: a.atol,
                max_evals: 100_000,
            },
            eps: 1e-5,
            probe: a.probe,
        },
        probes: a.probes,
        repeats: a.dequant_repeats,
        dequantize: image,
    };
    let n = x.dim(0)?;
    let solves = n.div_ceil(a.batch_size) * a.probes * if image { a.dequant_repeats } else { 1 };
    let bar = super::progress(solves as u64, "ODE solves");
    if !elbo::collective::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let means = elbo::eval::ode_likelihood(
        process,
        continuous,
        net,
        x,
        run,
        a.batch_size,
        a.seed,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    // 8-bit images on [-1, 1]: the dequantized density of u = (k + U) / 256 is 2^D that of x,
    // and the 256 bins add D ln 256: -log P(k) <= -log p(x) + D ln 128.
    let offset = if image {
        dims as f64 * 128f64.ln()
    } else {
        0.0
    };
    let totals: Vec<f64> = means.totals.iter().map(|v| v + offset).collect();
    let nll = elbo::eval::mean(&totals);
    let se = elbo::eval::standard_error(&totals);
    check_finite_result(&a.checkpoint, &[("the ODE likelihood", nll)])?;
    Ok(serde_json::json!({
        "nll_nats": nll,
        "nll_stderr": se,
        "bpd": elbo::eval::bits_per_dim(nll, dims),
        "bpd_stderr": elbo::eval::bits_per_dim(se, dims),
        "probe": a.probe,
        "probes": a.probes,
        "dequant_repeats": if image { a.dequant_repeats } else { 0 },
        "rtol": a.rtol,
        "atol": a.atol,
        "eps": 1e-5,
        "nfe_per_solve": means.evals_per_solve,
        "network_calls": means.evals_per_solve * means.solves as f64,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

pub fn eval_diffusion(a: EvalDiffusionArgs, device: &Device) -> Result<()> {
    use elbo::limits::{COUNT_CEILING, count};
    count("--batch-size", a.batch_size, 1_000_000)?;
    count("--limit", a.limit, COUNT_CEILING)?;
    if let Some(dir) = &a.report {
        check_report_run(dir, "diffusion")?;
    }
    if let Some(k) = a.t_samples {
        count("--t-samples", k, elbo::diffusion::schedule::MAX_TIMESTEPS)?;
        if a.plot.is_some() {
            bail!("--plot draws every L_t; it needs the exact sum (leave out --t-samples)");
        }
    }
    if let Some(p) = &a.plot
        && !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        bail!(
            "--plot {}: the L_t plot is an SVG (axes, labels, units); name it FILE.svg",
            p.display()
        );
    }
    let m = load_diffusion(&a.checkpoint, &a.model_flags, device)?;
    if m.continuous.is_some() {
        return eval_continuous(&a, m, device);
    }
    if a.steps.is_some() {
        bail!("--steps T: the T-step bound of a continuous-time model; this model has its own T");
    }
    let net = elbo::engine::FrozenNet::with_engine(m.net, a.engine)?;
    m.config.net.check_training_memory(
        a.batch_size.min(a.limit),
        m.config.image_shape().map_or(0, |s| s.height * s.width),
    )?;
    let (x_all, decoder, dims) = bound_data(&a, &m.config, device)?;
    let n = x_all.dim(0)?;
    let t_max = m.process.num_timesteps();
    // Network calls per batch: T, or K + 1 (at most T) with --t-samples.
    use elbo::diffusion::process::TSampling;
    let t_sampling = a.t_sampling.unwrap_or(TSampling::Stratified);
    if a.t_sampling.is_some() && a.t_samples.is_none() {
        bail!("--t-sampling chooses how --t-samples draws its timesteps; give --t-samples K");
    }
    // Network calls per batch: T, or K + 1 with --t-samples (stratified: at most T).
    let calls = match (a.t_samples, t_sampling) {
        (None, _) => t_max,
        (Some(k), TSampling::Stratified) => (k + 1).min(t_max),
        (Some(k), TSampling::Importance) => k + 1,
    };
    let pilot = match (a.t_samples, t_sampling) {
        (Some(k), TSampling::Importance) => k.min(t_max - 1).max(1),
        _ => 0,
    };
    elbo::limits::check_work(
        &format!("--limit {n} x {calls} timesteps"),
        (n as u64).checked_mul(calls as u64),
        diffusion_net_cost(&m.config),
    )?;
    let bar = indicatif::ProgressBar::new((n.div_ceil(a.batch_size) * calls + pilot) as u64);
    if !elbo::collective::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let variance = super::model_variance(&m.process, a.variance)?;
    let opts = elbo::diffusion::process::BoundOptions {
        variance,
        decoder,
        clip_denoised: a.clip_denoised,
    };
    let want_bound = a.likelihood != Likelihood::Ode;
    let means = match (want_bound, a.t_samples) {
        (false, _) => None,
        (true, Some(k)) => Some(elbo::eval::bound_sampled(
            &m.process,
            &net,
            &x_all,
            k,
            t_sampling,
            opts,
            a.batch_size,
            a.seed,
            &|| bar.inc(1),
        )?),
        (true, None) => Some(elbo::eval::bound_terms(
            &m.process,
            &net,
            &x_all,
            opts,
            a.batch_size,
            a.seed,
            &|| bar.inc(1),
        )?),
    };
    bar.finish_and_clear();
    let bound_seconds = started.elapsed().as_secs_f64();
    let summary = means.map(|means| means.summary(dims, &format!("{decoder:?}")));
    if let Some(s) = &summary {
        check_finite_result(&a.checkpoint, &[("the bound", s.nll_bound_nats)])?;
    }
    let ode = match a.likelihood {
        Likelihood::Bound => None,
        _ => Some(ode_results(
            &a, &m.config, &m.process, &net, &x_all, dims, None,
        )?),
    };
    if !elbo::collective::is_main() {
        return Ok(()); // rank 0 reports what every rank computed
    }
    if let (Some(path), Some(s)) = (&a.plot, &summary) {
        let svg = elbo::report::lt_plot_svg(&s.lt)?;
        elbo::files::write_atomic(path, svg.as_bytes())?;
    }
    let mut results = match &summary {
        Some(s) => serde_json::to_value(s)?,
        None => serde_json::json!({ "n": n }),
    };
    results["split"] = serde_json::to_value(a.split)?;
    results["checkpoint"] = serde_json::to_value(&a.checkpoint)?;
    results["seconds"] = started.elapsed().as_secs_f64().into();
    if summary.is_some() {
        results["bound_seconds"] = bound_seconds.into();
        results["variance"] = serde_json::to_value(variance)?;
        if a.t_samples.is_some() {
            results["t_sampling"] = serde_json::to_value(t_sampling)?;
        }
        results["clip_denoised"] = a.clip_denoised.into();
    }
    if let Some(o) = &ode {
        results["ode"] = o.clone();
    }
    if let Some(dir) = &a.report {
        save_eval_report(dir, "diffusion", &results)?;
    }
    if a.json {
        println!("{results}");
        return Ok(());
    }
    println!("checkpoint      {}", a.checkpoint.display());
    println!(
        "examples        {n} ({:?}), T = {t_max}, {:?} decoder",
        a.split, decoder
    );
    if let Some(s) = &summary {
        print_bound(s);
    }
    if let Some(o) = &ode {
        print_ode(o);
    }
    Ok(())
}

/// The ODE likelihood's line of `eval diffusion`'s text output.
fn print_ode(o: &serde_json::Value) {
    let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "ODE likelihood  {:10.3} nats per example = {:.4} bits/dim (+- {:.4}), {:.0} network calls per solve, {:.1} s",
        f("nll_nats"),
        f("bpd"),
        f("bpd_stderr"),
        f("nfe_per_solve"),
        f("seconds")
    );
}

/// `eval diffusion` of a continuous-time model: its bound (`--t-samples K` draws of t per
/// image, default 1) and with `--steps T` the T-step model's bound from the same draws.
fn eval_continuous(
    a: &EvalDiffusionArgs,
    m: elbo::diffusion::model::LoadedDiffusion,
    device: &Device,
) -> Result<()> {
    let Some(model) = m.continuous.clone() else {
        bail!("not a continuous-time model");
    };
    for (given, flag) in [
        (a.variance.is_some(), "--variance"),
        (a.plot.is_some(), "--plot"),
        (a.clip_denoised, "--clip-denoised"),
        (a.t_sampling.is_some(), "--t-sampling"),
    ] {
        if given {
            bail!(
                "{flag}: for discrete-time models; a continuous-time model's bound has no per-step variances or L_t"
            );
        }
    }
    let draws = a.t_samples.unwrap_or(1);
    elbo::limits::count("--t-samples", draws, 1 << 20)?;
    if let Some(t) = a.steps {
        elbo::limits::count("--steps", t, elbo::diffusion::schedule::MAX_TIMESTEPS)?;
    }
    let net = elbo::engine::FrozenNet::with_engine(m.net, a.engine)?;
    m.config.net.check_training_memory(
        a.batch_size.min(a.limit),
        m.config.image_shape().map_or(0, |s| s.height * s.width),
    )?;
    let (x_all, _, dims) = bound_data(a, &m.config, device)?;
    let n = x_all.dim(0)?;
    let want_bound = a.likelihood != Likelihood::Ode;
    let runs = usize::from(want_bound) * (1 + usize::from(a.steps.is_some()));
    elbo::limits::check_work(
        &format!("--limit {n} x --t-samples {draws}"),
        (n as u64).checked_mul((draws * runs) as u64),
        diffusion_net_cost(&m.config),
    )?;
    let bar = indicatif::ProgressBar::new((n.div_ceil(a.batch_size) * runs) as u64);
    if !elbo::collective::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let run = |steps| {
        elbo::eval::continuous_bound(
            &model,
            &net,
            &x_all,
            draws,
            steps,
            a.batch_size,
            a.seed,
            &|| bar.inc(1),
        )
    };
    let continuous = want_bound.then(|| run(None)).transpose()?;
    let bound_seconds = started.elapsed().as_secs_f64();
    let discrete = a
        .steps
        .filter(|_| want_bound)
        .map(|t| run(Some(t)))
        .transpose()?;
    bar.finish_and_clear();
    if let Some(c) = &continuous {
        check_finite_result(&a.checkpoint, &[("the bound", c.nll_bound_nats)])?;
    }
    let ode = match a.likelihood {
        Likelihood::Bound => None,
        _ => Some(ode_results(
            a,
            &m.config,
            &m.process,
            &net,
            &x_all,
            dims,
            Some(&model),
        )?),
    };
    if !elbo::collective::is_main() {
        return Ok(());
    }
    let (g0, g1) = model.gamma.endpoints();
    let mut results = match &continuous {
        Some(c) => serde_json::to_value(c)?,
        None => serde_json::json!({ "n": n }),
    };
    results["split"] = serde_json::to_value(a.split)?;
    results["checkpoint"] = serde_json::to_value(&a.checkpoint)?;
    results["time"] = "continuous".into();
    results["gamma"] = serde_json::to_value(model.spec.gamma)?;
    results["gamma_0"] = g0.into();
    results["gamma_1"] = g1.into();
    results["bound_seconds"] = bound_seconds.into();
    if let Some(d) = &discrete {
        results["discrete"] = serde_json::to_value(d)?;
    }
    if let Some(o) = &ode {
        results["ode"] = o.clone();
    }
    results["seconds"] = started.elapsed().as_secs_f64().into();
    if let Some(dir) = &a.report {
        save_eval_report(dir, "diffusion", &results)?;
    }
    if a.json {
        println!("{results}");
        return Ok(());
    }
    println!("checkpoint      {}", a.checkpoint.display());
    println!(
        "examples        {n} ({:?}), continuous time, {:?} gamma from {g0:.3} to {g1:.3}, {draws} t per example",
        a.split, model.spec.gamma
    );
    let line = |name: &str, s: &elbo::eval::ContinuousSummary| {
        println!(
            "{name:<15} {:10.3} nats per example = {:.4} bits/dim (+- {:.4}, over the examples)",
            s.nll_bound_nats, s.bpd, s.bpd_stderr
        );
    };
    if let Some(c) = &continuous {
        line("bound", c);
        println!(
            "  prior         {:10.3}   KL(q(z_1 | x) || N(0, I))",
            c.prior
        );
        println!(
            "  reconstruction{:10.3}   -log p(x | z_0), 256 levels",
            c.reconstruction
        );
        println!(
            "  diffusion     {:10.3}   1/2 E[gamma'(t) ||eps - eps_hat||^2]",
            c.diffusion
        );
    }
    if let (Some(d), Some(t)) = (&discrete, a.steps) {
        line(&format!("T = {t} bound"), d);
    }
    if let Some(o) = &ode {
        print_ode(o);
    }
    Ok(())
}

/// The bound's lines of `eval diffusion`'s text output.
fn print_bound(s: &elbo::eval::BoundSummary) {
    println!(
        "bound           {:10.3} nats per example = {:.4} bits/dim (+- {:.4}, over the examples)",
        s.nll_bound_nats, s.bpd, s.bpd_stderr
    );
    if let (Some(l0), Some(lt_sum)) = (s.l0, s.lt_sum) {
        println!("  L_0           {l0:10.3}   -log p(x_0 | x_1)");
        println!(
            "  sum L_t       {lt_sum:10.3}   KL(q(x_t-1 | x_t, x_0) || p(x_t-1 | x_t)), t = 2..T"
        );
    } else if let Some(k) = s.t_samples {
        println!(
            "  sum over t    {:10.3}   L_0 + sum L_t estimated from {k} sampled timesteps per example",
            s.nll_bound_nats - s.l_prior
        );
    }
    println!(
        "  L_T           {:10.5}   KL(q(x_T | x_0) || N(0, I))",
        s.l_prior
    );
}

/// The examples `eval diffusion` bounds: `--limit` images of the model's shape in [-1, 1] with
/// the discretized decoder, or toy points with the continuous one; and the values per example.
fn bound_data(
    a: &EvalDiffusionArgs,
    config: &DiffusionConfig,
    device: &Device,
) -> Result<(candle_core::Tensor, Decoder, usize)> {
    Ok(if config.is_image() {
        let data = DiffusionData::from_flags(a.dataset.as_deref(), a.data.as_deref())?;
        let DiffusionData::Images(source) = data else {
            bail!("--dataset: the checkpoint is an image model; give an image data set");
        };
        let d = source.load(a.split)?.take(a.limit);
        if config.image_shape() != Some(d.shape) {
            bail!(
                "{}: images are {}, but the checkpoint's model takes {}",
                source.describe(),
                d.shape,
                config
                    .image_shape()
                    .map_or("points".into(), |s| s.to_string())
            );
        }
        let idx: Vec<usize> = (0..d.len()).collect();
        (
            image_batch(&d, &idx, device)?,
            Decoder::Discretized,
            d.shape.dim(),
        )
    } else {
        let Some(toy) = a
            .dataset
            .as_deref()
            .and_then(|s| s.strip_prefix("toy:"))
            .and_then(elbo::data::toy::Toy::parse)
        else {
            bail!("--dataset: the checkpoint is a 2-D model; give toy:NAME");
        };
        elbo::limits::check_bytes(
            &format!("--limit {}", a.limit),
            "the toy points",
            elbo::limits::product(&[a.limit as u64, 2 * 4 * 4]),
        )?;
        let mut rng = StdRng::seed_from_u64(a.seed ^ 0x5eed);
        let pts = toy.sample(a.limit, &mut rng);
        (
            candle_core::Tensor::from_vec(pts, (a.limit, 2), device)?,
            Decoder::Continuous,
            2,
        )
    })
}
