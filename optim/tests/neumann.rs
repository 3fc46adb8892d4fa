//! The Neumann optimizer: on a quadratic with a known Hessian its iterate converges to the
//! Newton step, a reset restores the state the paper's algorithm 2 says, the regularisers are
//! the gradient of the paper's terms, it trains a model through Burn's `Optimizer`, and a
//! resumed run is bit for bit the uninterrupted one.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::Module;
use burn::optim::{Optimizer, SimpleOptimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{Tensor, TensorData};
use common::models::*;
use common::*;
use hylo_optim::neumann::{neumann_output, regularizer, NeumannState};
use hylo_optim::{CaptureHandle, NeumannConfig};

fn vector(values: &[f64]) -> Tensor<IB, 1> {
    let v: Vec<f32> = values.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), &Default::default())
}

/// `H x` for a dense row-major `h`.
fn mat_vec(h: &[f64], x: &[f64]) -> Vec<f64> {
    let n = x.len();
    (0..n)
        .map(|i| (0..n).map(|j| h[i * n + j] * x[j]).sum())
        .collect()
}

#[test]
fn on_a_quadratic_the_iterate_converges_to_the_newton_step() {
    // f(w) = (w - w*)^T H (w - w*) / 2 with a dense H of condition number 20: from w0 the
    // Newton step is -H^-1 grad f(w0) = w* - w0. Regularisers off (they are the paper's
    // convexification of non-convex mini-batches), no warm-up, no reset.
    let n = 6;
    let q = to_mat(tensor::<IB, 2>(3, [n, n]));
    let (qr, _, _) = hylo_optim::linalg::pivoted_qr(q.as_ref());
    let eig: Vec<f64> = (0..n)
        .map(|i| 1.0 + 19.0 * i as f64 / (n - 1) as f64)
        .collect();
    let h: Vec<f64> = (0..n * n)
        .map(|k| {
            let (i, j) = (k / n, k % n);
            (0..n).map(|l| qr[(i, l)] * eig[l] * qr[(j, l)]).sum()
        })
        .collect();
    let w_star: Vec<f64> = values(5, n).iter().map(|v| f64::from(*v)).collect();
    let w0: Vec<f64> = values(6, n).iter().map(|v| 2.0 * f64::from(*v)).collect();
    let g0 = mat_vec(
        &h,
        &w0.iter()
            .zip(&w_star)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
    );
    let config = NeumannConfig::new(10)
        .with_alpha(0.0)
        .with_beta(0.0)
        .with_sgd_warmup_steps(Some(0))
        .with_reset_every(Some(100_000));
    let optim = config.build().unwrap();
    // eta = 1 / lambda_max, as the paper's derivation takes it.
    let lr = 1.0 / 20.0;
    let mut w = vector(&w0);
    let mut state: Option<NeumannState<IB, 1>> = None;
    for _ in 0..400 {
        let here: Vec<f64> = to_vec(w.clone());
        let diff: Vec<f64> = here.iter().zip(&w_star).map(|(a, b)| a - b).collect();
        let g = vector(&mat_vec(&h, &diff));
        let (next, s) = optim.step(lr, w, g, state);
        w = next;
        state = s;
    }
    let out = to_vec(neumann_output(&config, w, state.as_ref().unwrap()));
    let step: Vec<f64> = out.iter().zip(&w0).map(|(a, b)| a - b).collect();
    // The Newton step, solved densely.
    let hm = faer::Mat::from_fn(n, n, |i, j| h[i * n + j]);
    let rhs = faer::Mat::from_fn(n, 1, |i, _| -g0[i]);
    let newton = hylo_optim::linalg::lu_solve(hm.as_ref(), rhs.as_ref()).unwrap();
    let newton: Vec<f64> = (0..n).map(|i| newton[(i, 0)]).collect();
    let err = rel_err(&step, &newton);
    assert!(err < 1e-4, "step {step:?} vs Newton {newton:?}: {err}");
}

#[test]
fn a_reset_restarts_the_series_from_the_current_gradient() {
    // Warm-up 2 steps, reset every 3: Neumann steps s = 1, 4, 7 are resets (m = -eta g), the
    // others accumulate m = mu m - eta d.
    let config = NeumannConfig::new(4)
        .with_sgd_warmup_steps(Some(2))
        .with_reset_every(Some(3));
    let optim = config.build().unwrap();
    let lr = 0.1;
    let w0 = [1.0, -2.0, 0.5];
    let mut w = vector(&w0);
    let mut state: Option<NeumannState<IB, 1>> = None;
    for t in 1..=9usize {
        let g = vector(&[0.3, -0.1 * t as f64, 0.2]);
        let before = to_vec(w.clone());
        let m_before = state.as_ref().map(|s| to_vec(s.m.clone()));
        let (next, s) = optim.step(lr, w, g.clone(), state);
        let s = s.unwrap();
        let (after, m, gv) = (to_vec(next.clone()), to_vec(s.m.clone()), to_vec(g));
        assert_eq!(s.step, t);
        if t <= 2 {
            // SGD, the moving average at the initial weights, no momentum.
            for k in 0..3 {
                assert!((after[k] - (before[k] - lr * gv[k])).abs() < 1e-6, "t {t}");
            }
            assert_eq!(m, vec![0.0; 3]);
            assert!(rel_err(&to_vec(s.v.clone()), &w0) < 1e-7);
        } else if (t - 2 - 1) % 3 == 0 {
            let mu = config.momentum_at(t - 2);
            for k in 0..3 {
                assert!((m[k] + lr * gv[k]).abs() < 1e-6, "t {t}: reset m {m:?}");
                let expected = before[k] + mu * m[k] - lr * gv[k];
                assert!((after[k] - expected).abs() < 1e-6, "t {t}");
            }
        } else {
            // Not a reset: m keeps its history (m = mu m_prev - eta d, d with the regularisers).
            let mu = config.momentum_at(t - 2);
            let m_prev = m_before.unwrap();
            let plain: Vec<f64> = (0..3).map(|k| mu * m_prev[k] - lr * gv[k]).collect();
            assert!(rel_err(&m, &plain) < 1e-2, "t {t}: {m:?} vs {plain:?}");
        }
        w = next;
        state = Some(s);
    }
}

