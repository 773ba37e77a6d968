//! Group normalisation (Wu & He 2018) of the layer engine, optionally followed by a SiLU, one
//! (example, group) at a time with a closed-form backward pass:
//!
//! ```text
//! forward    mu = mean(x), sigma = sqrt(var(x) + eps), x_hat = (x - mu) / sigma
//!            a = gamma_c x_hat + beta_c,   y = a  or  y = silu(a) = a sigmoid(a)
//! backward   g = dy (times silu'(a) = s (1 + a (1 - s)), s = sigmoid(a), with the SiLU)
//!            dbeta_c += sum g,  dgamma_c += sum g x_hat
//!            dx = (gamma g - mean(gamma g) - x_hat mean(gamma g x_hat)) / sigma
//! ```
//!
//! A group is `[cg, hw]`: cg channels of hw values. Used by the U-Net's fused engine and by the
//! candle op of `nn::modules::group_norm`; tested against candle's autodiff and finite
//! differences in `tests/nn.rs`.

/// silu(a) = a sigmoid(a).
#[inline(always)]
pub fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// d silu(a) / da = s (1 + a (1 - s)), s = sigmoid(a).
#[inline(always)]
pub fn silu_grad(a: f32) -> f32 {
    let s = 1.0 / (1.0 + (-a).exp());
    s * (1.0 + a * (1.0 - s))
}

/// `sigmoid(a)` without a branch or a libm call, so that loops over it vectorise: e =
/// exp(-|a|) in (0, 1], sigmoid(a) = 1 / (1 + e) for a >= 0 and e / (1 + e) below. (A
/// division-free reciprocal, three Newton steps from a linear guess, was slower on the AVX-512
/// development machine: DDIM-50 A/B medians 1,185 -> 1,138 ms and 1,331 -> 1,214 ms with the
/// division.)
#[inline(always)]
fn sigmoid_fast(a: f32) -> f32 {
    let e = crate::nn::kernels::exp_nonpositive(-a.abs());
    let r = 1.0 / (1.0 + e);
    if a >= 0.0 { r } else { e * r }
}

/// `y = [silu](gamma (x - mean) inv + beta)` over one channel; with the SiLU, `sig` (as long
/// as `x`) gets sigmoid(a) for the backward pass.
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn normalize_channel(
    y: &mut [f32],
    sig: &mut [f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    beta: f32,
    with_silu: bool,
) {
    if with_silu {
        for ((y, s), &x) in y.iter_mut().zip(sig.iter_mut()).zip(x) {
            let a = gamma * (x - mean) * inv + beta;
            *s = sigmoid_fast(a);
            *y = a * *s;
        }
    } else {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gamma * (x - mean) * inv + beta;
        }
    }
}

