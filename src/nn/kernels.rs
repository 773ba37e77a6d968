//! The SIMD kernels the fused CPU engines share: element-wise adds and activations, a
//! branch-free `exp` for non-positive arguments, attention's softmax rows, and the Bernoulli
//! (BCE-with-logits) row loops.
//! Each is compiled for the machine's vector instructions (`multiversion`) and chosen at run
//! time; each states its error bound where it approximates.

/// `dst += src`, element by element.
#[multiversion::multiversion(targets = "simd")]
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[multiversion::multiversion(targets = "simd")]
pub fn relu(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = x.max(0.0);
    }
}

/// `g *= 1[a > 0]`, where `a` is the ReLU's output.
#[multiversion::multiversion(targets = "simd")]
pub fn relu_backward(g: &mut [f32], a: &[f32]) {
    for (g, &a) in g.iter_mut().zip(a) {
        *g = if a > 0.0 { *g } else { 0.0 };
    }
}

/// `out[j] = sum_i m[i, j]` for a row-major `m` with `cols` columns.
#[multiversion::multiversion(targets = "simd")]
pub fn column_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in m.chunks_exact(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// `e^x` for x <= 0, branch-free so that it vectorises: x = n ln2 + r, |r| <= ln2/2,
/// e^r by its Taylor polynomial to r^7 (relative error < 1e-7), 2^n by the exponent bits.
/// Arguments below -87 are clamped (e^-87 ~ 1.6e-38, the smallest normal f32).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Coefficients are multiplied, never divided by: a division by a constant that is not a
    // power of two stays a (slow) vector division.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // SAFETY: x in [-87, 0], so n = round(x log2 e) is an integer in [-126, 0]. (A plain `as`
    // cast saturates, which the compiler does one lane at a time.)
    let n = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// `ln(1 + e)` for e in [0, 1], branch-free: with s = e / (2 + e), ln(1 + e) =
/// 2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13); s <= 1/3 so the error is below 1e-8.
#[inline(always)]
pub fn ln_1p_unit(e: f32) -> f32 {
    ln_1p_from_ratio(e / (2.0 + e))
}

/// `ln(1 + e)` given `s = e / (2 + e)` in [0, 1/3]: `2 atanh(s)` by its series to s^13.
#[inline(always)]
pub fn ln_1p_from_ratio(s: f32) -> f32 {
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0
                    + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0)))))))
}

/// Lanes of the fused row loops: their sums are kept in this many independent accumulators
/// (added up at the end), so that the loops vectorise; a single float accumulator would force
/// one addition after the other.
pub const LANES: usize = 16;

/// One row of the Bernoulli likelihood: returns `sum_j x_j l_j - softplus(l_j)` and overwrites
/// `l` with `scale * (sigmoid(l) - x)`, the gradient of `-scale * log p`. Stable for any l:
/// softplus(l) = max(l, 0) + ln(1 + e^{-|l|}), sigmoid(l) from the same e^{-|l|}.
#[multiversion::multiversion(targets = "simd")]
pub fn bce_logits_grad(l: &mut [f32], x: &[f32], scale: f32) -> f32 {
    #[inline(always)]
    fn one(li: &mut f32, xi: f32, scale: f32) -> f32 {
        let v = *li;
        let e = exp_nonpositive(-v.abs());
        // One division serves both 1 / (1 + e) (the sigmoid) and e / (2 + e) (the logarithm).
        let r = 1.0 / ((1.0 + e) * (2.0 + e));
        let inv = (2.0 + e) * r;
        let softplus = v.max(0.0) + ln_1p_from_ratio(e * (1.0 + e) * r);
        let sigmoid = if v >= 0.0 { inv } else { e * inv };
        *li = scale * (sigmoid - xi);
        xi * v - softplus
    }
    let mut acc = [0f32; LANES];
    let mut l_chunks = l.chunks_exact_mut(LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (lc, xc) in (&mut l_chunks).zip(&mut x_chunks) {
        for j in 0..LANES {
            acc[j] += one(&mut lc[j], xc[j], scale);
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (li, &xi) in l_chunks
        .into_remainder()
        .iter_mut()
        .zip(x_chunks.remainder())
    {
        total += one(li, xi, scale);
    }
    total
}

/// `sum_j x_j` in `LANES` running sums (one register's worth, so the loop vectorises where a
/// single running sum would wait on each add).
#[multiversion::multiversion(targets = "simd")]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// One row of attention's softmax, in place: `a_j = e^{scale (s_j - max s)} / sum_i e^{scale
/// (s_i - max s)}` (scale > 0; the scores' maximum subtracted so that every exponent is <= 0,
/// [`exp_nonpositive`]), the maximum and the sum in `LANES` running values so that the loops
/// vectorise.
#[multiversion::multiversion(targets = "simd")]
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    let mut top = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            top[j] = top[j].max(c[j]);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&top)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            c[j] = exp_nonpositive((c[j] - max) * scale);
            acc[j] += c[j];
        }
    }
    let mut total: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpositive((*v - max) * scale);
        total += *v;
    }
    row.iter_mut().for_each(|v| *v /= total);
}

