//! K-FAC against the dense Kronecker product, and HyLo's KID/KIS in their exact limits.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::ParamId;
use burn::tensor::Tensor;
use common::*;
use faer::Mat;
use hylo_optim::capture::{CapturedInput, LayerCapture, LayerGeometry};
use hylo_optim::factors::kfac_factors;
use hylo_optim::precond::{kid, kis, sngd, KfacMethod, KfacState};
use hylo_optim::rows::PerSampleRows;

fn linear_capture(n: usize, d_in: usize, d_out: usize, seed: u64) -> LayerCapture<IB> {
    LayerCapture {
        weight_id: ParamId::new(),
        bias_id: Some(ParamId::new()),
        geometry: LayerGeometry::Linear {
            d_in,
            d_out,
            bias: true,
        },
        input: CapturedInput::Linear(tensor::<IB, 3>(seed, [n, 1, d_in])),
        // backward's dL/dy = g / n
        output_grad: tensor::<IB, 3>(seed + 1, [n, 1, d_out]) / n as f64,
    }
}

/// Dense (G kron A + lambda I)^-1 vec(X) in the row-major vec of X `[d_out, d_in]`.
fn dense_kron_solve(a: &Mat<f64>, g: &Mat<f64>, x: &[f64], lambda: f64) -> Vec<f64> {
    let (da, dg) = (a.nrows(), g.nrows());
    let d = da * dg;
    let mut f = Mat::from_fn(d, d, |r, c| g[(r / da, c / da)] * a[(r % da, c % da)]);
    for i in 0..d {
        f[(i, i)] += lambda;
    }
    let rhs = Mat::from_fn(d, 1, |i, _| x[i]);
    let sol = hylo_optim::linalg::spd_solve(f.as_ref(), rhs.as_ref()).unwrap();
    (0..d).map(|i| sol[(i, 0)]).collect()
}

#[test]
fn kfac_direction_matches_dense_kronecker() {
    let capture = linear_capture(8, 4, 3, 10);
    let (a, g) = kfac_factors(&capture);
    let mut state = KfacState::new(a.clone(), g.clone());
    let lambda = 0.03;
    state.update_inverses(lambda).unwrap();
    let ghat = tensor::<IB, 2>(20, [3, 5]);
    let v = to_vec(state.apply(ghat.clone(), lambda));
    let oracle = dense_kron_solve(&to_mat(a), &to_mat(g), &to_vec(ghat), lambda);
    let err = rel_err(&v, &oracle);
    assert!(err <= 1e-4, "K-FAC relative error {err}");
}

/// Dense ((G + s I) kron (A + s I))^-1 vec(X).
fn dense_damped_factors_solve(a: &Mat<f64>, g: &Mat<f64>, x: &[f64], s: f64) -> Vec<f64> {
    let (da, dg) = (a.nrows(), g.nrows());
    let a = a + Mat::<f64>::identity(da, da) * s;
    let g = g + Mat::<f64>::identity(dg, dg) * s;
    dense_kron_solve(&a, &g, x, 0.0)
}

#[test]
fn kfac_inverse_method_matches_the_dense_damped_kronecker() {
    let capture = linear_capture(8, 4, 3, 11);
    let (a, g) = kfac_factors(&capture);
    let mut state = KfacState::new(a.clone(), g.clone());
    let lambda = 0.04;
    state.invert(KfacMethod::Inverse, lambda).unwrap();
    let ghat = tensor::<IB, 2>(21, [3, 5]);
    // The damping baked in at inversion time is used, whatever is passed later.
    let v = to_vec(state.apply(ghat.clone(), 123.0));
    let oracle = dense_damped_factors_solve(&to_mat(a), &to_mat(g), &to_vec(ghat), lambda.sqrt());
    let err = rel_err(&v, &oracle);
    assert!(err <= 1e-4, "K-FAC inverse method: relative error {err}");
}

