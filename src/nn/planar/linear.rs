//! A linear layer on one example, its parameters at offsets of a flat vector:
//! `y = W x + b`, `dW += dy x^T`, `db += dy`, `dx += W^T dy` (`W` `[O, I]`).

use super::sized;

/// A linear layer's place in the flat parameter vector (`weight` `[O, I]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinP {
    pub(crate) w: usize,
    pub(crate) b: usize,
    pub(crate) o: usize,
    pub(crate) i: usize,
}

impl LinP {
    /// `y = W x + b` for one example.
    pub(crate) fn forward(&self, p: &[f32], x: &[f32], y: &mut Vec<f32>) {
        sized(y, self.o);
        for (o, y) in y.iter_mut().enumerate() {
            let row = &p[self.w + o * self.i..self.w + (o + 1) * self.i];
            *y = p[self.b + o] + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }

    /// `dW += dy x^T`, `db += dy` and, when asked, `dx += W^T dy`.
    pub(crate) fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
    ) {
        for (o, &d) in dy.iter().enumerate() {
            grads[self.b + o] += d;
            let at = self.w + o * self.i;
            add_scaled(&mut grads[at..at + self.i], x, d);
            if let Some(dx) = dx.as_deref_mut() {
                add_scaled(dx, &p[at..at + self.i], d);
            }
        }
    }
}

pub(crate) fn add_scaled(dst: &mut [f32], src: &[f32], a: f32) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += a * s);
}
