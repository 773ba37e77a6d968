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