#[test]
fn kfac_eigen_is_accurate_on_ill_conditioned_factors() {
    // Factors with eigenvalues from 1 down to 1e-8 (condition number 1e8) and random
    // eigenvectors; the direction from the f32 eigendecomposition against the f64 dense solve.
    let (da, dg) = (24, 10);
    let orthogonal = |n: usize, seed: u64| {
        let m = Mat::from_fn(n, n, |i, j| values(seed + (i * n + j) as u64, 1)[0] as f64);
        let (q, _, _) = hylo_optim::linalg::pivoted_qr(m.as_ref());
        q
    };
    let spectrum = |n: usize| {
        Mat::from_fn(n, n, |i, j| {
            if i == j {
                10f64.powf(-8.0 * i as f64 / (n - 1) as f64)
            } else {
                0.0
            }
        })
    };
    let (qa, qg) = (orthogonal(da, 40), orthogonal(dg, 41));
    let a = &qa * spectrum(da) * qa.transpose();
    let g = &qg * spectrum(dg) * qg.transpose();
    let dev = Default::default();
    let device = |m: &Mat<f64>| hylo_optim::linalg::to_device::<IB>(m.as_ref(), &dev);
    let ghat = tensor::<IB, 2>(42, [dg, da]);
    // 1e-2 .. 1e-4 use the f32 decompositions, 1e-6 and 1e-8 the f64 ones.
    for lambda in [1e-2, 1e-3, 1e-4, 1e-6, 1e-8] {
        let mut state = KfacState::new(device(&a), device(&g));
        state.update_inverses(lambda).unwrap();
        let v = to_vec(state.apply(ghat.clone(), lambda));
        // The oracle sees the factors as the device holds them (rounded to f32).
        let (a32, g32) = (to_mat(device(&a)), to_mat(device(&g)));
        let oracle = dense_kron_solve(&a32, &g32, &to_vec(ghat.clone()), lambda);
        let err = rel_err(&v, &oracle);
        assert!(err <= 1e-4, "lambda {lambda}: relative error {err}");
        // The inverse method on the same factors (f32 Cholesky above 1e-4 of the largest
        // diagonal entry, f64 below).
        let mut state = KfacState::new(device(&a), device(&g));
        state.invert(KfacMethod::Inverse, lambda).unwrap();
        let v = to_vec(state.apply(ghat.clone(), lambda));
        let oracle = dense_damped_factors_solve(&a32, &g32, &to_vec(ghat.clone()), lambda.sqrt());
        let err = rel_err(&v, &oracle);
        assert!(
            err <= 1e-4,
            "inverse method, lambda {lambda}: relative error {err}"
        );
    }
}

#[test]
fn kfac_running_average_folds_factors() {
    let c1 = linear_capture(4, 3, 2, 1);
    let c2 = linear_capture(4, 3, 2, 2);
    let (a1, g1) = kfac_factors(&c1);
    let (a2, g2) = kfac_factors(&c2);
    let mut state = KfacState::new(a1.clone(), g1.clone());
    state.update_factors(a2.clone(), g2.clone(), 0.75);
    let expected = to_vec(a1 * 0.75 + a2 * 0.25);
    assert!(rel_err(&to_vec(state.a_factor.clone()), &expected) < 1e-6);
    let expected = to_vec(g1 * 0.75 + g2 * 0.25);
    assert!(rel_err(&to_vec(state.g_factor), &expected) < 1e-6);
}

#[test]
fn kfac_factors_of_one_sample_are_the_exact_fisher_block() {
    let capture = linear_capture(1, 4, 3, 30);
    let (a, g) = kfac_factors(&capture);
    let rows = hylo_optim::factors::per_sample_rows(&capture, Default::default());
    let j = to_mat(rows.jacobian()); // 1 x (d_out * d_in')
    let fisher = j.transpose() * &j;
    let (a, g) = (to_mat(a), to_mat(g));
    let da = a.nrows();
    let d = fisher.nrows();
    for r in 0..d {
        for c in 0..d {
            let kron = g[(r / da, c / da)] * a[(r % da, c % da)];
            assert!((kron - fisher[(r, c)]).abs() < 1e-5 * (1.0 + fisher[(r, c)].abs()));
        }
    }
}

fn kron_rows(n: usize, d_in: usize, d_out: usize, seed: u64) -> PerSampleRows<IB> {
    PerSampleRows::Kronecker {
        a: tensor(seed, [n, d_in]),
        g: tensor(seed + 1, [n, d_out]),
    }
}

