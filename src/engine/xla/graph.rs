//! A traced array program, its reverse-mode derivative, and its StableHLO text.
//!
//! A model builds its step as a [`Graph`] of f32 arrays: inputs, constants, elementwise maps,
//! products ([`Graph::dot`]: `dot_general` with one contracting dimension each side),
//! broadcasts and sums. [`Graph::grad`] appends the adjoint of a scalar with respect to any
//! nodes (the chain rule node by node, newest first, as `jax.grad` traces it), and
//! [`Graph::to_stablehlo`] prints the whole program as one MLIR module whose `main` takes the
//! inputs and returns the chosen outputs, for XLA to fuse and compile ([`super::pjrt`]).
//!
//! Shapes are checked as nodes are made: a mismatch is a bug in the model's builder, reported
//! as an error, never a malformed module.

use std::fmt::Write;

use anyhow::{Result, bail, ensure};

/// A node of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct T(usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Log1p,
    Tanh,
    Logistic,
    Abs,
    Sign,
    Sqrt,
    Sin,
    Cos,
    /// erf(a) = 2/sqrt(pi) int_0^a e^{-s^2} ds (CHLO's `erf`, which XLA lowers to its
    /// polynomial; f32 error within a few ulps).
    Erf,
    /// erfc(a) = 1 - erf(a), without the cancellation in the tail (CHLO's `erfc`).
    Erfc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

#[derive(Debug, Clone)]
enum Op {
    /// Input `i` of `main`.
    Input(usize),
    /// A constant splatted to the node's shape.
    Const(f32),
    Unary(Unary, T),
    Binary(Binary, T, T),
    /// 1.0 where `a > b`, else 0.0 (no derivative).
    Greater(T, T),
    /// The value, with no derivative (`jax.lax.stop_gradient`).
    Stop(T),
    /// `dot_general` contracting dimension `lc` of `a` with `rc` of `b` (both 2-D); the result
    /// is `a`'s free dimension then `b`'s.
    Dot(T, T, usize, usize),
    /// `broadcast_in_dim`: operand dimension i becomes dimension `dims[i]` of the result.
    Broadcast(T, Vec<usize>),
    /// The sum over `dims`.
    Sum(T, Vec<usize>),
    /// The maximum over `dims` (no derivative: used inside log-sum-exp only).
    MaxOver(T, Vec<usize>),
    Reshape(T),
    /// Values `start..start + len` of a 1-D array.
    Slice(T, usize),
    /// 1-D arrays end to end.
    Concat(Vec<T>),
    Transpose(T, Vec<usize>),
    /// `convolution(lhs, rhs)` ([`Conv`]).
    Conv(T, T, Box<Conv>),
    /// The array with dimensions `dims` reversed.
    Reverse(T, Vec<usize>),
    /// `[B, m, k] x [B, k, n] -> [B, m, n]`: one product per batch entry.
    BatchDot(T, T),
    /// The block starting at `starts`, of the node's shape.
    Block(T, Vec<usize>),
    /// Zeros `(low, high)` around each dimension.
    Pad(T, Vec<(usize, usize)>),
    /// Arrays end to end along dimension `dim`.
    Join(Vec<T>, usize),
    /// Dropout masks ([`crate::nn::dropout`]) computed on the device from each example's
    /// 64-bit hash base, given as four 16-bit pieces `[B, 4]` (exact in f32), with drop
    /// probability p: `1/(1-p)` where `(mix(base + i) >> 40) / 2^24 >= p`, else 0, for the
    /// node's `[B, ...]` values; no derivative.
    DropoutMask(T, f32),
}

/// A 2-D convolution as StableHLO's `convolution` takes it (JAX's `conv_general_dilated`):
/// which dimension of each array is which, the window's strides, the padding of the input
/// (low, high; negative crops), and the dilations of the input and of the kernel.
///
/// ```text
/// lhs  [batch, feature, spatial 0, spatial 1] at dims lhs[0..4]
/// rhs  [out feature, in feature, spatial 0, spatial 1] at dims rhs[0..4]
/// out  [batch, feature, spatial 0, spatial 1] at dims out[0..4]
/// out size = (dil(in, lhs_dil) + lo + hi - dil(k, rhs_dil)) / stride + 1,  dil(n, d) = 1 + d (n - 1)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv {
    pub lhs: [usize; 4],
    pub rhs: [usize; 4],
    pub out: [usize; 4],
    pub stride: [usize; 2],
    pub pad: [(i64, i64); 2],
    pub lhs_dil: [usize; 2],
    pub rhs_dil: [usize; 2],
}

/// `1 + d (n - 1)` (0 for n = 0): a size dilated by d.
fn dilate(n: usize, d: usize) -> i64 {
    if n == 0 { 0 } else { 1 + (d * (n - 1)) as i64 }
}

impl Conv {
    /// NCHW input, OIHW kernel, NCHW output: PyTorch's `conv2d(x, w, stride, padding)`.
    pub fn nchw(stride: usize, pad: usize) -> Self {
        Self {
            lhs: [0, 1, 2, 3],
            rhs: [0, 1, 2, 3],
            out: [0, 1, 2, 3],
            stride: [stride; 2],
            pad: [(pad as i64, pad as i64); 2],
            lhs_dil: [1; 2],
            rhs_dil: [1; 2],
        }
    }

    /// The first two entries of a spec swapped: batch and feature, or out and in feature.
    fn swap(spec: [usize; 4]) -> [usize; 4] {
        [spec[1], spec[0], spec[2], spec[3]]
    }

    /// The result's shape for operands of shapes `l` and `r`.
    fn shape(&self, l: &[usize], r: &[usize]) -> Option<Vec<usize>> {
        if l.len() != 4 || r.len() != 4 || l[self.lhs[1]] != r[self.rhs[1]] {
            return None;
        }
        let mut out = vec![0; 4];
        out[self.out[0]] = l[self.lhs[0]];
        out[self.out[1]] = r[self.rhs[0]];
        for d in 0..2 {
            let span = dilate(l[self.lhs[2 + d]], self.lhs_dil[d]) + self.pad[d].0 + self.pad[d].1
                - dilate(r[self.rhs[2 + d]], self.rhs_dil[d]);
            if span < 0 || self.stride[d] == 0 {
                return None;
            }
            out[self.out[2 + d]] = span as usize / self.stride[d] + 1;
        }
        Some(out)
    }

