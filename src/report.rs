//! The run report: one self-contained HTML page of a run folder (no network, no external
//! script or font; plots inline as SVG from `plotters`, pictures as base64 PNG), readable in
//! any browser and attachable to an email. Written at the end of `train` as
//! `RUN_DIR/report.html`, refreshed by `eval ... --report RUN_DIR`, and by `elbo report`.
//!
//! Sections, for what the run has: the configuration and the data; per-epoch curves (VAE:
//! -ELBO with its reconstruction and KL parts, train / validation / test, per stochastic layer
//! where there are several; diffusion: the simple loss); the evaluation (`eval.json`: NLL with
//! its standard error, the gap, active units; the diffusion bound's L_0 / sum L_t / L_T split
//! and L_t per t on log axes); sample and reconstruction grids, the last and earlier epochs';
//! and for a VAE its latent space: the KL of each dimension of z_1 as bars, the variance of
//! each dimension's posterior mean across examples (the active units), and for a 2-D latent
//! the posterior means coloured by label.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use base64::Engine as _;
use candle_core::Device;
use plotters::prelude::*;
use rand::SeedableRng;
use serde_json::Value;

use crate::data::{PixelMode, Source, Split};
use crate::distributions::Noise;
use crate::vae::Vae;

/// The evaluation results `eval --report RUN_DIR` leaves in the run folder.
pub const EVAL_FILE: &str = "eval.json";
/// The per-epoch sample grids the trainers write.
pub const PICTURES_DIR: &str = "pictures";

/// Writes the report of the run in `dir` to `out` with [`crate::files::write_atomic`], so a
/// reader never sees half a page and a link at `out` is refused.
pub fn write_report(dir: &Path, out: &Path) -> Result<()> {
    let html = build(dir)?;
    crate::files::write_atomic(out, html.as_bytes())
}

/// The most a run's JSON file (`config.json`, `eval.json`) may hold here.
const JSON_MAX: u64 = 16 << 20;

fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::files::read_regular_file(path, JSON_MAX)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))
}

/// The kind of run `dir` holds, from its `config.json`'s model: "vae", "diffusion" or
/// "unknown".
pub fn run_kind(dir: &Path) -> Result<&'static str> {
    let config = read_json(&dir.join("config.json"))?;
    let model = &config["model"];
    Ok(if model.get("latent_dims").is_some() {
        "vae"
    } else if model.get("net").is_some() {
        "diffusion"
    } else {
        "unknown"
    })
}

/// The run's `metrics.jsonl`, streamed line by line: at most [`crate::run_dir::METRICS_MAX`]
/// bytes, each line pruned to the numbers and short strings the report draws.
fn read_metrics(dir: &Path) -> Result<Vec<Value>> {
    use std::io::{BufRead, Read};
    let path = dir.join("metrics.jsonl");
    let cannot = || format!("{}: no metrics.jsonl", dir.display());
    let meta = std::fs::metadata(&path).with_context(cannot)?;
    if !meta.is_file() {
        anyhow::bail!("{}: not a regular file", path.display());
    }
    let max = crate::run_dir::METRICS_MAX;
    if meta.len() > max {
        anyhow::bail!(
            "{}: {} is more than the {} a run's metrics may hold (about 160,000 epochs); not a run elbo wrote",
            path.display(),
            crate::limits::human(meta.len()),
            crate::limits::human(max)
        );
    }
    let file = std::fs::File::open(&path).with_context(cannot)?;
    let reader = std::io::BufReader::new(file.take(max));
    let mut metrics = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line.with_context(|| format!("{}: cannot read", path.display()))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // serde counts lines within this one line: give the file's line and the column.
        let value: Value = serde_json::from_slice(&line).map_err(|e| {
            let what = e.to_string();
            anyhow!(
                "{}: line {} is not JSON: {} (column {})",
                path.display(),
                i + 1,
                crate::files::excerpt(what.split(" at line ").next().unwrap_or(""), 120),
                e.column()
            )
        })?;
        metrics.push(prune(value, 0));
    }
    Ok(metrics)
}

