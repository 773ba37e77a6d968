//! A VAE elbo does not ship (a convolutional encoder, an MLP decoder) made of candle modules:
//! implementing `LatentVariableModel` gives it elbo's objectives, training loop and evaluation.
//! `cargo run --release --example custom_vae -- 600` (training steps).
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation::Relu, Conv2dConfig, Sequential, VarBuilder, VarMap};
use candle_nn::{conv2d, linear, seq};
use elbo::data::{Named, PixelMode, Source, Split};
use elbo::distributions::{DiagGaussian, bernoulli_log_prob_logits};
use elbo::train::latent::{Evaluation, FitConfig, evaluate, fit};
use elbo::vae::objective::{LatentVariableModel, Objective};

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

/// Trains on IWAE_5 for `steps` steps of 64 built-in digits, then evaluates 200 test digits
/// (log p(x) with K = 500).
pub fn run(steps: usize) -> Result<Evaluation> {
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
        device,
    };
    let train = Source::Named(Named::Mnist10k)
        .load(Split::Train)?
        .take(steps * 64);
    let config = FitConfig {
        objective: Objective::Iwae,
        k: 5,
        ..Default::default()
    };
    fit(&model, vars.all_vars(), &train, &config)?;
    let test = Source::Named(Named::Mnist10k).load(Split::Test)?;
    let e = evaluate(&model, &test, PixelMode::Dynamic, 500, Some(200), 0)?;
    println!(
        "after {steps} steps: test -ELBO {:.2}, NLL {:.2} +- {:.2} nats",
        e.neg_elbo, e.nll, e.nll_stderr
    );
    Ok(e)
}

#[allow(dead_code)]
fn main() -> Result<()> {
    run(std::env::args().nth(1).map_or(Ok(600), |s| s.parse())?).map(|_| ())
}