/// [`normalize_channel`] with the SiLU in 16 lanes of AVX-512, where the CPU has it: the same
/// `a = gamma (x - mean) inv + beta` and `e = exp(-|a|)` (the polynomial of
/// [`crate::nn::kernels::exp_nonpositive`] by fused multiply-adds), but `1 / (1 + e)` from the
/// 14-bit reciprocal estimate and one Newton step, `r' = r + r (1 - d r)` (relative error
/// ~2^-28, below float32's rounding), in place of the division that was 37% of the scalar
/// loop's samples.
///
/// # Safety
/// The CPU has AVX-512F; `y`, `sig` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn normalize_silu_avx512(
    y: &mut [f32],
    sig: &mut [f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    beta: f32,
) {
    use std::arch::x86_64::*;
    let n = x.len();
    debug_assert!(y.len() == n && sig.len() == n);
    let (xp, yp, sp) = (x.as_ptr(), y.as_mut_ptr(), sig.as_mut_ptr());
    let set = _mm512_set1_ps;
    let (vmean, vscale, vbeta) = (set(mean), set(gamma * inv), set(beta));
    // exp_nonpositive's constants: its clamp, log2 e, ln 2 in two parts, the Taylor terms.
    let (floor, log2e) = (set(-87.0), set(std::f32::consts::LOG2_E));
    let (ln2_hi, ln2_lo) = (set(0.693_145_75), set(1.428_606_8e-6));
    let taylor: [f32; 8] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let affine = (vmean, vscale, vbeta);
    let consts = (floor, log2e, ln2_hi, ln2_lo);
    // Full registers load and store unmasked (a masked store was 40% of this loop's samples on
    // the AMD development machine), the last partial one masked. (Four registers a step, for
    // four of the exponential's chains at once, measured no faster.)
    let mut at = 0;
    // SAFETY (both blocks): loads and stores stay below n, the caller's lengths: whole
    // registers where 16 lanes remain, else masked to the lanes below n.
    while at + 16 <= n {
        unsafe {
            let (s, y) = silu_register(_mm512_loadu_ps(xp.add(at)), affine, consts, &taylor);
            _mm512_storeu_ps(sp.add(at), s);
            _mm512_storeu_ps(yp.add(at), y);
        }
        at += 16;
    }
    if at < n {
        let mask: __mmask16 = (1u16 << (n - at)) - 1;
        unsafe {
            let xv = _mm512_maskz_loadu_ps(mask, xp.add(at));
            let (s, y) = silu_register(xv, affine, consts, &taylor);
            _mm512_mask_storeu_ps(sp.add(at), mask, s);
            _mm512_mask_storeu_ps(yp.add(at), mask, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
type Register = std::arch::x86_64::__m512;

/// (sigmoid(a), silu(a)) of one register of [`normalize_silu_avx512`].
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn silu_register(
    xv: Register,
    (vmean, vscale, vbeta): (Register, Register, Register),
    (floor, log2e, ln2_hi, ln2_lo): (Register, Register, Register, Register),
    taylor: &[f32; 8],
) -> (Register, Register) {
    use std::arch::x86_64::*;
    let (one, zero) = (_mm512_set1_ps(1.0), _mm512_setzero_ps());
    // a = gamma inv (x - mean) + beta; t = max(-|a|, -87).
    let a = _mm512_fmadd_ps(_mm512_sub_ps(xv, vmean), vscale, vbeta);
    let t = _mm512_max_ps(_mm512_sub_ps(zero, _mm512_abs_ps(a)), floor);
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(t, log2e),
    );
    let r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, t));
    let mut p = _mm512_set1_ps(taylor[0]);
    for &c in &taylor[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(k),
        _mm512_set1_epi32(127),
    ));
    let e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    // 1 / (1 + e): the estimate, then one Newton step.
    let d = _mm512_add_ps(one, e);
    let r0 = _mm512_rcp14_ps(d);
    let rec = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, one), r0);
    // sigmoid(a) = rec for a >= 0, e rec below.
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, zero);
    let s = _mm512_mask_mul_ps(rec, below, e, rec);
    (s, _mm512_mul_ps(a, s))
}

