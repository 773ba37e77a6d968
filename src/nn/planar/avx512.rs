//! AVX-512 kernels for the row-shift convolutions of `nn::planar::conv`, reading the shifted rows
//! `e` in place: no packed copy of either operand (the gemm crate packs both panels of every
//! product, and a 3x3 convolution of 16 or 32 channels is three thin products whose packing
//! costs as much as a third of their multiply-adds), 16 pixels to a register, the plane's tail
//! through masked loads and stores.
//!
//! ```text
//! conv:        y[o, p] (+)= sum_u sum_r W_u[o, r] e[r, off_u + p]    (o < M, r < C k, p < P)
//! weight grad: dW_u^T[r, o] += sum_p dy[o, p] e[r, off_u + p]
//! ```
//!
//! For a stride-1 convolution `e` is `[C k, (H + k - 1) W]` (see `conv::shifted_rows`) and
//! off_u = u W: the im2col row of kernel offset (u, v) is the contiguous run of row (c, v)
//! from u W. For stride 2 `e` holds the input split by line and column parity
//! (`conv::strided_rows`) and off_u picks the parity and line of kernel row u. Both kernels
//! read every operand row by row. The callers check the CPU's AVX-512F ([`available`]) and
//! every buffer's length. Winograd's tile products (`nn::winograd`) are the same two products
//! with one kernel row.

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
};

/// Whether this CPU runs these kernels (AVX-512F).
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Output rows of one register tile of [`conv`] (its 8 x 3 accumulators fill 24 of the 32
/// registers); the convolution runs here when M is a multiple of it.
pub const CONV_ROWS: usize = 8;

/// Pixels of one full tile of [`conv`]: three registers.
const TILE: usize = 48;

/// The lanes of a register that lie before pixel `n` of a plane, from pixel `at`.
fn mask(at: usize, n: usize) -> __mmask16 {
    match n.saturating_sub(at) {
        0 => 0,
        r if r >= 16 => 0xffff,
        r => (1u16 << r) - 1,
    }
}

/// A tile's accumulators `[8][R]`: zeros, or when adding y's outputs `o0..o0 + 8` at pixels
/// `p0..` (rows `ys` apart; lanes past the plane masked off).
///
/// # Safety
/// AVX-512F; y holds those rows' unmasked lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_start<const R: usize>(
    yp: *const f32,
    ys: usize,
    (o0, p0): (usize, usize),
    masks: &[__mmask16; R],
    add: bool,
) -> [[__m512; R]; CONV_ROWS] {
    let mut acc: [[__m512; R]; CONV_ROWS] = [[_mm512_setzero_ps(); R]; CONV_ROWS];
    if add {
        for (i, acc) in acc.iter_mut().enumerate() {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's contract.
                *a =
                    unsafe { _mm512_maskz_loadu_ps(masks[j], yp.add((o0 + i) * ys + p0 + 16 * j)) };
            }
        }
    }
    acc
}

/// One step of a tile: `acc[i][j] += w[i stride] b[j]` (the 8 outputs' weights, `stride`
/// apart, broadcast against R registers of one input row).
///
/// # Safety
/// AVX-512F; `w` holds 8 weights `stride` apart.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_fma<const R: usize>(
    acc: &mut [[__m512; R]; CONV_ROWS],
    w: *const f32,
    stride: usize,
    b: &[__m512; R],
) {
    for (i, acc) in acc.iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        let a = _mm512_set1_ps(unsafe { *w.add(i * stride) });
        for (a_ij, b) in acc.iter_mut().zip(b) {
            *a_ij = _mm512_fmadd_ps(a, *b, *a_ij);
        }
    }
}

/// Stores a tile's accumulators into y's outputs `o0..o0 + 8` at pixels `p0..` (rows `ys`
/// apart; lanes past the plane masked off).
///
/// # Safety
/// AVX-512F; y holds those rows' unmasked lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_store<const R: usize>(
    yp: *mut f32,
    ys: usize,
    (o0, p0): (usize, usize),
    masks: &[__mmask16; R],
    acc: &[[__m512; R]; CONV_ROWS],
) {
    for (i, acc) in acc.iter().enumerate() {
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { _mm512_mask_storeu_ps(yp.add((o0 + i) * ys + p0 + 16 * j), masks[j], *a) };
        }
    }
}

