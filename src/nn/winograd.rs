//! Winograd's minimal filtering F(2x2, 3x3) for stride-1 "same" 3x3 convolutions over one
//! example `[C, H, W]` (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
//! Networks"): each 2x2 output tile is
//!
//! ```text
//! Y = A^T [ sum_c (G g_oc G^T) (.) (B^T d_c B) ] A       (.) elementwise over the 4x4 tile
//! ```
//!
//! with d_c the 4x4 input tile of channel c (starting one row and column before the output
//! tile; zeros outside the image), and
//!
//! ```text
//! B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//! A^T = [1 1 1 0; 0 1 -1 -1]
//! ```
//!
//! The sum over channels at each of the 16 tile positions is one gemm `[O, C] x [C, P]` (P
//! tiles), so the multiplications fall from 36 to 16 per tile and channel pair (2.25x). The
//! weight gradient goes through the same transforms transposed: with dM = A dY A^T per tile,
//! `dU = sum_P dM V^T` (16 gemms `[O, P] x [P, C]`) and `dW = G^T dU G`; the input gradient is
//! the convolution of dY with the flipped, transposed weights, itself F(2x2, 3x3).
//!
//! Layouts: transformed filters `U [16, O, C]`, inputs `V [C, 16, P]`, products `M [O, 16, P]`,
//! the filters' gradient transposed, `dU [16, C, O]`,
//! tiles in row-major order over `ceil(H/2) x ceil(W/2)`. The gemm of tile position k reads
//! `V[:, k, :]` and writes `M[:, k, :]` as matrices of row stride 16 P, so that a transform
//! writes (or reads) each channel's 16 P values as one block: the layout `[16, C, P]` puts the
//! 16 values of a tile C P floats apart, a multiple of 4 KiB at the networks' sizes, and its
//! writes then fall in the same cache sets (measured: the input transform 3x slower).

// The transforms index 4 x 4 tiles by row and column, as the formulas are written.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use crate::nn::planar::avx512;

/// Tiles over an `h x w` plane: (rows, columns).
pub fn tiles((h, w): (usize, usize)) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// `U = G g G^T` for every (o, c): `w` `[O, C, 3, 3]` into `u` `[16, O, C]`.
pub fn transform_filter(w: &[f32], (o, c): (usize, usize), u: &mut [f32]) {
    assert!(w.len() >= o * c * 9 && u.len() >= 16 * o * c);
    let oc = o * c;
    for (i, g) in w.chunks_exact(9).take(oc).enumerate() {
        // t = G g (4 x 3), then t G^T (4 x 4).
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for (r, row) in t.iter().enumerate() {
            let (a, b, cc) = (row[0], row[1], row[2]);
            let out = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
            for (s, v) in out.into_iter().enumerate() {
                u[(r * 4 + s) * oc + i] = v;
            }
        }
    }
}

/// `dW = G^T dU G` for every (o, c): `du` `[16, C, O]` (transposed, as [`filter_products`]
/// writes it) into `dw` `[O, C, 3, 3]` (added).
pub fn filter_gradient(du: &[f32], (o, c): (usize, usize), dw: &mut [f32]) {
    assert!(du.len() >= 16 * o * c && dw.len() >= o * c * 9);
    let oc = o * c;
    for (i, g) in dw.chunks_exact_mut(9).take(oc).enumerate() {
        let at = (i % c) * o + i / c;
        let m = |r: usize, s: usize| du[(r * 4 + s) * oc + at];
        // t = G^T m (3 x 4), then t G (3 x 3); G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1].
        let mut t = [[0f32; 4]; 3];
        for s in 0..4 {
            let (m0, m1, m2, m3) = (m(0, s), m(1, s), m(2, s), m(3, s));
            t[0][s] = m0 + 0.5 * (m1 + m2);
            t[1][s] = 0.5 * (m1 - m2);
            t[2][s] = 0.5 * (m1 + m2) + m3;
        }
        for (r, row) in t.iter().enumerate() {
            let (m0, m1, m2, m3) = (row[0], row[1], row[2], row[3]);
            g[r * 3] += m0 + 0.5 * (m1 + m2);
            g[r * 3 + 1] += 0.5 * (m1 - m2);
            g[r * 3 + 2] += 0.5 * (m1 + m2) + m3;
        }
    }
}