/// Over one channel, `out = dy silu'(a)` (`dy` itself without the SiLU), a = gamma x_hat +
/// beta, x_hat = (x - mean) inv, silu'(a) = s (1 + a (1 - s)) with s = `sig` (stored by
/// [`normalize_channel`]); returns (sum out, sum out x_hat).
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn channel_grad_sums(
    out: &mut [f32],
    dy: &[f32],
    sig: &[f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    beta: f32,
    with_silu: bool,
) -> (f32, f32) {
    const LANES: usize = 16;
    let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
    let n = x.len();
    let whole = n - n % LANES;
    let silu_grad = |d: f32, x_hat: f32, s: f32| {
        let a = gamma * x_hat + beta;
        d * s * (1.0 + a * (1.0 - s))
    };
    // Whole registers as fixed-size arrays: indexed slices left this loop scalar.
    let lanes = |v: &[f32]| -> [f32; LANES] { v.try_into().expect("a chunk of LANES") };
    if with_silu {
        let chunks = out[..whole]
            .chunks_exact_mut(LANES)
            .zip(dy[..whole].chunks_exact(LANES))
            .zip(
                sig[..whole]
                    .chunks_exact(LANES)
                    .zip(x[..whole].chunks_exact(LANES)),
            );
        for ((out, dy), (sig, x)) in chunks {
            let (dy, sig, x) = (lanes(dy), lanes(sig), lanes(x));
            for l in 0..LANES {
                let x_hat = (x[l] - mean) * inv;
                let o = silu_grad(dy[l], x_hat, sig[l]);
                out[l] = o;
                sg[l] += o;
            }
        }
    } else {
        out[..n].copy_from_slice(&dy[..n]);
        for dy in dy[..whole].chunks_exact(LANES) {
            let dy = lanes(dy);
            for l in 0..LANES {
                sg[l] += dy[l];
            }
        }
    }
    // sum out x_hat in a loop of its own: with both running sums in one loop LLVM pairs
    // sg[l] with sgx[l] into two-lane vectors instead of vectorising across l.
    for (o, x) in out[..whole]
        .chunks_exact(LANES)
        .zip(x[..whole].chunks_exact(LANES))
    {
        let (o, x) = (lanes(o), lanes(x));
        for l in 0..LANES {
            sgx[l] += o[l] * ((x[l] - mean) * inv);
        }
    }
    let (mut sg, mut sgx) = (sg.iter().sum::<f32>(), sgx.iter().sum::<f32>());
    for i in whole..n {
        let x_hat = (x[i] - mean) * inv;
        let o = if with_silu {
            silu_grad(dy[i], x_hat, sig[i])
        } else {
            dy[i]
        };
        out[i] = o;
        sg += o;
        sgx += o * x_hat;
    }
    (sg, sgx)
}

/// `dx += (gamma dy - mean_g - x_hat mean_gx) inv` over one channel.
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn channel_dx(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    mean_g: f32,
    mean_gx: f32,
) {
    for ((dx, &d), &x) in dx.iter_mut().zip(dy).zip(x) {
        let x_hat = (x - mean) * inv;
        *dx += (gamma * d - mean_g - x_hat * mean_gx) * inv;
    }
}

/// Forward of one (example, group): `x`, `y` `[cg, hw]` (cg = `gamma.len()` channels),
/// `y = [silu](gamma (x - mu) / sigma + beta)`; returns (mu, 1/sigma). With the SiLU, `sig`
/// gets sigmoid(a): for every value when it is as long as `x` (kept for the backward pass),
/// else one channel's worth (`hw`), overwritten channel by channel.
#[allow(clippy::too_many_arguments)]
pub fn group_forward(
    y: &mut [f32],
    sig: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
    eps: f64,
    with_silu: bool,
) -> (f32, f32) {
    let (mean, inv) = moments(x, eps);
    let keep = sig.len() >= x.len();
    for (j, (yc, xc)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
        let at = if keep { j * hw } else { 0 };
        let s = if with_silu {
            &mut sig[at..at + hw]
        } else {
            &mut []
        };
        #[cfg(target_arch = "x86_64")]
        if with_silu && crate::nn::planar::conv::has_avx512() {
            // SAFETY: AVX-512F is there (checked); s, yc and xc are one channel's hw values.
            unsafe { normalize_silu_avx512(yc, s, xc, mean, inv, gamma[j], beta[j]) };
            continue;
        }
        normalize_channel(yc, s, xc, mean, inv, gamma[j], beta[j], with_silu);
    }
    (mean, inv)
}

/// Backward of one (example, group), the closed form of the module doc: `dx +=`, and the
/// group's channels' `dgamma`, `dbeta +=`. `sig` is the sigmoid [`group_forward`] kept (with
/// the SiLU), `scratch` `[cg, hw]` takes dy through the SiLU.
#[allow(clippy::too_many_arguments)]
pub fn group_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    sig: &[f32],
    x: &[f32],
    (mean, inv): (f32, f32),
    (gamma, beta): (&[f32], &[f32]),
    hw: usize,
    with_silu: bool,
    scratch: &mut [f32],
) {
    let n = x.len() as f64;
    let (mut mean_g, mut mean_gx) = (0f64, 0f64);
    for j in 0..gamma.len() {
        let r = j * hw..(j + 1) * hw;
        let s = if with_silu { &sig[r.clone()] } else { &[] };
        let (sg, sgx) = channel_grad_sums(
            &mut scratch[r.clone()],
            &dy[r.clone()],
            s,
            &x[r],
            mean,
            inv,
            gamma[j],
            beta[j],
            with_silu,
        );
        dbeta[j] += sg;
        dgamma[j] += sgx;
        mean_g += (gamma[j] * sg) as f64;
        mean_gx += (gamma[j] * sgx) as f64;
    }
    let (mean_g, mean_gx) = ((mean_g / n) as f32, (mean_gx / n) as f32);
    for (j, &gm) in gamma.iter().enumerate() {
        let r = j * hw..(j + 1) * hw;
        let (dxc, g, xc) = (&mut dx[r.clone()], &scratch[r.clone()], &x[r]);
        channel_dx(dxc, g, xc, mean, inv, gm, mean_g, mean_gx);
    }
}

