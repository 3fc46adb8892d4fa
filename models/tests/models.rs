//! Parameter counts, output shapes, forward/backward and capture counts of every model.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use hylo_models::*;
use hylo_optim::capture::CaptureHandle;

type B = Autodiff<Flex>;

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

fn images(n: usize, c: usize, size: usize) -> Tensor<B, 4> {
    Tensor::random(
        [n, c, size, size],
        Distribution::Normal(0.0, 1.0),
        &device(),
    )
}

/// Armed forward + backward: every captured layer records, and collect finds every probe.
fn check_capture<M, F, const D: usize>(
    model: &M,
    capture: &CaptureHandle,
    forward: F,
    layers: usize,
) where
    M: burn::module::AutodiffModule<B>,
    F: Fn(&M) -> Tensor<B, D>,
{
    assert_eq!(preconditioned_layers::<B, _>(model).len(), layers);
    capture.arm(true);
    let y = forward(model);
    assert_eq!(capture.pending_len(), layers);
    let grads = y.powf_scalar(2.0).mean().backward();
    capture.collect::<B>(&grads);
    let taken = capture.take::<Flex>();
    assert_eq!(taken.len(), layers);
    capture.arm(false);
    let params = capture.gradients::<B, M>(grads, model);
    assert!(!params.is_empty());
}

#[test]
fn cifar_resnet32_counts_shapes_and_capture() {
    let capture = CaptureHandle::new();
    let plain = CifarResNetConfig::new(32)
        .init::<B>(&capture, &device())
        .unwrap();
    assert_eq!(trainable_params::<B, _>(&plain), 464_154);
    let biased = CifarResNetConfig::new(32)
        .with_conv_bias(true)
        .init::<B>(&capture, &device())
        .unwrap();
    assert_eq!(trainable_params::<B, _>(&biased), 465_290);

    let layers = preconditioned_layers::<B, _>(&plain);
    let convs = layers
        .iter()
        .filter(|l| l.kind == LayerKind::Conv2d)
        .count();
    assert_eq!((convs, layers.len()), (31, 32));
    assert_eq!(layers[0].name, "stem");
    assert_eq!(layers[0].weight_shape, vec![16, 3, 3, 3]);
    assert!(!layers[0].bias);
    let fc = layers.last().unwrap();
    assert_eq!(
        (fc.kind, fc.d_in(), fc.d_out()),
        (LayerKind::Linear, 65, 10)
    );

    check_capture(&plain, &capture, |m| m.forward(images(2, 3, 32)), 32);
    assert_eq!(plain.forward(images(2, 3, 32)).dims(), [2, 10]);
}

#[test]
fn cifar_resnets_of_every_depth() {
    let capture = CaptureHandle::new();
    for depth in [20, 44, 56, 110] {
        let model = CifarResNetConfig::new(depth)
            .with_classes(100)
            .init::<B>(&capture, &device())
            .unwrap();
        assert_eq!(preconditioned_layers::<B, _>(&model).len(), depth);
        assert_eq!(model.forward(images(2, 3, 8)).dims(), [2, 100]);
    }
    let err = CifarResNetConfig::new(33)
        .init::<B>(&capture, &device())
        .unwrap_err();
    assert!(err.contains("6k+2"), "{err}");
}

#[test]
fn imagenet_resnet50_counts_shapes_and_capture() {
    let capture = CaptureHandle::new();
    let model = ImageNetResNetConfig::new(50)
        .init::<B>(&capture, &device())
        .unwrap();
    assert_eq!(trainable_params::<B, _>(&model), 25_557_032);
    let layers = preconditioned_layers::<B, _>(&model);
    let convs = layers
        .iter()
        .filter(|l| l.kind == LayerKind::Conv2d)
        .count();
    assert_eq!((convs, layers.len()), (53, 54));
    assert_eq!(layers[0].weight_shape, vec![64, 3, 7, 7]);
    check_capture(&model, &capture, |m| m.forward(images(2, 3, 32)), 54);
    assert_eq!(model.forward(images(2, 3, 32)).dims(), [2, 1000]);
}

#[test]
fn imagenet_resnets_of_every_depth() {
    let capture = CaptureHandle::new();
    // torchvision's parameter counts with 1000 classes.
    for (depth, params, layers) in [
        (18, 11_689_512, 21),
        (34, 21_797_672, 37),
        (101, 44_549_160, 105),
        (152, 60_192_808, 156),
    ] {
        let model = ImageNetResNetConfig::new(depth)
            .init::<B>(&capture, &device())
            .unwrap();
        assert_eq!(trainable_params::<B, _>(&model), params, "resnet{depth}");
        assert_eq!(
            preconditioned_layers::<B, _>(&model).len(),
            layers,
            "resnet{depth}"
        );
    }
    let small = ImageNetResNetConfig::new(18)
        .with_classes(7)
        .init::<B>(&capture, &device())
        .unwrap();
    assert_eq!(small.forward(images(2, 3, 32)).dims(), [2, 7]);
    assert!(ImageNetResNetConfig::new(19)
        .init::<B>(&capture, &device())
        .is_err());
}