/// `V = B^T d B` of every tile and channel: `x` `[C, H, W]` into `v` `[C, 16, P]`. Each
/// channel is first copied into a plane with a zero border (one row and column before, enough
/// after for the last tiles), so that every tile reads without a bounds check.
pub fn transform_input(x: &[f32], c: usize, (h, w): (usize, usize), v: &mut [f32]) {
    let (th, tw) = tiles((h, w));
    let p = th * tw;
    assert!(x.len() >= c * h * w && v.len() >= 16 * c * p);
    // Padded plane: rows -1 .. 2 th + 1, columns -1 .. 2 tw + 1.
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    let mut pad = vec![0f32; ph * pw];
    for ci in 0..c {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for (y, row) in plane.chunks_exact(w).enumerate() {
            pad[(y + 1) * pw + 1..(y + 1) * pw + 1 + w].copy_from_slice(row);
        }
        let vc = &mut v[ci * 16 * p..(ci + 1) * 16 * p];
        for ty in 0..th {
            let r0 = &pad[2 * ty * pw..(2 * ty + 1) * pw];
            let r1 = &pad[(2 * ty + 1) * pw..(2 * ty + 2) * pw];
            let r2 = &pad[(2 * ty + 2) * pw..(2 * ty + 3) * pw];
            let r3 = &pad[(2 * ty + 3) * pw..(2 * ty + 4) * pw];
            for tx in 0..tw {
                // t = B^T d (columns s of the tile), then t B.
                let mut t = [[0f32; 4]; 4];
                for s in 0..4 {
                    let col = 2 * tx + s;
                    let (d0, d1, d2, d3) = (r0[col], r1[col], r2[col], r3[col]);
                    t[0][s] = d0 - d2;
                    t[1][s] = d1 + d2;
                    t[2][s] = d2 - d1;
                    t[3][s] = d1 - d3;
                }
                let at = ty * tw + tx;
                for (r, row) in t.iter().enumerate() {
                    vc[(r * 4) * p + at] = row[0] - row[2];
                    vc[(r * 4 + 1) * p + at] = row[1] + row[2];
                    vc[(r * 4 + 2) * p + at] = row[2] - row[1];
                    vc[(r * 4 + 3) * p + at] = row[1] - row[3];
                }
            }
        }
        // The border stays zero; the interior is overwritten by the next channel. A plane
        // smaller than its tiles (odd H or W) leaves its last row or column zero as well.
    }
}

/// `Y = A^T M A` of every tile: `m` `[O, 16, P]` into `y` `[O, H, W]` (the tiles' parts
/// inside the plane), added to `y` when `add`. A row of tiles at a time: its 16 slices of M
/// give two rows of output, written through even/odd buffers.
pub fn transform_output(m: &[f32], o: usize, (h, w): (usize, usize), y: &mut [f32], add: bool) {
    let (th, tw) = tiles((h, w));
    let p = th * tw;
    assert!(m.len() >= 16 * o * p && y.len() >= o * h * w);
    let mut rows = [vec![0f32; 2 * tw], vec![0f32; 2 * tw]];
    for oi in 0..o {
        let plane = &mut y[oi * h * w..(oi + 1) * h * w];
        let mo = &m[oi * 16 * p..(oi + 1) * 16 * p];
        for ty in 0..th {
            let at = ty * tw;
            let e = |k: usize| &mo[k * p + at..k * p + at + tw];
            let ek: [&[f32]; 16] = std::array::from_fn(e);
            for i in 0..tw {
                // t = A^T e (2 x 4), then t A (2 x 2).
                let mut t = [[0f32; 4]; 2];
                for s in 0..4 {
                    t[0][s] = ek[s][i] + ek[4 + s][i] + ek[8 + s][i];
                    t[1][s] = ek[4 + s][i] - ek[8 + s][i] - ek[12 + s][i];
                }
                for (r, tr) in t.iter().enumerate() {
                    rows[r][2 * i] = tr[0] + tr[1] + tr[2];
                    rows[r][2 * i + 1] = tr[1] - tr[2] - tr[3];
                }
            }
            for (r, out) in rows.iter().enumerate() {
                let yy = 2 * ty + r;
                if yy >= h {
                    break;
                }
                let dst = &mut plane[yy * w..(yy + 1) * w];
                if add {
                    dst.iter_mut().zip(out).for_each(|(d, v)| *d += v);
                } else {
                    dst.copy_from_slice(&out[..w]);
                }
            }
        }
    }
}

/// `dM = A dY A^T` of every tile (the output transform's transpose): `dy` `[O, H, W]` into
/// `dm` `[O, 16, P]` (zeros where a tile overhangs the plane).
pub fn transform_output_gradient(dy: &[f32], o: usize, (h, w): (usize, usize), dm: &mut [f32]) {
    let (th, tw) = tiles((h, w));
    let p = th * tw;
    assert!(dy.len() >= o * h * w && dm.len() >= 16 * o * p);
    for oi in 0..o {
        let plane = &dy[oi * h * w..(oi + 1) * h * w];
        let dmo = &mut dm[oi * 16 * p..(oi + 1) * 16 * p];
        for ty in 0..th {
            for tx in 0..tw {
                let g = |r: usize, s: usize| {
                    let (yy, zz) = (2 * ty + r, 2 * tx + s);
                    if yy < h && zz < w {
                        plane[yy * w + zz]
                    } else {
                        0.0
                    }
                };
                // A = [1 0; 1 1; 1 -1; 0 -1]: t = A g (4 x 2), then t A^T (4 x 4).
                let (g00, g01, g10, g11) = (g(0, 0), g(0, 1), g(1, 0), g(1, 1));
                let t = [
                    [g00, g01],
                    [g00 + g10, g01 + g11],
                    [g00 - g10, g01 - g11],
                    [-g10, -g11],
                ];
                let tile = ty * tw + tx;
                for (r, row) in t.iter().enumerate() {
                    let out = [row[0], row[0] + row[1], row[0] - row[1], -row[1]];
                    for (s, val) in out.into_iter().enumerate() {
                        dmo[(r * 4 + s) * p + tile] = val;
                    }
                }
            }
        }
    }
}