/// `y [M, P] (+)= sum_u W_u e_u` (the product of `conv::offset_conv`), `e_u` the rows
/// of `e` (`[C k, plane]`) from `offsets[u]`, y's rows `ys` apart (P for a plane; Winograd's
/// products write one tile position of `[O, 16, P]`, rows 16 P apart), for M a multiple of
/// [`CONV_ROWS`]: tiles of 8 outputs by 48 pixels, each the sum of `k C k` broadcast weights
/// times three rows of `e`, kept in registers from the first product to the store.
///
/// # Safety
/// The CPU has AVX-512F; `y.len() >= (m - 1) ys + P`, `ys >= P`, `wts.len() >= k m ck`,
/// `e.len() >= ck plane`, `offsets[u] + P <= plane`, `m % CONV_ROWS == 0` (k =
/// `offsets.len()`, P = `hw`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
    ys: usize,
    add: bool,
) {
    let k = offsets.len();
    debug_assert!(m > 0 && ys >= hw && y.len() >= (m - 1) * ys + hw);
    debug_assert!(wts.len() >= k * m * ck && e.len() >= ck * plane);
    debug_assert!(offsets.iter().all(|&o| o + hw <= plane));
    debug_assert_eq!(m % CONV_ROWS, 0);
    let mut p0 = 0;
    while p0 < hw {
        // The last tile has as many registers as it has pixels for.
        let regs = (hw - p0).div_ceil(16).min(3);
        for o0 in (0..m).step_by(CONV_ROWS) {
            // SAFETY: the caller's contract, as the function's.
            unsafe {
                match regs {
                    3 => tile::<3>(y, wts, e, (m, ck), offsets, (hw, plane, ys), (o0, p0), add),
                    2 => tile::<2>(y, wts, e, (m, ck), offsets, (hw, plane, ys), (o0, p0), add),
                    _ => tile::<1>(y, wts, e, (m, ck), offsets, (hw, plane, ys), (o0, p0), add),
                }
            }
        }
        p0 += TILE;
    }
}

/// One tile of [`conv`]: outputs `o0..o0 + 8`, pixels `p0..p0 + 16 R` (masked past H W).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane, ys): (usize, usize, usize),
    (o0, p0): (usize, usize),
    add: bool,
) {
    let masks: [__mmask16; R] = std::array::from_fn(|j| mask(p0 + 16 * j, hw));
    let (yp, wp, ep) = (y.as_mut_ptr(), wts.as_ptr(), e.as_ptr());
    // SAFETY: every load and store is masked to the pixels below hw of a row the caller's
    // lengths cover: y's rows o < m (from o ys), e's rows r < ck from r plane + offsets[u] with
    // offsets[u] + hw <= plane; weights at u m ck + o ck + r < k m ck.
    unsafe {
        let mut acc = tile_start(yp, ys, (o0, p0), &masks, add);
        for (u, &offset) in offsets.iter().enumerate() {
            let wu = wp.add(u * m * ck + o0 * ck);
            let eu = ep.add(offset + p0);
            for r in 0..ck {
                let row = eu.add(r * plane);
                let b: [__m512; R] =
                    std::array::from_fn(|j| _mm512_maskz_loadu_ps(masks[j], row.add(16 * j)));
                tile_fma(&mut acc, wu.add(r), ck, &b);
            }
        }
        tile_store(yp, ys, (o0, p0), &masks, &acc);
    }
}

