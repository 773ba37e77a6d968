//! Built-in 2-D toy distributions for diffusion models with an MLP denoiser.

use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// A 2-D distribution to sample from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Toy {
    /// Two interleaved half circles (as scikit-learn's `make_moons`, noise 0.05), centred.
    Moons,
    /// The 2-D swiss roll (t cos t, t sin t), t in [1.5 pi, 4.5 pi], scaled by 1/5, noise 0.05.
    SwissRoll,
    /// Eight Gaussians (std 0.1) on a circle of radius 2.
    EightGaussians,
    /// A ring of radius 1.5 with radial noise 0.05.
    Ring,
}

impl Toy {
    pub const NAMES: [&'static str; 4] = ["moons", "swiss-roll", "8gaussians", "ring"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "moons" => Toy::Moons,
            "swiss-roll" => Toy::SwissRoll,
            "8gaussians" => Toy::EightGaussians,
            "ring" => Toy::Ring,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Toy::Moons => "moons",
            Toy::SwissRoll => "swiss-roll",
            Toy::EightGaussians => "8gaussians",
            Toy::Ring => "ring",
        }
    }

    /// `n` points, row-major `[n, 2]`.
    pub fn sample(self, n: usize, rng: &mut StdRng) -> Vec<f32> {
        let mut out = Vec::with_capacity(2 * n);
        let g = |rng: &mut StdRng| -> f64 { StandardNormal.sample(rng) };
        for _ in 0..n {
            let (x, y) = match self {
                Toy::Moons => {
                    let th = rng.random::<f64>() * std::f64::consts::PI;
                    let (x, y) = if rng.random::<bool>() {
                        (th.cos(), th.sin())
                    } else {
                        (1.0 - th.cos(), 0.5 - th.sin())
                    };
                    ((x - 0.5) + 0.05 * g(rng), (y - 0.25) * 2.0 + 0.05 * g(rng))
                }
                Toy::SwissRoll => {
                    let t = 1.5 * std::f64::consts::PI * (1.0 + 2.0 * rng.random::<f64>());
                    (
                        t * t.cos() / 5.0 + 0.05 * g(rng),
                        t * t.sin() / 5.0 + 0.05 * g(rng),
                    )
                }
                Toy::EightGaussians => {
                    let k = rng.random_range(0..8) as f64;
                    let a = k * std::f64::consts::FRAC_PI_4;
                    (2.0 * a.cos() + 0.1 * g(rng), 2.0 * a.sin() + 0.1 * g(rng))
                }
                Toy::Ring => {
                    let a = rng.random::<f64>() * std::f64::consts::TAU;
                    let r = 1.5 + 0.05 * g(rng);
                    (r * a.cos(), r * a.sin())
                }
            };
            out.push(x as f32);
            out.push(y as f32);
        }
        out
    }
}
