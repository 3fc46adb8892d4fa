//! Data-parallel training with P = 2 in-process workers (the `ThreadGroup` communicator; the
//! MPI communicator runs the same code under `mpirun`, checked by `.ci/run`): one step of SGD,
//! SNGD and K-FAC equals a single process on the union of the shards; HyLo's workers agree bit
//! for bit; the bytes moved follow ALGORITHMS.md.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use std::sync::Arc;

use burn::module::Module;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use common::models::{cnn_problem, cross_entropy, Cnn};
use common::{kid_direction_dense, kid_skeleton_dense, rel_err, TB};
use faer::Mat;
use hylo_optim::comm::{all_reduce_mean, flatten_params, Communicator, Single, ThreadGroup};
use hylo_optim::{
    CaptureHandle, CurvatureConfig, DampingConfig, Graft, HyloConfig, KfacConfig, SngdConfig,
    StepReport, SwitchPolicy,
};

fn weights(model: &Cnn<TB>) -> Vec<f32> {
    flatten_params::<TB, _>(model)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sgd,
    Sngd,
    Kfac,
    KfacInverse,
    Kid,
    Kis,
}

fn curvature() -> CurvatureConfig {
    CurvatureConfig::new()
        .with_freq(1)
        .with_damping(DampingConfig::new().with_initial(0.5))
        .with_graft(Graft::None)
}

/// Runs `steps` steps on samples `range` of the problem with communicator `comm`; returns the
/// weights and each step's report.
fn train(
    kind: Kind,
    start: &Cnn<TB>,
    range: std::ops::Range<usize>,
    comm: Arc<dyn Communicator>,
    steps: usize,
) -> (Vec<f32>, Vec<StepReport>) {
    let capture = CaptureHandle::new();
    let mut model = Cnn::<TB>::new(4, &capture).load_record(start.clone().into_record());
    let (x, y) = cnn_problem(16);
    let (x, y) = (x.slice([range.clone()]), y.slice([range]));
    let mut reports = Vec::new();
    let distributed = comm.size() > 1;
    let mut natural = match kind {
        Kind::Sgd => None,
        Kind::Sngd => Some(
            SngdConfig::new()
                .with_curvature(curvature())
                .init::<TB>(&capture)
                .unwrap(),
        ),
        Kind::Kfac | Kind::KfacInverse => Some(
            KfacConfig::new()
                .with_curvature(curvature())
                .with_inverse_every(1)
                .with_method(if matches!(kind, Kind::Kfac) {
                    hylo_optim::KfacMethod::Eigen
                } else {
                    hylo_optim::KfacMethod::Inverse
                })
                .init::<TB>(&capture)
                .unwrap(),
        ),
        Kind::Kid | Kind::Kis => Some(
            HyloConfig::new()
                .with_curvature(curvature())
                .with_rho(0.5)
                .with_switch(if matches!(kind, Kind::Kid) {
                    SwitchPolicy::Kid
                } else {
                    SwitchPolicy::Kis
                })
                .init::<TB>(&capture)
                .unwrap(),
        ),
    }
    .map(|o| o.with_communicator(comm.clone()));
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
        .init::<TB, Cnn<TB>>();
    for _ in 0..steps {
        let loss = cross_entropy(model.forward(x.clone()), y.clone());
        let grads: GradientsParams = capture.gradients(loss.backward(), &model);
        let grads = if distributed {
            all_reduce_mean::<TB, _>(grads, &model, comm.as_ref()).0
        } else {
            grads
        };
        model = match &mut natural {
            Some(o) => {
                let m = o.step(0.1, model, grads);
                reports.push(o.last_report().clone());
                m
            }
            None => sgd.step(0.1, model, grads),
        };
    }
    (weights(&model), reports)
}

