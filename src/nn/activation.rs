//! Element-wise activations, forward and hand-derived backward, over f32 buffers:
//!
//! ```text
//! relu      y = max(x, 0)                         f'(x) = 1[x > 0]
//! tanh      y = tanh x                            f'(x) = 1 - y^2
//! softplus  y = max(x, 0) + ln(1 + e^-|x|)        f'(x) = sigmoid(x)
//! elu       y = x (x > 0), e^x - 1 (x <= 0)       f'(x) = 1 (x > 0), y + 1 (x <= 0)
//! sigmoid   y = 1 / (1 + e^-x)                    f'(x) = y (1 - y)
//! silu      y = x sigmoid(x)                      f'(x) = s (1 + x (1 - s)), s = sigmoid(x)
//! ```
//!
//! The backward pass multiplies the incoming gradient g = dL/dy by f'(x) in place, reading the
//! forward pass's input x and output y (whichever the derivative is cheaper from).

/// An element-wise activation (ELU with alpha = 1, as PyTorch's default).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Softplus,
    Elu,
    Sigmoid,
    Silu,
}

/// `1 / (1 + e^-x)` without overflow for any x.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `y[i] = f(x[i])`, inlined and vectorised per activation.
#[multiversion::multiversion(targets = "simd")]
fn map(x: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = f(x);
    }
}

/// `g[i] *= d(x[i], y[i])`, inlined and vectorised per activation.
#[multiversion::multiversion(targets = "simd")]
fn scale(g: &mut [f32], x: &[f32], y: &[f32], d: impl Fn(f32, f32) -> f32) {
    for ((g, &x), &y) in g.iter_mut().zip(x).zip(y) {
        *g *= d(x, y);
    }
}

/// tanh by the rational approximation Eigen uses (odd degree-13 numerator over even
/// degree-6 denominator, x clamped to +-7.9053, where tanh is 1 in float32); within a few
/// float32 ulps of the true value (`tests::tanh_matches_the_standard_library`), and it
/// vectorises, which the library call does not.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    const A: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_672e-11,
        2.000_188e-13,
        -2.760_768_5e-16,
    ];
    const B: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    if x.abs() < 4e-4 {
        return x;
    }
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = A[6];
    let p = p.mul_add(x2, A[5]);
    let p = p.mul_add(x2, A[4]);
    let p = p.mul_add(x2, A[3]);
    let p = p.mul_add(x2, A[2]);
    let p = p.mul_add(x2, A[1]);
    let p = p.mul_add(x2, A[0]) * x;
    let q = B[3].mul_add(x2, B[2]).mul_add(x2, B[1]).mul_add(x2, B[0]);
    p / q
}

impl Activation {
    /// `y = f(x)`, element by element; `y` `[n]` for `x` `[n]`.
    pub fn forward(self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "activation: x and y differ in length");
        match self {
            Activation::Relu => map(x, y, |x| x.max(0.0)),
            Activation::Tanh => map(x, y, tanh),
            Activation::Softplus => map(x, y, |x| x.max(0.0) + (-x.abs()).exp().ln_1p()),
            Activation::Elu => map(x, y, |x| if x > 0.0 { x } else { x.exp_m1() }),
            Activation::Sigmoid => map(x, y, sigmoid),
            Activation::Silu => map(x, y, |x| x * sigmoid(x)),
        }
    }

    /// `g *= f'(x)`: the backward pass of [`Activation::forward`], given its input `x` and
    /// output `y`; all three `[n]`.
    pub fn backward(self, g: &mut [f32], x: &[f32], y: &[f32]) {
        assert!(
            g.len() == x.len() && x.len() == y.len(),
            "activation: lengths differ"
        );
        // in the forward pass this was: y = f(x); so now: dL/dx = dL/dy f'(x).
        match self {
            Activation::Relu => scale(g, x, y, |x, _| if x > 0.0 { 1.0 } else { 0.0 }),
            Activation::Tanh => scale(g, x, y, |_, y| 1.0 - y * y),
            Activation::Softplus => scale(g, x, y, |x, _| sigmoid(x)),
            Activation::Elu => scale(g, x, y, |x, y| if x > 0.0 { 1.0 } else { y + 1.0 }),
            Activation::Sigmoid => scale(g, x, y, |_, y| y * (1.0 - y)),
            Activation::Silu => scale(g, x, y, |x, _| {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }),
        }
    }

    /// Every activation, for tests and help texts.
    pub const ALL: [Activation; 6] = [
        Activation::Relu,
        Activation::Tanh,
        Activation::Softplus,
        Activation::Elu,
        Activation::Sigmoid,
        Activation::Silu,
    ];
}

/// The same activation on candle tensors (for the autodiff path and the tests).
pub fn candle_forward(
    activation: Activation,
    x: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    match activation {
        Activation::Relu => x.relu(),
        Activation::Tanh => x.tanh(),
        Activation::Softplus => {
            // max(x, 0) + ln(1 + e^-|x|)
            let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
            x.relu()? + tail
        }
        Activation::Elu => x.elu(1.0),
        Activation::Sigmoid => candle_nn::ops::sigmoid(x),
        Activation::Silu => x.silu(),
    }
}

#[cfg(test)]
mod tests {
    /// The fast tanh against f64's over [-12, 12]: absolute error below 5e-7 everywhere and
    /// relative error below 1e-6 (a few float32 ulps).
    #[test]
    fn tanh_matches_the_standard_library() {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        for i in -1_200_000..=1_200_000 {
            let x = i as f32 * 1e-5;
            let (got, want) = (super::tanh(x) as f64, (x as f64).tanh());
            worst_abs = worst_abs.max((got - want).abs());
            if want != 0.0 {
                worst_rel = worst_rel.max(((got - want) / want).abs());
            }
        }
        println!("tanh: worst absolute {worst_abs:e}, relative {worst_rel:e}");
        assert!(
            worst_abs < 5e-7 && worst_rel < 1e-6,
            "abs {worst_abs:e} rel {worst_rel:e}"
        );
    }
}