/// `y [M, H W] (+)= W * x`, the stride-1 "same" k x k convolution (k odd, p = k / 2) read
/// straight from `x [C, H W]`, without [`conv`]'s shifted rows: kernel offset (u, v) reads
/// the plane shifted by (u - p) W + v - p, its lanes past an edge (a line above or below the
/// plane, a column before the first or after the last) masked to zero. `wts` is the same
/// `W_u [M, C k]` (weight (o, c, u, v) at `u M C k + o C k + c k + v`). Tiles as [`conv`]'s: 8
/// outputs by 48 pixels; each tile's masks are the line masks of its k kernel rows and the
/// column masks of its k kernel columns, made once for all its outputs. For a pass that keeps
/// no rows (sampling): training keeps the shifted rows for dW.
///
/// # Safety
/// The CPU has AVX-512F; `y.len() >= m h w`, `wts.len() >= k m c k`, `x.len() >= c h w`, k
/// odd and at most 7, `w > 0`, `m % CONV_ROWS == 0`.
#[target_feature(enable = "avx512f")]
pub unsafe fn conv_same(
    y: &mut [f32],
    wts: &[f32],
    x: &[f32],
    (m, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
    add: bool,
) {
    let hw = h * w;
    debug_assert!(y.len() >= m * hw && wts.len() >= k * m * c * k && x.len() >= c * hw);
    debug_assert!(k % 2 == 1 && k <= 7 && w > 0 && m % CONV_ROWS == 0);
    let p = k / 2;
    // lines[u 3 + j], columns[v 3 + j]: the lanes of register j whose pixel's neighbour at
    // kernel row u (column v) lies inside the plane (and, for the lines, below H W).
    let mut lines = [0 as __mmask16; 7 * 3];
    let mut columns = [0 as __mmask16; 7 * 3];
    let mut p0 = 0;
    while p0 < hw {
        let regs = (hw - p0).div_ceil(16).min(3);
        lines.fill(0);
        columns.fill(0);
        let (mut yy, mut xx) = (p0 / w, p0 % w);
        for lane in 0..48.min(hw - p0) {
            let (j, bit) = (lane / 16, 1u16 << (lane % 16));
            for u in 0..k {
                let sy = yy + u;
                if sy >= p && sy < h + p {
                    lines[u * 3 + j] |= bit;
                }
                let sx = xx + u;
                if sx >= p && sx < w + p {
                    columns[u * 3 + j] |= bit;
                }
            }
            xx += 1;
            if xx == w {
                (xx, yy) = (0, yy + 1);
            }
        }
        for o0 in (0..m).step_by(CONV_ROWS) {
            // SAFETY: the caller's contract, as the function's.
            unsafe {
                let masks = (&lines[..], &columns[..]);
                match regs {
                    3 => same_tile::<3>(y, wts, x, (m, c, k), (h, w), masks, (o0, p0), add),
                    2 => same_tile::<2>(y, wts, x, (m, c, k), (h, w), masks, (o0, p0), add),
                    _ => same_tile::<1>(y, wts, x, (m, c, k), (h, w), masks, (o0, p0), add),
                }
            }
        }
        p0 += TILE;
    }
}

/// One tile of [`conv_same`]: outputs `o0..o0 + 8`, pixels `p0..p0 + 16 R`.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn same_tile<const R: usize>(
    y: &mut [f32],
    wts: &[f32],
    x: &[f32],
    (m, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
    (lines, columns): (&[__mmask16], &[__mmask16]),
    (o0, p0): (usize, usize),
    add: bool,
) {
    let hw = h * w;
    let p = k / 2;
    let ck = c * k;
    let tail: [__mmask16; R] = std::array::from_fn(|j| mask(p0 + 16 * j, hw));
    let (yp, wp, xp) = (y.as_mut_ptr(), wts.as_ptr(), x.as_ptr());
    // SAFETY: y's loads and stores are masked to pixels below hw of rows o < m; x's loads to
    // the lanes whose shifted pixel lies inside channel ci's plane (the masks), so every lane
    // read is within x (the addresses of the others are formed with wrapping arithmetic and
    // never read); weights at u m ck + o ck + ci k + v < k m ck.
    unsafe {
        let mut acc = tile_start(yp, hw, (o0, p0), &tail, add);
        for u in 0..k {
            for v in 0..k {
                let shift = (u as isize - p as isize) * w as isize + v as isize - p as isize;
                let mk: [__mmask16; R] =
                    std::array::from_fn(|j| lines[u * 3 + j] & columns[v * 3 + j]);
                let wuv = wp.add(u * m * ck + o0 * ck + v);
                for ci in 0..c {
                    let row = xp.wrapping_offset((ci * hw + p0) as isize + shift);
                    let b: [__m512; R] = std::array::from_fn(|j| {
                        _mm512_maskz_loadu_ps(mk[j], row.wrapping_add(16 * j))
                    });
                    tile_fma(&mut acc, wuv.add(ci * k), ck, &b);
                }
            }
        }
        tile_store(yp, hw, (o0, p0), &tail, &acc);
    }
}

/// `dW_u^T[r, o] += sum_p dy[o, p] e_u[r, p]` (the product of `conv::offset_weight_grad`,
/// `dwu` = k matrices `[C k, O]`, `e_u` the rows of `e` from `offsets[u]`) for O a multiple
/// of 16, with dy transposed first into `dyt [P, O]` (O P values against the product's
/// O P C k^2 multiply-adds): at each pixel
/// one to four registers of 16 outputs `dyt[p, ..]`, times the broadcast values of 24 / (O / 16)
/// rows of `e`, into 24 accumulators kept over the whole plane. The rows of `e` are read in
/// place, one value a pixel each, so neither operand is packed. dy's rows are `dys` apart (P
/// for a plane, 16 P for one tile position of Winograd's `dM [O, 16, P]`).
///
/// # Safety
/// The CPU has AVX-512F; `dwu.len() >= k o ck`, `dy.len() >= (o - 1) dys + hw`, `dys >= hw`,
/// `e.len() >= ck plane`, `offsets[u] + hw <= plane`, `o % 16 == 0` (k = `offsets.len()`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
    dys: usize,
    dyt: &mut Vec<f32>,
) {
    let k = offsets.len();
    debug_assert!(o > 0 && dys >= hw && dy.len() >= (o - 1) * dys + hw);
    debug_assert!(dwu.len() >= k * o * ck && e.len() >= ck * plane && o % 16 == 0);
    debug_assert!(offsets.iter().all(|&at| at + hw <= plane));
    dyt.resize(hw * o, 0.0);
    for oi in 0..o {
        let row = &dy[oi * dys..oi * dys + hw];
        for (p, &v) in row.iter().enumerate() {
            dyt[p * o + oi] = v;
        }
    }
    let geometry = Rows {
        o,
        ck,
        offsets,
        hw,
        plane,
    };
    let mut o0 = 0;
    while o0 < o {
        let regs = ((o - o0) / 16).min(4);
        // SAFETY: the caller's contract, as the function's.
        unsafe {
            match regs {
                4 => rows::<4, 6>(dwu, dyt, e, &geometry, o0),
                3 => rows::<3, 8>(dwu, dyt, e, &geometry, o0),
                2 => rows::<2, 12>(dwu, dyt, e, &geometry, o0),
                _ => rows::<1, 24>(dwu, dyt, e, &geometry, o0),
            }
        }
        o0 += 16 * regs;
    }
}

