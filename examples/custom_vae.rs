//! A VAE elbo does not ship (a convolutional encoder, an MLP decoder) made of candle modules:
//! implementing `LatentVariableModel` gives it elbo's objectives, training loop and evaluation.
//! `cargo run --release --example custom_vae -- 600` (training steps).
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation::Relu, Conv2dConfig, Sequential, VarBuilder, VarMap, conv2d, linear};
use elbo::data::{Named, PixelMode, Source, Split};
use elbo::distributions::{DiagGaussian, bernoulli_log_prob_logits};
use elbo::train::latent::{Evaluation, FitConfig, evaluate, fit};
use elbo::vae::objective::{LatentVariableModel, Objective};

struct ConvVae(Sequential, Sequential, Device);

impl LatentVariableModel for ConvVae {
    fn latent_dims(&self) -> Vec<usize> {
        vec![16]
    }
    fn device(&self) -> &Device {
        &self.2
    }
    /// q(z|x): the encoder's 32 outputs are the mean and log-variance of z (16 each).
    fn encode_layer(&self, _: usize, x: &Tensor) -> Result<DiagGaussian> {
        let h = self.0.forward(&x.reshape(((), 1, 28, 28))?)?.chunk(2, 1)?;
        Ok(DiagGaussian::new(h[0].clone(), h[1].clone())?)
    }
    /// log p(x|z) with Bernoulli pixels; `z` `[K, B, 16]`.
    fn log_px_given_z(&self, x: &Tensor, z: &Tensor) -> Result<Tensor> {
        Ok(bernoulli_log_prob_logits(x, &self.1.forward(z)?)?)
    }
}

/// Trains on IWAE_5 for `steps` steps of 64 built-in digits, then evaluates 200 test digits
/// (log p(x) with K = 500).
pub fn run(steps: usize) -> Result<Evaluation> {
    let (vars, mut c) = (VarMap::new(), Conv2dConfig::default());
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    (c.stride, c.padding) = (2, 1);
    // 1x28x28 -> 16x14x14 -> 32x7x7 (stride-2 3x3 convolutions) -> 32; 16 -> 256 -> 784 logits.
    let encoder = candle_nn::seq()
        .add(conv2d(1, 16, 3, c, vb.pp("c0"))?)
        .add(Relu)
        .add(conv2d(16, 32, 3, c, vb.pp("c1"))?)
        .add(Relu)
        .add_fn(|h| h.flatten_from(1))
        .add(linear(32 * 49, 32, vb.pp("heads"))?);
    let decoder = candle_nn::seq()
        .add(linear(16, 256, vb.pp("d0"))?)
        .add(Relu)
        .add(linear(256, 784, vb.pp("d1"))?);
    let model = ConvVae(encoder, decoder, Device::Cpu);
    let train = Source::Named(Named::Mnist10k).load(Split::Train)?;
    let mut config = FitConfig::default();
    (config.objective, config.k) = (Objective::Iwae, 5);
    fit(&model, vars.all_vars(), &train.take(steps * 64), &config)?;
    let test = Source::Named(Named::Mnist10k).load(Split::Test)?;
    let e = evaluate(&model, &test, PixelMode::Dynamic, 500, Some(200), 0)?;
    let (elbo, nll, se) = (e.neg_elbo, e.nll, e.nll_stderr);
    println!("after {steps} steps: test -ELBO {elbo:.2}, NLL {nll:.2} +- {se:.2} nats");
    Ok(e)
}

#[allow(dead_code)]
fn main() -> Result<()> {
    run(std::env::args().nth(1).map_or(Ok(600), |s| s.parse())?).map(|_| ())
}
