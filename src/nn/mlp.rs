//! A multilayer perceptron of [`super::linear`] layers and one [`Activation`], forward and
//! hand-derived backward, over a flat parameter vector and buffers reused from call to call:
//!
//! ```text
//! h_0 = x                         [rows, sizes[0]]
//! a_i = h_i W_i^T + b_i           [rows, sizes[i+1]]     W_i [sizes[i+1], sizes[i]]
//! h_{i+1} = f(a_i)                (every layer but the last, which stays linear)
//! params = [W_0, b_0, W_1, b_1, ...]   (PyTorch's nn.Linear layout, row-major)
//! ```

use super::activation::Activation;
use super::linear::{linear_backward, linear_forward};

/// The sizes of an MLP (input, hidden..., output) and its activation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MlpShape {
    pub sizes: Vec<usize>,
    pub activation: Activation,
}

impl MlpShape {
    /// The number of layers (linear maps).
    pub fn layers(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }

    /// Where layer `i`'s weight starts in the flat parameters, and `(in, out)`.
    pub fn layer(&self, i: usize) -> (usize, usize, usize) {
        let offset = (0..i)
            .map(|j| self.sizes[j + 1] * (self.sizes[j] + 1))
            .sum();
        (offset, self.sizes[i], self.sizes[i + 1])
    }

    /// Parameters in all: `sum_i out_i (in_i + 1)`.
    pub fn parameter_count(&self) -> usize {
        (0..self.layers())
            .map(|i| self.sizes[i + 1] * (self.sizes[i] + 1))
            .sum()
    }
}

/// What the forward pass keeps for the backward pass: each hidden layer's pre-activation
/// `a_i` and every layer's output `h_{i+1}` (the last layer's output is the MLP's output, and
/// its `pre` stays empty: it is linear).
#[derive(Debug, Default)]
pub struct MlpTape {
    pub pre: Vec<Vec<f32>>,
    pub post: Vec<Vec<f32>>,
    /// dL/d(the activation being walked back through), and the next one down.
    d_hidden: Vec<f32>,
    d_next: Vec<f32>,
}

/// The forward pass of `rows` examples `x` `[rows, sizes[0]]`; returns the output
/// `[rows, sizes.last()]`, kept in `tape`.
pub fn mlp_forward<'t>(
    shape: &MlpShape,
    params: &[f32],
    x: &[f32],
    rows: usize,
    tape: &'t mut MlpTape,
    threads: usize,
) -> &'t [f32] {
    let layers = shape.layers();
    tape.pre.resize_with(layers, Vec::new);
    tape.post.resize_with(layers, Vec::new);
    for i in 0..layers {
        let (offset, inp, out) = shape.layer(i);
        let w = &params[offset..offset + out * inp];
        let b = &params[offset + out * inp..offset + out * (inp + 1)];
        let (done, rest) = tape.post.split_at_mut(i);
        let h_in: &[f32] = if i == 0 { x } else { &done[i - 1] };
        if i + 1 == layers {
            // The output layer stays linear: written straight into its output (pre stays empty).
            linear_forward(&mut rest[0], h_in, w, b, (rows, inp, out), threads);
        } else {
            linear_forward(&mut tape.pre[i], h_in, w, b, (rows, inp, out), threads);
            let (pre, post) = (&tape.pre[i], &mut rest[0]);
            post.resize(pre.len(), 0.0);
            shape.activation.forward(pre, post);
        }
    }
    &tape.post[layers - 1]
}

/// The backward pass: given `dy` = dL/d(output) `[rows, sizes.last()]`, adds nothing but
/// writes every layer's dW and db into `grads` (laid out as `params`) and, when asked, dL/dx
/// into `dx`. `tape` must hold the forward pass of the same `x`.
#[allow(clippy::too_many_arguments)]
pub fn mlp_backward(
    shape: &MlpShape,
    params: &[f32],
    grads: &mut [f32],
    x: &[f32],
    rows: usize,
    tape: &mut MlpTape,
    dy: &[f32],
    dx: Option<&mut Vec<f32>>,
    threads: usize,
) {
    let layers = shape.layers();
    let MlpTape {
        pre,
        post,
        d_hidden,
        d_next,
    } = tape;
    let mut dx = dx;
    for i in (0..layers).rev() {
        let (offset, inp, out) = shape.layer(i);
        // in the forward pass this was: h_{i+1} = f(a_i); so now dL/da_i = dL/dh_{i+1} f'(a_i).
        // (The output layer is linear: its gradient is dy itself, read in place.)
        if i + 1 < layers {
            shape.activation.backward(d_hidden, &pre[i], &post[i]);
        }
        let g: &[f32] = if i + 1 == layers { dy } else { d_hidden };
        let h_in: &[f32] = if i == 0 { x } else { &post[i - 1] };
        let w = &params[offset..offset + out * inp];
        let grad_wb = &mut grads[offset..offset + out * (inp + 1)];
        // in the forward pass this was: a_i = h_i W_i^T + b_i.
        let da = if i > 0 {
            Some(&mut *d_next)
        } else {
            dx.as_deref_mut()
        };
        linear_backward(grad_wb, w, g, h_in, (rows, inp, out), da, threads);
        if i > 0 {
            std::mem::swap(d_hidden, d_next);
        }
    }
}