/// [`weight_grad`]'s operands' shapes: `o` outputs, `ck` rows of `e` per kernel row, each
/// kernel row u reading `hw` values from `offsets[u]` of rows `plane` apart.
#[derive(Clone, Copy)]
struct Rows<'a> {
    o: usize,
    ck: usize,
    offsets: &'a [usize],
    hw: usize,
    plane: usize,
}

/// [`weight_grad`]'s outputs `o0..o0 + 16 N` for every row `(u, r)` of `e`: tiles of `Q` rows,
/// the last rows one at a time.
#[target_feature(enable = "avx512f")]
unsafe fn rows<const N: usize, const Q: usize>(
    dwu: &mut [f32],
    dyt: &[f32],
    e: &[f32],
    g: &Rows,
    o0: usize,
) {
    let total = g.offsets.len() * g.ck;
    let full = total / Q * Q;
    for q0 in (0..full).step_by(Q) {
        // SAFETY: the caller's contract.
        unsafe { row_tile::<N, Q>(dwu, dyt, e, g, (o0, q0)) };
    }
    for q0 in full..total {
        // SAFETY: the caller's contract.
        unsafe { row_tile::<N, 1>(dwu, dyt, e, g, (o0, q0)) };
    }
}

/// Rows `q0..q0 + Q` of the stacked shifts (row q = (u, r): e_u's row r) against outputs
/// `o0..o0 + 16 N`, summed over every pixel, added into `dwu`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_tile<const N: usize, const Q: usize>(
    dwu: &mut [f32],
    dyt: &[f32],
    e: &[f32],
    g: &Rows,
    (o0, q0): (usize, usize),
) {
    let Rows {
        o, ck, hw, plane, ..
    } = *g;
    let start: [usize; Q] = std::array::from_fn(|j| {
        let q = q0 + j;
        (q % ck) * plane + g.offsets[q / ck]
    });
    let (dp, ep) = (dyt.as_ptr(), e.as_ptr());
    // SAFETY: dyt holds hw rows of o values (o0 + 16 N <= o); row q of e spans start(q) ..
    // start(q) + hw <= (q % ck + 1) plane <= e.len() (offsets[u] + hw <= plane).
    let acc = unsafe {
        let mut acc: [[__m512; N]; Q] = [[_mm512_setzero_ps(); N]; Q];
        for p in 0..hw {
            let a: [__m512; N] =
                std::array::from_fn(|n| _mm512_loadu_ps(dp.add(p * o + o0 + 16 * n)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*ep.add(start[j] + p));
                for (acc, a) in acc.iter_mut().zip(&a) {
                    *acc = _mm512_fmadd_ps(*a, b, *acc);
                }
            }
        }
        acc
    };
    // Row q = (u, r) of dW^T: its outputs o0.. are contiguous.
    for (j, acc) in acc.iter().enumerate() {
        let row = &mut dwu[(q0 + j) * o + o0..][..16 * N];
        for (d, acc) in row.chunks_exact_mut(16).zip(acc) {
            // SAFETY: __m512 and [f32; 16] have the same size, any bits are a float.
            let v: [f32; 16] = unsafe { std::mem::transmute(*acc) };
            d.iter_mut().zip(v).for_each(|(d, v)| *d += v);
        }
    }
}