/// Mean and 1/sigma of one group, in one pass: sums of d and d^2 for d = x - x_0, in 16
/// float lanes (a group has at most a few thousand values per lane) added up in f64.
/// Shifting by the first value keeps var = E[d^2] - E[d]^2 free of cancellation when the mean
/// is large against the spread.
#[multiversion::multiversion(targets = "simd")]
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    const LANES: usize = 16;
    let n = x.len() as f64;
    let shift = x.first().copied().unwrap_or(0.0);
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    // Two loops of one running sum each: in one loop LLVM pairs s1[l] with s2[l] into
    // two-lane vectors instead of vectorising across l (the group is in L1 either way).
    for c in chunks.clone() {
        for l in 0..LANES {
            s1[l] += c[l] - shift;
        }
    }
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            s2[l] += d * d;
        }
    }
    let mut t1: f64 = s1.iter().map(|&v| v as f64).sum();
    let mut t2: f64 = s2.iter().map(|&v| v as f64).sum();
    for &v in rest {
        let d = (v - shift) as f64;
        t1 += d;
        t2 += d * d;
    }
    let mean_d = t1 / n;
    let var = (t2 / n - mean_d * mean_d).max(0.0);
    (
        (shift as f64 + mean_d) as f32,
        (1.0 / (var + eps).sqrt()) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::{normalize_channel, sigmoid_fast};

    /// The AVX-512 normalisation + SiLU agrees with the scalar loop (its division exact) to
    /// float32 rounding, for inputs whose a = gamma (x - mean) inv + beta spans -100..100,
    /// lengths with and without a partial last register, and writes nothing past them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_silu_matches_the_scalar_loop() {
        if !crate::nn::planar::conv::has_avx512() {
            return;
        }
        for n in [1, 15, 16, 17, 49, 784] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 2001) as f32 / 10.0 - 100.0)
                .collect();
            let (mean, inv, gamma, beta) = (0.3, 0.9, 1.1, -0.2);
            let (mut y0, mut s0) = (vec![0f32; n], vec![0f32; n]);
            normalize_channel(&mut y0, &mut s0, &x, mean, inv, gamma, beta, true);
            let (mut y1, mut s1) = (vec![7f32; n + 1], vec![7f32; n + 1]);
            // SAFETY: AVX-512F checked above; equal lengths.
            unsafe {
                super::normalize_silu_avx512(&mut y1[..n], &mut s1[..n], &x, mean, inv, gamma, beta)
            };
            assert_eq!((y1[n], s1[n]), (7.0, 7.0), "wrote past {n}");
            for i in 0..n {
                let (dy, ds) = ((y1[i] - y0[i]).abs(), (s1[i] - s0[i]).abs());
                assert!(
                    dy <= 1e-6 * (1.0 + y0[i].abs()) && ds <= 1e-6,
                    "n {n} x {}: y {} vs {}, s {} vs {}",
                    x[i],
                    y1[i],
                    y0[i],
                    s1[i],
                    s0[i]
                );
            }
        }
    }

    /// The branch-free sigmoid agrees with the exact one (computed in f64) to float32
    /// rounding over a = -100..100.
    #[test]
    fn branch_free_sigmoid_matches_the_exact_one() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let a = i as f64 / 1000.0;
            let exact = 1.0 / (1.0 + (-a).exp());
            worst = worst.max((sigmoid_fast(a as f32) as f64 - exact).abs());
        }
        assert!(worst < 3e-7, "sigmoid: absolute error {worst:e}");
    }
}
