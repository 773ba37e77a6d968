//! Times the default U-Net's forward and forward+backward at batch 64 (a rough profile).
use candle_core::{Device, Tensor};
use elbo::diffusion::Denoiser;
use elbo::diffusion::nets::{Net, NetConfig};
use elbo::distributions::Noise;

fn main() -> anyhow::Result<()> {
    let base: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(32);
    let cfg = NetConfig::Unet {
        base,
        channel_mult: vec![1, 2, 2],
        groups: 8,
        attention: true,
        in_channels: 1,
        res_blocks: None,
        attention_levels: Vec::new(),
        dropout: 0.0,
        options: elbo::diffusion::nets::UnetOptions::default(),
    };
    let (net, _vm) = Net::trainable(&cfg, &mut Noise::new(0), &Device::Cpu)?;
    let x = Noise::new(1).randn((64, 1, 28, 28), &Device::Cpu)?;
    let t = Tensor::from_vec(vec![500f32; 64], 64, &Device::Cpu)?;
    for _ in 0..3 {
        let s = std::time::Instant::now();
        let y = net.forward(&x, &t)?;
        let f = s.elapsed();
        let _g = y.sqr()?.mean_all()?.backward()?;
        println!("forward {:?}, forward+backward {:?}", f, s.elapsed());
    }
    Ok(())
}
