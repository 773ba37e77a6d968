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