/// The 16 products of the tile positions: `m[:, k, :] = u[k] v[:, k, :]` (`[O, C] x [C, P]`).
/// With AVX-512 and O a multiple of 8, the row-product kernel of the planar convolutions
/// (`nn::planar::avx512::conv`, one kernel row, reading `v` in place); else gemms (which pack
/// both operands of every product: at the U-Nets' 16 to 64 tiles, packing weighs).
pub fn products(u: &[f32], v: &[f32], (o, c, p): (usize, usize, usize), m: &mut [f32]) {
    assert!(u.len() >= 16 * o * c && v.len() >= 16 * c * p && m.len() >= 16 * o * p);
    if o == 0 || p == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if o.is_multiple_of(avx512::CONV_ROWS) && avx512::available() {
        for k in 0..16 {
            // SAFETY: AVX-512F is there and O a multiple of 8 (checked); the assert bounds
            // every block: u[k] is [O, C] at k O C, v's rows are C of 16 P with tile position
            // k's run at k P (k P + P <= 16 P), m[:, k, :] is O rows 16 P apart from k P.
            unsafe {
                avx512::conv(
                    &mut m[k * p..],
                    &u[k * o * c..],
                    v,
                    (o, c),
                    &[k * p],
                    (p, 16 * p),
                    16 * p,
                    false,
                )
            };
        }
        return;
    }
    for k in 0..16 {
        // SAFETY: the assert bounds every block: u[k] is [O, C] at k O C (row-major), v[:, k, :]
        // the [C, P] matrix at k P of row stride 16 P, m[:, k, :] likewise [O, P].
        unsafe {
            gemm::gemm(
                o,
                p,
                c,
                m.as_mut_ptr().add(k * p),
                1,
                (16 * p) as isize,
                false,
                u.as_ptr().add(k * o * c),
                1,
                c as isize,
                v.as_ptr().add(k * p),
                1,
                (16 * p) as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// A tile position of dM transposed (`[P, O]`), for the AVX-512 weight-gradient kernel.
    static DM_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The filter gradient's 16 products, written transposed: `du[k] += v[:, k, :] dm[:, k, :]^T`
/// (`[C, P] x [P, O]`; `du` is `[16, C, O]`, the layout [`filter_gradient`] reads). With
/// AVX-512 and O a multiple of 16, the weight-gradient kernel of the planar convolutions
/// (`nn::planar::avx512::weight_grad`, one kernel row); else gemms.
pub fn filter_products(dm: &[f32], v: &[f32], (o, c, p): (usize, usize, usize), du: &mut [f32]) {
    assert!(dm.len() >= 16 * o * p && v.len() >= 16 * c * p && du.len() >= 16 * o * c);
    if o == 0 || p == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if o.is_multiple_of(16) && avx512::available() {
        DM_T.with_borrow_mut(|dmt| {
            for k in 0..16 {
                // SAFETY: AVX-512F is there and O a multiple of 16 (checked); du[k] is [C, O]
                // at k O C, dm's tile position k is O rows 16 P apart from k P, v's rows are
                // C of 16 P with position k's run at k P (k P + P <= 16 P).
                unsafe {
                    avx512::weight_grad(
                        &mut du[k * o * c..],
                        &dm[k * p..],
                        v,
                        (o, c),
                        &[k * p],
                        (p, 16 * p),
                        16 * p,
                        dmt,
                    )
                };
            }
        });
        return;
    }
    for k in 0..16 {
        // SAFETY: as in `products`; v[:, k, :]^T is read with row stride 1 and column stride
        // 16 P, du[k] written transposed (element (o, c) at c O + o).
        unsafe {
            gemm::gemm(
                o,
                c,
                p,
                du.as_mut_ptr().add(k * o * c),
                o as isize,
                1,
                true,
                dm.as_ptr().add(k * p),
                1,
                (16 * p) as isize,
                v.as_ptr().add(k * p),
                (16 * p) as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// Buffers of one Winograd convolution.
#[derive(Default)]
pub struct Scratch {
    pub v: Vec<f32>,
    pub m: Vec<f32>,
}

/// `y [O, H, W] (+)= conv3x3(x)` with the transformed filters `u` `[16, O, C]` (no bias).
pub fn conv3x3(
    y: &mut [f32],
    u: &[f32],
    x: &[f32],
    (o, c): (usize, usize),
    size: (usize, usize),
    add: bool,
    s: &mut Scratch,
) {
    let (th, tw) = tiles(size);
    let p = th * tw;
    s.v.resize(16 * c * p, 0.0);
    s.m.resize(16 * o * p, 0.0);
    transform_input(x, c, size, &mut s.v);
    products(u, &s.v, (o, c, p), &mut s.m);
    transform_output(&s.m, o, size, y, add);
}