/// Keeps what a metrics line's curves need: numbers, booleans, short strings, and objects and
/// arrays of them, three levels deep, 64 entries each.
fn prune(value: Value, depth: usize) -> Value {
    match value {
        Value::String(s) if s.len() > 64 => Value::Null,
        Value::Array(a) if depth < 3 => Value::Array(
            a.into_iter()
                .take(64)
                .map(|v| prune(v, depth + 1))
                .collect(),
        ),
        Value::Object(o) if depth < 3 => Value::Object(
            o.into_iter()
                .take(64)
                .map(|(k, v)| (k, prune(v, depth + 1)))
                .collect(),
        ),
        Value::Array(_) | Value::Object(_) => Value::Null,
        other => other,
    }
}

/// The page of the run in `dir`.
pub fn build(dir: &Path) -> Result<String> {
    let config = read_json(&dir.join("config.json"))
        .with_context(|| format!("{}: not a run folder (no config.json)", dir.display()))?;
    let metrics = read_metrics(dir)?;
    let is_vae = metrics
        .first()
        .is_some_and(|m| m.get("train").is_some_and(Value::is_object));
    let eval = read_json(&dir.join(EVAL_FILE)).ok();

    let mut page = String::new();
    let kind = if is_vae { "VAE" } else { "diffusion model" };
    let title = format!("elbo run report: {kind}, {}", dir.display());
    write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    )?;
    page.push_str(&config_section(&config, &metrics)?);
    page.push_str(&if is_vae {
        vae_curves(&metrics)?
    } else {
        diffusion_curves(&metrics)?
    });
    page.push_str(&eval_section(eval.as_ref(), is_vae, dir)?);
    page.push_str(&pictures_section(dir, &config)?);
    if is_vae {
        page.push_str(&latent_section(dir, &config));
    }
    page.push_str("</body></html>\n");
    Ok(page)
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;\
margin:2em auto;padding:0 1em;color:#222}h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;\
padding-bottom:.2em;margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px \
solid #ddd;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}th{background:#f4f4f4}\
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}\
img{image-rendering:pixelated}pre{background:#f8f8f8;padding:.6em;overflow-x:auto;font-size:.8em}\
.note{color:#777}svg{max-width:100%;height:auto}";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn config_section(config: &Value, metrics: &[Value]) -> Result<String> {
    let mut s = String::from("<section id=\"config\"><h2>Configuration and data</h2>\n<table>");
    let train = &config["train"];
    let model = &config["model"];
    let row = |s: &mut String, k: &str, v: String| {
        let _ = write!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    if let Some(data) = config.get("data") {
        row(
            &mut s,
            "data",
            data["source"].as_str().unwrap_or("?").to_string(),
        );
        for key in ["shape", "train", "valid", "test"] {
            if let Some(v) = data.get(key).filter(|v| !v.is_null()) {
                row(&mut s, key, v.to_string().trim_matches('"').to_string());
            }
        }
    }
    row(&mut s, "epochs run", metrics.len().to_string());
    for key in [
        "epochs",
        "batch_size",
        "lr",
        "lr_schedule",
        "objective",
        "mc_samples",
        "pixels",
    ] {
        if let Some(v) = train.get(key).filter(|v| !v.is_null()) {
            row(&mut s, key, v.to_string().trim_matches('"').to_string());
        }
    }
    let seconds: f64 = metrics.iter().filter_map(|m| m["seconds"].as_f64()).sum();
    row(&mut s, "training time", format!("{seconds:.1} s"));
    s.push_str("</table>\n<details><summary>full configuration (config.json)</summary><pre>");
    s.push_str(&esc(&serde_json::to_string_pretty(&serde_json::json!({
        "model": model,
        "train": train
    }))?));
    s.push_str("</pre></details></section>\n");
    Ok(s)
}

/// Points `(epoch, value)` of `path` (e.g. `["test", "neg_elbo"]`) over the epochs that have it.
fn series(metrics: &[Value], path: &[&str]) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|m| {
            let v = path.iter().try_fold(m, |v, k| v.get(*k))?.as_f64()?;
            Some((m["epoch"].as_f64()?, v))
        })
        .collect()
}

