use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use std::time::Instant;

type B = Flex;

fn main() {
    let dev = Default::default();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (n, c, co, hw) = (args[0], args[1], args[2], args[3]);
    let k = 3;
    let p = 1;
    let x = Tensor::<B, 4>::random([n, c, hw, hw], Distribution::Normal(0., 1.), &dev);
    let w = Tensor::<B, 2>::random([co, c * 9], Distribution::Normal(0., 1.), &dev);
    let l = hw * hw;
    for _ in 0..3 {
        let t = Instant::now();
        let xp = x
            .clone()
            .pad([(p, p), (p, p)], burn::tensor::ops::PadMode::Constant(0.0));
        let _ = xp.clone().slice([0..1, 0..1, 0..1, 0..1]).into_scalar();
        let t_pad = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut v = Vec::new();
        for u in 0..k {
            for q in 0..k {
                v.push(
                    xp.clone()
                        .slice(burn::tensor::s![.., .., u..u + hw, q..q + hw])
                        .reshape([n, c, 1, l]),
                );
            }
        }
        let pt = Tensor::cat(v, 2).reshape([n, c * 9, l]);
        let _ = pt.clone().slice([0..1, 0..1, 0..1]).into_scalar();
        let t_cols = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let y = w.clone().reshape([1, co, c * 9]).matmul(pt.clone());
        let _ = y.clone().slice([0..1, 0..1, 0..1]).into_scalar();
        let t_bmm = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let y2 = w
            .clone()
            .reshape([1, co, c * 9])
            .expand([n, co, c * 9])
            .matmul(pt.clone());
        let _ = y2.clone().slice([0..1, 0..1, 0..1]).into_scalar();
        let t_bmm2 = t.elapsed().as_secs_f64();
        // one big GEMM: [co, ckk] x [ckk, n*l]
        let pt2 = pt.clone().swap_dims(0, 1).reshape([c * 9, n * l]);
        let _ = pt2.clone().slice([0..1, 0..1]).into_scalar();
        let t = Instant::now();
        let y3 = w.clone().matmul(pt2.clone());
        let _ = y3.clone().slice([0..1, 0..1]).into_scalar();
        let t_gemm = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let dw = y3.clone().matmul(pt2.clone().transpose());
        let _ = dw.clone().slice([0..1, 0..1]).into_scalar();
        let t_dw = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let dp = w.clone().transpose().matmul(y3.clone());
        let _ = dp.clone().slice([0..1, 0..1]).into_scalar();
        let t_dp = t.elapsed().as_secs_f64();
        println!("pad {t_pad:.4} cols {t_cols:.4} bmm {t_bmm:.4} bmm-expand {t_bmm2:.4} gemm {t_gemm:.4} dW {t_dw:.4} dP {t_dp:.4}");
    }
}
