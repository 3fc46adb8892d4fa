//! Data-parallel training with P = 2 in-process workers (the `ThreadGroup` communicator; the
//! MPI communicator runs the same code under `mpirun`, checked by `.ci/run`): one step of SGD,
//! SNGD and K-FAC equals a single process on the union of the shards; HyLo's workers agree bit
//! for bit; the bytes moved follow ALGORITHMS.md.

mod common;

use std::sync::Arc;

use burn::module::Module;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use common::models::{cnn_problem, cross_entropy, Cnn};
use common::{rel_err, TB};
use hylo_optim::comm::{all_reduce_mean, flatten_params, Communicator, Single, ThreadGroup};
use hylo_optim::{
    CaptureHandle, CurvatureConfig, DampingConfig, HyloConfig, KfacConfig, SngdConfig, StepReport,
    SwitchPolicy,
};

fn weights(model: &Cnn<TB>) -> Vec<f32> {
    flatten_params::<TB, _>(model)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sgd,
    Sngd,
    Kfac,
    Kid,
    Kis,
}

fn curvature() -> CurvatureConfig {
    CurvatureConfig::new()
        .with_freq(1)
        .with_damping(DampingConfig::new().with_initial(0.5))
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
        Kind::Kfac => Some(
            KfacConfig::new()
                .with_curvature(curvature())
                .with_inverse_every(1)
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
    for kind in [Kind::Sgd, Kind::Sngd, Kind::Kfac] {
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
    // SNGD: all b rows of every worker; its broadcast is the N x N matrix.
    let sngd = two_workers(Kind::Sngd, &record, 1);
    assert_eq!(
        sngd[0].1[0].comm.all_gather,
        4 * layers().map(|(a, g)| 16 * (a + g)).sum::<u64>()
    );
}
