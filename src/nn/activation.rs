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

impl Activation {
    /// `y = f(x)`, element by element; `y` `[n]` for `x` `[n]`.
    pub fn forward(self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "activation: x and y differ in length");
        let f: fn(f32) -> f32 = match self {
            Activation::Relu => |x| x.max(0.0),
            Activation::Tanh => f32::tanh,
            Activation::Softplus => |x| x.max(0.0) + (-x.abs()).exp().ln_1p(),
            Activation::Elu => |x| if x > 0.0 { x } else { x.exp_m1() },
            Activation::Sigmoid => sigmoid,
            Activation::Silu => |x| x * sigmoid(x),
        };
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(x);
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
        let d: fn(f32, f32) -> f32 = match self {
            Activation::Relu => |x, _| if x > 0.0 { 1.0 } else { 0.0 },
            Activation::Tanh => |_, y| 1.0 - y * y,
            Activation::Softplus => |x, _| sigmoid(x),
            Activation::Elu => |x, y| if x > 0.0 { 1.0 } else { y + 1.0 },
            Activation::Sigmoid => |_, y| y * (1.0 - y),
            Activation::Silu => |x, _| {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            },
        };
        for ((g, &x), &y) in g.iter_mut().zip(x).zip(y) {
            *g *= d(x, y);
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
