//! Criterion benchmarks of one curvature refresh and one preconditioning per method, on
//! representative ResNet-50 layer shapes at batch 32 (64x64 inputs keep the run short).
//! Run with `cargo bench -p hylo-benches`.

use criterion::{criterion_group, criterion_main, Criterion};
use hylo_benches::layers::{resnet50_cases, synthetic_capture};
use hylo_optim::factors::{kfac_factors, per_sample_rows};
use hylo_optim::precond::{kid, kis, sngd};
use hylo_optim::ConvMode;

fn curvature(c: &mut Criterion) {
    let cases = resnet50_cases(64);
    // A 3x3 conv of each stage and the classifier.
    let picks: Vec<_> = cases
        .iter()
        .filter(|k| k.shape.contains("k3x3 s1") || k.shape.starts_with("linear"))
        .take(5)
        .collect();
    let n = 32;
    let mut group = c.benchmark_group("refresh");
    group.sample_size(10);
    for case in picks {
        let capture = synthetic_capture::<burn::backend::Flex>(case, n, &Default::default());
        let mode = ConvMode::SpatialMean;
        let r = kis::kept_rows(0.1, n);
        group.bench_function(format!("kfac-factors {}", case.shape), |b| {
            b.iter(|| kfac_factors(&capture))
        });
        group.bench_function(format!("sngd {}", case.shape), |b| {
            b.iter(|| sngd::refresh(per_sample_rows(&capture, mode), 0.1).unwrap())
        });
        group.bench_function(format!("kid {}", case.shape), |b| {
            b.iter(|| kid::refresh(per_sample_rows(&capture, mode), 0.1, r).unwrap())
        });
        group.bench_function(format!("kis {}", case.shape), |b| {
            b.iter(|| kis::refresh(per_sample_rows(&capture, mode), 0.1, 0.1, 3).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, curvature);
criterion_main!(benches);
