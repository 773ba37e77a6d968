//! The exact log-likelihood of a diffusion model through its probability-flow ODE (Song et al.
//! 2021, "Score-based generative modeling through SDEs", sec. 4.3 and app. D.2): the
//! continuous normalising flow that moves x_eps to x_1 with the marginals of the diffusion,
//!
//! ```text
//! dx/dt = f(x, t) = -1/2 beta(t) [x + score(x, t)],   score(x, t) = -eps_hat(x, t) / sigma(t)
//! log p_eps(x_eps) = log N(x_1; 0, I) + int_eps^1 div_x f(x_t, t) dt
//! ```
//!
//! with eps_hat the network's noise prediction (from eps, x_0 or v), integrated with the
//! augmented state [x, delta log p] by an adaptive Dormand-Prince RK45 ([`Rk45`]), and the
//! divergence `div f = -1/2 beta(t) [D - v^T (d eps_hat / dx) v / sigma(t)]` by Hutchinson's
//! estimator (E[v^T J v] = tr J for probes with E[v v^T] = I, one probe fixed along each
//! trajectory) or exactly (one vector-Jacobian product per dimension, for a few dimensions).
//!
//! The discrete schedule made continuous ([`ContinuousSchedule`]): t in [0, 1] is the step
//! index s = t (T - 1) (score_sde's labels for DDPM-trained models), log abar(t) interpolates
//! the discrete log abar_s linearly between steps, so beta(t) = -d log abar / dt is constant on
//! each step, sigma(t) = sqrt(1 - abar(t)), and the network is given s (or the model's own time
//! for that step, interpolated likewise).

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

use super::process::{Denoiser, GaussianDiffusion, Prediction};
use crate::distributions::LOG_2PI;

/// The adaptive Dormand-Prince 5(4) solver (Dormand & Prince 1980), as scipy's `RK45` (which
/// score_sde uses): the fifth-order solution advances, the embedded fourth-order one estimates
/// the error, first-same-as-last, a step is accepted when the RMS of `err_i / (atol + rtol
/// max(|y_i|, |y_new_i|))` is at most 1, and the step size follows `0.9 err^{-1/5}`, within
/// [0.2, 10] times the last.
#[derive(Debug, Clone, Copy)]
pub struct Rk45 {
    pub rtol: f64,
    pub atol: f64,
    /// The most function evaluations before giving up.
    pub max_evals: usize,
}

/// The right-hand side `dy/dt = f(t, y)` of an ODE.
pub type Derivative<'a> = dyn FnMut(f64, &[f64]) -> Result<Vec<f64>> + 'a;

/// What a solve did.
#[derive(Debug, Clone)]
pub struct Solution {
    pub y: Vec<f64>,
    /// Function evaluations.
    pub evals: usize,
    pub steps: usize,
    pub rejected: usize,
}

const C: [f64; 6] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0];
const A: [[f64; 5]; 6] = [
    [0.0; 5],
    [1.0 / 5.0, 0.0, 0.0, 0.0, 0.0],
    [3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0],
    [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0],
    [
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
        0.0,
    ],
    [
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
];
/// Fifth-order weights (the seventh stage's, FSAL).
const B: [f64; 6] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
];
/// Fifth minus fourth order, per stage (the seventh stage's last).
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