/// Rows whose per-sample gradients span exactly `k` directions: row i is c_i (a_{i mod k}, g_{i mod k}).
fn rank_k_rows(n: usize, k: usize, d_in: usize, d_out: usize) -> PerSampleRows<IB> {
    let base_a = values(40, k * d_in);
    let base_g = values(41, k * d_out);
    let scales = values(42, n);
    let mut a = Vec::new();
    let mut g = Vec::new();
    for i in 0..n {
        let c = 0.5 + scales[i].abs();
        a.extend(
            base_a[(i % k) * d_in..(i % k + 1) * d_in]
                .iter()
                .map(|x| x * c),
        );
        g.extend(base_g[(i % k) * d_out..(i % k + 1) * d_out].iter().copied());
    }
    let dev = Default::default();
    PerSampleRows::Kronecker {
        a: Tensor::from_data(burn::tensor::TensorData::new(a, [n, d_in]), &dev),
        g: Tensor::from_data(burn::tensor::TensorData::new(g, [n, d_out]), &dev),
    }
}

fn sngd_direction(rows: &PerSampleRows<IB>, ghat: &Tensor<IB, 2>, lambda: f64) -> Vec<f64> {
    to_vec(
        sngd::refresh(rows.clone(), lambda)
            .unwrap()
            .apply(ghat.clone()),
    )
}

#[test]
fn kid_at_full_rank_equals_sngd() {
    let rows = kron_rows(12, 5, 4, 50);
    let ghat = tensor::<IB, 2>(51, [4, 5]);
    let v_kid = to_vec(
        kid::refresh(rows.clone(), 0.1, 12)
            .unwrap()
            .apply(ghat.clone()),
    );
    let err = rel_err(&v_kid, &sngd_direction(&rows, &ghat, 0.1));
    assert!(err <= 1e-4, "KID r = n: {err}");
}

#[test]
fn kid_on_exact_rank_kernel_equals_sngd() {
    let (n, k) = (32, 4);
    let rows = rank_k_rows(n, k, 6, 5);
    let ghat = tensor::<IB, 2>(52, [5, 6]);
    let state = kid::refresh(rows.clone(), 0.5, k).unwrap();
    assert_eq!(state.rank(), k);
    let v_kid = to_vec(state.apply(ghat.clone()));
    let err = rel_err(&v_kid, &sngd_direction(&rows, &ghat, 0.5));
    assert!(err <= 1e-4, "KID on a rank-{k} kernel: {err}");
}

#[test]
fn kid_below_full_rank_is_a_different_but_finite_direction() {
    let rows = kron_rows(16, 5, 4, 60);
    let ghat = tensor::<IB, 2>(61, [4, 5]);
    let state = kid::refresh(rows.clone(), 0.1, 4).unwrap();
    assert_eq!(state.rank(), 4);
    let v = to_vec(state.apply(ghat.clone()));
    assert!(v.iter().all(|x| x.is_finite()));
    assert!(rel_err(&v, &sngd_direction(&rows, &ghat, 0.1)) > 1e-3);
}

#[test]
fn kid_below_full_rank_matches_the_dense_formula() {
    // A full-rank kernel (n = 16 samples, D = 4 x 5 = 20 gradient entries), r = 5 < n.
    let (n, r, lambda) = (16, 5, 0.1);
    let rows = kron_rows(n, 5, 4, 63);
    let ghat = tensor::<IB, 2>(64, [4, 5]);
    let jac = to_mat(rows.jacobian());
    let (skeleton, s) = kid_skeleton_dense(&jac, n as f64 * lambda, r);
    let js = Mat::from_fn(r, jac.ncols(), |i, j| jac[(skeleton[i], j)]);
    let oracle = kid_direction_dense(&js, &s, &mat_to_vec(&to_mat(ghat.clone())), lambda);
    let state = kid::refresh(rows.clone(), lambda, r).unwrap();
    assert_eq!(state.rank(), r);
    let v = to_vec(state.apply(ghat.clone()));
    let err = rel_err(&v, &oracle);
    assert!(
        err <= 1e-4,
        "KID r = {r} < n = {n} against the dense formula: {err}"
    );
    // And it is not SNGD: the check above is not the exact limit in disguise.
    assert!(rel_err(&v, &sngd_direction(&rows, &ghat, lambda)) > 1e-3);
}

