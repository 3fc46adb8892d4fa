use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Distribution, Tensor};
use hylo_optim::{CaptureHandle, CapturedConv2d};
use std::time::Instant;

type B = Autodiff<Flex>;

fn main() {
    let dev = Default::default();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (n, c, co, hw, k, s) = (args[0], args[1], args[2], args[3], args[4], args[5]);
    let p = k / 2;
    let conv = Conv2dConfig::new([c, co], [k, k])
        .with_stride([s, s])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(false)
        .init::<B>(&dev);
    let ours = CapturedConv2d::new(conv.clone(), &CaptureHandle::new()).unwrap();
    let x =
        Tensor::<B, 4>::random([n, c, hw, hw], Distribution::Normal(0., 1.), &dev).require_grad();
    for rep in 0..3 {
        let mut times = Vec::new();
        for which in 0..2 {
            let t = Instant::now();
            let y = if which == 0 {
                conv.forward(x.clone())
            } else {
                ours.forward(x.clone())
            };
            let _ = y.clone().sum().into_scalar();
            let tf = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let g = y.sum().backward();
            let gx = x.grad(&g).unwrap();
            let w = if which == 0 {
                conv.weight.val()
            } else {
                ours.inner.weight.val()
            };
            let gw = w.grad(&g).unwrap();
            let _ = gx.sum().into_scalar() + gw.sum().into_scalar();
            times.push((tf, t.elapsed().as_secs_f64()));
        }
        println!(
            "rep {rep}: burn fwd {:.3} bwd {:.3} | ours fwd {:.3} bwd {:.3}",
            times[0].0, times[0].1, times[1].0, times[1].1
        );
    }
}