impl Rk45 {
    /// Integrates `dy/dt = f(t, y)` from `t0` to `t1` (either direction).
    pub fn solve(
        &self,
        f: &mut Derivative<'_>,
        t0: f64,
        t1: f64,
        y0: Vec<f64>,
    ) -> Result<Solution> {
        if !(self.rtol > 0.0 && self.atol > 0.0) {
            bail!("the ODE tolerances must be positive (--rtol, --atol)");
        }
        let n = y0.len();
        let dir = if t1 >= t0 { 1.0 } else { -1.0 };
        let mut evals = 0usize;
        let mut eval = |t: f64, y: &[f64], evals: &mut usize| -> Result<Vec<f64>> {
            *evals += 1;
            let d = f(t, y)?;
            if d.len() != n {
                bail!(
                    "the ODE's derivative has {} values for a state of {n}",
                    d.len()
                );
            }
            if d.iter().any(|v| !v.is_finite()) {
                bail!("the ODE's derivative is not finite at t = {t}");
            }
            Ok(d)
        };
        let scale = |y: &[f64], z: &[f64]| -> Vec<f64> {
            y.iter()
                .zip(z)
                .map(|(a, b)| self.atol + self.rtol * a.abs().max(b.abs()))
                .collect()
        };
        let rms = |v: &[f64], s: &[f64]| -> f64 {
            (v.iter().zip(s).map(|(a, b)| (a / b).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt()
        };
        let mut t = t0;
        let mut y = y0;
        let mut k0 = eval(t, &y, &mut evals)?;
        // The initial step (Hairer, Norsett & Wanner, II.4), as scipy's `select_initial_step`.
        let mut h = {
            let s = scale(&y, &y);
            let (d0, d1) = (rms(&y, &s), rms(&k0, &s));
            let h0 = if d0 < 1e-5 || d1 < 1e-5 {
                1e-6
            } else {
                0.01 * d0 / d1
            };
            let y1: Vec<f64> = y.iter().zip(&k0).map(|(a, k)| a + dir * h0 * k).collect();
            let k1 = eval(t + dir * h0, &y1, &mut evals)?;
            let diff: Vec<f64> = k1.iter().zip(&k0).map(|(a, b)| a - b).collect();
            let d2 = rms(&diff, &s) / h0;
            let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
                (h0 * 1e-3).max(1e-6)
            } else {
                (0.01 / d1.max(d2)).powf(1.0 / 5.0)
            };
            (100.0 * h0).min(h1)
        };
        let span = (t1 - t0).abs();
        let (mut steps, mut rejected) = (0usize, 0usize);
        let mut k = vec![vec![0.0; n]; 7];
        while dir * (t1 - t) > 1e-12 * span.max(1e-300) {
            if evals > self.max_evals {
                bail!(
                    "the ODE solver took more than {} function evaluations (rtol {}, atol {})",
                    self.max_evals,
                    self.rtol,
                    self.atol
                );
            }
            let min_h = 10.0 * f64::EPSILON * t.abs().max(1e-300);
            h = h.min((t1 - t).abs()).max(min_h);
            k[0].clone_from(&k0);
            for s in 1..6 {
                let ys: Vec<f64> = (0..n)
                    .map(|i| y[i] + dir * h * (0..s).map(|j| A[s][j] * k[j][i]).sum::<f64>())
                    .collect();
                k[s] = eval(t + dir * C[s] * h, &ys, &mut evals)?;
            }
            let y_new: Vec<f64> = (0..n)
                .map(|i| y[i] + dir * h * (0..6).map(|j| B[j] * k[j][i]).sum::<f64>())
                .collect();
            let t_new = t + dir * h;
            k[6] = eval(t_new, &y_new, &mut evals)?;
            let err: Vec<f64> = (0..n)
                .map(|i| dir * h * (0..7).map(|j| E[j] * k[j][i]).sum::<f64>())
                .collect();
            let e = rms(&err, &scale(&y, &y_new));
            if e <= 1.0 {
                t = t_new;
                y = y_new;
                k0 = k[6].clone();
                steps += 1;
                let factor = if e == 0.0 {
                    10.0
                } else {
                    (0.9 * e.powf(-0.2)).clamp(0.2, 10.0)
                };
                h *= factor;
            } else {
                rejected += 1;
                h *= (0.9 * e.powf(-0.2)).clamp(0.2, 1.0);
            }
        }
        Ok(Solution {
            y,
            evals,
            steps,
            rejected,
        })
    }
}

/// The schedule on t in [0, 1]: a process's discrete one made continuous (see the module
/// doc), or a continuous-time model's own (`log abar(t) = log sigmoid(-gamma(t))`).
#[derive(Debug, Clone)]
pub enum ContinuousSchedule {
    Steps {
        /// log abar_s, s = 0..T-1.
        log_abar: Vec<f64>,
        /// What the network is given at step s (the step itself, or the model's own time).
        model_times: Vec<f64>,
    },
    Gamma(crate::diffusion::vdm::ContinuousModel),
}

impl ContinuousSchedule {
    pub fn new(process: &GaussianDiffusion) -> Self {
        let s = &process.schedule;
        let t = s.len();
        Self::Steps {
            log_abar: s.alphas_cumprod.iter().map(|a| a.ln()).collect(),
            model_times: match &process.model_times {
                Some(m) => m.clone(),
                None => (0..t).map(|i| i as f64).collect(),
            },
        }
    }

    /// The step index `t (T - 1)`, its segment and the fraction into it.
    fn locate(log_abar: &[f64], t: f64) -> (usize, f64) {
        let last = log_abar.len() - 1;
        let s = t.clamp(0.0, 1.0) * last as f64;
        let i = (s.floor() as usize).min(last.saturating_sub(1));
        (i, s - i as f64)
    }

    /// log abar(t).
    pub fn log_abar(&self, t: f64) -> f64 {
        match self {
            Self::Steps { log_abar, .. } => {
                let (i, f) = Self::locate(log_abar, t);
                let next = log_abar[(i + 1).min(log_abar.len() - 1)];
                log_abar[i] + f * (next - log_abar[i])
            }
            // log sigmoid(-gamma) = -log(1 + e^gamma)
            Self::Gamma(m) => -m.gamma.value(t).exp().ln_1p(),
        }
    }

