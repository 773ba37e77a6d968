//! The layer engine's layers against candle's autodiff and central finite differences: each
//! layer's forward output and the gradients of a random linear functional L = sum(w * y) with
//! respect to its inputs and parameters.

use candle_core::{Device, Tensor, Var};
use elbo::distributions::Noise;
use elbo::nn::activation::Activation;
use elbo::nn::linear::{linear_backward, linear_forward};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// candle's version of each activation (composed where candle has no op of its own).
fn candle_activation(a: Activation, x: &Tensor) -> Tensor {
    match a {
        Activation::Relu => x.relu().unwrap(),
        Activation::Tanh => x.tanh().unwrap(),
        // softplus(x) = ln(1 + e^x), fine for the |x| < 4 used here.
        Activation::Softplus => (x.exp().unwrap() + 1.0).unwrap().log().unwrap(),
        Activation::Elu => x.elu(1.0).unwrap(),
        Activation::Sigmoid => candle_nn::ops::sigmoid(x).unwrap(),
        Activation::Silu => x.silu().unwrap(),
    }
}

/// Forward and backward of every activation against candle's autodiff (to float rounding),
/// and the backward against central differences of the engine's own forward.
#[test]
fn activations_match_candle_autodiff_and_finite_differences() {
    let dev = Device::Cpu;
    let mut noise = Noise::new(3);
    let n = 257;
    // x in (-4, 4), kept away from ReLU's and ELU's kink at 0 for the finite differences.
    let x: Vec<f32> = values(&(noise.randn(n, &dev).unwrap() * 1.5).unwrap())
        .into_iter()
        .map(|v| v.clamp(-4.0, 4.0))
        .map(|v| if v.abs() < 0.05 { v + 0.1 } else { v })
        .collect();
    let w = values(&noise.randn(n, &dev).unwrap());
    for a in Activation::ALL {
        let mut y = vec![0f32; n];
        a.forward(&x, &mut y);
        let xv = Var::from_vec(x.clone(), n, &dev).unwrap();
        let yc = candle_activation(a, xv.as_tensor());
        assert!(max_abs_diff(&y, &values(&yc)) < 1e-5, "{a:?} forward");
        let wt = Tensor::from_vec(w.clone(), n, &dev).unwrap();
        let loss = (yc * wt).unwrap().sum_all().unwrap();
        let want = values(loss.backward().unwrap().get(xv.as_tensor()).unwrap());
        let mut g = w.clone();
        a.backward(&mut g, &x, &y);
        assert!(max_abs_diff(&g, &want) < 1e-5, "{a:?} backward vs candle");
        // Central differences of L = sum(w * f(x)) in each coordinate.
        let h = 1e-2f32;
        for i in (0..n).step_by(16) {
            let f = |v: f32| {
                let mut out = [0f32];
                a.forward(&[v], &mut out);
                out[0] as f64
            };
            let fd = (f(x[i] + h) - f(x[i] - h)) / (2.0 * h as f64) * w[i] as f64;
            let tol = 2e-3 * (1.0 + fd.abs());
            assert!(
                (g[i] as f64 - fd).abs() < tol,
                "{a:?} at x = {}: {} vs {fd}",
                x[i],
                g[i]
            );
        }
    }
}

