//! Micro-benchmarks of the layer engine (`cargo bench --bench nn`): one forward and backward
//! pass of the IWAE paper's encoder MLP (784-200-200-50, tanh) over 100 rows (a batch of 20
//! with k = 5 samples), on `nn::mlp` and on candle's autodiff.

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use elbo::distributions::Noise;
use elbo::nn::activation::Activation;
use elbo::nn::mlp::{MlpShape, MlpTape, mlp_backward, mlp_forward};

fn mlp_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let shape = MlpShape {
        sizes: vec![784, 200, 200, 50],
        activation: Activation::Tanh,
    };
    let rows = 100;
    let mut noise = Noise::new(0);
    let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let params = values((noise.randn(shape.parameter_count(), &dev).unwrap() * 0.05).unwrap());
    let x = values(noise.randn((rows, 784), &dev).unwrap());
    let dy = values(noise.randn((rows, 50), &dev).unwrap());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut tape = MlpTape::default();
    let mut grads = vec![0f32; params.len()];
    c.bench_function("mlp 784-200-200-50 tanh, 100 rows, nn::mlp", |b| {
        b.iter(|| {
            mlp_forward(&shape, &params, &x, rows, &mut tape, threads);
            mlp_backward(
                &shape, &params, &mut grads, &x, rows, &mut tape, &dy, None, threads,
            );
        })
    });
    let xt = Tensor::from_vec(x.clone(), (rows, 784), &dev).unwrap();
    let dyt = Tensor::from_vec(dy.clone(), (rows, 50), &dev).unwrap();
    let layers: Vec<(Var, Var)> = (0..shape.layers())
        .map(|i| {
            let (o, inp, out) = shape.layer(i);
            let w = Var::from_vec(params[o..o + out * inp].to_vec(), (out, inp), &dev).unwrap();
            let b = Var::from_vec(
                params[o + out * inp..o + out * (inp + 1)].to_vec(),
                out,
                &dev,
            )
            .unwrap();
            (w, b)
        })
        .collect();
    c.bench_function("mlp 784-200-200-50 tanh, 100 rows, candle autodiff", |b| {
        b.iter(|| {
            let mut h = xt.clone();
            for (i, (w, bias)) in layers.iter().enumerate() {
                h = h
                    .matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(bias.as_tensor())
                    .unwrap();
                if i + 1 < layers.len() {
                    h = h.tanh().unwrap();
                }
            }
            (h * &dyt).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
}

criterion_group!(benches, mlp_step);
criterion_main!(benches);