    /// beta(t) = -d log abar / dt (constant on each step; sigmoid(gamma) gamma'(t) in
    /// continuous time).
    pub fn beta(&self, t: f64) -> f64 {
        match self {
            Self::Steps { log_abar, .. } => {
                let (i, _) = Self::locate(log_abar, t);
                let last = (log_abar.len() - 1) as f64;
                let next = log_abar[(i + 1).min(log_abar.len() - 1)];
                (log_abar[i] - next) * last
            }
            Self::Gamma(m) => {
                let (g, slope) = m.gamma.value_and_slope(t);
                slope / (1.0 + (-g).exp())
            }
        }
    }

    /// The network's time input at t.
    pub fn model_time(&self, t: f64) -> f64 {
        match self {
            Self::Steps {
                log_abar,
                model_times,
            } => {
                let (i, f) = Self::locate(log_abar, t);
                let next = model_times[(i + 1).min(model_times.len() - 1)];
                model_times[i] + f * (next - model_times[i])
            }
            Self::Gamma(m) => m.spec.model_time(m.gamma.value(t)),
        }
    }
}

/// How the divergence is estimated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// Hutchinson's estimator with +-1 entries.
    Rademacher,
    /// Hutchinson's estimator with standard normal entries.
    Gaussian,
    /// The exact trace: one vector-Jacobian product per dimension (for a few dimensions).
    Exact,
}

/// The options of [`log_likelihood`].
#[derive(Debug, Clone, Copy)]
pub struct OdeOptions {
    pub solver: Rk45,
    /// The start of the integration (score_sde: 1e-5).
    pub eps: f64,
    pub probe: Probe,
}

/// log p_eps(x) of each example of `x` `[B, ...]` (the data at t = eps, in the model's scale),
/// in nats, with the function evaluations the solve took. `noise` draws the probe, fixed
/// along the trajectory.
pub fn log_likelihood(
    process: &GaussianDiffusion,
    model: &dyn Denoiser,
    x: &Tensor,
    opts: OdeOptions,
    noise: &mut crate::distributions::Noise,
) -> Result<(Vec<f64>, usize)> {
    let sched = ContinuousSchedule::new(process);
    log_likelihood_on(process, &sched, model, x, opts, noise)
}

/// [`log_likelihood`] on the schedule `sched` (a continuous-time model's own); `process`
/// gives what the network predicts.
pub fn log_likelihood_on(
    process: &GaussianDiffusion,
    sched: &ContinuousSchedule,
    model: &dyn Denoiser,
    x: &Tensor,
    opts: OdeOptions,
    noise: &mut crate::distributions::Noise,
) -> Result<(Vec<f64>, usize)> {
    let dev = x.device().clone();
    let shape = x.shape().clone();
    let b = x.dim(0)?;
    let d = x.elem_count() / b.max(1);
    let probes: Vec<Tensor> = match opts.probe {
        Probe::Rademacher => {
            let g = noise.randn(shape.clone(), &dev)?;
            vec![g.ge(0.0)?.to_dtype(DType::F32)?.affine(2.0, -1.0)?]
        }
        Probe::Gaussian => vec![noise.randn(shape.clone(), &dev)?],
        Probe::Exact => {
            if d > 64 {
                bail!(
                    "the exact divergence takes one backward pass per dimension; {d} dimensions are too many (use Hutchinson's probes)"
                );
            }
            (0..d)
                .map(|i| {
                    let mut e = vec![0f32; b * d];
                    for row in 0..b {
                        e[row * d + i] = 1.0;
                    }
                    Tensor::from_vec(e, shape.clone(), &dev)
                })
                .collect::<candle_core::Result<_>>()?
        }
    };
    let prediction = process.prediction;
    let cotangents = probes
        .iter()
        .map(|p| process.output_cotangent(p))
        .collect::<Result<Vec<_>>>()?;
    // sum_i p_i^2 of each probe and example: the divergence's term in x.
    let norms: Vec<Vec<f64>> = probes
        .iter()
        .map(|p| row_dots(p, p))
        .collect::<Result<_>>()?;
    let mut f = |t: f64, y: &[f64]| -> Result<Vec<f64>> {
        let xs: Vec<f32> = y[..b * d].iter().map(|&v| v as f32).collect();
        let xt = Tensor::from_vec(xs, shape.clone(), &dev)?;
        let abar = sched.log_abar(t).exp();
        let sigma = (1.0 - abar).max(1e-20).sqrt();
        let beta = sched.beta(t);
        let s = Tensor::full(sched.model_time(t) as f32, b, &dev)?;
        let (out, vjps) = model.vjp(&xt, &s, &cotangents)?;
        let (out, _) = process.split_output(&out)?;
        // eps_hat = a out + c x: x_0 = (x - sigma eps) / sqrt(abar) gives eps = (x - sqrt(abar)
        // x_0) / sigma; v = sqrt(abar) eps - sigma x_0 gives eps = sqrt(abar) v + sigma x.
        let (a, c) = match prediction {
            Prediction::Eps => (1.0, 0.0),
            Prediction::X0 => (-abar.sqrt() / sigma, 1.0 / sigma),
            Prediction::V => (abar.sqrt(), sigma),
        };
        // f = -1/2 beta (x - eps_hat / sigma) = -1/2 beta (kx x - ko out), so
        // p . (df/dx)^T p = -1/2 beta (kx |p|^2 - ko p . (d out/dx)^T p). The difference is
        // taken before the scaling by beta (thousands at the cosine schedule's end), where x
        // and eps_hat / sigma nearly cancel.
        let (kx, ko) = (1.0 - c / sigma, a / sigma);
        let drift = (((&xt * kx)? - (out * ko)?)? * (-0.5 * beta))?;
        let mut div = vec![0f64; b];
        for ((p, g), pp) in probes.iter().zip(&vjps).zip(&norms) {
            for ((acc, pg), pp) in div.iter_mut().zip(row_dots(g, p)?).zip(pp) {
                *acc += -0.5 * beta * (kx * pp - ko * pg);
            }
        }
        let mut dy: Vec<f64> = drift
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        dy.extend(div);
        Ok(dy)
    };
    let mut y0: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    y0.extend(std::iter::repeat_n(0.0, b));
    let sol = opts.solver.solve(&mut f, opts.eps, 1.0, y0)?;
    let mut logp = Vec::with_capacity(b);
    for row in 0..b {
        let z = &sol.y[row * d..(row + 1) * d];
        let prior = -0.5 * (d as f64 * LOG_2PI + z.iter().map(|v| v * v).sum::<f64>());
        logp.push(prior + sol.y[b * d + row]);
    }
    Ok((logp, sol.evals))
}

