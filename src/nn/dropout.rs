//! Dropout (Srivastava et al. 2014) with counter-based masks, so that the candle path and the
//! fused engine drop the same values from the same seed, whatever the thread split:
//!
//! ```text
//! m_i = 1 / (1 - p)  if u_i >= p,  else 0        u_i = U[0, 1) from hash(seed, stream, i)
//! y   = m * x                                    dx = m * dy
//! ```
//!
//! `stream` names one activation of one example (example index x blocks + block index), `i`
//! the value within it; u_i is splitmix64 of the three, so masks need no generator state.

/// splitmix64's finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hash every value of stream `stream`'s mask starts from: value i is kept when
/// `(mix(base + i) >> 40) / 2^24 >= p` (the XLA engine computes the masks from it on the
/// device).
pub fn mask_base(seed: u64, stream: u64) -> u64 {
    mix(seed ^ mix(stream))
}

/// `mask[i] = 1 / (1 - p)` (kept) or 0 (dropped), drawn from `(seed, stream, i)`; p in [0, 1).
pub fn fill_mask(seed: u64, stream: u64, p: f32, mask: &mut [f32]) {
    let base = mask_base(seed, stream);
    let scale = 1.0 / (1.0 - p);
    for (i, m) in mask.iter_mut().enumerate() {
        // The top 24 bits as a float in [0, 1): exact, and the same on every machine.
        let u = (mix(base.wrapping_add(i as u64)) >> 40) as f32 / (1u64 << 24) as f32;
        *m = if u >= p { scale } else { 0.0 };
    }
}

/// `x *= mask` (forward) or `dy *= mask` (backward: the same mask).
pub fn apply(x: &mut [f32], mask: &[f32]) {
    x.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_the_stated_fraction_and_keep_the_mean() {
        let p = 0.3;
        let mut m = vec![0f32; 200_000];
        fill_mask(7, 3, p, &mut m);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        // Binomial standard error sqrt(p (1 - p) / n) = 0.001: 5 of them.
        assert!((dropped - 0.3).abs() < 0.005, "dropped {dropped}");
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        let mut again = vec![0f32; 1000];
        fill_mask(7, 3, p, &mut again);
        assert_eq!(&again[..], &m[..1000]);
        fill_mask(7, 4, p, &mut again);
        assert_ne!(&again[..], &m[..1000], "another stream, another mask");
    }
}
