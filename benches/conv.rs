//! 3x3 stride-1 convolutions of one example at the U-Nets' sizes (`cargo bench --bench conv`):
//! the row-shift product as gemms and as the engine runs it (`nn::planar::conv`: the AVX-512
//! kernel where the CPU has it; 9 multiply-adds per output and input channel pair) against
//! Winograd F(2x2, 3x3) (`nn::winograd`, 4), forward pass only,
//! the filters transformed beforehand (once per step in the engine); and a batch's products
//! per example (the engine's way) against one batch-wide product ([`batch_wide`]).

use criterion::{Criterion, criterion_group, criterion_main};
use elbo::nn::planar::conv::{gemm_shifted_conv, shifted_conv, shifted_rows};
use elbo::nn::winograd::{Scratch, conv3x3, transform_filter};

fn conv(c: &mut Criterion) {
    for (o, ch, h, w) in [
        (16, 16, 28, 28),
        (32, 32, 32, 32),
        (32, 32, 14, 14),
        (32, 32, 7, 7),
        (64, 64, 16, 16),
        (64, 64, 8, 8),
        (128, 128, 32, 32),
        (256, 256, 16, 16),
        (256, 256, 8, 8),
    ] {
        let x: Vec<f32> = (0..ch * h * w)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let wt: Vec<f32> = (0..o * ch * 9)
            .map(|i| ((i * 104729) % 11) as f32 * 0.02 - 0.1)
            .collect();
        // W_u[o, c 3 + v] = W[o, c, u, v], the row-shift layout.
        let mut wu = vec![0f32; 3 * o * ch * 3];
        for oi in 0..o {
            for ci in 0..ch {
                for u in 0..3 {
                    for v in 0..3 {
                        wu[u * o * ch * 3 + oi * ch * 3 + ci * 3 + v] =
                            wt[((oi * ch + ci) * 3 + u) * 3 + v];
                    }
                }
            }
        }
        let mut e = vec![0f32; ch * 3 * (h + 2) * w];
        let mut y = vec![0f32; o * h * w];
        c.bench_function(&format!("conv3x3 {o}x{ch} {h}x{w}: row-shift gemms"), |b| {
            b.iter(|| {
                shifted_rows(&x, ch, (h, w), 3, &mut e);
                gemm_shifted_conv(&mut y, &wu, &e, (o, ch * 3, 3), (h, w), false);
            })
        });
        c.bench_function(
            &format!("conv3x3 {o}x{ch} {h}x{w}: row-shift engine"),
            |b| {
                b.iter(|| {
                    shifted_rows(&x, ch, (h, w), 3, &mut e);
                    shifted_conv(&mut y, &wu, &e, (o, ch * 3, 3), (h, w), false);
                })
            },
        );
        let mut u = vec![0f32; 16 * o * ch];
        transform_filter(&wt, (o, ch), &mut u);
        let mut s = Scratch::default();
        c.bench_function(
            &format!("conv3x3 {o}x{ch} {h}x{w}: winograd F(2x2, 3x3)"),
            |b| b.iter(|| conv3x3(&mut y, &u, &x, (o, ch), (h, w), false, &mut s)),
        );
    }
}

/// Winograd's parts at DDPM's CIFAR-10 widths (64 and 128 channels): the input transform,
/// the 16 gemms and the output transform.
fn winograd_parts(c: &mut Criterion) {
    use elbo::nn::winograd::{products, tiles, transform_input, transform_output};
    for (o, ch, h, w) in [(64, 64, 16, 16), (128, 128, 32, 32)] {
        let (th, tw) = tiles((h, w));
        let p = th * tw;
        let x: Vec<f32> = (0..ch * h * w)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let u: Vec<f32> = (0..16 * o * ch)
            .map(|i| ((i * 104729) % 11) as f32 * 0.02 - 0.1)
            .collect();
        let mut v = vec![0f32; 16 * ch * p];
        let mut m = vec![0f32; 16 * o * p];
        let mut y = vec![0f32; o * h * w];
        c.bench_function(
            &format!("winograd {o}x{ch} {h}x{w}: input transform"),
            |b| b.iter(|| transform_input(&x, ch, (h, w), &mut v)),
        );
        c.bench_function(&format!("winograd {o}x{ch} {h}x{w}: 16 gemms"), |b| {
            b.iter(|| products(&u, &v, (o, ch, p), &mut m))
        });
        c.bench_function(
            &format!("winograd {o}x{ch} {h}x{w}: output transform"),
            |b| b.iter(|| transform_output(&m, o, (h, w), &mut y, false)),
        );
    }
}