fn vae_curves(metrics: &[Value]) -> Result<String> {
    let mut s = String::from("<section id=\"curves\"><h2>Training curves</h2>\n");
    let splits = ["train", "valid", "test"];
    let mut bound = Vec::new();
    for split in splits {
        let pts = series(metrics, &[split, "neg_elbo"]);
        if !pts.is_empty() {
            bound.push((format!("{split} -ELBO"), pts));
        }
    }
    s.push_str(&line_chart(
        "-ELBO per epoch",
        "epoch",
        "nats per example",
        &bound,
    )?);
    let mut parts = Vec::new();
    for split in ["train", "test"] {
        for (key, what) in [("reconstruction", "reconstruction"), ("kl", "KL")] {
            let pts = series(metrics, &[split, key]);
            if !pts.is_empty() {
                parts.push((format!("{split} {what}"), pts));
            }
        }
    }
    s.push_str(&line_chart(
        "the bound's two parts: -E_q[log p(x|z)] and KL(q || p)",
        "epoch",
        "nats per example",
        &parts,
    )?);
    let layers = metrics
        .last()
        .and_then(|m| m["train"]["kl_layers"].as_array())
        .map_or(0, Vec::len);
    if layers > 1 {
        let per_layer: Vec<(String, Vec<(f64, f64)>)> = (0..layers)
            .map(|l| {
                let pts = metrics
                    .iter()
                    .filter_map(|m| {
                        Some((m["epoch"].as_f64()?, m["train"]["kl_layers"][l].as_f64()?))
                    })
                    .collect();
                (format!("train KL of z_{}", l + 1), pts)
            })
            .collect();
        s.push_str(&line_chart(
            "KL per stochastic layer",
            "epoch",
            "nats per example",
            &per_layer,
        )?);
    }
    s.push_str("</section>\n");
    Ok(s)
}

fn diffusion_curves(metrics: &[Value]) -> Result<String> {
    let mut s = String::from("<section id=\"curves\"><h2>Training curves</h2>\n");
    let mut lines = Vec::new();
    for (key, name) in [
        ("train_loss", "train simple loss"),
        ("valid_loss", "validation simple loss (EMA)"),
        ("test_loss", "test simple loss (EMA)"),
    ] {
        let pts = series(metrics, &[key]);
        if !pts.is_empty() {
            lines.push((name.to_string(), pts));
        }
    }
    s.push_str(&line_chart(
        "the simplified loss ||eps - eps_theta(x_t, t)||^2 per epoch",
        "epoch",
        "mean squared error per value",
        &lines,
    )?);
    s.push_str("</section>\n");
    Ok(s)
}

