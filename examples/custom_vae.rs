//! A VAE elbo does not ship (a convolutional encoder, an MLP decoder) made of candle modules:
//! implementing `LatentVariableModel` gives it elbo's IWAE bound to train on and the
//! importance-sampled log p(x) to evaluate with. `cargo run --release --example custom_vae -- 600`
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation::Relu, Conv2dConfig, Optimizer, Sequential, VarBuilder, VarMap};
use candle_nn::{conv2d, linear, seq};
use elbo::data::{Named, PixelMode, Source, Split};
use elbo::distributions::{DiagGaussian, Noise, bernoulli_log_prob_logits};
use elbo::vae::objective::{LatentVariableModel, estimate_log_likelihood_candle, iwae_bound};
use rand::SeedableRng;

struct ConvVae {
    encoder: Sequential,
    decoder: Sequential,
    device: Device,
}

impl LatentVariableModel for ConvVae {
    fn latent_dims(&self) -> Vec<usize> {
        vec![16]
    }
    fn device(&self) -> &Device {
        &self.device
    }
    /// q(z|x): the encoder's 32 outputs are the mean and log-variance of z (16 each).
    fn encode_layer(&self, _: usize, x: &Tensor) -> Result<DiagGaussian> {
        let out = self.encoder.forward(&x.reshape(((), 1, 28, 28))?)?;
        Ok(DiagGaussian::new(
            out.narrow(1, 0, 16)?,
            out.narrow(1, 16, 16)?,
        )?)
    }
    /// log p(x|z) with Bernoulli pixels; `z` `[K, B, 16]`.
    fn log_px_given_z(&self, x: &Tensor, z: &Tensor) -> Result<Tensor> {
        Ok(bernoulli_log_prob_logits(x, &self.decoder.forward(z)?)?)
    }
}

/// Trains for `steps` steps of IWAE_5 at batch 64 on the built-in digits; returns the test
/// -ELBO and NLL (log p(x) with K = 500) of 200 digits.
pub fn run(steps: usize) -> Result<(f64, f64)> {
    let (device, vars) = (Device::Cpu, VarMap::new());
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let c = Conv2dConfig {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    // 1x28x28 -> 16x14x14 -> 32x7x7 (stride-2 3x3 convolutions) -> 32; 16 -> 256 -> 784 logits.
    let model = ConvVae {
        encoder: seq()
            .add(conv2d(1, 16, 3, c, vb.pp("c0"))?)
            .add(Relu)
            .add(conv2d(16, 32, 3, c, vb.pp("c1"))?)
            .add(Relu)
            .add_fn(|h| h.flatten_from(1))
            .add(linear(32 * 49, 32, vb.pp("heads"))?),
        decoder: seq()
            .add(linear(16, 256, vb.pp("d0"))?)
            .add(Relu)
            .add(linear(256, 784, vb.pp("d1"))?),
        device: device.clone(),
    };
    let mut adam = candle_nn::AdamW::new_lr(vars.all_vars(), 1e-3)?;
    let (train, test) = (
        Source::Named(Named::Mnist10k).load(Split::Train)?,
        Source::Named(Named::Mnist10k).load(Split::Test)?,
    );
    let (mut rng, mut noise) = (rand::rngs::StdRng::seed_from_u64(0), Noise::new(0));
    for step in 0..steps {
        let idx: Vec<usize> = (0..64).map(|i| (step * 64 + i) % train.len()).collect();
        let x = train.batch(&idx, PixelMode::Dynamic, &mut rng, &device)?;
        adam.backward_step(&iwae_bound(&model, &x, 5, &mut noise)?.mean_all()?.neg()?)?;
    }
    let x = test.batch(
        &(0..200).collect::<Vec<_>>(),
        PixelMode::Dynamic,
        &mut rng,
        &device,
    )?;
    let est = estimate_log_likelihood_candle(&model, &x, 500, 50_000, &mut noise)?;
    let (neg_elbo, nll) = (
        -elbo::eval::mean(&est.elbo()),
        -elbo::eval::mean(&est.log_px),
    );
    println!("after {steps} steps: test -ELBO {neg_elbo:.2}, NLL {nll:.2} nats (200 digits)");
    Ok((neg_elbo, nll))
}

#[allow(dead_code)]
fn main() -> Result<()> {
    run(std::env::args().nth(1).map_or(Ok(600), |s| s.parse())?).map(|_| ())
}