/// The row-shift products of a whole batch (`cargo bench --bench conv -- batch`), on both
/// threads: the engine's way, each thread taking whole examples (`[O, 3C] x [3C, H W]`, three
/// shifts each), against one batch-wide product per shift whose N dimension is every
/// example's padded plane laid side by side (`[O, 3C] x [3C, B (H + 2) W]`; the 2W columns
/// where a shift crosses from one example into the next are computed and thrown away).
/// Products only: the shifted rows are built beforehand in both layouts.
fn batch_wide(c: &mut Criterion) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    for (o, ch, h, w) in [
        (16, 16, 28, 28),
        (32, 32, 14, 14),
        (32, 64, 32, 32),
        (64, 64, 16, 16),
    ] {
        let batch = 64;
        let (ck, plane, hw) = (3 * ch, (h + 2) * w, h * w);
        let wu: Vec<f32> = (0..3 * o * ck)
            .map(|i| ((i * 104729) % 11) as f32 * 0.02 - 0.1)
            .collect();
        let e: Vec<f32> = (0..ck * plane)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut ys = vec![vec![0f32; o * hw]; batch];
        c.bench_function(
            &format!("batch {batch} conv3x3 {o}x{ch} {h}x{w}: per-example products"),
            |b| {
                b.iter(|| {
                    ys.par_iter_mut()
                        .for_each(|y| shifted_conv(y, &wu, &e, (o, ck, 3), (h, w), false))
                })
            },
        );
        let cols = batch * plane;
        let n = cols - 2 * w;
        let e_all: Vec<f32> = (0..ck * cols)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut y_all = vec![0f32; o * n];
        c.bench_function(
            &format!("batch {batch} conv3x3 {o}x{ch} {h}x{w}: batch-wide products"),
            |b| {
                b.iter(|| {
                    for u in 0..3 {
                        // SAFETY: row r of the u-th shift spans r cols + u w .. r cols + u w +
                        // n <= (r + 1) cols; y_all holds o n values, wu 3 o ck.
                        unsafe {
                            gemm::gemm(
                                o,
                                n,
                                ck,
                                y_all.as_mut_ptr(),
                                1,
                                n as isize,
                                u > 0,
                                wu.as_ptr().add(u * o * ck),
                                1,
                                ck as isize,
                                e_all.as_ptr().add(u * w),
                                1,
                                cols as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::Rayon(threads),
                            );
                        }
                    }
                })
            },
        );
    }
}

/// The weight gradient of a 3x3 convolution of one example from its shifted rows
/// (`cargo bench --bench conv -- weight`): three gemms `dW_u += dy e_u^T` against the
/// engine's kernel from 512 pixels up (AVX-512, else AVX2 dot products).
fn weight_grad(c: &mut Criterion) {
    use elbo::nn::planar::conv::{gemm_weight_grad, shifted_weight_grad};
    for (o, ch, h, w) in [
        (16, 16, 28, 28),
        (16, 32, 28, 28),
        (32, 32, 32, 32),
        (32, 32, 14, 14),
        (32, 32, 7, 7),
    ] {
        let (ck, plane) = (3 * ch, (h + 2) * w);
        let dy: Vec<f32> = (0..o * h * w)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1)
            .collect();
        let e: Vec<f32> = (0..ck * plane)
            .map(|i| ((i * 104729) % 11) as f32 * 0.1)
            .collect();
        let mut dw = vec![0f32; 3 * o * ck];
        c.bench_function(&format!("weight grad {o}x{ch} {h}x{w}: gemms"), |b| {
            b.iter(|| gemm_weight_grad(&mut dw, &dy, &e, (o, ch, 3), (h, w)))
        });
        c.bench_function(&format!("weight grad {o}x{ch} {h}x{w}: engine"), |b| {
            b.iter(|| shifted_weight_grad(&mut dw, &dy, &e, (o, ch, 3), (h, w)))
        });
    }
}

criterion_group!(benches, conv, winograd_parts, batch_wide, weight_grad);
criterion_main!(benches);