/// The softmax's backward pass on one row, in place: `d_j = scale a_j (d_j - sum_i a_i d_i)`,
/// from `d` = dL/da to dL/d(scores), `a` [`softmax_scaled`]'s output.
#[multiversion::multiversion(targets = "simd")]
pub fn softmax_scaled_backward(d: &mut [f32], a: &[f32], scale: f32) {
    let mut acc = [0f32; LANES];
    let (dc, ac) = (d.chunks_exact(LANES), a.chunks_exact(LANES));
    let rest: f32 = dc
        .remainder()
        .iter()
        .zip(ac.remainder())
        .map(|(d, a)| d * a)
        .sum();
    for (dc, ac) in dc.zip(ac) {
        for j in 0..LANES {
            acc[j] += dc[j] * ac[j];
        }
    }
    let dot = acc.iter().sum::<f32>() + rest;
    for (d, &a) in d.iter_mut().zip(a) {
        *d = a * (*d - dot) * scale;
    }
}

/// `sum_j x_j l_j - softplus(l_j)`: one row of the Bernoulli log-likelihood from logits.
#[multiversion::multiversion(targets = "simd")]
pub fn bernoulli_log_prob(x: &[f32], l: &[f32]) -> f32 {
    #[inline(always)]
    fn one(v: f32, xi: f32) -> f32 {
        xi * v - (v.max(0.0) + ln_1p_unit(exp_nonpositive(-v.abs())))
    }
    let mut acc = [0f32; LANES];
    let (l_chunks, x_chunks) = (l.chunks_exact(LANES), x.chunks_exact(LANES));
    let (l_rest, x_rest) = (l_chunks.remainder(), x_chunks.remainder());
    for (lc, xc) in l_chunks.zip(x_chunks) {
        for j in 0..LANES {
            acc[j] += one(lc[j], xc[j]);
        }
    }
    let rest: f32 = l_rest.iter().zip(x_rest).map(|(&v, &xi)| one(v, xi)).sum();
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst relative errors against the standard library over their whole domains: both
    /// within a few float32 ulps (epsilon 1.19e-7), so the fused likelihood agrees with
    /// candle's to float rounding.
    #[test]
    fn fast_exp_and_log_match_the_standard_library() {
        let (mut worst_exp, mut worst_log) = (0f64, 0f64);
        for i in 0..=200_000 {
            let x = -(i as f32) * 0.000_435; // 0 .. -87
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst_exp = worst_exp.max((got - want).abs() / want);
            let e = (-(i as f64) * 1e-4).exp() as f32; // (0, 1]
            let want = (e as f64).ln_1p();
            worst_log = worst_log.max((ln_1p_unit(e) as f64 - want).abs() / want);
        }
        assert!(worst_exp < 4e-7, "exp: worst relative error {worst_exp:e}");
        assert!(
            worst_log < 4e-7,
            "ln(1 + e): worst relative error {worst_log:e}"
        );
        println!("worst relative errors: exp {worst_exp:e}, ln(1 + e) {worst_log:e}");
    }

    /// Attention's softmax against a float64 softmax, and its backward pass against central
    /// differences of the float64 `L(s) = sum_j g_j softmax(scale s)_j`, on rows shorter than,
    /// equal to and longer than a register, with scores up to +-60 (e^60 overflows nothing
    /// once the maximum is subtracted).
    #[test]
    fn softmax_rows_match_float64_and_finite_differences() {
        fn reference(s: &[f64], scale: f64) -> Vec<f64> {
            let max = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f64> = s.iter().map(|v| ((v - max) * scale).exp()).collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|v| v / total).collect()
        }
        let scale = 0.125f32;
        for n in [1usize, 7, 16, 37, 256] {
            let s: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 1.25)
                .collect();
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 104_729 % 13) as f32 - 6.0) * 0.3)
                .collect();
            let s64: Vec<f64> = s.iter().map(|&v| v as f64).collect();
            let want = reference(&s64, scale as f64);
            let mut a = s.clone();
            softmax_scaled(&mut a, scale);
            for (j, (&got, want)) in a.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                    "softmax n {n} [{j}]: {got} against {want}"
                );
            }
            let mut d = g.clone();
            softmax_scaled_backward(&mut d, &a, scale);
            let loss = |s: &[f64]| -> f64 {
                let a = reference(s, scale as f64);
                a.iter().zip(&g).map(|(a, &g)| a * g as f64).sum()
            };
            for j in 0..n {
                let h = 1e-5;
                let (mut up, mut down) = (s64.clone(), s64.clone());
                up[j] += h;
                down[j] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h);
                assert!(
                    (d[j] as f64 - fd).abs() <= 1e-5,
                    "softmax backward n {n} [{j}]: {} against {fd}",
                    d[j]
                );
            }
        }
    }
}