#[test]
fn kid_quadratic_model_is_the_fisher_its_preconditioner_inverts() {
    // Below full rank, KID's v = (J_S^T (lambda S) J_S + lambda I)^-1 ghat (Woodbury with
    // M = (S^-1 + K_SS)^-1): its quadratic model must use F = J_S^T (lambda S) J_S.
    let (n, r, lambda) = (16, 5, 0.1);
    let rows = kron_rows(n, 5, 4, 63);
    let delta = tensor::<IB, 2>(65, [4, 5]);
    let jac = to_mat(rows.jacobian());
    let (skeleton, s) = kid_skeleton_dense(&jac, n as f64 * lambda, r);
    let js = Mat::from_fn(r, jac.ncols(), |i, j| jac[(skeleton[i], j)]);
    let d = Mat::from_fn(jac.ncols(), 1, |i, _| mat_to_vec(&to_mat(delta.clone()))[i]);
    let u = &js * &d;
    let oracle = (u.transpose() * (&s * lambda) * &u)[(0, 0)];
    let state = kid::refresh(rows.clone(), lambda, r).unwrap();
    let got = to_vec(state.quadratic(delta.clone()))[0];
    assert!(rel_err(&[got], &[oracle]) < 1e-4, "{got} vs {oracle}");
    // The direction is that of the same Fisher, damped (so the two agree).
    let f = js.transpose() * (&s * lambda) * &js;
    let mut damped = f.clone();
    for i in 0..damped.nrows() {
        damped[(i, i)] += lambda;
    }
    let ghat = tensor::<IB, 2>(64, [4, 5]);
    let g = Mat::from_fn(jac.ncols(), 1, |i, _| mat_to_vec(&to_mat(ghat.clone()))[i]);
    let v_dense = hylo_optim::linalg::lu_solve(damped.as_ref(), g.as_ref()).unwrap();
    let v = to_vec(state.apply(ghat));
    let v_dense: Vec<f64> = (0..v.len()).map(|i| v_dense[(i, 0)]).collect();
    assert!(rel_err(&v, &v_dense) < 1e-4);
    // SNGD and KIS: the mean over the rows they keep.
    let sngd_state = sngd::refresh(rows.clone(), lambda).unwrap();
    let dense: f64 = (0..n)
        .map(|i| {
            (0..jac.ncols())
                .map(|j| jac[(i, j)] * d[(j, 0)])
                .sum::<f64>()
                .powi(2)
        })
        .sum::<f64>()
        / n as f64;
    let got = to_vec(sngd_state.quadratic(delta))[0];
    assert!(rel_err(&[got], &[dense]) < 1e-4, "{got} vs {dense}");
}

#[test]
fn kid_with_rank_above_the_kernel_rank_stays_exact() {
    // Duplicate rows make the kernel rank deficient; asking for more rows than its rank must not
    // blow up and still reproduces SNGD.
    let rows = rank_k_rows(20, 3, 5, 4);
    let ghat = tensor::<IB, 2>(62, [4, 5]);
    let state = kid::refresh(rows.clone(), 0.2, 10).unwrap();
    assert!(state.rank() <= 10);
    let v = to_vec(state.apply(ghat.clone()));
    let err = rel_err(&v, &sngd_direction(&rows, &ghat, 0.2));
    assert!(err <= 1e-3, "rank-deficient KID: {err}");
}

#[test]
fn kis_with_rho_one_equals_sngd() {
    let rows = kron_rows(10, 4, 3, 70);
    let ghat = tensor::<IB, 2>(71, [3, 4]);
    let v = to_vec(
        kis::refresh(rows.clone(), 0.1, 1.0, 7)
            .unwrap()
            .apply(ghat.clone()),
    );
    let err = rel_err(&v, &sngd_direction(&rows, &ghat, 0.1));
    assert!(err <= 1e-4, "KIS rho = 1: {err}");
}

#[test]
fn kis_with_rho_one_equals_sngd_when_some_samples_have_zero_gradient() {
    // Samples 2 and 5 have an exactly zero output gradient: they have no weight, so KIS keeps 8
    // of the 10 rows, but normalises by r = 10 as SNGD does by n.
    let n = 10;
    let a = tensor::<IB, 2>(74, [n, 4]);
    let mut g = values(75, n * 3);
    for i in [2, 5] {
        g[i * 3..i * 3 + 3].iter_mut().for_each(|v| *v = 0.0);
    }
    let rows = PerSampleRows::Kronecker {
        a,
        g: Tensor::from_data(
            burn::tensor::TensorData::new(g, [n, 3]),
            &Default::default(),
        ),
    };
    let ghat = tensor::<IB, 2>(76, [3, 4]);
    let state = kis::refresh(rows.clone(), 0.1, 1.0, 7).unwrap();
    assert_eq!(state.rank(), 8);
    let v = to_vec(state.apply(ghat.clone()));
    let err = rel_err(&v, &sngd_direction(&rows, &ghat, 0.1));
    assert!(err <= 1e-4, "KIS rho = 1 with zero-gradient samples: {err}");
}