/// The linear layer `y = a W^T + b` and its gradients dW, db, da against candle's autodiff and
/// central differences, single- and multi-threaded.
#[test]
fn linear_matches_candle_autodiff_and_finite_differences() {
    let dev = Device::Cpu;
    let mut noise = Noise::new(11);
    let (rows, inp, out) = (7, 13, 5);
    let a = values(&noise.randn((rows, inp), &dev).unwrap());
    let w = values(&noise.randn((out, inp), &dev).unwrap());
    let b = values(&noise.randn(out, &dev).unwrap());
    let gw = values(&noise.randn((rows, out), &dev).unwrap());
    let av = Var::from_vec(a.clone(), (rows, inp), &dev).unwrap();
    let wv = Var::from_vec(w.clone(), (out, inp), &dev).unwrap();
    let bv = Var::from_vec(b.clone(), out, &dev).unwrap();
    let yc = av
        .as_tensor()
        .matmul(&wv.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(bv.as_tensor())
        .unwrap();
    let loss = (&yc * Tensor::from_vec(gw.clone(), (rows, out), &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| values(grads.get(v.as_tensor()).unwrap());
    for threads in [1, 2] {
        let mut y = Vec::new();
        linear_forward(&mut y, &a, &w, &b, (rows, inp, out), threads);
        assert!(max_abs_diff(&y, &values(&yc)) < 1e-5, "forward");
        let mut grad_wb = vec![0f32; out * inp + out];
        let mut da = Vec::new();
        linear_backward(
            &mut grad_wb,
            &w,
            &gw,
            &a,
            (rows, inp, out),
            Some(&mut da),
            threads,
        );
        assert!(max_abs_diff(&grad_wb[..out * inp], &grad(&wv)) < 1e-4, "dW");
        assert!(max_abs_diff(&grad_wb[out * inp..], &grad(&bv)) < 1e-4, "db");
        assert!(max_abs_diff(&da, &grad(&av)) < 1e-4, "da");
        // Central differences of L in a few weights (L is linear in W: exact up to rounding).
        let loss_at = |w: &[f32]| {
            let mut y = Vec::new();
            linear_forward(&mut y, &a, w, &b, (rows, inp, out), 1);
            y.iter().zip(&gw).map(|(y, g)| (y * g) as f64).sum::<f64>()
        };
        for i in [0, 17, out * inp - 1] {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[i] += 1e-2;
            down[i] -= 1e-2;
            let fd = (loss_at(&up) - loss_at(&down)) / 2e-2;
            assert!(
                (grad_wb[i] as f64 - fd).abs() < 1e-2,
                "dW[{i}]: {} vs {fd}",
                grad_wb[i]
            );
        }
    }
}

/// MLPs of several depths, widths and activations against the same network composed of candle
/// ops: the output, every parameter's gradient and dL/dx.
#[test]
fn mlp_matches_candle_autodiff() {
    use elbo::nn::mlp::{MlpShape, MlpTape, mlp_backward, mlp_forward};
    let dev = Device::Cpu;
    let shapes = [
        (vec![784, 200, 200, 50], Activation::Tanh),
        (vec![50, 100, 100, 100], Activation::Softplus),
        (vec![9, 16, 3], Activation::Relu),
        (vec![6, 8, 8, 8, 4], Activation::Elu),
        (vec![5, 7, 2], Activation::Silu),
        (vec![4, 3], Activation::Sigmoid),
    ];
    for (sizes, activation) in shapes {
        let shape = MlpShape { sizes, activation };
        let mut noise = Noise::new(5);
        let rows = 6;
        let params = values(&(noise.randn(shape.parameter_count(), &dev).unwrap() * 0.3).unwrap());
        let x = values(&noise.randn((rows, shape.sizes[0]), &dev).unwrap());
        let out = *shape.sizes.last().unwrap();
        let w = values(&noise.randn((rows, out), &dev).unwrap());
        let mut tape = MlpTape::default();
        let y = mlp_forward(&shape, &params, &x, rows, &mut tape, 2).to_vec();
        let mut grads = vec![0f32; params.len()];
        let mut dx = Vec::new();
        mlp_backward(
            &shape,
            &params,
            &mut grads,
            &x,
            rows,
            &mut tape,
            &w,
            Some(&mut dx),
            2,
        );

        // The same network in candle.
        let xv = Var::from_vec(x.clone(), (rows, shape.sizes[0]), &dev).unwrap();
        let mut vars = Vec::new();
        let mut h = xv.as_tensor().clone();
        for i in 0..shape.layers() {
            let (offset, inp, o) = shape.layer(i);
            let wv =
                Var::from_vec(params[offset..offset + o * inp].to_vec(), (o, inp), &dev).unwrap();
            let bv = Var::from_vec(
                params[offset + o * inp..offset + o * (inp + 1)].to_vec(),
                o,
                &dev,
            )
            .unwrap();
            let a = h
                .matmul(&wv.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(bv.as_tensor())
                .unwrap();
            h = if i + 1 < shape.layers() {
                candle_activation(activation, &a)
            } else {
                a
            };
            vars.push((wv, bv));
        }
        let scale = values(&h).iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        assert!(
            max_abs_diff(&y, &values(&h)) < 1e-4 * scale,
            "{activation:?} output"
        );
        let loss = (&h * Tensor::from_vec(w.clone(), (rows, out), &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let close = |got: &[f32], want: &Tensor, what: &str| {
            let want = values(want);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let err = max_abs_diff(got, &want);
            assert!(
                err < 1e-3 * scale,
                "{activation:?} {what}: {err:e} (scale {scale:e})"
            );
        };
        for (i, (wv, bv)) in vars.iter().enumerate() {
            let (offset, inp, o) = shape.layer(i);
            close(
                &grads[offset..offset + o * inp],
                g.get(wv.as_tensor()).unwrap(),
                "dW",
            );
            close(
                &grads[offset + o * inp..offset + o * (inp + 1)],
                g.get(bv.as_tensor()).unwrap(),
                "db",
            );
        }
        close(&dx, g.get(xv.as_tensor()).unwrap(), "dx");
    }
}

/// Convolutions of several geometries (kernels 1, 3, 4, 5; strides 1 and 2; paddings 0-2;
/// odd and even sizes) and transposed convolutions (the VAE decoder's 4x4 stride-2 doubling,
/// and others), one example at a time: output, dW, db and dx against candle's `conv2d` /
/// `conv_transpose2d` and autodiff, and dx against central differences of the loss in a few
/// inputs. L = sum(g * y) with a random g.
#[test]
fn convolutions_match_candle_autodiff_and_finite_differences() {
    use elbo::nn::conv::{
        ConvScratch, Geometry, conv_transpose2d_backward, conv_transpose2d_forward,
        conv2d_backward, conv2d_forward,
    };
    let dev = Device::Cpu;
    let mut noise = Noise::new(5);
    // (C_in, C_out, H, W, k, stride, padding)
    let cases = [
        (3, 4, 8, 8, 3, 1, 1),
        (2, 5, 7, 9, 3, 2, 1),
        (4, 3, 8, 8, 4, 2, 1),
        (1, 2, 6, 5, 1, 1, 0),
        (2, 2, 9, 9, 5, 2, 2),
        (3, 2, 6, 6, 3, 1, 0),
    ];
    for (transposed, name) in [(false, "conv2d"), (true, "conv_transpose2d")] {
        for &(ci, co, h, w, k, s, p) in &cases {
            let what = format!("{name} C {ci}->{co}, {h}x{w}, k {k}, stride {s}, padding {p}");
            // The convolution's geometry maps [h, w] to [oh, ow]; a transposed one runs it
            // backwards, from [oh, ow] (its input) to [h, w] (its output).
            let g = Geometry {
                k,
                stride: s,
                padding: p,
                h,
                w,
            };
            let (oh, ow) = g.output();
            let (x_shape, y_shape, w_shape) = if transposed {
                ((ci, oh, ow), (co, h, w), (ci, co, k, k))
            } else {
                ((ci, h, w), (co, oh, ow), (co, ci, k, k))
            };
            let x = values(&noise.randn(x_shape, &dev).unwrap());
            let wt = values(&noise.randn(w_shape, &dev).unwrap());
            let b = values(&noise.randn(co, &dev).unwrap());
            let gy = values(&noise.randn(y_shape, &dev).unwrap());
            let xv = Var::from_vec(x.clone(), (1, x_shape.0, x_shape.1, x_shape.2), &dev).unwrap();
            let wv = Var::from_vec(wt.clone(), w_shape, &dev).unwrap();
            let bv = Var::from_vec(b.clone(), co, &dev).unwrap();
            let yc = if transposed {
                xv.as_tensor()
                    .conv_transpose2d(wv.as_tensor(), p, 0, s, 1)
                    .unwrap()
            } else {
                xv.as_tensor().conv2d(wv.as_tensor(), p, s, 1, 1).unwrap()
            };
            let yc = yc
                .broadcast_add(&bv.as_tensor().reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(
                yc.dims()[1..],
                [y_shape.0, y_shape.1, y_shape.2],
                "{what}: shape"
            );
            let gt = Tensor::from_vec(gy.clone(), yc.shape(), &dev).unwrap();
            let grads = (&yc * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| values(grads.get(v.as_tensor()).unwrap());

            let mut scratch = ConvScratch::default();
            let forward = |x: &[f32], scratch: &mut ConvScratch| {
                let mut y = vec![0f32; gy.len()];
                if transposed {
                    conv_transpose2d_forward(&mut y, x, &wt, &b, g, (ci, co), scratch);
                } else {
                    conv2d_forward(&mut y, x, &wt, &b, g, (ci, co), scratch);
                }
                y
            };
            let y = forward(&x, &mut scratch);
            assert!(max_abs_diff(&y, &values(&yc)) < 1e-4, "{what}: forward");
            let (mut dw, mut db, mut dx) =
                (vec![0f32; wt.len()], vec![0f32; co], vec![0f32; x.len()]);
            if transposed {
                conv_transpose2d_backward(
                    &mut dw,
                    &mut db,
                    Some(&mut dx),
                    &x,
                    &wt,
                    &gy,
                    g,
                    (ci, co),
                    &mut scratch,
                );
            } else {
                conv2d_backward(
                    &mut dw,
                    &mut db,
                    Some(&mut dx),
                    &x,
                    &wt,
                    &gy,
                    g,
                    (ci, co),
                    &mut scratch,
                );
            }
            assert!(max_abs_diff(&dw, &grad(&wv)) < 1e-3, "{what}: dW");
            assert!(max_abs_diff(&db, &grad(&bv)) < 1e-3, "{what}: db");
            assert!(max_abs_diff(&dx, &grad(&xv)) < 1e-3, "{what}: dx");
            // L is linear in x: central differences are exact up to rounding.
            let loss = |x: &[f32], scratch: &mut ConvScratch| -> f64 {
                forward(x, scratch)
                    .iter()
                    .zip(&gy)
                    .map(|(y, g)| (y * g) as f64)
                    .sum()
            };
            for i in [0, x.len() / 2, x.len() - 1] {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += 1e-2;
                down[i] -= 1e-2;
                let fd = (loss(&up, &mut scratch) - loss(&down, &mut scratch)) / 2e-2;
                assert!(
                    (dx[i] as f64 - fd).abs() < 1e-2,
                    "{what}: dx[{i}] {} vs {fd}",
                    dx[i]
                );
            }
        }
    }
}

/// A deliberate mistake is caught: a convolution backward pass that forgets the border (the
/// kernel offsets that overhang the image: dx of the first and last rows) differs from
/// candle's dx by far more than the tolerance above.
#[test]
fn a_convolution_backward_without_its_border_is_caught() {
    use elbo::nn::conv::{ConvScratch, Geometry, conv2d_backward};
    let dev = Device::Cpu;
    let mut noise = Noise::new(8);
    let g = Geometry {
        k: 3,
        stride: 1,
        padding: 1,
        h: 6,
        w: 6,
    };
    let x = values(&noise.randn((2, 6, 6), &dev).unwrap());
    let wt = values(&noise.randn((3, 2, 3, 3), &dev).unwrap());
    let gy = values(&noise.randn((3, 6, 6), &dev).unwrap());
    let (mut dw, mut db, mut dx) = (vec![0f32; wt.len()], vec![0f32; 3], vec![0f32; x.len()]);
    conv2d_backward(
        &mut dw,
        &mut db,
        Some(&mut dx),
        &x,
        &wt,
        &gy,
        g,
        (2, 3),
        &mut ConvScratch::default(),
    );
    let xv = Var::from_vec(x.clone(), (1, 2, 6, 6), &dev).unwrap();
    let wv = Tensor::from_vec(wt.clone(), (3, 2, 3, 3), &dev).unwrap();
    let y = xv.as_tensor().conv2d(&wv, 1, 1, 1, 1).unwrap();
    let gt = Tensor::from_vec(gy, y.shape(), &dev).unwrap();
    let want = values(
        grads_of(&(&y * &gt).unwrap().sum_all().unwrap(), &xv)
            .as_ref()
            .unwrap(),
    );
    assert!(max_abs_diff(&dx, &want) < 1e-3);
    // The mutation: the border rows of each channel's dx left at zero.
    let mut broken = dx.clone();
    for c in 0..2 {
        for j in 0..6 {
            broken[c * 36 + j] = 0.0;
            broken[c * 36 + 30 + j] = 0.0;
        }
    }
    assert!(
        max_abs_diff(&broken, &want) > 1e-1,
        "the mutation went unnoticed"
    );
}

fn grads_of(loss: &Tensor, v: &Var) -> Option<Tensor> {
    loss.backward().unwrap().get(v.as_tensor()).cloned()
}

/// Group normalisation, with and without the SiLU after it, one (example, group) at a time:
/// output, dx, dgamma, dbeta against candle's autodiff of the textbook composition (mean,
/// biased variance, normalise, scale and shift, SiLU), and dx against central differences.
#[test]
fn group_norm_matches_candle_autodiff_and_finite_differences() {
    use elbo::nn::group_norm::{group_backward, group_forward};
    let dev = Device::Cpu;
    let mut noise = Noise::new(21);
    let (c, groups, hw, eps) = (6, 3, 20, 1e-5);
    let cg = c / groups;
    for with_silu in [false, true] {
        // Values away from zero mean, so the variance's cancellation is exercised too.
        let x: Vec<f32> = values(&noise.randn((c, hw), &dev).unwrap())
            .iter()
            .map(|v| 3.0 + 2.0 * v)
            .collect();
        let gamma = values(&noise.randn(c, &dev).unwrap());
        let beta = values(&noise.randn(c, &dev).unwrap());
        let gy = values(&noise.randn((c, hw), &dev).unwrap());
        let xv = Var::from_vec(x.clone(), (groups, cg * hw), &dev).unwrap();
        let gv = Var::from_vec(gamma.clone(), (c, 1), &dev).unwrap();
        let bv = Var::from_vec(beta.clone(), (c, 1), &dev).unwrap();
        let xt = xv.as_tensor();
        let mean = xt.mean_keepdim(1).unwrap();
        let centred = xt.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(1).unwrap();
        let x_hat = centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((c, hw))
            .unwrap();
        let a = x_hat
            .broadcast_mul(gv.as_tensor())
            .unwrap()
            .broadcast_add(bv.as_tensor())
            .unwrap();
        let y = if with_silu { a.silu().unwrap() } else { a };
        let gt = Tensor::from_vec(gy.clone(), (c, hw), &dev).unwrap();
        let grads = (&y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| values(grads.get(v.as_tensor()).unwrap());

        let forward = |x: &[f32]| -> (Vec<f32>, Vec<f32>, Vec<(f32, f32)>) {
            let (mut out, mut sig) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            let mut stats = Vec::new();
            for g in 0..groups {
                let r = g * cg * hw..(g + 1) * cg * hw;
                let ch = g * cg..(g + 1) * cg;
                stats.push(group_forward(
                    &mut out[r.clone()],
                    &mut sig[r.clone()],
                    &x[r],
                    &gamma[ch.clone()],
                    &beta[ch],
                    hw,
                    eps,
                    with_silu,
                ));
            }
            (out, sig, stats)
        };
        let (out, sig, stats) = forward(&x);
        let what = if with_silu {
            "group norm + SiLU"
        } else {
            "group norm"
        };
        assert!(max_abs_diff(&out, &values(&y)) < 1e-4, "{what}: forward");
        let (mut dx, mut dgamma, mut dbeta) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
        let mut scratch = vec![0f32; cg * hw];
        for (g, &st) in stats.iter().enumerate() {
            let r = g * cg * hw..(g + 1) * cg * hw;
            let ch = g * cg..(g + 1) * cg;
            group_backward(
                &mut dx[r.clone()],
                &mut dgamma[ch.clone()],
                &mut dbeta[ch.clone()],
                &gy[r.clone()],
                &sig[r.clone()],
                &x[r],
                st,
                (&gamma[ch.clone()], &beta[ch]),
                hw,
                with_silu,
                &mut scratch,
            );
        }
        assert!(max_abs_diff(&dx, &grad(&xv)) < 1e-3, "{what}: dx");
        assert!(max_abs_diff(&dgamma, &grad(&gv)) < 1e-3, "{what}: dgamma");
        assert!(max_abs_diff(&dbeta, &grad(&bv)) < 1e-3, "{what}: dbeta");
        let loss = |x: &[f32]| -> f64 {
            forward(x)
                .0
                .iter()
                .zip(&gy)
                .map(|(y, g)| (y * g) as f64)
                .sum()
        };
        for i in [0, 37, x.len() - 1] {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += 1e-2;
            down[i] -= 1e-2;
            let fd = (loss(&up) - loss(&down)) / 2e-2;
            assert!(
                (dx[i] as f64 - fd).abs() < 2e-2,
                "{what}: dx[{i}] {} vs {fd}",
                dx[i]
            );
        }
    }
}

/// The direct 3x3 stride-1 "same" convolution (cross-correlation, as PyTorch's), in f64:
/// `x` `[C, H, W]`, `w` `[O, C, 3, 3]` -> `[O, H, W]`.
fn direct_conv3x3(
    x: &[f32],
    w: &[f32],
    (o, c): (usize, usize),
    (h, wd): (usize, usize),
) -> Vec<f64> {
    let mut y = vec![0f64; o * h * wd];
    for oi in 0..o {
        for ci in 0..c {
            for yy in 0..h {
                for zz in 0..wd {
                    let mut acc = 0f64;
                    for u in 0..3 {
                        for v in 0..3 {
                            let (sy, sz) =
                                (yy as isize + u as isize - 1, zz as isize + v as isize - 1);
                            if sy < 0 || sz < 0 || sy >= h as isize || sz >= wd as isize {
                                continue;
                            }
                            let xv = x[ci * h * wd + sy as usize * wd + sz as usize] as f64;
                            acc += xv * w[((oi * c + ci) * 3 + u) * 3 + v] as f64;
                        }
                    }
                    y[oi * h * wd + yy * wd + zz] += acc;
                }
            }
        }
    }
    y
}

/// Winograd F(2x2, 3x3) (`nn::winograd`) against the direct convolution in f64, for the
/// channel counts and sizes of the networks (1 and 3 channels, 16 to 64, 28 x 28 to 7 x 7 and
/// CIFAR's 32 x 32) and odd sizes whose last tiles overhang the plane: forward, the input
/// gradient (the same kernel on the flipped, transposed weights) and the weight gradient
/// (G^T (sum dM V^T) G), each within a stated float32 error. A planted mistake in any
/// transform moves them by O(1).
#[test]
fn winograd_convolution_matches_the_direct_one() {
    use elbo::nn::winograd::{
        Scratch, conv3x3, filter_gradient, filter_products, tiles, transform_filter,
        transform_input, transform_output_gradient,
    };
    let mut noise = Noise::new(21);
    let mut randn = |n: usize| -> Vec<f32> { values(&noise.randn(n, &Device::Cpu).unwrap()) };
    for (o, c, h, w) in [
        (1, 1, 5, 7),
        (3, 1, 1, 1),
        (2, 3, 9, 4),
        (16, 3, 28, 28),
        (32, 16, 14, 14),
        (64, 32, 7, 7),
        (16, 64, 32, 32),
    ] {
        let (x, wt, dy) = (randn(c * h * w), randn(o * c * 9), randn(o * h * w));
        let mut s = Scratch::default();
        // Forward.
        let mut u = vec![0f32; 16 * o * c];
        transform_filter(&wt, (o, c), &mut u);
        let mut y = vec![0f32; o * h * w];
        conv3x3(&mut y, &u, &x, (o, c), (h, w), false, &mut s);
        let want = direct_conv3x3(&x, &wt, (o, c), (h, w));
        let err = |got: &[f32], want: &[f64]| -> (f64, f64) {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let e = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
            (e, scale)
        };
        let (e, scale) = err(&y, &want);
        eprintln!(
            "forward {o}x{c}x{h}x{w}: {:.2e} of the largest output",
            e / scale
        );
        assert!(
            e <= 2e-6 * scale.max(1.0),
            "forward {o}x{c}x{h}x{w}: {e:e} of {scale}"
        );
        // Input gradient: the convolution of dy with W'[c, o, u, v] = W[o, c, 2-u, 2-v].
        let mut flipped = vec![0f32; c * o * 9];
        for oi in 0..o {
            for ci in 0..c {
                for k in 0..9 {
                    flipped[(ci * o + oi) * 9 + 8 - k] = wt[(oi * c + ci) * 9 + k];
                }
            }
        }
        let mut uf = vec![0f32; 16 * c * o];
        transform_filter(&flipped, (c, o), &mut uf);
        let mut dx = vec![0f32; c * h * w];
        conv3x3(&mut dx, &uf, &dy, (c, o), (h, w), false, &mut s);
        let want_dx = direct_conv3x3(&dy, &flipped, (c, o), (h, w));
        let (e, scale) = err(&dx, &want_dx);
        eprintln!("dx {o}x{c}x{h}x{w}: {:.2e} of the largest", e / scale);
        assert!(
            e <= 2e-6 * scale.max(1.0),
            "dx {o}x{c}x{h}x{w}: {e:e} of {scale}"
        );
        // Weight gradient: dW[o, c, u, v] = sum_j dy[o, j] x_shifted[c, u, v, j].
        let (th, tw) = tiles((h, w));
        let p = th * tw;
        let mut v = vec![0f32; 16 * c * p];
        transform_input(&x, c, (h, w), &mut v);
        let mut dm = vec![0f32; 16 * o * p];
        transform_output_gradient(&dy, o, (h, w), &mut dm);
        let mut du = vec![0f32; 16 * o * c];
        filter_products(&dm, &v, (o, c, p), &mut du);
        let mut dw = vec![0f32; o * c * 9];
        filter_gradient(&du, (o, c), &mut dw);
        let mut want_dw = vec![0f64; o * c * 9];
        for oi in 0..o {
            for ci in 0..c {
                for uu in 0..3 {
                    for vv in 0..3 {
                        let mut acc = 0f64;
                        for yy in 0..h {
                            for zz in 0..w {
                                let (sy, sz) =
                                    (yy as isize + uu as isize - 1, zz as isize + vv as isize - 1);
                                if sy < 0 || sz < 0 || sy >= h as isize || sz >= w as isize {
                                    continue;
                                }
                                acc += dy[oi * h * w + yy * w + zz] as f64
                                    * x[ci * h * w + sy as usize * w + sz as usize] as f64;
                            }
                        }
                        want_dw[((oi * c + ci) * 3 + uu) * 3 + vv] = acc;
                    }
                }
            }
        }
        let (e, scale) = err(&dw, &want_dw);
        eprintln!("dW {o}x{c}x{h}x{w}: {:.2e} of the largest", e / scale);
        assert!(
            e <= 4e-6 * scale.max(1.0),
            "dW {o}x{c}x{h}x{w}: {e:e} of {scale}"
        );
    }
}
