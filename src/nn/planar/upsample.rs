//! Nearest-neighbour upsampling of one example `[C, SH, SW]` to `[C, DH, DW]` (candle's and
//! PyTorch's source index), and its adjoint `dx[c, src(i), src(j)] += dy[c, i, j]`.

use super::sized;

/// candle's nearest-neighbour source index for each of `dst` positions.
pub(crate) fn nearest(src: usize, dst: usize) -> impl Iterator<Item = usize> {
    let scale = src as f64 / dst as f64;
    (0..dst).map(move |i| ((i as f64 * scale) as usize).min(src - 1))
}

/// `y [C, DH, DW]` = nearest-neighbour upsampling of `x [C, SH, SW]`.
pub(crate) fn upsample(
    x: &[f32],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    y: &mut Vec<f32>,
) {
    let c = x.len() / (sh * sw);
    sized(y, c * dh * dw);
    let cols: Vec<usize> = nearest(sw, dw).collect();
    for (plane, out) in x.chunks(sh * sw).zip(y.chunks_mut(dh * dw)) {
        for (row, sy) in out.chunks_mut(dw).zip(nearest(sh, dh)) {
            for (v, &sx) in row.iter_mut().zip(&cols) {
                *v = plane[sy * sw + sx];
            }
        }
    }
}

/// The adjoint of [`upsample`]: `dx += ` the sum of `dy` over each source pixel's copies.
pub(crate) fn upsample_backward(
    dy: &[f32],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    dx: &mut [f32],
) {
    let cols: Vec<usize> = nearest(sw, dw).collect();
    for (plane, d) in dx.chunks_mut(sh * sw).zip(dy.chunks(dh * dw)) {
        for (row, sy) in d.chunks(dw).zip(nearest(sh, dh)) {
            for (&g, &sx) in row.iter().zip(&cols) {
                plane[sy * sw + sx] += g;
            }
        }
    }
}