fn eval_section(eval: Option<&Value>, is_vae: bool, dir: &Path) -> Result<String> {
    let mut s = String::from("<section id=\"evaluation\"><h2>Evaluation</h2>\n");
    let Some(e) = eval else {
        let cmd = if is_vae { "vae" } else { "diffusion" };
        writeln!(
            s,
            "<p class=\"note\">No evaluation yet: <code>elbo eval {cmd} --checkpoint {}/model.safetensors --report {}</code> adds it here.</p></section>",
            esc(&dir.display().to_string()),
            esc(&dir.display().to_string())
        )?;
        return Ok(s);
    };
    let num = |k: &str| e.get(k).and_then(Value::as_f64);
    s.push_str("<table>");
    let mut row = |k: &str, v: String, what: &str| {
        let _ = write!(
            s,
            "<tr><th>{}</th><td>{}</td><td class=\"note\">{}</td></tr>",
            esc(k),
            esc(&v),
            esc(what)
        );
    };
    if is_vae {
        if let (Some(nll), Some(se)) = (num("nll"), num("nll_stderr")) {
            let k = num("iw_samples").unwrap_or(0.0);
            row(
                "NLL",
                format!("{nll:.3} +- {se:.3} nats"),
                &format!("-log p(x), importance sampling with K = {k}"),
            );
        }
        if let Some(b) = num("nll_bits_per_dim") {
            row("NLL", format!("{b:.4} bits/dim"), "NLL / (D ln 2)");
        }
        if let Some(v) = num("neg_elbo") {
            row("-ELBO", format!("{v:.3} nats"), "reconstruction + KL");
        }
        if let Some(v) = num("reconstruction") {
            row("reconstruction", format!("{v:.3} nats"), "-E_q[log p(x|z)]");
        }
        if let Some(layers) = e["kl_layers"].as_array() {
            for (l, v) in layers.iter().enumerate() {
                if let Some(v) = v.as_f64() {
                    row(
                        &format!("KL of z_{}", l + 1),
                        format!("{v:.3} nats"),
                        "KL(q || p) of the layer",
                    );
                }
            }
        }
        if let Some(v) = num("gap") {
            row(
                "gap",
                format!("{v:.3} nats"),
                "-ELBO - NLL = KL(q(z|x) || p(z|x))",
            );
        }
        if let Some(a) = e["active_units"].as_array() {
            let units: Vec<String> = a.iter().map(|v| v.to_string()).collect();
            row(
                "active units",
                units.join(", "),
                "per layer: Cov_x(E_q[u|x]) > 0.01",
            );
        }
        if let Some(n) = num("n") {
            row(
                "examples",
                format!("{n}"),
                e["split"].as_str().unwrap_or(""),
            );
        }
        s.push_str("</table>\n");
    } else {
        if let Some(v) = num("bpd") {
            row(
                "bound",
                format!("{v:.4} bits/dim"),
                "the variational bound on -log p(x_0)",
            );
        }
        let continuous = e["time"].as_str() == Some("continuous");
        if let Some(v) = num("nll_bound_nats") {
            let what = match continuous {
                true => "prior + reconstruction + diffusion (continuous time)",
                false => "L_0 + sum L_t + L_T",
            };
            row("bound", format!("{v:.3} nats"), what);
        }
        for (k, name, what) in [
            ("prior", "prior", "KL(q(z_1|x) || N(0, I))"),
            (
                "reconstruction",
                "reconstruction",
                "-log p(x|z_0), 256 levels",
            ),
            (
                "diffusion",
                "diffusion",
                "1/2 E[gamma'(t) ||eps - eps_hat||^2], t ~ U(0, 1)",
            ),
        ] {
            if let Some(v) = num(k).filter(|_| continuous) {
                row(name, format!("{v:.4} nats"), what);
            }
        }
        let discrete = &e["discrete"];
        if let (Some(bpd), Some(steps)) = (
            discrete.get("bpd").and_then(Value::as_f64),
            discrete.get("steps").and_then(Value::as_u64),
        ) {
            row(
                &format!("T = {steps} bound"),
                format!("{bpd:.4} bits/dim"),
                "the same model with T discrete steps (never below the continuous bound in expectation)",
            );
        }
        for (k, name, what) in [
            ("l0", "L_0", "-log p(x_0|x_1)"),
            (
                "lt_sum",
                "sum of L_t",
                "KL(q(x_t-1|x_t, x_0) || p(x_t-1|x_t)), t = 2..T",
            ),
            ("lT", "L_T", "KL(q(x_T|x_0) || N(0, I))"),
        ] {
            if let Some(v) = num(k) {
                row(name, format!("{v:.4} nats"), what);
            }
        }
        let ode = &e["ode"];
        let onum = |k: &str| ode.get(k).and_then(Value::as_f64);
        if let (Some(bpd), Some(se)) = (onum("bpd"), onum("bpd_stderr")) {
            row(
                "ODE likelihood",
                format!("{bpd:.4} +- {se:.4} bits/dim"),
                "-log p(x) of the probability-flow ODE (exact up to the solver and the divergence estimate)",
            );
        }
        if let (Some(nats), Some(nfe)) = (onum("nll_nats"), onum("nfe_per_solve")) {
            row(
                "ODE likelihood",
                format!("{nats:.3} nats"),
                &format!("{nfe:.0} network calls per solve"),
            );
        }
        s.push_str("</table>\n");
        if let Some(lt) = e["lt"].as_array() {
            let lt: Vec<f64> = lt.iter().filter_map(Value::as_f64).collect();
            s.push_str(&lt_plot_svg(&lt)?);
        }
    }
    s.push_str("</section>\n");
    Ok(s)
}

/// L_t against t on log axes, as an SVG with axes, labels and units; `lt[i]` is L_t for
/// t = i + 2 (t = 2..T, as `eval diffusion` reports them). Non-positive terms are left out.
pub fn lt_plot_svg(lt: &[f64]) -> Result<String> {
    let pts: Vec<(f64, f64)> = lt
        .iter()
        .enumerate()
        .map(|(i, &v)| ((i + 2) as f64, v))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    if pts.is_empty() {
        return Ok(String::new());
    }
    log_log_chart(
        "L_t per timestep (log axes)",
        "timestep t",
        "L_t, nats per example",
        &pts,
    )
}

