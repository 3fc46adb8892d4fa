//! A 2-D convolution (groups = 1) and its two gradients as sums of matrix products on row-major
//! f32 buffers, without unfolding patches.
//!
//! The padded input of each sample is split into `s_h x s_w` phase images (for stride 1 there is
//! one: the padded input itself), each `[C, Hq, Wq]` with `Hq = Hp / s_h`, `Wq = Wp / s_w`.
//! Kernel offset `(u, v)` reads, for output `(r, q)`, input row `r s_h + u d_h` and column
//! `q s_w + v d_w`: phase `((u d_h) % s_h, (v d_w) % s_w)` at `(r + u d_h / s_h, q + v d_w / s_w)`.
//! Over the flattened phase image those positions are `off_uv + r Wq + q`, so with the output
//! laid out "wide" (`[Co, oh, Wq]`, columns `q >= ow` unused) the input of offset `(u, v)` is one
//! strided matrix `[C, oh Wq]` (row stride `Hq Wq`) and
//!
//! - forward: `Y_wide = sum_uv W_uv X_uv` (`W_uv = W[:, :, u, v]`, `[Co, C]`),
//! - weight gradient: `dW_uv = sum_samples dY_wide X_uv^T`,
//! - input gradient: `dX_uv += W_uv^T dY_wide` (into the phase images, then back to the input),
//!
//! with `dY_wide` zero in the unused columns. Every product is a GEMM (the `gemm` crate, which
//! Burn's CPU backend uses too) reading its operands in place; samples run in parallel (rayon).
//! The only copies are the phase images (one pass over the input) and the wide output gradient.

use rayon::prelude::*;

/// The shape of one convolution: input, kernel, stride, dilation, padding and what follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub co: usize,
    /// Input height and width.
    pub hw: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Padding `[top, bottom, left, right]`.
    pub padding: [usize; 4],
    /// Output height and width.
    pub out: [usize; 2],
    /// Height and width of each phase image.
    pub phase_hw: [usize; 2],
}

impl ConvShape {
    /// The shape of a convolution of an `[n, c, h, w]` input with a `[co, c, kh, kw]` kernel, or
    /// why there is none: the weight's input channels differ from the input's, a size, stride or
    /// dilation is zero, or the dilated kernel is larger than the padded input.
    pub fn new(
        input: [usize; 4],
        weight: [usize; 4],
        stride: [usize; 2],
        dilation: [usize; 2],
        padding: [usize; 4],
    ) -> Result<Self, String> {
        let [n, c, h, w] = input;
        let [co, ci, kh, kw] = weight;
        if ci != c {
            return Err(format!(
                "a weight of {ci} input channels ({weight:?}) on an input of {c} ({input:?})"
            ));
        }
        if input.contains(&0) || weight.contains(&0) || stride.contains(&0) || dilation.contains(&0)
        {
            return Err(format!(
                "a zero size: input {input:?}, weight {weight:?}, stride {stride:?}, dilation \
                 {dilation:?}"
            ));
        }
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let padded = [h + padding[0] + padding[1], w + padding[2] + padding[3]];
        if padded[0] < span(kh, dilation[0]) || padded[1] < span(kw, dilation[1]) {
            return Err(format!(
                "a dilated kernel of {}x{} does not fit the padded input of {}x{}",
                span(kh, dilation[0]),
                span(kw, dilation[1]),
                padded[0],
                padded[1]
            ));
        }
        let out = [
            (padded[0] - span(kh, dilation[0])) / stride[0] + 1,
            (padded[1] - span(kw, dilation[1])) / stride[1] + 1,
        ];
        // Every window `off_uv + [0, oh Wq)` must lie inside its phase image: one row more than
        // the last offset's rows, and at least the padded input.
        let rows =
            (padded[0].div_ceil(stride[0])).max(out[0] + (dilation[0] * (kh - 1)) / stride[0] + 1);
        let cols =
            (padded[1].div_ceil(stride[1])).max(out[1] + (dilation[1] * (kw - 1)) / stride[1]);
        Ok(Self {
            n,
            c,
            co,
            hw: [h, w],
            kernel: [kh, kw],
            stride,
            dilation,
            padding,
            out,
            phase_hw: [rows, cols],
        })
    }

    /// Scratch memory of one worker task (bytes): a sample's phase images and their gradient,
    /// its wide output, and in the backward pass the task's weight- and bias-gradient
    /// accumulators (the reduction holds a second pair while it adds two tasks' sums).
    pub fn scratch_bytes(&self) -> usize {
        let accumulators = self.co * self.c * self.kernel[0] * self.kernel[1] + self.co;
        4 * (2 * self.sample_len() + self.co * self.wide_len() + 2 * accumulators)
    }

