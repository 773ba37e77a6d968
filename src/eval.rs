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
    }
}