    /// StableHLO's `dim_numbers`: each position's role, e.g. `[b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1]`.
    fn dim_numbers(&self) -> String {
        let roles = |spec: &[usize; 4], names: [&str; 4]| -> String {
            let mut at = [""; 4];
            for (role, &dim) in spec.iter().enumerate() {
                at[dim] = names[role];
            }
            format!("[{}]", at.join(", "))
        };
        format!(
            "{}x{}->{}",
            roles(&self.lhs, ["b", "f", "0", "1"]),
            roles(&self.rhs, ["o", "i", "0", "1"]),
            roles(&self.out, ["b", "f", "0", "1"])
        )
    }
}

#[derive(Debug, Clone)]
struct Node {
    op: Op,
    shape: Vec<usize>,
}

/// The program being traced.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    inputs: Vec<T>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn shape(&self, t: T) -> &[usize] {
        &self.nodes[t.0].shape
    }

    fn push(&mut self, op: Op, shape: Vec<usize>) -> T {
        self.nodes.push(Node { op, shape });
        T(self.nodes.len() - 1)
    }

    /// The next input of `main`, of shape `shape`.
    pub fn input(&mut self, shape: &[usize]) -> T {
        let t = self.push(Op::Input(self.inputs.len()), shape.to_vec());
        self.inputs.push(t);
        t
    }

    /// `value` everywhere in an array of shape `shape`.
    pub fn constant(&mut self, value: f32, shape: &[usize]) -> T {
        self.push(Op::Const(value), shape.to_vec())
    }

    /// `value` in an array shaped as `like`.
    pub fn full_like(&mut self, value: f32, like: T) -> T {
        let shape = self.shape(like).to_vec();
        self.constant(value, &shape)
    }

    pub fn unary(&mut self, op: Unary, a: T) -> T {
        let shape = self.shape(a).to_vec();
        self.push(Op::Unary(op, a), shape)
    }

    pub fn binary(&mut self, op: Binary, a: T, b: T) -> Result<T> {
        ensure!(
            self.shape(a) == self.shape(b),
            "XLA graph: {op:?} of shapes {:?} and {:?}",
            self.shape(a),
            self.shape(b)
        );
        let shape = self.shape(a).to_vec();
        Ok(self.push(Op::Binary(op, a, b), shape))
    }

    pub fn add(&mut self, a: T, b: T) -> Result<T> {
        self.binary(Binary::Add, a, b)
    }
    pub fn sub(&mut self, a: T, b: T) -> Result<T> {
        self.binary(Binary::Sub, a, b)
    }
    pub fn mul(&mut self, a: T, b: T) -> Result<T> {
        self.binary(Binary::Mul, a, b)
    }
    pub fn div(&mut self, a: T, b: T) -> Result<T> {
        self.binary(Binary::Div, a, b)
    }
    pub fn max(&mut self, a: T, b: T) -> Result<T> {
        self.binary(Binary::Max, a, b)
    }
    pub fn neg(&mut self, a: T) -> T {
        self.unary(Unary::Neg, a)
    }
    pub fn exp(&mut self, a: T) -> T {
        self.unary(Unary::Exp, a)
    }
    pub fn log(&mut self, a: T) -> T {
        self.unary(Unary::Log, a)
    }
    pub fn tanh(&mut self, a: T) -> T {
        self.unary(Unary::Tanh, a)
    }
    pub fn sigmoid(&mut self, a: T) -> T {
        self.unary(Unary::Logistic, a)
    }
    pub fn sqrt(&mut self, a: T) -> T {
        self.unary(Unary::Sqrt, a)
    }

    /// `a * s` for a constant `s`.
    pub fn scale(&mut self, a: T, s: f32) -> Result<T> {
        let c = self.full_like(s, a);
        self.mul(a, c)
    }

    /// `a + s` for a constant `s`.
    pub fn offset(&mut self, a: T, s: f32) -> Result<T> {
        let c = self.full_like(s, a);
        self.add(a, c)
    }

    /// 1.0 where `a > b`, else 0.0; no derivative flows through it.
    pub fn greater(&mut self, a: T, b: T) -> Result<T> {
        ensure!(
            self.shape(a) == self.shape(b),
            "XLA graph: compare of different shapes"
        );
        let shape = self.shape(a).to_vec();
        Ok(self.push(Op::Greater(a, b), shape))
    }

    pub fn stop_gradient(&mut self, a: T) -> T {
        let shape = self.shape(a).to_vec();
        self.push(Op::Stop(a), shape)
    }

    /// `dot_general(a, b)` contracting `a`'s dimension `lc` with `b`'s `rc` (2-D arrays): `[m,
    /// k] x [k, n] -> [m, n]` is `dot(a, b, 1, 0)`; `a b^T` is `dot(a, b, 1, 1)`.
    pub fn dot(&mut self, a: T, b: T, lc: usize, rc: usize) -> Result<T> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        ensure!(
            sa.len() == 2 && sb.len() == 2 && lc < 2 && rc < 2 && sa[lc] == sb[rc],
            "XLA graph: dot of {sa:?} (dim {lc}) and {sb:?} (dim {rc})"
        );
        Ok(self.push(Op::Dot(a, b, lc, rc), vec![sa[1 - lc], sb[1 - rc]]))
    }

    /// `a` broadcast to `shape`, its dimension i becoming `dims[i]` (sizes equal).
    pub fn broadcast(&mut self, a: T, dims: &[usize], shape: &[usize]) -> Result<T> {
        let sa = self.shape(a).to_vec();
        ensure!(
            dims.len() == sa.len()
                && dims
                    .iter()
                    .zip(&sa)
                    .all(|(&d, &n)| d < shape.len() && shape[d] == n)
                && dims.windows(2).all(|w| w[0] < w[1]),
            "XLA graph: broadcast of {sa:?} along {dims:?} to {shape:?}"
        );
        Ok(self.push(Op::Broadcast(a, dims.to_vec()), shape.to_vec()))
    }

    /// The sum over dimensions `dims` (increasing).
    pub fn sum(&mut self, a: T, dims: &[usize]) -> Result<T> {
        let sa = self.shape(a).to_vec();
        ensure!(
            dims.iter().all(|&d| d < sa.len()) && dims.windows(2).all(|w| w[0] < w[1]),
            "XLA graph: sum of {sa:?} over {dims:?}"
        );
        let shape = (0..sa.len())
            .filter(|d| !dims.contains(d))
            .map(|d| sa[d])
            .collect();
        Ok(self.push(Op::Sum(a, dims.to_vec()), shape))
    }

    /// The sum of every value: a scalar.
    pub fn sum_all(&mut self, a: T) -> Result<T> {
        let dims: Vec<usize> = (0..self.shape(a).len()).collect();
        self.sum(a, &dims)
    }

    /// The maximum over `dims`, with no derivative.
    pub fn max_over(&mut self, a: T, dims: &[usize]) -> Result<T> {
        let s = self.sum(a, dims)?;
        let shape = self.shape(s).to_vec();
        self.nodes.pop();
        Ok(self.push(Op::MaxOver(a, dims.to_vec()), shape))
    }

    pub fn reshape(&mut self, a: T, shape: &[usize]) -> Result<T> {
        ensure!(
            numel(self.shape(a)) == numel(shape),
            "XLA graph: reshape of {:?} to {shape:?}",
            self.shape(a)
        );
        Ok(self.push(Op::Reshape(a), shape.to_vec()))
    }

    pub fn transpose(&mut self, a: T, perm: &[usize]) -> Result<T> {
        let sa = self.shape(a).to_vec();
        let mut seen = vec![false; sa.len()];
        ensure!(
            perm.len() == sa.len()
                && perm
                    .iter()
                    .all(|&p| p < sa.len() && !std::mem::replace(&mut seen[p], true)),
            "XLA graph: transpose of {sa:?} by {perm:?}"
        );
        let shape = perm.iter().map(|&p| sa[p]).collect();
        Ok(self.push(Op::Transpose(a, perm.to_vec()), shape))
    }

    /// The convolution `spec` of `lhs` by the kernel `rhs`.
    pub fn conv(&mut self, lhs: T, rhs: T, spec: Conv) -> Result<T> {
        let (l, r) = (self.shape(lhs).to_vec(), self.shape(rhs).to_vec());
        let Some(shape) = spec.shape(&l, &r) else {
            bail!("XLA graph: convolution {spec:?} of {l:?} by {r:?}");
        };
        Ok(self.push(Op::Conv(lhs, rhs, Box::new(spec)), shape))
    }

    /// `[B, m, k] x [B, k, n] -> [B, m, n]`.
    pub fn batch_dot(&mut self, a: T, b: T) -> Result<T> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        ensure!(
            sa.len() == 3 && sb.len() == 3 && sa[0] == sb[0] && sa[2] == sb[1],
            "XLA graph: batch product of {sa:?} and {sb:?}"
        );
        Ok(self.push(Op::BatchDot(a, b), vec![sa[0], sa[1], sb[2]]))
    }

    /// The block of `a` from `starts`, of shape `shape`.
    pub fn block(&mut self, a: T, starts: &[usize], shape: &[usize]) -> Result<T> {
        let sa = self.shape(a).to_vec();
        ensure!(
            starts.len() == sa.len()
                && shape.len() == sa.len()
                && (0..sa.len()).all(|d| starts[d] + shape[d] <= sa[d]),
            "XLA graph: block {starts:?} + {shape:?} of {sa:?}"
        );
        Ok(self.push(Op::Block(a, starts.to_vec()), shape.to_vec()))
    }

    /// `len` entries of dimension `dim` from `start`.
    pub fn narrow(&mut self, a: T, dim: usize, start: usize, len: usize) -> Result<T> {
        let mut shape = self.shape(a).to_vec();
        ensure!(
            dim < shape.len(),
            "XLA graph: narrow of dimension {dim} of {shape:?}"
        );
        let mut starts = vec![0; shape.len()];
        starts[dim] = start;
        shape[dim] = len;
        self.block(a, &starts, &shape)
    }

    /// `a` with `pad[d]` zeros before and after dimension d.
    pub fn pad(&mut self, a: T, pad: &[(usize, usize)]) -> Result<T> {
        let sa = self.shape(a).to_vec();
        ensure!(
            pad.len() == sa.len(),
            "XLA graph: padding {pad:?} of {sa:?}"
        );
        let shape = sa
            .iter()
            .zip(pad)
            .map(|(n, (lo, hi))| n + lo + hi)
            .collect();
        Ok(self.push(Op::Pad(a, pad.to_vec()), shape))
    }

    /// Arrays of equal shapes but for dimension `dim`, end to end along it.
    pub fn join(&mut self, parts: &[T], dim: usize) -> Result<T> {
        ensure!(!parts.is_empty(), "XLA graph: a join of nothing");
        let mut shape = self.shape(parts[0]).to_vec();
        ensure!(
            dim < shape.len(),
            "XLA graph: join along {dim} of {shape:?}"
        );
        shape[dim] = 0;
        for &p in parts {
            let sp = self.shape(p);
            ensure!(
                sp.len() == shape.len() && (0..sp.len()).all(|d| d == dim || sp[d] == shape[d]),
                "XLA graph: join of {sp:?} and {shape:?} along {dim}"
            );
            shape[dim] += sp[dim];
        }
        Ok(self.push(Op::Join(parts.to_vec(), dim), shape))
    }

    /// Dropout masks of `shape` `[B, ...]` from the examples' hash bases `bases` `[B, 4]`
    /// (16-bit pieces, low first) and drop probability `p` ([`Op::DropoutMask`]).
    pub fn dropout_mask(&mut self, bases: T, p: f32, shape: &[usize]) -> Result<T> {
        let sb = self.shape(bases).to_vec();
        ensure!(
            sb.len() == 2
                && sb[1] == 4
                && !shape.is_empty()
                && shape[0] == sb[0]
                && (0.0..1.0).contains(&p),
            "XLA graph: dropout masks {shape:?} from bases {sb:?} (p = {p})"
        );
        Ok(self.push(Op::DropoutMask(bases, p), shape.to_vec()))
    }

    /// The softmax over the last dimension, stable (the maximum, with no derivative, taken
    /// out first).
    pub fn softmax_last(&mut self, a: T) -> Result<T> {
        let shape = self.shape(a).to_vec();
        let last = shape.len() - 1;
        let keep: Vec<usize> = (0..last).collect();
        let m = self.max_over(a, &[last])?;
        let mb = self.broadcast(m, &keep, &shape)?;
        let d = self.sub(a, mb)?;
        let e = self.exp(d);
        let s = self.sum(e, &[last])?;
        let sb = self.broadcast(s, &keep, &shape)?;
        self.div(e, sb)
    }

    /// `a` with dimensions `dims` reversed.
    pub fn reverse(&mut self, a: T, dims: &[usize]) -> Result<T> {
        let shape = self.shape(a).to_vec();
        ensure!(
            dims.iter().all(|&d| d < shape.len()),
            "XLA graph: reverse {dims:?} of {shape:?}"
        );
        Ok(self.push(Op::Reverse(a, dims.to_vec()), shape))
    }

    /// Values `start..start + len` of the 1-D array `a`.
    pub fn slice(&mut self, a: T, start: usize, len: usize) -> Result<T> {
        let sa = self.shape(a).to_vec();
        ensure!(
            sa.len() == 1 && start + len <= sa[0],
            "XLA graph: slice {start}..{} of {sa:?}",
            start + len
        );
        Ok(self.push(Op::Slice(a, start), vec![len]))
    }

    /// 1-D arrays end to end.
    pub fn concat(&mut self, parts: &[T]) -> Result<T> {
        ensure!(!parts.is_empty(), "XLA graph: concatenation of nothing");
        let mut n = 0;
        for &p in parts {
            ensure!(
                self.shape(p).len() == 1,
                "XLA graph: concatenation of {:?}",
                self.shape(p)
            );
            n += self.shape(p)[0];
        }
        Ok(self.push(Op::Concat(parts.to_vec()), vec![n]))
    }

    /// `log sum exp` over dimension `dim` of a 2-D array, stable (the maximum subtracted, with
    /// no derivative: the gradient is the softmax either way).
    pub fn logsumexp(&mut self, a: T, dim: usize) -> Result<T> {
        let shape = self.shape(a).to_vec();
        ensure!(shape.len() == 2, "XLA graph: logsumexp of {shape:?}");
        let keep = 1 - dim;
        let m = self.max_over(a, &[dim])?;
        let mb = self.broadcast(m, &[keep], &shape)?;
        let d = self.sub(a, mb)?;
        let e = self.exp(d);
        let s = self.sum(e, &[dim])?;
        let l = self.log(s);
        self.add(l, m)
    }

    /// `softplus(a) = log(1 + e^a) = max(a, 0) + log1p(e^{-|a|})`, stable.
    pub fn softplus(&mut self, a: T) -> Result<T> {
        let zero = self.full_like(0.0, a);
        let m = self.max(a, zero)?;
        let abs = self.unary(Unary::Abs, a);
        let na = self.neg(abs);
        let e = self.exp(na);
        let l = self.unary(Unary::Log1p, e);
        self.add(m, l)
    }

    /// The derivative of the scalar `y` with respect to each of `wrt`, appended to the graph:
    /// reverse mode, each node's adjoint the sum of its uses' contributions.
    pub fn grad(&mut self, y: T, wrt: &[T]) -> Result<Vec<T>> {
        ensure!(
            self.shape(y).is_empty(),
            "XLA graph: grad of a non-scalar {:?}",
            self.shape(y)
        );
        let n = y.0 + 1;
        let mut adj: Vec<Option<T>> = vec![None; n];
        adj[y.0] = Some(self.constant(1.0, &[]));
        for i in (0..n).rev() {
            let Some(g) = adj[i] else { continue };
            let node = self.nodes[i].clone();
            let out = T(i);
            let acc = |graph: &mut Graph, adj: &mut Vec<Option<T>>, to: T, v: T| -> Result<()> {
                adj[to.0] = Some(match adj[to.0] {
                    Some(prev) => graph.add(prev, v)?,
                    None => v,
                });
                Ok(())
            };
            match node.op {
                Op::Input(_)
                | Op::Const(_)
                | Op::Greater(..)
                | Op::Stop(_)
                | Op::MaxOver(..)
                | Op::DropoutMask(..) => {}
                Op::Unary(u, a) => {
                    let d = match u {
                        Unary::Neg => self.neg(g),
                        // d e^a = e^a
                        Unary::Exp => self.mul(g, out)?,
                        Unary::Log => self.div(g, a)?,
                        Unary::Log1p => {
                            let one = self.offset(a, 1.0)?;
                            self.div(g, one)?
                        }
                        // d tanh = 1 - tanh^2
                        Unary::Tanh => {
                            let sq = self.mul(out, out)?;
                            let one = self.full_like(1.0, out);
                            let d = self.sub(one, sq)?;
                            self.mul(g, d)?
                        }
                        // d sigma = sigma (1 - sigma)
                        Unary::Logistic => {
                            let one = self.full_like(1.0, out);
                            let c = self.sub(one, out)?;
                            let d = self.mul(out, c)?;
                            self.mul(g, d)?
                        }
                        Unary::Abs => {
                            let s = self.unary(Unary::Sign, a);
                            self.mul(g, s)?
                        }
                        Unary::Sign => continue,
                        Unary::Sin => {
                            let c = self.unary(Unary::Cos, a);
                            self.mul(g, c)?
                        }
                        Unary::Cos => {
                            let s = self.unary(Unary::Sin, a);
                            let ns = self.neg(s);
                            self.mul(g, ns)?
                        }
                        // d erf(a) = 2/sqrt(pi) e^{-a^2}
                        Unary::Erf => {
                            let sq = self.mul(a, a)?;
                            let e = self.neg(sq);
                            let e = self.exp(e);
                            let d = self.scale(e, std::f32::consts::FRAC_2_SQRT_PI)?;
                            self.mul(g, d)?
                        }
                        // d erfc(a) = -2/sqrt(pi) e^{-a^2}
                        Unary::Erfc => {
                            let sq = self.mul(a, a)?;
                            let e = self.neg(sq);
                            let e = self.exp(e);
                            let d = self.scale(e, -std::f32::consts::FRAC_2_SQRT_PI)?;
                            self.mul(g, d)?
                        }
                        // d sqrt(a) = 1 / (2 sqrt(a))
                        Unary::Sqrt => {
                            let t = self.div(g, out)?;
                            self.scale(t, 0.5)?
                        }
                    };
                    acc(self, &mut adj, a, d)?;
                }
                Op::Binary(op, a, b) => match op {
                    Binary::Add => {
                        acc(self, &mut adj, a, g)?;
                        acc(self, &mut adj, b, g)?;
                    }
                    Binary::Sub => {
                        acc(self, &mut adj, a, g)?;
                        let ng = self.neg(g);
                        acc(self, &mut adj, b, ng)?;
                    }
                    Binary::Mul => {
                        let da = self.mul(g, b)?;
                        let db = self.mul(g, a)?;
                        acc(self, &mut adj, a, da)?;
                        acc(self, &mut adj, b, db)?;
                    }
                    // d(a/b) = da / b - db a / b^2 = (da - db out) / b
                    Binary::Div => {
                        let da = self.div(g, b)?;
                        let t = self.mul(da, out)?;
                        let db = self.neg(t);
                        acc(self, &mut adj, a, da)?;
                        acc(self, &mut adj, b, db)?;
                    }
                    // To a where a > b, else to b.
                    Binary::Max => {
                        let m = self.greater(a, b)?;
                        let da = self.mul(g, m)?;
                        let db = self.sub(g, da)?;
                        acc(self, &mut adj, a, da)?;
                        acc(self, &mut adj, b, db)?;
                    }
                },
                // c = a . b contracting (lc, rc); g has a's free dim then b's.
                // dA = g contracted with b over b's free dim, laid out as a.
                Op::Dot(a, b, lc, rc) => {
                    // dA[free_a, k] = sum_j g[free_a, j] b[.., j]: dot(g, b, 1, 1 - rc) gives
                    // [free_a, k]; transpose when a's contracting dim is first.
                    let da = self.dot(g, b, 1, 1 - rc)?;
                    let da = if lc == 1 {
                        da
                    } else {
                        self.transpose(da, &[1, 0])?
                    };
                    let db = self.dot(a, g, 1 - lc, 0)?;
                    let db = if rc == 0 {
                        db
                    } else {
                        self.transpose(db, &[1, 0])?
                    };
                    acc(self, &mut adj, a, da)?;
                    acc(self, &mut adj, b, db)?;
                }
                Op::Broadcast(a, dims) => {
                    let rank = node.shape.len();
                    let summed: Vec<usize> = (0..rank).filter(|d| !dims.contains(d)).collect();
                    let d = if summed.is_empty() {
                        g
                    } else {
                        self.sum(g, &summed)?
                    };
                    acc(self, &mut adj, a, d)?;
                }
                Op::Sum(a, dims) => {
                    let sa = self.shape(a).to_vec();
                    let kept: Vec<usize> = (0..sa.len()).filter(|d| !dims.contains(d)).collect();
                    let d = self.broadcast(g, &kept, &sa)?;
                    acc(self, &mut adj, a, d)?;
                }
                Op::Reshape(a) => {
                    let sa = self.shape(a).to_vec();
                    let d = self.reshape(g, &sa)?;
                    acc(self, &mut adj, a, d)?;
                }
                Op::Transpose(a, perm) => {
                    let mut inv = vec![0; perm.len()];
                    for (i, &p) in perm.iter().enumerate() {
                        inv[p] = i;
                    }
                    let d = self.transpose(g, &inv)?;
                    acc(self, &mut adj, a, d)?;
                }
                // JAX's transpose rules of `conv_general_dilated` (lax/convolution.py).
                Op::Conv(lhs, rhs, spec) => {
                    let (ls, rs) = (self.shape(lhs).to_vec(), self.shape(rhs).to_vec());
                    let gs = node.shape.clone();
                    let sp = |shape: &[usize], spec: &[usize; 4], d: usize| shape[spec[2 + d]];
                    // d lhs: g convolved with the spatially reversed kernel, in and out swapped,
                    // the forward's strides becoming the input's dilation.
                    let mut pad = [(0i64, 0i64); 2];
                    for (d, p) in pad.iter_mut().enumerate() {
                        let in_d = dilate(sp(&ls, &spec.lhs, d), spec.lhs_dil[d]);
                        let k_d = dilate(sp(&rs, &spec.rhs, d), spec.rhs_dil[d]);
                        let out_d = dilate(sp(&gs, &spec.out, d), spec.stride[d]);
                        let before = k_d - spec.pad[d].0 - 1;
                        *p = (before, in_d + k_d - 1 - out_d - before);
                    }
                    let rev = self.reverse(rhs, &[spec.rhs[2], spec.rhs[3]])?;
                    let dl = Conv {
                        lhs: spec.out,
                        rhs: Conv::swap(spec.rhs),
                        out: spec.lhs,
                        stride: spec.lhs_dil,
                        pad,
                        lhs_dil: spec.stride,
                        rhs_dil: spec.rhs_dil,
                    };
                    let dlhs = self.conv(g, rev, dl)?;
                    ensure!(
                        self.shape(dlhs) == ls.as_slice(),
                        "XLA graph: conv d lhs {:?} for {ls:?}",
                        self.shape(dlhs)
                    );
                    // d rhs: the input convolved with g, batch and feature swapped, the
                    // forward's strides becoming the kernel's dilation.
                    let mut pad = [(0i64, 0i64); 2];
                    for (d, p) in pad.iter_mut().enumerate() {
                        let in_d = dilate(sp(&ls, &spec.lhs, d), spec.lhs_dil[d]);
                        let k_d = dilate(sp(&rs, &spec.rhs, d), spec.rhs_dil[d]);
                        let out_d = dilate(sp(&gs, &spec.out, d), spec.stride[d]);
                        let lo = spec.pad[d].0;
                        *p = (lo, (out_d - in_d) + (k_d - lo - 1));
                    }
                    let dr = Conv {
                        lhs: Conv::swap(spec.lhs),
                        rhs: Conv::swap(spec.out),
                        out: Conv::swap(spec.rhs),
                        stride: spec.rhs_dil,
                        pad,
                        lhs_dil: spec.lhs_dil,
                        rhs_dil: spec.stride,
                    };
                    let drhs = self.conv(lhs, g, dr)?;
                    ensure!(
                        self.shape(drhs) == rs.as_slice(),
                        "XLA graph: conv d rhs {:?} for {rs:?}",
                        self.shape(drhs)
                    );
                    acc(self, &mut adj, lhs, dlhs)?;
                    acc(self, &mut adj, rhs, drhs)?;
                }
                Op::Reverse(a, dims) => {
                    let d = self.reverse(g, &dims)?;
                    acc(self, &mut adj, a, d)?;
                }
                // C = A B per batch: dA = G B^T, dB = A^T G.
                Op::BatchDot(a, b) => {
                    let bt = self.transpose(b, &[0, 2, 1])?;
                    let da = self.batch_dot(g, bt)?;
                    let at = self.transpose(a, &[0, 2, 1])?;
                    let db = self.batch_dot(at, g)?;
                    acc(self, &mut adj, a, da)?;
                    acc(self, &mut adj, b, db)?;
                }
                Op::Block(a, starts) => {
                    let sa = self.shape(a).to_vec();
                    let pad: Vec<(usize, usize)> = (0..sa.len())
                        .map(|d| (starts[d], sa[d] - starts[d] - node.shape[d]))
                        .collect();
                    let d = self.pad(g, &pad)?;
                    acc(self, &mut adj, a, d)?;
                }
                Op::Pad(a, pad) => {
                    let starts: Vec<usize> = pad.iter().map(|p| p.0).collect();
                    let sa = self.shape(a).to_vec();
                    let d = self.block(g, &starts, &sa)?;
                    acc(self, &mut adj, a, d)?;
                }
                Op::Join(parts, dim) => {
                    let mut at = 0;
                    for p in parts {
                        let len = self.shape(p)[dim];
                        let d = self.narrow(g, dim, at, len)?;
                        acc(self, &mut adj, p, d)?;
                        at += len;
                    }
                }
                // Parameters are sliced out of one flat input and their derivatives concatenated
                // back by the caller: no derivative is taken through either.
                Op::Slice(..) | Op::Concat(_) => {}
            }
        }
        wrt.iter()
            .map(|&w| {
                Ok(match adj.get(w.0).copied().flatten() {
                    Some(g) => g,
                    None => self.full_like(0.0, w),
                })
            })
            .collect()
    }

    /// The derivative of the scalar `loss` with respect to a flat buffer of `len` values whose
    /// pieces `(offset, node)` were sliced out of it (each node an array of its piece's
    /// values): the pieces' derivatives flattened and concatenated, in offset order. The pieces
    /// must tile the buffer.
    pub fn flat_gradient(&mut self, loss: T, pieces: &[(usize, T)], len: usize) -> Result<T> {
        let mut pieces = pieces.to_vec();
        pieces.sort_by_key(|p| p.0);
        let wrt: Vec<T> = pieces.iter().map(|p| p.1).collect();
        let grads = self.grad(loss, &wrt)?;
        let mut flat = Vec::with_capacity(grads.len());
        let mut at = 0;
        for ((offset, t), dt) in pieces.iter().zip(grads) {
            ensure!(
                *offset == at,
                "XLA graph: values {at}..{offset} of the buffer are not used"
            );
            let n = numel(self.shape(*t));
            flat.push(self.reshape(dt, &[n])?);
            at += n;
        }
        ensure!(
            at == len,
            "XLA graph: values {at}..{len} of the buffer are not used"
        );
        self.concat(&flat)
    }

    /// The module: `main` takes the inputs in the order they were made and returns `outputs`.
    pub fn to_stablehlo(&self, outputs: &[T]) -> Result<String> {
        self.to_stablehlo_donating(outputs, &[])
    }

    /// [`Graph::to_stablehlo`], with input `i` donated to output `o` for each `(i, o)` of
    /// `donated` (`tf.aliasing_output`, as `jax.jit(donate_argnums=...)` lowers it): the output
    /// is written into the input's memory, which the caller must not use again.
    pub fn to_stablehlo_donating(
        &self,
        outputs: &[T],
        donated: &[(usize, usize)],
    ) -> Result<String> {
        for &(i, o) in donated {
            ensure!(
                i < self.inputs.len()
                    && o < outputs.len()
                    && self.shape(self.inputs[i]) == self.shape(outputs[o]),
                "XLA graph: input {i} cannot be donated to output {o}"
            );
        }
        let ty = |shape: &[usize]| -> String {
            let mut s = String::from("tensor<");
            for d in shape {
                let _ = write!(s, "{d}x");
            }
            s.push_str("f32>");
            s
        };
        let list = |v: &[usize]| -> String {
            v.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Only the nodes the outputs need.
        let mut live = vec![false; self.nodes.len()];
        for &o in outputs {
            ensure!(
                o.0 < self.nodes.len(),
                "XLA graph: output {o:?} is not a node"
            );
            live[o.0] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if !live[i] {
                continue;
            }
            for a in self.operands(i) {
                live[a.0] = true;
            }
        }
        let mut m = String::from("module @elbo {\n  func.func public @main(");
        let args: Vec<String> = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, t)| match donated.iter().find(|d| d.0 == i) {
                Some((_, o)) => format!(
                    "%arg{i}: {} {{tf.aliasing_output = {o} : i32}}",
                    ty(self.shape(*t))
                ),
                None => format!("%arg{i}: {}", ty(self.shape(*t))),
            })
            .collect();
        m.push_str(&args.join(", "));
        let results: Vec<String> = outputs.iter().map(|t| ty(self.shape(*t))).collect();
        let _ = writeln!(m, ") -> ({}) {{", results.join(", "));
        let name = |t: T| format!("%v{}", t.0);
        for (i, node) in self.nodes.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let out_ty = ty(&node.shape);
            let v = format!("%v{i}");
            let line = match &node.op {
                Op::Input(k) => format!("{v} = stablehlo.reshape %arg{k} : ({out_ty}) -> {out_ty}"),
                // The exact bits, as MLIR reads a hexadecimal float literal.
                Op::Const(c) => format!(
                    "{v} = stablehlo.constant dense<0x{:08X}> : {out_ty}",
                    c.to_bits()
                ),
                Op::Unary(u, a) => {
                    let op = match u {
                        Unary::Neg => "negate",
                        Unary::Exp => "exponential",
                        Unary::Log => "log",
                        Unary::Log1p => "log_plus_one",
                        Unary::Tanh => "tanh",
                        Unary::Logistic => "logistic",
                        Unary::Abs => "abs",
                        Unary::Sign => "sign",
                        Unary::Sqrt => "sqrt",
                        Unary::Sin => "sine",
                        Unary::Cos => "cosine",
                        Unary::Erf => "erf",
                        Unary::Erfc => "erfc",
                    };
                    if matches!(u, Unary::Erf | Unary::Erfc) {
                        format!("{v} = chlo.{op} {} : {out_ty} -> {out_ty}", name(*a))
                    } else {
                        format!("{v} = stablehlo.{op} {} : {out_ty}", name(*a))
                    }
                }
                Op::Binary(b, x, y) => {
                    let op = match b {
                        Binary::Add => "add",
                        Binary::Sub => "subtract",
                        Binary::Mul => "multiply",
                        Binary::Div => "divide",
                        Binary::Max => "maximum",
                    };
                    format!("{v} = stablehlo.{op} {}, {} : {out_ty}", name(*x), name(*y))
                }
                Op::Greater(x, y) => {
                    let pred = ty(&node.shape).replace("f32", "i1");
                    format!(
                        "{v}p = stablehlo.compare GT, {}, {}, FLOAT : ({out_ty}, {out_ty}) -> {pred}\n    {v} = stablehlo.convert {v}p : ({pred}) -> {out_ty}",
                        name(*x),
                        name(*y)
                    )
                }
                Op::Stop(a) => format!(
                    "{v} = stablehlo.reshape {} : ({out_ty}) -> {out_ty}",
                    name(*a)
                ),
                Op::Dot(a, b, lc, rc) => format!(
                    "{v} = stablehlo.dot_general {}, {}, contracting_dims = [{lc}] x [{rc}] : ({}, {}) -> {out_ty}",
                    name(*a),
                    name(*b),
                    ty(self.shape(*a)),
                    ty(self.shape(*b))
                ),
                Op::Broadcast(a, dims) => format!(
                    "{v} = stablehlo.broadcast_in_dim {}, dims = [{}] : ({}) -> {out_ty}",
                    name(*a),
                    list(dims),
                    ty(self.shape(*a))
                ),
                Op::Sum(a, dims) | Op::MaxOver(a, dims) => {
                    let (init, op) = match node.op {
                        Op::Sum(..) => ("0.0", "add"),
                        _ => ("0xFF800000", "maximum"),
                    };
                    format!(
                        "{v}i = stablehlo.constant dense<{init}> : tensor<f32>\n    {v} = stablehlo.reduce({} init: {v}i) applies stablehlo.{op} across dimensions = [{}] : ({}, tensor<f32>) -> {out_ty}",
                        name(*a),
                        list(dims),
                        ty(self.shape(*a))
                    )
                }
                Op::Reshape(a) => format!(
                    "{v} = stablehlo.reshape {} : ({}) -> {out_ty}",
                    name(*a),
                    ty(self.shape(*a))
                ),
                Op::Transpose(a, perm) => format!(
                    "{v} = stablehlo.transpose {}, dims = [{}] : ({}) -> {out_ty}",
                    name(*a),
                    list(perm),
                    ty(self.shape(*a))
                ),
                Op::Conv(l, r, c) => {
                    let pads: Vec<String> = c
                        .pad
                        .iter()
                        .map(|(lo, hi)| format!("[{lo}, {hi}]"))
                        .collect();
                    format!(
                        "{v} = stablehlo.convolution({}, {}) dim_numbers = {}, window = {{stride = [{}], pad = [{}], lhs_dilate = [{}], rhs_dilate = [{}]}} {{batch_group_count = 1 : i64, feature_group_count = 1 : i64}} : ({}, {}) -> {out_ty}",
                        name(*l),
                        name(*r),
                        c.dim_numbers(),
                        list(&c.stride),
                        pads.join(", "),
                        list(&c.lhs_dil),
                        list(&c.rhs_dil),
                        ty(self.shape(*l)),
                        ty(self.shape(*r))
                    )
                }
                Op::Reverse(a, dims) => format!(
                    "{v} = stablehlo.reverse {}, dims = [{}] : {out_ty}",
                    name(*a),
                    list(dims)
                ),
                Op::BatchDot(a, b) => format!(
                    "{v} = stablehlo.dot_general {}, {}, batching_dims = [0] x [0], contracting_dims = [2] x [1] : ({}, {}) -> {out_ty}",
                    name(*a),
                    name(*b),
                    ty(self.shape(*a)),
                    ty(self.shape(*b))
                ),
                Op::Block(a, starts) => {
                    let limits: Vec<usize> =
                        starts.iter().zip(&node.shape).map(|(s, n)| s + n).collect();
                    let ranges: Vec<String> = starts
                        .iter()
                        .zip(&limits)
                        .map(|(s, l)| format!("{s}:{l}"))
                        .collect();
                    format!(
                        "{v} = stablehlo.slice {} [{}] : ({}) -> {out_ty}",
                        name(*a),
                        ranges.join(", "),
                        ty(self.shape(*a))
                    )
                }
                Op::Pad(a, pad) => {
                    let lo: Vec<usize> = pad.iter().map(|p| p.0).collect();
                    let hi: Vec<usize> = pad.iter().map(|p| p.1).collect();
                    let zeros = vec![0usize; pad.len()];
                    format!(
                        "{v}z = stablehlo.constant dense<0.0> : tensor<f32>\n    {v} = stablehlo.pad {}, {v}z, low = [{}], high = [{}], interior = [{}] : ({}, tensor<f32>) -> {out_ty}",
                        name(*a),
                        list(&lo),
                        list(&hi),
                        list(&zeros),
                        ty(self.shape(*a))
                    )
                }
                Op::Join(parts, dim) => {
                    let names: Vec<String> = parts.iter().map(|p| name(*p)).collect();
                    let tys: Vec<String> = parts.iter().map(|p| ty(self.shape(*p))).collect();
                    format!(
                        "{v} = stablehlo.concatenate {}, dim = {dim} : ({}) -> {out_ty}",
                        names.join(", "),
                        tys.join(", ")
                    )
                }
                Op::DropoutMask(bases, p) => {
                    let b = node.shape[0];
                    let m: usize = node.shape[1..].iter().product();
                    let u = format!("tensor<{b}x{m}xui64>");
                    let f = format!("tensor<{b}x{m}xf32>");
                    let bi = name(*bases);
                    let k = |c: u64| format!("stablehlo.constant dense<{c}> : {u}");
                    let mut t = String::new();
                    let mut line = |s: String| {
                        let _ = write!(t, "{s}\n    ");
                    };
                    line(format!(
                        "{v}c = stablehlo.convert {bi} : (tensor<{b}x4xf32>) -> tensor<{b}x4xui64>"
                    ));
                    for j in 0..4 {
                        line(format!(
                            "{v}s{j} = stablehlo.slice {v}c [0:{b}, {j}:{}] : (tensor<{b}x4xui64>) -> tensor<{b}x1xui64>",
                            j + 1
                        ));
                        line(format!(
                            "{v}b{j} = stablehlo.broadcast_in_dim {v}s{j}, dims = [0, 1] : (tensor<{b}x1xui64>) -> {u}"
                        ));
                        line(format!("{v}k{j} = {}", k(16 * j as u64)));
                        line(format!(
                            "{v}h{j} = stablehlo.shift_left {v}b{j}, {v}k{j} : {u}"
                        ));
                    }
                    line(format!("{v}o1 = stablehlo.or {v}h0, {v}h1 : {u}"));
                    line(format!("{v}o2 = stablehlo.or {v}o1, {v}h2 : {u}"));
                    line(format!("{v}base = stablehlo.or {v}o2, {v}h3 : {u}"));
                    line(format!("{v}i = stablehlo.iota dim = 1 : {u}"));
                    line(format!("{v}z0 = stablehlo.add {v}base, {v}i : {u}"));
                    // splitmix64's finaliser.
                    line(format!("{v}g = {}", k(0x9E37_79B9_7F4A_7C15)));
                    line(format!("{v}z1 = stablehlo.add {v}z0, {v}g : {u}"));
                    for (j, (shift, mul)) in [
                        (30u64, 0xBF58_476D_1CE4_E5B9u64),
                        (27, 0x94D0_49BB_1331_11EB),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let (a, next) = (j + 1, j + 2);
                        line(format!("{v}r{a} = {}", k(shift)));
                        line(format!(
                            "{v}q{a} = stablehlo.shift_right_logical {v}z{a}, {v}r{a} : {u}"
                        ));
                        line(format!("{v}x{a} = stablehlo.xor {v}z{a}, {v}q{a} : {u}"));
                        line(format!("{v}m{a} = {}", k(mul)));
                        line(format!(
                            "{v}z{next} = stablehlo.multiply {v}x{a}, {v}m{a} : {u}"
                        ));
                    }
                    line(format!("{v}r3 = {}", k(31)));
                    line(format!(
                        "{v}q3 = stablehlo.shift_right_logical {v}z3, {v}r3 : {u}"
                    ));
                    line(format!("{v}z4 = stablehlo.xor {v}z3, {v}q3 : {u}"));
                    line(format!("{v}r4 = {}", k(40)));
                    line(format!(
                        "{v}top = stablehlo.shift_right_logical {v}z4, {v}r4 : {u}"
                    ));
                    line(format!("{v}tf = stablehlo.convert {v}top : ({u}) -> {f}"));
                    line(format!(
                        "{v}unit = stablehlo.constant dense<0x{:08X}> : {f}",
                        (1.0f32 / (1u32 << 24) as f32).to_bits()
                    ));
                    line(format!("{v}uu = stablehlo.multiply {v}tf, {v}unit : {f}"));
                    line(format!(
                        "{v}p = stablehlo.constant dense<0x{:08X}> : {f}",
                        p.to_bits()
                    ));
                    line(format!(
                        "{v}keep = stablehlo.compare GE, {v}uu, {v}p, FLOAT : ({f}, {f}) -> tensor<{b}x{m}xi1>"
                    ));
                    line(format!(
                        "{v}sc = stablehlo.constant dense<0x{:08X}> : {f}",
                        (1.0 / (1.0 - p)).to_bits()
                    ));
                    line(format!(
                        "{v}zero = stablehlo.constant dense<0x{:08X}> : {f}",
                        0f32.to_bits()
                    ));
                    line(format!(
                        "{v}sel = stablehlo.select {v}keep, {v}sc, {v}zero : tensor<{b}x{m}xi1>, {f}"
                    ));
                    format!("{t}{v} = stablehlo.reshape {v}sel : ({f}) -> {out_ty}")
                }
                Op::Slice(a, start) => format!(
                    "{v} = stablehlo.slice {} [{start}:{}] : ({}) -> {out_ty}",
                    name(*a),
                    start + node.shape[0],
                    ty(self.shape(*a))
                ),
                Op::Concat(parts) => {
                    let names: Vec<String> = parts.iter().map(|p| name(*p)).collect();
                    let tys: Vec<String> = parts.iter().map(|p| ty(self.shape(*p))).collect();
                    format!(
                        "{v} = stablehlo.concatenate {}, dim = 0 : ({}) -> {out_ty}",
                        names.join(", "),
                        tys.join(", ")
                    )
                }
            };
            let _ = writeln!(m, "    {line}");
        }
        let outs: Vec<String> = outputs.iter().map(|t| name(*t)).collect();
        let _ = writeln!(m, "    return {} : {}", outs.join(", "), results.join(", "));
        m.push_str("  }\n}\n");
        Ok(m)
    }

    fn operands(&self, i: usize) -> Vec<T> {
        match &self.nodes[i].op {
            Op::Input(_) | Op::Const(_) => vec![],
            Op::Unary(_, a)
            | Op::Stop(a)
            | Op::Broadcast(a, _)
            | Op::Sum(a, _)
            | Op::MaxOver(a, _)
            | Op::Reshape(a)
            | Op::Slice(a, _)
            | Op::Transpose(a, _) => vec![*a],
            Op::Binary(_, a, b) | Op::Greater(a, b) | Op::Dot(a, b, _, _) | Op::Conv(a, b, _) => {
                vec![*a, *b]
            }
            Op::Reverse(a, _) | Op::Block(a, _) | Op::Pad(a, _) | Op::DropoutMask(a, _) => vec![*a],
            Op::BatchDot(a, b) => vec![*a, *b],
            Op::Join(parts, _) => parts.clone(),
            Op::Concat(parts) => parts.clone(),
        }
    }

    /// `main`'s inputs, in the order they were made.
    pub fn inputs(&self) -> &[T] {
        &self.inputs
    }

    /// The shapes of `main`'s inputs, in order.
    pub fn input_shapes(&self) -> Vec<Vec<usize>> {
        self.inputs
            .iter()
            .map(|t| self.shape(*t).to_vec())
            .collect()
    }
}