#[test]
fn unet_counts_shapes_and_capture() {
    let capture = CaptureHandle::new();
    let model = UNetConfig::new().init::<B>(&capture, &device());
    assert_eq!(trainable_params::<B, _>(&model), 7_763_041);
    let layers = preconditioned_layers::<B, _>(&model);
    assert!(layers.iter().all(|l| l.kind == LayerKind::Conv2d));
    check_capture(&model, &capture, |m| m.forward(images(2, 3, 16)), 19);
    let out = model.forward(images(2, 3, 32));
    assert_eq!(out.dims(), [2, 1, 32, 32]);
    let values = out.into_data().to_vec::<f32>().unwrap();
    assert!(values.iter().all(|p| (0.0..=1.0).contains(p)));
    let narrow = UNetConfig::new()
        .with_init_features(4)
        .init::<B>(&capture, &device());
    assert!(trainable_params::<B, _>(&narrow) < 200_000);
    assert_eq!(narrow.forward(images(1, 3, 16)).dims(), [1, 1, 16, 16]);
}

#[test]
fn three_c1f_counts_shapes_and_capture() {
    let capture = CaptureHandle::new();
    let model = ThreeC1FConfig::new().init::<B>(&capture, &device());
    assert_eq!(trainable_params::<B, _>(&model), 5_485_958);
    check_capture(&model, &capture, |m| m.forward(images(2, 1, 28)), 5);
    assert_eq!(model.forward(images(2, 1, 28)).dims(), [2, 10]);
}

#[test]
fn mlp_counts_shapes_and_capture() {
    let capture = CaptureHandle::new();
    let model = MlpConfig::new(20, vec![30, 15], 4).init::<B>(&capture, &device());
    assert_eq!(
        trainable_params::<B, _>(&model),
        20 * 30 + 30 + 30 * 15 + 15 + 15 * 4 + 4
    );
    let x = || Tensor::<B, 2>::random([3, 20], Distribution::Normal(0.0, 1.0), &device());
    check_capture(&model, &capture, |m| m.forward(x()), 3);
    assert_eq!(model.forward_images(images(3, 5, 2)).dims(), [3, 4]);
    let linear = MlpConfig::new(6, vec![], 2).init::<B>(&capture, &device());
    assert_eq!(preconditioned_layers::<B, _>(&linear).len(), 1);
}

#[test]
fn model_names_parse_and_build() {
    let capture = CaptureHandle::new();
    for (name, expected) in [
        ("resnet32", ModelName::CifarResNet(32)),
        ("ResNet50", ModelName::ImageNetResNet(50)),
        ("3c1f", ModelName::ThreeC1F),
        ("unet", ModelName::UNet),
        ("small-cnn", ModelName::SmallCnn),
        ("mlp", ModelName::Mlp),
    ] {
        let parsed: ModelName = name.parse().unwrap();
        assert_eq!(parsed, expected);
        assert_eq!(parsed.to_string().parse::<ModelName>().unwrap(), parsed);
    }
    let err = "resnet33".parse::<ModelName>().unwrap_err();
    assert!(
        err.contains("resnet33") && err.contains("resnet110"),
        "{err}"
    );

    let spec = ClassifierSpec::new(1, 8, 3);
    for name in ["small-cnn", "resnet20", "3c1f", "mlp", "resnet18"] {
        let model =
            Classifier::<B>::build(name.parse().unwrap(), &spec, &capture, &device()).unwrap();
        assert_eq!(model.forward(images(2, 1, 8)).dims(), [2, 3], "{name}");
    }
    assert!(Classifier::<B>::build(ModelName::UNet, &spec, &capture, &device()).is_err());
    assert!(build_segmenter::<B>(ModelName::UNet, 3, 4, &capture, &device()).is_ok());
    assert!(build_segmenter::<B>(ModelName::SmallCnn, 3, 4, &capture, &device()).is_err());
}

#[test]
fn natural_gradient_steps_resnet_and_unet_with_batchnorm_fallback() {
    use burn::optim::Optimizer;
    use hylo_optim::{CurvatureConfig, HyloConfig, KfacConfig, SngdConfig};

    let curvature = CurvatureConfig::new().with_freq(1);
    let capture = CaptureHandle::new();
    let mut resnet = CifarResNetConfig::new(20)
        .init::<B>(&capture, &device())
        .unwrap();
    let mut unet = UNetConfig::new()
        .with_init_features(4)
        .init::<B>(&capture, &device());
    let mut sngd = SngdConfig::new()
        .with_curvature(curvature.clone())
        .init::<B>(&capture)
        .unwrap();
    let mut kfac = KfacConfig::new()
        .with_curvature(curvature.clone())
        .init::<B>(&capture)
        .unwrap();
    let mut hylo = HyloConfig::new()
        .with_curvature(curvature)
        .init::<B>(&capture)
        .unwrap();
    let x = images(4, 3, 16);
    for optim in [&mut sngd, &mut kfac, &mut hylo] {
        let before = resnet
            .forward(x.clone())
            .powf_scalar(2.0)
            .mean()
            .into_scalar();
        let grads = capture.gradients(
            resnet.forward(x.clone()).powf_scalar(2.0).mean().backward(),
            &resnet,
        );
        resnet = optim.step(0.01, resnet, grads);
        let report = optim.last_report();
        assert!(report.refreshed && !report.skipped, "{report:?}");
        let after = resnet
            .forward(x.clone())
            .powf_scalar(2.0)
            .mean()
            .into_scalar();
        assert!(after.is_finite() && after != before);
    }
    let grads = capture.gradients(unet.forward(x.clone()).mean().backward(), &unet);
    unet = hylo.step(0.01, unet, grads);
    assert!(unet
        .forward(x)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}