fn two_workers(kind: Kind, start: &Cnn<TB>, steps: usize) -> Vec<(Vec<f32>, Vec<StepReport>)> {
    // Each worker loads its own copy of the weights: threads must not share autodiff graph
    // nodes (Burn 0.21 can deadlock when they do), so no worker sees another's tensors.
    let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(start.clone().into_record(), ())
        .expect("the record serialises");
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::create(2)
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let bytes = bytes.clone();
                s.spawn(move || {
                    let record = BinBytesRecorder::<FullPrecisionSettings>::default()
                        .load(bytes, &Default::default())
                        .expect("the record loads");
                    let start = Cnn::<TB>::new(4, &CaptureHandle::new()).load_record(record);
                    train(kind, &start, rank * 8..rank * 8 + 8, Arc::new(comm), steps)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn initial() -> Cnn<TB> {
    let model = Cnn::<TB>::new(4, &CaptureHandle::new());
    // Materialise the lazily initialised parameters once, so every worker starts alike.
    let record = model.clone().into_record();
    model.load_record(record)
}

#[test]
fn one_step_on_two_shards_equals_one_process_on_their_union() {
    let record = initial();
    for kind in [Kind::Sgd, Kind::Sngd, Kind::Kfac, Kind::KfacInverse] {
        let (single, _) = train(kind, &record, 0..16, Arc::new(Single), 1);
        let workers = two_workers(kind, &record, 1);
        assert_eq!(workers[0].0, workers[1].0, "{kind:?}: workers disagree");
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let err = rel_err(&to64(&workers[0].0), &to64(&single));
        assert!(err < 1e-5, "{kind:?}: relative error {err}");
        let moved = weights(&record);
        assert!(
            rel_err(&to64(&moved), &to64(&single)) > 1e-4,
            "{kind:?}: the step changed nothing ({})",
            rel_err(&to64(&moved), &to64(&single))
        );
    }
}

#[test]
fn hylo_workers_agree_bit_for_bit() {
    let record = initial();
    for kind in [Kind::Kid, Kind::Kis] {
        let workers = two_workers(kind, &record, 3);
        assert_eq!(workers[0].0, workers[1].0, "{kind:?}");
        assert!(workers[0].0.iter().all(|v| v.is_finite()));
        for report in &workers[0].1 {
            assert!(
                report.refreshed && report.fallbacks.is_empty(),
                "{report:?}"
            );
        }
    }
}

#[test]
fn bytes_per_refresh_follow_the_formula() {
    let record = initial();
    // Captured layers of the CNN: c1 1->6 k3 (d_in' 10), c2 6->8 k3 s2 (55), fc 128->4 (129).
    let (d_in, d_out) = ([10u64, 55, 129], [6u64, 8, 4]);
    let layers = || d_in.iter().zip(&d_out);
    // KIS: b = 8 local rows, rho 0.5: r = 4, rP = 8.
    let kis = two_workers(Kind::Kis, &record, 1);
    let bytes = kis[0].1[0].comm;
    let rp = 8u64;
    assert_eq!(
        bytes.all_gather,
        4 * layers().map(|(a, g)| rp * (a + g)).sum::<u64>()
    );
    assert_eq!(bytes.broadcast, 4 * 3 * rp * rp);
    assert_eq!(bytes.all_reduce, 0);
    // KID: the same rows, plus each worker's r x r S_mat_p in the all-gather.
    let kid = two_workers(Kind::Kid, &record, 1);
    let bytes = kid[0].1[0].comm;
    let (r, p) = (4u64, 2u64);
    assert_eq!(
        bytes.all_gather,
        4 * layers().map(|(a, g)| rp * (a + g) + p * r * r).sum::<u64>()
    );
    assert_eq!(bytes.broadcast, 4 * 3 * rp * rp);
    // K-FAC: factors all-reduced, then the owners' eigendecompositions broadcast.
    let kfac = two_workers(Kind::Kfac, &record, 1);
    let bytes = kfac[0].1[0].comm;
    assert_eq!(
        bytes.all_reduce,
        4 * layers().map(|(a, g)| a * a + g * g).sum::<u64>()
    );
    assert_eq!(
        bytes.broadcast,
        4 * layers().map(|(a, g)| a * a + a + g * g + g).sum::<u64>()
    );
    // K-FAC's inverse method broadcasts the two inverses.
    let inverse = two_workers(Kind::KfacInverse, &record, 1);
    assert_eq!(
        inverse[0].1[0].comm.broadcast,
        4 * layers().map(|(a, g)| a * a + g * g).sum::<u64>()
    );
    // SNGD: all b rows of every worker; its broadcast is the N x N matrix.
    let sngd = two_workers(Kind::Sngd, &record, 1);
    assert_eq!(
        sngd[0].1[0].comm.all_gather,
        4 * layers().map(|(a, g)| 16 * (a + g)).sum::<u64>()
    );
}

#[derive(Module, Debug)]
struct Lin<B: burn::tensor::backend::Backend> {
    fc: hylo_optim::CapturedLinear<B>,
}

/// One KID step of a single Linear layer (5 -> 3 with bias) on two workers, each holding 8 of
/// the 16 samples; returns the weight and bias before and after, and the samples.
#[allow(clippy::type_complexity)]
fn distributed_kid_step(
    rho: f64,
    lambda: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<i64>) {
    let (n, d_in, d_out) = (16, 5, 3);
    let x = common::values(500, n * d_in);
    let labels: Vec<i64> = (0..n as i64).map(|i| (i * 7) % 3).collect();
    let start = {
        let _rng = common::rng_lock();
        let m = Lin::<TB> {
            fc: hylo_optim::CapturedLinear::from_config(
                &burn::nn::LinearConfig::new(d_in, d_out),
                &CaptureHandle::new(),
                &Default::default(),
            ),
        };
        common::models::materialised(m)
    };
    let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(start.clone().into_record(), ())
        .unwrap();
    let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::create(2)
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (bytes, x, labels) = (bytes.clone(), x.clone(), labels.clone());
                s.spawn(move || {
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let capture = CaptureHandle::new();
                    let record = BinBytesRecorder::<FullPrecisionSettings>::default()
                        .load(bytes, &Default::default())
                        .unwrap();
                    let model = Lin::<TB> {
                        fc: hylo_optim::CapturedLinear::from_config(
                            &burn::nn::LinearConfig::new(d_in, d_out),
                            &capture,
                            &Default::default(),
                        ),
                    }
                    .load_record(record);
                    let mut optim = HyloConfig::new()
                        .with_curvature(
                            CurvatureConfig::new()
                                .with_freq(1)
                                .with_momentum(0.0)
                                .with_damping(DampingConfig::new().with_initial(lambda))
                                .with_graft(Graft::None),
                        )
                        .with_rho(rho)
                        .with_switch(SwitchPolicy::Kid)
                        .init::<TB>(&capture)
                        .unwrap()
                        .with_communicator(comm.clone());
                    let b = 8;
                    let dev = Default::default();
                    let xs = burn::tensor::Tensor::<TB, 2>::from_data(
                        burn::tensor::TensorData::new(
                            x[rank * b * d_in..(rank + 1) * b * d_in].to_vec(),
                            [b, d_in],
                        ),
                        &dev,
                    );
                    let ys = burn::tensor::Tensor::<TB, 1, burn::tensor::Int>::from_data(
                        burn::tensor::TensorData::new(
                            labels[rank * b..(rank + 1) * b].to_vec(),
                            [b],
                        ),
                        &dev,
                    );
                    let loss = cross_entropy(model.fc.forward(xs), ys);
                    let grads = capture.gradients(loss.backward(), &model);
                    let grads = all_reduce_mean::<TB, _>(grads, &model, comm.as_ref()).0;
                    let model = optim.step(1.0, model, grads);
                    assert!(optim.last_report().refreshed);
                    (
                        common::to_vec(model.fc.inner.weight.val())
                            .into_iter()
                            .map(|v| v as f32)
                            .collect(),
                        common::to_vec(model.fc.inner.bias.as_ref().unwrap().val())
                            .into_iter()
                            .map(|v| v as f32)
                            .collect(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0], results[1], "workers disagree");
    let w0: Vec<f32> = common::to_vec(start.fc.inner.weight.val())
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let b0: Vec<f32> = common::to_vec(start.fc.inner.bias.as_ref().unwrap().val())
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let (w1, b1) = results.into_iter().next().unwrap();
    (w0, b0, w1, b1, x, labels)
}

#[test]
fn distributed_kid_matches_the_dense_formula() {
    // ALGORITHMS.md, "Distributed KID": each worker builds S_p from its local b x b kernel with
    // E_p + N lambda I; S = blockdiag(S_1, S_2); K_SS from the gathered skeleton rows.
    let (rho, lambda) = (0.5, 0.5);
    let (w0, b0, w1, b1, x, labels) = distributed_kid_step(rho, lambda);
    let (n, d_in, d_out, b, workers) = (16, 5, 3, 8, 2);
    let r = hylo_optim::precond::kis::kept_rows(rho, b);
    // Per-sample gradients of the cross-entropy, by hand: g_i = softmax(y_i) - onehot_i,
    // a_i = [x_i, 1], J_i = vec(g_i a_i^T) in (out, in) order. Burn's Linear: y = x W + b, W
    // stored [d_in, d_out].
    let d = d_out * (d_in + 1);
    let jac = Mat::from_fn(n, d, |i, k| {
        let (o, j) = (k / (d_in + 1), k % (d_in + 1));
        let logits: Vec<f64> = (0..d_out)
            .map(|c| {
                b0[c] as f64
                    + (0..d_in)
                        .map(|q| x[i * d_in + q] as f64 * w0[q * d_out + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let g = (logits[o] - max).exp() / z - f64::from(u8::from(labels[i] == o as i64));
        let a = if j < d_in {
            x[i * d_in + j] as f64
        } else {
            1.0
        };
        g * a
    });
    let ghat: Vec<f64> = (0..d)
        .map(|k| (0..n).map(|i| jac[(i, k)]).sum::<f64>() / n as f64)
        .collect();
    let mut skeleton_rows = Vec::new();
    let mut s = Mat::<f64>::zeros(r * workers, r * workers);
    for p in 0..workers {
        let local = Mat::from_fn(b, d, |i, k| jac[(p * b + i, k)]);
        let (skeleton, s_p) = kid_skeleton_dense(&local, n as f64 * lambda, r);
        skeleton_rows.extend(skeleton.iter().map(|&i| p * b + i));
        for i in 0..r {
            for j in 0..r {
                s[(p * r + i, p * r + j)] = s_p[(i, j)];
            }
        }
    }
    let js = Mat::from_fn(r * workers, d, |i, k| jac[(skeleton_rows[i], k)]);
    let oracle = kid_direction_dense(&js, &s, &ghat, lambda);
    // lr 1, no momentum: the step is -v. Our layout: [d_out, d_in'] with the bias last.
    let moved: Vec<f64> = (0..d)
        .map(|k| {
            let (o, j) = (k / (d_in + 1), k % (d_in + 1));
            if j < d_in {
                (w0[j * d_out + o] - w1[j * d_out + o]) as f64
            } else {
                (b0[o] - b1[o]) as f64
            }
        })
        .collect();
    let err = rel_err(&moved, &oracle);
    assert!(
        err < 1e-4,
        "distributed KID against the dense formula: {err}"
    );
}