/// sum_i u_bi v_bi of each row b of two tensors `[B, ...]`, in f64.
fn row_dots(u: &Tensor, v: &Tensor) -> Result<Vec<f64>> {
    let b = u.dim(0)?;
    let u = u.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let v = v.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if u.len() != v.len() {
        bail!("{} values against {}", u.len(), v.len());
    }
    let n = u.len() / b.max(1);
    Ok((0..b)
        .map(|r| (r * n..(r + 1) * n).map(|i| u[i] * v[i]).sum())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y' = A y with A = [[-1, 2], [-2, -1]]: y(t) = e^{-t} [cos 2t, -sin 2t] from y(0) = [1, 0].
    #[test]
    fn rk45_solves_a_linear_ode_within_its_tolerance() {
        let mut f = |_t: f64, y: &[f64]| Ok(vec![-y[0] + 2.0 * y[1], -2.0 * y[0] - y[1]]);
        for tol in [1e-5, 1e-8] {
            let solver = Rk45 {
                rtol: tol,
                atol: tol,
                max_evals: 100_000,
            };
            let sol = solver.solve(&mut f, 0.0, 3.0, vec![1.0, 0.0]).unwrap();
            let want = [(-3f64).exp() * 6f64.cos(), -(-3f64).exp() * 6f64.sin()];
            let err = (sol.y[0] - want[0]).abs().max((sol.y[1] - want[1]).abs());
            assert!(err < 20.0 * tol, "tol {tol}: error {err:e}");
            // 6 evaluations per step and the initial two, plus the rejected steps'.
            assert_eq!(sol.evals, 2 + 6 * (sol.steps + sol.rejected));
            assert!(sol.steps > 3, "{sol:?}");
        }
        // Backwards in time, and tighter tolerances need more evaluations.
        let loose = Rk45 {
            rtol: 1e-4,
            atol: 1e-4,
            max_evals: 100_000,
        };
        let tight = Rk45 {
            rtol: 1e-9,
            atol: 1e-9,
            max_evals: 100_000,
        };
        let a = loose.solve(&mut f, 0.0, 3.0, vec![1.0, 0.0]).unwrap();
        let b = tight.solve(&mut f, 0.0, 3.0, vec![1.0, 0.0]).unwrap();
        assert!(b.evals > 2 * a.evals, "{} vs {}", b.evals, a.evals);
        let back = tight.solve(&mut f, 3.0, 0.0, b.y.clone()).unwrap();
        assert!(
            (back.y[0] - 1.0).abs() < 1e-6 && back.y[1].abs() < 1e-6,
            "{back:?}"
        );
    }
}
