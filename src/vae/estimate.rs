//! What an importance-sampled log-likelihood estimate returns, and the log-sum-exp step that
//! accumulates it; shared by the candle path (`vae::objective`) and the fused CPU engine
//! (`vae::fused`).

/// Per-example results of `vae::estimate_log_likelihood`, in nats.
#[derive(Debug, Clone)]
pub struct LikelihoodEstimate {
    /// `log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)`, z_k ~ q(z|x).
    pub log_px: Vec<f64>,
    /// `E_q[log p(x|z)]`, the Monte Carlo mean over the same K samples.
    pub reconstruction: Vec<f64>,
    /// Closed-form `KL(q(z|x) || p(z))`.
    pub kl: Vec<f64>,
}

impl LikelihoodEstimate {
    /// `ELBO = reconstruction - kl`, per example.
    pub fn elbo(&self) -> Vec<f64> {
        self.reconstruction
            .iter()
            .zip(&self.kl)
            .map(|(r, k)| r - k)
            .collect()
    }
}

/// log(e^a + e^b) without overflow.
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}
