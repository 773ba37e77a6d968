//! Micro-benchmarks of the VAE hot paths (`cargo bench`): one training step on the fused engine
//! and on candle's autodiff, at batch 128 and 1024, one chunk of the importance-sampled
//! log p(x), and the IWAE paper's models (one and two stochastic layers, tanh, batch 20) with
//! k = 1 and k = 5. The side-by-side comparison with PyTorch and JAX is `bench/run`.

use candle_core::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use elbo::data::{Named, PixelMode, Source, Split};
use elbo::distributions::Noise;
use elbo::engine::estimate_log_likelihood;
use elbo::engine::vae::FusedVae;
use elbo::optim::{Adam, AdamConfig};
use elbo::vae::{Vae, VaeConfig, elbo_terms};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn vae_step(c: &mut Criterion) {
    let train = Source::Named(Named::Mnist10k).load(Split::Train).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut noise = Noise::new(0);
    let vae = Vae::new(VaeConfig::default(), &mut noise, &Device::Cpu).unwrap();
    let config = AdamConfig::with_lr(1e-3);
    for b in [128usize, 1024] {
        let idx: Vec<usize> = (0..b).collect();
        let xv = train.batch_values(&idx, PixelMode::Grey, &mut rng);
        let mut fused = FusedVae::from_vae(&vae).unwrap();
        let mut adam = Adam::new(fused.table().clone(), config);
        c.bench_function(&format!("vae step fused b{b}"), |bench| {
            bench.iter(|| {
                fused
                    .train_step(&xv, 1, 1.0, &mut noise, &mut adam)
                    .unwrap()
            })
        });
        let x = train
            .batch(&idx, PixelMode::Grey, &mut rng, &Device::Cpu)
            .unwrap();
        let mut adam = Adam::for_vars(vae.params(), config);
        c.bench_function(&format!("vae step candle b{b}"), |bench| {
            bench.iter(|| {
                let loss = elbo_terms(&vae, &x, 1, &mut noise)
                    .unwrap()
                    .loss(1.0)
                    .unwrap();
                adam.step_vars(vae.params(), &loss.backward().unwrap())
                    .unwrap();
            })
        });
    }
    let test = Source::Named(Named::Mnist10k).load(Split::Test).unwrap();
    let idx: Vec<usize> = (0..100).collect();
    let x = test
        .batch(&idx, PixelMode::Grey, &mut rng, &Device::Cpu)
        .unwrap();
    let frozen = vae.frozen().unwrap();
    c.bench_function("log p(x) 100 digits K=250", |bench| {
        bench.iter(|| estimate_log_likelihood(&frozen, &x, 250, 25_000, &mut noise).unwrap())
    });
}

/// The IWAE paper's architectures at its batch size 20 (Burda et al. 2015, Section 5).
fn iwae_step(c: &mut Criterion) {
    use elbo::nn::activation::Activation;
    use elbo::vae::objective::Objective;
    let train = Source::Named(Named::Mnist10k).load(Split::Train).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut noise = Noise::new(0);
    let idx: Vec<usize> = (0..20).collect();
    let xv = train.batch_values(&idx, PixelMode::Dynamic, &mut rng);
    for (name, hidden, latents) in [
        ("1 layer", vec![vec![200, 200]], vec![50]),
        (
            "2 layers",
            vec![vec![200, 200], vec![100, 100]],
            vec![100, 50],
        ),
    ] {
        let config = VaeConfig {
            hidden,
            latent_dims: latents,
            activation: Activation::Tanh,
            ..VaeConfig::default()
        };
        let vae = Vae::new(config, &mut noise, &Device::Cpu).unwrap();
        for (k, objective) in [(1, Objective::Elbo), (5, Objective::Iwae)] {
            let mut fused = FusedVae::from_vae(&vae).unwrap();
            fused.set_objective(objective);
            let mut adam = Adam::new(fused.table().clone(), AdamConfig::with_lr(1e-3));
            c.bench_function(&format!("iwae paper {name} k{k} b20 fused"), |bench| {
                bench.iter(|| {
                    fused
                        .train_step(&xv, k, 1.0, &mut noise, &mut adam)
                        .unwrap()
                })
            });
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = vae_step, iwae_step
}
criterion_main!(benches);
