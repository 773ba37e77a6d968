//! The sinusoidal timestep embedding (Vaswani et al. 2017, as DDPM and improved-diffusion use
//! it), the one implementation both the candle path (`diffusion::nets::timestep_embedding`)
//! and the U-Net's fused engine use:
//!
//! ```text
//! f_i = 10000^(-i / half),  i = 0..half        e(t) = [cos(t f_0..f_{half-1}), sin(t f_0..)]
//! ```
//!
//! and diffusers' variants of it (a shifted denominator `half - shift`, sines first), which
//! checkpoints trained with DDPM's code need.
//!
//! It has no parameters and t is not differentiated, so it has no backward pass.

/// The `dim / 2` frequencies of a `dim`-wide embedding.
pub fn sinusoid_frequencies(dim: usize) -> Vec<f32> {
    sinusoid_frequencies_shifted(dim, 0)
}

/// The frequencies `f_i = 10000^(-i / (half - shift))` of diffusers' `get_timestep_embedding`
/// with `downscale_freq_shift = shift` (DDPM's own code and its diffusers checkpoints: 1;
/// elbo and improved-diffusion: 0).
pub fn sinusoid_frequencies_shifted(dim: usize, shift: usize) -> Vec<f32> {
    let half = dim / 2;
    let denom = half.saturating_sub(shift).max(1) as f64;
    (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
        .collect()
}

/// `out [2 half] = [cos(t f_i); sin(t f_i)]` for the frequencies `freqs` `[half]`.
pub fn sinusoidal_embedding(t: f32, freqs: &[f32], out: &mut [f32]) {
    sinusoidal_embedding_ordered(t, freqs, true, out)
}

/// [`sinusoidal_embedding`] with the halves in either order: cosines first (`cos_first`,
/// diffusers' `flip_sin_to_cos = True`) or sines first (DDPM's order).
pub fn sinusoidal_embedding_ordered(t: f32, freqs: &[f32], cos_first: bool, out: &mut [f32]) {
    let half = freqs.len();
    let (c, s) = if cos_first { (0, half) } else { (half, 0) };
    for (i, &f) in freqs.iter().enumerate() {
        let a = t * f;
        out[c + i] = a.cos();
        out[s + i] = a.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known values: f_0 = 1 and f_{half-1} = 10000^(-(half-1)/half); t = 0 gives cos 1, sin 0.
    #[test]
    fn frequencies_and_values() {
        let f = sinusoid_frequencies(8);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[3] as f64 - 10000f64.powf(-0.75)).abs() < 1e-9);
        let mut e = vec![0f32; 8];
        sinusoidal_embedding(0.0, &f, &mut e);
        assert_eq!(e, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        sinusoidal_embedding(3.0, &f, &mut e);
        assert!((e[0] - 3f32.cos()).abs() < 1e-6 && (e[4] - 3f32.sin()).abs() < 1e-6);
    }
}