#[test]
fn the_regularisers_are_the_gradient_of_the_papers_terms() {
    // alpha/3 |w - v|^3 + beta n / |w - v| has the gradient
    // (alpha |u|^2 - beta n / |u|^2) u / |u|, u = w - v; checked by central differences.
    let (alpha, beta) = (0.3, 0.02);
    let w0 = [0.4, -0.2, 0.9, 0.1];
    let v = [0.1, 0.3, 0.2, -0.4];
    let energy = |w: &[f64]| {
        let norm = w
            .iter()
            .zip(&v)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        alpha / 3.0 * norm.powi(3) + beta * 4.0 / norm
    };
    let got = to_vec(regularizer(&vector(&w0), &vector(&v), alpha, beta));
    let expected: Vec<f64> = (0..4)
        .map(|k| {
            let (mut plus, mut minus) = (w0.to_vec(), w0.to_vec());
            plus[k] += 1e-6;
            minus[k] -= 1e-6;
            (energy(&plus) - energy(&minus)) / 2e-6
        })
        .collect();
    assert!(rel_err(&got, &expected) < 1e-4, "{got:?} vs {expected:?}");
    // Where the weights equal their average the terms are left out (no division by zero).
    let zero = to_vec(regularizer(&vector(&v), &vector(&v), alpha, beta));
    assert_eq!(zero, vec![0.0; 4]);
}

/// `steps` full-batch steps of the MLP problem; the losses.
fn train<O: Optimizer<Mlp<TB>, TB>>(
    model: Mlp<TB>,
    optim: &mut O,
    capture: &CaptureHandle,
    steps: usize,
    lr: f64,
) -> (Mlp<TB>, Vec<f64>) {
    let (x, y) = mlp_problem(64, 8, 4);
    let mut model = model;
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (next, loss) = step(model, optim, capture, lr, |m: &Mlp<TB>| {
            cross_entropy(m.forward(x.clone()), y.clone())
        });
        model = next;
        losses.push(loss);
    }
    (model, losses)
}

#[test]
fn it_trains_a_model_and_a_resumed_run_is_bit_for_bit_the_same() {
    let config = NeumannConfig::new(4);
    let capture = CaptureHandle::new();
    let start = Mlp::<TB>::new(8, 16, 4, &capture);
    let mut optim = config.init::<TB, Mlp<TB>>().unwrap();
    let (whole, losses) = train(start.clone(), &mut optim, &capture, 30, 0.1);
    assert!(losses[29] < 0.6 * losses[0], "{losses:?}");
    // 12 steps, a save and a reload into a fresh optimizer, 18 more.
    let mut first = config.init::<TB, Mlp<TB>>().unwrap();
    let (half, _) = train(start, &mut first, &capture, 12, 0.1);
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(first.to_record(), ()).unwrap();
    let model_bytes = recorder.record(half.into_record(), ()).unwrap();
    let record = recorder.load(bytes, &Default::default()).unwrap();
    let mut second = config.init::<TB, Mlp<TB>>().unwrap().load_record(record);
    let half = Mlp::<TB>::new(8, 16, 4, &capture)
        .load_record(recorder.load(model_bytes, &Default::default()).unwrap());
    let (resumed, _) = train(half, &mut second, &capture, 18, 0.1);
    for (a, b) in [(&whole.l1, &resumed.l1), (&whole.l2, &resumed.l2)] {
        assert_eq!(
            to_vec(a.inner.weight.val().inner()),
            to_vec(b.inner.weight.val().inner())
        );
    }
}

#[test]
fn invalid_settings_name_the_field() {
    for (config, field) in [
        (NeumannConfig::new(0), "steps_per_epoch"),
        (NeumannConfig::new(5).with_gamma(1.0), "gamma"),
        (NeumannConfig::new(5).with_beta(-1.0), "beta"),
        (
            NeumannConfig::new(5).with_momentum_end(0.4),
            "momentum_start",
        ),
        (
            NeumannConfig::new(5).with_reset_every(Some(0)),
            "reset_every",
        ),
    ] {
        let err = config.build().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}