#[test]
fn kis_equals_sngd_on_the_sampled_rows() {
    let rows = kron_rows(20, 4, 3, 72);
    let ghat = tensor::<IB, 2>(73, [3, 4]);
    let weights = to_vec(rows.squared_norms());
    let picked = kis::sample_indices(&weights, kis::kept_rows(0.25, 20), 9);
    assert_eq!(picked.len(), 5);
    let v = to_vec(
        kis::refresh(rows.clone(), 0.1, 0.25, 9)
            .unwrap()
            .apply(ghat.clone()),
    );
    let oracle = sngd_direction(&rows.select(&picked), &ghat, 0.1);
    assert!(rel_err(&v, &oracle) <= 1e-6);
}

#[test]
fn kis_sampling_follows_the_weights() {
    let weights = [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 10.0];
    let total: f64 = weights.iter().sum();
    let draws = 20_000;
    let mut counts = [0usize; 7];
    for seed in 0..draws {
        let picked = kis::sample_indices(&weights, 1, seed as u64);
        assert_eq!(picked.len(), 1);
        counts[picked[0]] += 1;
    }
    assert_eq!(counts[0] + counts[5], 0, "zero-weight rows were chosen");
    for (i, &w) in weights.iter().enumerate() {
        let freq = counts[i] as f64 / draws as f64;
        // 5 sigma of a binomial at 20k draws is below 0.018; uniform sampling is off by >= 0.05.
        assert!(
            (freq - w / total).abs() < 0.02,
            "row {i}: frequency {freq}, weight share {}",
            w / total
        );
    }
}

#[test]
fn kis_sampling_is_without_replacement_and_seeded() {
    let weights: Vec<f64> = (0..50)
        .map(|i| if i % 7 == 0 { 0.0 } else { i as f64 })
        .collect();
    let a = kis::sample_indices(&weights, 10, 3);
    let b = kis::sample_indices(&weights, 10, 3);
    assert_eq!(a, b);
    let mut dedup = a.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), 10);
    assert!(a.iter().all(|&i| i % 7 != 0));
    // Fewer positive weights than r: keep exactly those.
    assert_eq!(kis::sample_indices(&[0.0, 2.0, 0.0, 1.0], 3, 0), vec![1, 3]);
    assert_eq!(kis::kept_rows(0.1, 128), 13);
    assert_eq!(kis::kept_rows(0.1, 1), 1);
}

#[test]
fn degenerate_inputs_give_finite_directions() {
    let ghat = tensor::<IB, 2>(80, [3, 4]);
    let zero = PerSampleRows::Kronecker {
        a: Tensor::<IB, 2>::zeros([6, 4], &Default::default()),
        g: Tensor::<IB, 2>::zeros([6, 3], &Default::default()),
    };
    let expected: Vec<f64> = to_vec(ghat.clone()).iter().map(|x| x / 0.1).collect();
    for v in [
        kid::refresh(zero.clone(), 0.1, 2)
            .unwrap()
            .apply(ghat.clone()),
        kis::refresh(zero.clone(), 0.1, 0.5, 0)
            .unwrap()
            .apply(ghat.clone()),
        sngd::refresh(zero.clone(), 0.1)
            .unwrap()
            .apply(ghat.clone()),
    ] {
        assert!(rel_err(&to_vec(v), &expected) < 1e-6);
    }
    // n = 1 with every method.
    let one = kron_rows(1, 4, 3, 81);
    let v_sngd = sngd_direction(&one, &ghat, 0.1);
    for v in [
        kid::refresh(one.clone(), 0.1, 1)
            .unwrap()
            .apply(ghat.clone()),
        kis::refresh(one.clone(), 0.1, 0.1, 0)
            .unwrap()
            .apply(ghat.clone()),
    ] {
        assert!(rel_err(&to_vec(v), &v_sngd) < 1e-5);
    }
}