fn png_data_uri(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

fn figure(s: &mut String, path: &Path, caption: &str, width: Option<u32>) {
    if let Some(uri) = png_data_uri(path) {
        let w = width.map_or(String::new(), |w| format!(" width=\"{w}\""));
        let _ = write!(
            s,
            "<figure><img src=\"{uri}\" alt=\"{}\"{w}><figcaption>{}</figcaption></figure>",
            esc(caption),
            esc(caption)
        );
    }
}

fn pictures_section(dir: &Path, config: &Value) -> Result<String> {
    let mut s = String::from("<section id=\"pictures\"><h2>Samples and reconstructions</h2>\n");
    let toy = config["data"]["shape"] == "2-D points";
    let caption = if toy {
        "test data (left) and samples (right), the end of training"
    } else {
        "samples (the end of training)"
    };
    figure(
        &mut s,
        &dir.join("samples.png"),
        caption,
        Some(if toy { 640 } else { 360 }),
    );
    figure(
        &mut s,
        &dir.join("reconstructions.png"),
        "test images (odd rows) and their reconstructions (even rows)",
        Some(360),
    );
    figure(
        &mut s,
        &dir.join("manifold.png"),
        "decoded means over a grid of z in [-2.5, 2.5]^2",
        Some(360),
    );
    let mut epochs: Vec<PathBuf> = std::fs::read_dir(dir.join(PICTURES_DIR))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect()
        })
        .unwrap_or_default();
    epochs.sort();
    if !epochs.is_empty() {
        s.push_str("<h3>Samples during training (the same z each epoch)</h3>\n");
        // At most six, evenly spaced, the last always among them.
        let n = epochs.len();
        let picks: Vec<usize> = if n <= 6 {
            (0..n).collect()
        } else {
            (0..6).map(|i| i * (n - 1) / 5).collect()
        };
        for i in picks {
            let p = &epochs[i];
            let name = p.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            let epoch = name.trim_start_matches("samples-").trim_start_matches('0');
            figure(&mut s, p, &format!("epoch {epoch}"), Some(240));
        }
    }
    s.push_str("</section>\n");
    Ok(s)
}

/// The VAE's latent space on up to 1,000 test examples: the KL of each dimension of z_1
/// (closed form, one stochastic layer), the variance across examples of each dimension's
/// posterior mean (every layer), and for a 2-D latent the posterior means coloured by label.
fn latent_section(dir: &Path, config: &Value) -> String {
    let mut s = String::from("<section id=\"latent\"><h2>Latent space</h2>\n");
    match latent_plots(dir, config) {
        Ok(plots) => s.push_str(&plots),
        Err(e) => {
            let _ = write!(
                s,
                "<p class=\"note\">Not drawn: {}</p>",
                esc(&format!("{e:#}"))
            );
        }
    }
    s.push_str("</section>\n");
    s
}

fn latent_plots(dir: &Path, config: &Value) -> Result<String> {
    let vae = Vae::load(&dir.join("model.safetensors"), &Device::Cpu)?.frozen()?;
    let source: Source = serde_json::from_value(config["train"]["source"].clone())
        .context("config.json: train.source")?;
    let pixels: PixelMode =
        serde_json::from_value(config["train"]["pixels"].clone()).unwrap_or(PixelMode::Grey);
    let test = source.load(Split::Test)?.take(1000);
    let idx: Vec<usize> = (0..test.len()).collect();
    let x = test.batch(
        &idx,
        pixels,
        &mut rand::rngs::StdRng::seed_from_u64(0),
        &Device::Cpu,
    )?;
    let mut s = String::new();
    let q = vae.encode(&x)?;
    if vae.config.layers() == 1 {
        // KL_i = mean_x -1/2 (1 + lv_i - mu_i^2 - e^lv_i).
        let per_dim = q
            .log_var
            .affine(1.0, 1.0)?
            .sub(&q.mean.sqr()?)?
            .sub(&q.log_var.exp()?)?
            .mean(0)?
            .affine(-0.5, 0.0)?
            .to_vec1::<f32>()?;
        let v: Vec<f64> = per_dim.iter().map(|&v| v as f64).collect();
        s.push_str(&bar_chart(
            "KL(q(z_i|x) || N(0, 1)) per dimension of z (test mean)",
            "dimension i of z",
            "nats",
            &v,
            None,
        )?);
    }
    let means = crate::vae::objective::posterior_means(&vae, &x, 20, &mut Noise::new(0))?;
    for (l, m) in means.iter().enumerate() {
        let mut activity = crate::eval::Activity::default();
        activity.add(&m.flatten_all()?.to_vec1::<f32>()?, m.dim(1)?);
        let v = activity.variances();
        let active = activity.active(1e-2);
        s.push_str(&bar_chart(
            &format!(
                "Cov_x(E_q[u|x]) of z_{} ({active} of {} active above 0.01)",
                l + 1,
                v.len()
            ),
            &format!("dimension u of z_{}", l + 1),
            "variance (log scale)",
            &v,
            Some(1e-2),
        )?);
    }
    if vae.config.latent_dims == [2]
        && let Some(labels) = &test.labels
    {
        let mu = q.mean.to_vec2::<f32>()?;
        let pts: Vec<(f64, f64, usize)> = mu
            .iter()
            .zip(labels)
            .map(|(m, &l)| (m[0] as f64, m[1] as f64, l as usize))
            .collect();
        s.push_str(&scatter_chart(
            "posterior means of the test set, coloured by label",
            &pts,
        )?);
    }
    Ok(s)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// Range of `values` padded by 5% (a flat series gets +-1).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    if hi - lo < 1e-12 {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo - pad, hi + pad)
    }
}

fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<String> {
    let mut svg = String::new();
    if lines.iter().all(|(_, p)| p.is_empty()) {
        return Ok(svg);
    }
    {
        let root = SVGBackend::with_string(&mut svg, (760, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (x0, x1) = padded(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
        let (y0, y1) = padded(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(plot_err)?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            if pts.len() == 1 {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn log_log_chart(title: &str, x_label: &str, y_label: &str, pts: &[(f64, f64)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let x1 = pts.iter().map(|p| p.0).fold(2.0, f64::max);
        let (y0, y1) = pts
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (1f64..x1 * 1.1).log_scale(),
                (y0 * 0.8..y1 * 1.25).log_scale(),
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                Palette99::pick(0).stroke_width(2),
            ))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Bars of `values` (one per index), on a log scale when `threshold` is given (drawn as a
/// line: the active-unit cut).
fn bar_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    values: &[f64],
    threshold: Option<f64>,
) -> Result<String> {
    let mut svg = String::new();
    let n = values.len().max(1) as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let top = values.iter().copied().fold(1e-12, f64::max);
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70);
        let bar = |i: usize, v: f64| -> Rectangle<(f64, f64)> {
            let color = Palette99::pick(0).filled();
            Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.9, v)], color)
        };
        match threshold {
            None => {
                let mut chart = builder
                    .build_cartesian_2d(0f64..n as f64, 0f64..top * 1.1)
                    .map_err(plot_err)?;
                chart
                    .configure_mesh()
                    .x_labels((n as usize + 1).min(21))
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()
                    .map_err(plot_err)?;
                chart
                    .draw_series(values.iter().enumerate().map(|(i, &v)| bar(i, v)))
                    .map_err(plot_err)?;
            }
            Some(cut) => {
                let low = values
                    .iter()
                    .copied()
                    .filter(|v| *v > 0.0)
                    .fold(cut, f64::min)
                    .max(1e-8)
                    * 0.5;
                let mut chart = builder
                    .build_cartesian_2d(0f64..n as f64, (low..top.max(cut) * 2.0).log_scale())
                    .map_err(plot_err)?;
                chart
                    .configure_mesh()
                    .x_labels((n as usize + 1).min(21))
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()
                    .map_err(plot_err)?;
                chart
                    .draw_series(values.iter().enumerate().map(|(i, &v)| {
                        let color = if v > cut {
                            Palette99::pick(0)
                        } else {
                            Palette99::pick(1)
                        };
                        Rectangle::new(
                            [(i as f64 + 0.1, low), (i as f64 + 0.9, v.max(low))],
                            color.filled(),
                        )
                    }))
                    .map_err(plot_err)?;
                chart
                    .draw_series(LineSeries::new(
                        vec![(0.0, cut), (n as f64, cut)],
                        BLACK.stroke_width(1),
                    ))
                    .map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn scatter_chart(title: &str, pts: &[(f64, f64, usize)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (x0, x1) = padded(pts.iter().map(|p| p.0));
        let (y0, y1) = padded(pts.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("E_q[z_1]")
            .y_desc("E_q[z_2]")
            .draw()
            .map_err(plot_err)?;
        let labels: std::collections::BTreeSet<usize> = pts.iter().map(|p| p.2).collect();
        for label in labels {
            let color = Palette99::pick(label).to_rgba();
            chart
                .draw_series(
                    pts.iter()
                        .filter(|p| p.2 == label)
                        .map(|p| Circle::new((p.0, p.1), 2, color.filled())),
                )
                .map_err(plot_err)?
                .label(format!("label {label}"))
                .legend(move |(x, y)| Circle::new((x + 8, y), 3, color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}
