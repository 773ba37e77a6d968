//! What an importance-sampled log-likelihood estimate returns, and the log-sum-exp step that
//! accumulates it; shared by the candle path (`vae::objective`) and the fused CPU engine
//! (`engine::vae`).

/// Per-example results of `engine::estimate_log_likelihood`, in nats.
#[derive(Debug, Clone)]
pub struct LikelihoodEstimate {
    /// `log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x)`, z_k ~ q(z|x).
    pub log_px: Vec<f64>,
    /// `E_q[log p(x|z_1)]`, the Monte Carlo mean over the same K samples.
    pub reconstruction: Vec<f64>,
    /// `sum_l KL_l`: the KL of all layers (closed form for one layer).
    pub kl: Vec<f64>,
    /// `KL_l` of each stochastic layer (bottom-up), per example.
    pub kl_layers: Vec<Vec<f64>>,
}

impl LikelihoodEstimate {
    /// The estimate from per-example sums over K samples: the log-sum-exp of the log weights,
    /// the sum of log p(x|z_1), and per layer the sum of its KL estimates.
    pub fn from_sums(lse: Vec<f64>, rec_sum: Vec<f64>, kl_sums: Vec<Vec<f64>>, k: usize) -> Self {
        let (log_k, k) = ((k as f64).ln(), k as f64);
        let kl_layers: Vec<Vec<f64>> = kl_sums
            .iter()
            .map(|l| l.iter().map(|s| s / k).collect())
            .collect();
        let kl = (0..lse.len())
            .map(|i| kl_layers.iter().map(|l| l[i]).sum())
            .collect();
        Self {
            log_px: lse.iter().map(|l| l - log_k).collect(),
            reconstruction: rec_sum.iter().map(|r| r / k).collect(),
            kl,
            kl_layers,
        }
    }

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
