//! The linear layer of the fused engines, forward and hand-derived backward, over row-major
//! f32 buffers reused from call to call, with one `gemm` call per product:
//!
//! ```text
//! forward   y  = a W^T + b          a [rows, in], W [out, in], b [out], y [rows, out]
//! backward  dW = g^T a,  db = colsum g,  da = g W       g = dL/dy [rows, out]
//! ```

use gemm::Parallelism;

use super::kernels::column_sums;

/// A strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view out of bounds");
        Self {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// Multiply-adds below which a product runs on one thread (~2 MFLOP: done before a second
/// thread has started). Measured on 2 cores: keeping the 26M-multiply-add products of batch 128
/// on one thread and giving the second core to Adam alone was no faster.
pub const GEMM_THREADING_THRESHOLD: usize = 1 << 20;

/// Threads for a product of `work` multiply-adds.
pub fn parallelism(threads: usize, work: usize) -> Parallelism {
    if threads > 1 && work >= GEMM_THREADING_THRESHOLD {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// A linear layer `y = a W^T + b`: `a` `[rows, in]`, W `[out, in]` and `b` `[out]` read from
/// the front of `w` and `bias`; `y` `[rows, out]`.
pub fn linear_forward(
    y: &mut Vec<f32>,
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    (rows, inp, out): (usize, usize, usize),
    threads: usize,
) {
    fill_rows(y, rows, &bias[..out]);
    let w = Mat::rows(&w[..out * inp], out, inp);
    let work = parallelism(threads, rows * inp * out);
    matmul(y, Mat::rows(a, rows, inp), w.t(), true, work);
}

/// Backward of a linear layer `y = a W^T + b` (W `[out, in]`, a `[rows, in]`) given
/// g = dL/dy `[rows, out]`: writes `dW = g^T a` and `db = colsum g` into `grad_wb` (the layer's
/// weight gradient followed by its bias gradient, as the flat layout stores them) and, when
/// asked, `da = g W` `[rows, in]`.
pub fn linear_backward(
    grad_wb: &mut [f32],
    w: &[f32],
    g: &[f32],
    a: &[f32],
    (rows, inp, out): (usize, usize, usize),
    da: Option<&mut Vec<f32>>,
    threads: usize,
) {
    let (grad_w, grad_b) = grad_wb.split_at_mut(out * inp);
    let gm = Mat::rows(g, rows, out);
    let work = parallelism(threads, rows * inp * out);
    matmul(grad_w, gm.t(), Mat::rows(a, rows, inp), false, work);
    column_sums(g, out, grad_b);
    if let Some(da) = da {
        matmul(
            sized(da, rows * inp),
            gm,
            Mat::rows(w, out, inp),
            false,
            work,
        );
    }
}

/// `v` resized to `n` values (contents unspecified), as a slice.
pub fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    v
}

/// `dst [m, n] (row-major) = a [m, k] b [k, n]`, or `dst += a b` with `accumulate`.
pub fn matmul(dst: &mut [f32], a: Mat, b: Mat, accumulate: bool, par: Parallelism) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(dst.len(), m * n, "matmul: destination has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: the views were checked to lie inside their slices (`Mat::rows`; a transpose
    // keeps the extent), `dst` holds m * n values and is borrowed mutably only here.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

pub fn fill_rows(dst: &mut Vec<f32>, rows: usize, bias: &[f32]) {
    dst.clear();
    for _ in 0..rows {
        dst.extend_from_slice(bias);
    }
}
