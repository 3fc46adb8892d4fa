//! Criterion benchmarks of the CPU convolution: Burn's `Conv2d` against `CapturedConv2d`'s
//! matrix-product form, forward and forward + backward, on the three ResNet-32 shapes at the
//! paper's batch of 128 and two U-Net shapes. Run with `cargo bench -p hylo-benches --bench conv`.

use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use hylo_benches::conv::{burn_conv, conv_cases};
use hylo_benches::layers::{resnet32_cases, unet_cases};
use hylo_optim::{CaptureHandle, CapturedConv2d};

type B = burn::backend::Autodiff<burn::backend::Flex>;

fn conv(c: &mut Criterion) {
    let resnet = conv_cases(resnet32_cases());
    let unet = conv_cases(unet_cases(32, 128));
    let picks = resnet
        .iter()
        .filter(|k| k.shape.contains("k3x3 s1"))
        .map(|k| (k, 128))
        .chain(unet.iter().take(2).map(|k| (k, 4)));
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    for (case, n) in picks {
        let conv = burn_conv(case);
        let ours = CapturedConv2d::new(conv.clone(), &CaptureHandle::new()).unwrap();
        let [ch, h, w] = case.input_dims() else {
            unreachable!("a convolution")
        };
        let x = Tensor::<B, 4>::random(
            [n, *ch, *h, *w],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
        .require_grad();
        let label = format!("{} {h}x{w} batch {n}", case.shape);
        group.bench_function(format!("burn forward {label}"), |b| {
            b.iter(|| conv.forward(x.clone()).sum().into_scalar())
        });
        group.bench_function(format!("gemm forward {label}"), |b| {
            b.iter(|| ours.forward(x.clone()).sum().into_scalar())
        });
        group.bench_function(format!("burn forward+backward {label}"), |b| {
            b.iter(|| conv.forward(x.clone()).sum().backward())
        });
        group.bench_function(format!("gemm forward+backward {label}"), |b| {
            b.iter(|| ours.forward(x.clone()).sum().backward())
        });
    }
    group.finish();
}

criterion_group!(benches, conv);
criterion_main!(benches);