    /// Floats of the input `[n, c, h, w]`.
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.hw[0] * self.hw[1]
    }

    /// Floats of the weight `[co, c, kh, kw]`.
    pub fn weight_len(&self) -> usize {
        self.co * self.c * self.kernel[0] * self.kernel[1]
    }

    /// Floats of the output `[n, co, oh, ow]`.
    pub fn output_len(&self) -> usize {
        self.n * self.co * self.out[0] * self.out[1]
    }

    /// The same convolution restricted to `c` input channels (a block of them).
    fn with_channels(&self, c: usize) -> Self {
        Self { c, ..self.clone() }
    }

    fn phases(&self) -> usize {
        self.stride[0] * self.stride[1]
    }

    fn phase_len(&self) -> usize {
        self.phase_hw[0] * self.phase_hw[1]
    }

    /// Floats of one sample's phase images.
    fn sample_len(&self) -> usize {
        self.phases() * self.c * self.phase_len()
    }

    /// Positions of the wide output `oh Wq`.
    fn wide_len(&self) -> usize {
        self.out[0] * self.phase_hw[1]
    }

    /// Kernel offsets `(u, v)` with the start of their window in a sample's phase buffer.
    fn windows(&self) -> Vec<(usize, usize, usize)> {
        let [s0, s1] = self.stride;
        let [d0, d1] = self.dilation;
        let mut out = Vec::with_capacity(self.kernel[0] * self.kernel[1]);
        for u in 0..self.kernel[0] {
            for v in 0..self.kernel[1] {
                let (ru, cv) = (u * d0, v * d1);
                let phase = (ru % s0) * s1 + cv % s1;
                let start =
                    phase * self.c * self.phase_len() + (ru / s0) * self.phase_hw[1] + cv / s1;
                out.push((u, v, start));
            }
        }
        out
    }

    /// Where input row `row` and the input columns `col0, col0 + s_w, ...` land in a sample's
    /// phase buffer (for channel 0; channel `c` adds `c Hq Wq`): `(start, count)` per phase
    /// column, as `(col0, start, count)`.
    fn row_runs(&self, row: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let [_, w] = self.hw;
        let [s0, s1] = self.stride;
        let [top, _, left, _] = self.padding;
        let (pl, wq) = (self.phase_len(), self.phase_hw[1]);
        let pr = row + top;
        (0..s1.min(w)).map(move |col0| {
            let pc = col0 + left;
            let phase = (pr % s0) * s1 + pc % s1;
            let start = phase * self.c * pl + (pr / s0) * wq + pc / s1;
            (col0, start, (w - col0).div_ceil(s1))
        })
    }

    /// Sample `b`'s padded input rearranged into its phase images (zero where padding).
    fn phase_images(&self, x: &[f32], b: usize, out: &mut [f32]) {
        let [h, w] = self.hw;
        let (pl, s1) = (self.phase_len(), self.stride[1]);
        out.fill(0.0);
        for row in 0..h {
            for (col0, start, count) in self.row_runs(row) {
                for c in 0..self.c {
                    let src = &x[((b * self.c + c) * h + row) * w + col0..];
                    let dst = &mut out[start + c * pl..][..count];
                    if s1 == 1 {
                        dst.copy_from_slice(&src[..count]);
                    } else {
                        for (d, s) in dst.iter_mut().zip(src.iter().step_by(s1)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }

    /// One sample's input gradient `[c, h, w]` from the gradient of its phase images.
    fn gradient_of_phase_images(&self, dphase: &[f32], dx: &mut [f32]) {
        let [h, w] = self.hw;
        let (pl, s1) = (self.phase_len(), self.stride[1]);
        for row in 0..h {
            for (col0, start, count) in self.row_runs(row) {
                for c in 0..self.c {
                    let src = &dphase[start + c * pl..][..count];
                    let dst = &mut dx[(c * h + row) * w + col0..];
                    if s1 == 1 {
                        dst[..count].copy_from_slice(src);
                    } else {
                        for (d, s) in dst.iter_mut().step_by(s1).zip(src) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// `dst (+)= lhs rhs` on strided f32 matrices (`m x k` times `k x n`), single-threaded.
///
/// # Safety
/// Every pointer with its strides must address valid memory for the whole matrix; `dst` must
/// not overlap the operands.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    [dst_rs, dst_cs]: [isize; 2],
    accumulate: bool,
    lhs: *const f32,
    [lhs_rs, lhs_cs]: [isize; 2],
    rhs: *const f32,
    [rhs_rs, rhs_cs]: [isize; 2],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Samples per parallel task: about one task per thread, so that each keeps one scratch buffer
/// and one weight-gradient accumulator.
fn samples_per_task(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads()).max(1)
}

/// Blocks each sample's work is split into so that every thread has some when the batch is
/// smaller than the thread count (1 otherwise), at most `limit`.
fn blocks_per_sample(n: usize, limit: usize) -> usize {
    rayon::current_num_threads()
        .div_ceil(n)
        .clamp(1, limit.max(1))
}

/// Checks the buffers' lengths against `shape` (the kernels read them through raw pointers).
fn check_lengths(shape: &ConvShape, x: usize, weight: usize, other: (&str, usize, usize)) {
    assert_eq!(x, shape.input_len(), "input length for {shape:?}");
    assert_eq!(weight, shape.weight_len(), "weight length for {shape:?}");
    let (what, got, expected) = other;
    assert_eq!(got, expected, "{what} length for {shape:?}");
}

/// The convolution of `x` `[n, c, h, w]` with `weight` `[co, c, kh, kw]` plus `bias` `[co]`:
/// `[n, co, oh, ow]`. Panics when a buffer's length does not fit `shape`.
pub fn forward(shape: &ConvShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    check_lengths(
        shape,
        x.len(),
        weight.len(),
        ("bias", bias.map_or(shape.co, <[f32]>::len), shape.co),
    );
    let [oh, ow] = shape.out;
    let (wide, wq, kk) = (
        shape.wide_len(),
        shape.phase_hw[1],
        shape.kernel[0] * shape.kernel[1],
    );
    let windows = shape.windows();
    // Output channels per task: all of them, or a block when the batch leaves threads idle.
    let blocks = blocks_per_sample(shape.n, shape.co);
    let per_task = shape.co.div_ceil(blocks);
    let mut out = vec![0.0f32; shape.n * shape.co * oh * ow];
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(shape.co * oh * ow)
        .enumerate()
        .flat_map(|(b, out_b)| {
            out_b
                .chunks_mut(per_task * oh * ow)
                .enumerate()
                .map(move |(k, block)| (b, k * per_task, block))
        })
        .collect();
    tasks
        .into_par_iter()
        .with_min_len(if blocks > 1 {
            1
        } else {
            samples_per_task(shape.n)
        })
        .for_each_init(
            || {
                (
                    vec![0.0f32; shape.sample_len()],
                    vec![0.0f32; per_task * wide],
                )
            },
            |(phases, y), (b, co0, out_block)| {
                let rows = out_block.len() / (oh * ow);
                shape.phase_images(x, b, phases);
                for (i, &(u, v, start)) in windows.iter().enumerate() {
                    // SAFETY: W_uv's rows co0..co0 + rows are `[rows, c]` inside `weight` (row
                    // stride c kk, column stride kk); the window `[c, oh Wq]` starts at `start`
                    // with row stride `Hq Wq` and ends inside the sample's phase buffer
                    // (`ConvShape::new` sizes it); `y` is its own buffer of at least
                    // `[rows, oh Wq]`.
                    unsafe {
                        gemm(
                            [rows, wide, shape.c],
                            y.as_mut_ptr(),
                            [wide as isize, 1],
                            i > 0,
                            weight
                                .as_ptr()
                                .add(co0 * shape.c * kk + u * shape.kernel[1] + v),
                            [(shape.c * kk) as isize, kk as isize],
                            phases.as_ptr().add(start),
                            [shape.phase_len() as isize, 1],
                        );
                    }
                }
                for o in 0..rows {
                    let b_co = bias.map_or(0.0, |bias| bias[co0 + o]);
                    for r in 0..oh {
                        let src = &y[o * wide + r * wq..][..ow];
                        let dst = &mut out_block[(o * oh + r) * ow..][..ow];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d = s + b_co;
                        }
                    }
                }
            },
        );
    out
}

/// The input's, the weight's and the bias's gradient, each when asked for.
pub type ConvGradients = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Gradients of the convolution for the output gradient `dy` `[n, co, oh, ow]`: the input's
/// `[n, c, h, w]`, the weight's `[co, c, kh, kw]` and the bias's `[co]`, each when asked for.
/// Panics when a buffer's length does not fit `shape`.
pub fn backward(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    want: [bool; 3],
) -> ConvGradients {
    check_lengths(
        shape,
        x.len(),
        weight.len(),
        ("output gradient", dy.len(), shape.output_len()),
    );
    if blocks_per_sample(shape.n, shape.co.min(shape.c)) > 1 {
        return backward_split(shape, x, weight, dy, want);
    }
    backward_by_sample(shape, x, weight, dy, want)
}

/// `backward` with one task per group of samples (each with its own accumulators).
fn backward_by_sample(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    [want_dx, want_dw, want_db]: [bool; 3],
) -> ConvGradients {
    let [oh, ow] = shape.out;
    let [h, w] = shape.hw;
    let (wide, kk) = (shape.wide_len(), shape.kernel[0] * shape.kernel[1]);
    let (c, co) = (shape.c, shape.co);
    let windows = shape.windows();
    let weight_len = co * c * kk;
    let mut dx = want_dx.then(|| vec![0.0f32; shape.n * c * h * w]);
    // Per sample: its input gradient (written in place) and its share of dW and db (summed).
    let sample = |b: usize,
                  dx_b: Option<&mut [f32]>,
                  acc: &mut (Vec<f32>, Vec<f32>),
                  scratch: &mut (Vec<f32>, Vec<f32>, Vec<f32>)| {
        let (phases, dy_wide, dphases) = scratch;
        wide_output_gradient(shape, dy, b, 0, co, dy_wide);
        if want_db {
            for o in 0..co {
                acc.1[o] += dy[(b * co + o) * oh * ow..][..oh * ow].iter().sum::<f32>();
            }
        }
        if want_dw {
            shape.phase_images(x, b, phases);
            for &(u, v, start) in &windows {
                // SAFETY: dW_uv is `[co, c]` inside the `[co, c, kh, kw]` accumulator; dY_wide is
                // `[co, oh Wq]`; X_uv^T is `[oh Wq, c]` read from the window (see `forward`).
                unsafe {
                    gemm(
                        [co, c, wide],
                        acc.0.as_mut_ptr().add(u * shape.kernel[1] + v),
                        [(c * kk) as isize, kk as isize],
                        true,
                        dy_wide.as_ptr(),
                        [wide as isize, 1],
                        phases.as_ptr().add(start),
                        [1, shape.phase_len() as isize],
                    );
                }
            }
        }
        if let Some(dx_b) = dx_b {
            dphases.fill(0.0);
            // Windows overlap: one offset after the other.
            for &(u, v, start) in &windows {
                // SAFETY: W_uv^T is `[c, co]` inside `weight`; the window `[c, oh Wq]` of the
                // phase gradient is inside the sample's buffer (as in `forward`), which does not
                // overlap `weight` or `dy_wide`.
                unsafe {
                    gemm(
                        [c, wide, co],
                        dphases.as_mut_ptr().add(start),
                        [shape.phase_len() as isize, 1],
                        true,
                        weight.as_ptr().add(u * shape.kernel[1] + v),
                        [kk as isize, (c * kk) as isize],
                        dy_wide.as_ptr(),
                        [wide as isize, 1],
                    );
                }
            }
            shape.gradient_of_phase_images(dphases, dx_b);
        }
    };
    let scratch = || {
        (
            vec![0.0f32; if want_dw { shape.sample_len() } else { 0 }],
            vec![0.0f32; co * wide],
            vec![0.0f32; if want_dx { shape.sample_len() } else { 0 }],
        )
    };
    let zero_acc = || {
        (
            vec![0.0f32; if want_dw { weight_len } else { 0 }],
            vec![0.0f32; co],
        )
    };
    let add = |mut a: (Vec<f32>, Vec<f32>), b: (Vec<f32>, Vec<f32>)| {
        a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
        a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
        a
    };
    let (dw, db) = match dx.as_mut() {
        Some(dx) => dx
            .par_chunks_mut(c * h * w)
            .enumerate()
            .with_min_len(samples_per_task(shape.n))
            .fold(
                || (zero_acc(), scratch()),
                |(mut acc, mut s), (b, dx_b)| {
                    sample(b, Some(dx_b), &mut acc, &mut s);
                    (acc, s)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(zero_acc, add),
        None => (0..shape.n)
            .into_par_iter()
            .with_min_len(samples_per_task(shape.n))
            .fold(
                || (zero_acc(), scratch()),
                |(mut acc, mut s), b| {
                    sample(b, None, &mut acc, &mut s);
                    (acc, s)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(zero_acc, add),
    };
    (dx, want_dw.then_some(dw), want_db.then_some(db))
}

/// Sample `b`'s output gradient, rows `co0..co0 + rows`, laid out wide (`[rows, oh Wq]`, zero in
/// the unused columns).
fn wide_output_gradient(
    shape: &ConvShape,
    dy: &[f32],
    b: usize,
    co0: usize,
    rows: usize,
    out: &mut [f32],
) {
    let [oh, ow] = shape.out;
    let (wide, wq) = (shape.wide_len(), shape.phase_hw[1]);
    out.fill(0.0);
    for o in 0..rows {
        for r in 0..oh {
            out[o * wide + r * wq..][..ow]
                .copy_from_slice(&dy[((b * shape.co + co0 + o) * oh + r) * ow..][..ow]);
        }
    }
}

/// `backward` for batches smaller than the thread count: the weight and bias gradients by
/// blocks of output channels (each task sums every sample for its rows: no reduction), the
/// input gradient by sample and block of input channels.
fn backward_split(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    [want_dx, want_dw, want_db]: [bool; 3],
) -> ConvGradients {
    let [oh, ow] = shape.out;
    let [h, w] = shape.hw;
    let (c, co) = (shape.c, shape.co);
    let (wide, kk) = (shape.wide_len(), shape.kernel[0] * shape.kernel[1]);
    let windows = shape.windows();
    let mut dw = want_dw.then(|| vec![0.0f32; shape.weight_len()]);
    let db = want_db.then(|| {
        (0..co)
            .map(|o| {
                (0..shape.n)
                    .map(|b| dy[(b * co + o) * oh * ow..][..oh * ow].iter().sum::<f32>())
                    .sum()
            })
            .collect::<Vec<f32>>()
    });
    if let Some(dw) = dw.as_mut() {
        let per_task = co.div_ceil(rayon::current_num_threads().min(co));
        dw.par_chunks_mut(per_task * c * kk)
            .enumerate()
            .for_each(|(k, dw_block)| {
                let (co0, rows) = (k * per_task, dw_block.len() / (c * kk));
                let mut phases = vec![0.0f32; shape.sample_len()];
                let mut dy_wide = vec![0.0f32; rows * wide];
                for b in 0..shape.n {
                    shape.phase_images(x, b, &mut phases);
                    wide_output_gradient(shape, dy, b, co0, rows, &mut dy_wide);
                    for &(u, v, start) in &windows {
                        // SAFETY: dW_uv's rows co0.. are `[rows, c]` inside this task's block of
                        // the `[co, c, kh, kw]` gradient; dY_wide is `[rows, oh Wq]`; X_uv^T is
                        // `[oh Wq, c]` read from the window (see `forward`).
                        unsafe {
                            gemm(
                                [rows, c, wide],
                                dw_block.as_mut_ptr().add(u * shape.kernel[1] + v),
                                [(c * kk) as isize, kk as isize],
                                true,
                                dy_wide.as_ptr(),
                                [wide as isize, 1],
                                phases.as_ptr().add(start),
                                [1, shape.phase_len() as isize],
                            );
                        }
                    }
                }
            });
    }
    let dx = want_dx.then(|| {
        let mut dx = vec![0.0f32; shape.input_len()];
        let per_task = c.div_ceil(blocks_per_sample(shape.n, c));
        dx.par_chunks_mut(c * h * w)
            .enumerate()
            .flat_map(|(b, dx_b)| {
                dx_b.par_chunks_mut(per_task * h * w)
                    .enumerate()
                    .map(move |(k, block)| (b, k * per_task, block))
            })
            .for_each(|(b, c0, dx_block)| {
                let sub = shape.with_channels(dx_block.len() / (h * w));
                let sub_windows = sub.windows();
                let mut dy_wide = vec![0.0f32; co * wide];
                wide_output_gradient(shape, dy, b, 0, co, &mut dy_wide);
                let mut dphases = vec![0.0f32; sub.sample_len()];
                for &(u, v, start) in &sub_windows {
                    // SAFETY: W_uv^T's rows c0..c0 + sub.c are `[sub.c, co]` inside `weight`
                    // (row stride kk, column stride c kk); the window `[sub.c, oh Wq]` of this
                    // block's phase gradient is inside its own buffer (sized by `sub`).
                    unsafe {
                        gemm(
                            [sub.c, wide, co],
                            dphases.as_mut_ptr().add(start),
                            [sub.phase_len() as isize, 1],
                            true,
                            weight.as_ptr().add(c0 * kk + u * shape.kernel[1] + v),
                            [kk as isize, (c * kk) as isize],
                            dy_wide.as_ptr(),
                            [wide as isize, 1],
                        );
                    }
                }
                sub.gradient_of_phase_images(&dphases, dx_block);
            });
        dx
    });
    (dx, dw, db)
}
