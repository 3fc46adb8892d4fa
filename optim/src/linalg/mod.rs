//! Host linear algebra: the only place that talks to faer.
//!
//! Every function here takes and returns small dense matrices (n x n, r x r, d x d factors) in f64.
//! Device tensors cross to the host through [`to_host`] (a counted read, see [`crate::host`]) and
//! back through [`to_device`], so the round trips stay off the path of large tensors.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Mat, MatRef, Side};

use crate::error::CurvatureError;

/// Copies a 2-D device tensor into a host f64 matrix.
pub fn to_host<B: Backend>(tensor: Tensor<B, 2>) -> Mat<f64> {
    let [rows, cols] = tensor.dims();
    let values = crate::host::read_f64(tensor);
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// Copies a 2-D device tensor into a host f32 matrix.
pub fn to_host_f32<B: Backend>(tensor: Tensor<B, 2>) -> Mat<f32> {
    let [rows, cols] = tensor.dims();
    let values = crate::host::read_f32(tensor);
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// Copies a host f32 matrix onto the device.
pub fn to_device_f32<B: Backend>(matrix: MatRef<'_, f32>, device: &B::Device) -> Tensor<B, 2> {
    let (rows, cols) = (matrix.nrows(), matrix.ncols());
    let values: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| matrix[(i, j)]))
        .collect();
    crate::host::upload_floats(values, [rows, cols], device)
}

/// Copies a host matrix onto the device as a 2-D tensor of the backend's float type.
pub fn to_device<B: Backend>(matrix: MatRef<'_, f64>, device: &B::Device) -> Tensor<B, 2> {
    let (rows, cols) = (matrix.nrows(), matrix.ncols());
    let mut values = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            values.push(matrix[(i, j)]);
        }
    }
    crate::host::upload(
        TensorData::new(values, [rows, cols]).convert::<B::FloatElem>(),
        device,
    )
}

/// Copies a host vector onto the device as a 1-D tensor.
pub fn vec_to_device<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 1> {
    crate::host::upload(
        TensorData::new(values.to_vec(), [values.len()]).convert::<B::FloatElem>(),
        device,
    )
}

/// True when every entry is finite.
pub fn all_finite(matrix: MatRef<'_, f64>) -> bool {
    (0..matrix.ncols()).all(|j| (0..matrix.nrows()).all(|i| matrix[(i, j)].is_finite()))
}

/// Inverse of a symmetric positive definite matrix through its Cholesky factor.
///
/// Used where the inverse is applied to many right-hand sides over later steps (the stored
/// preconditioner); one-off systems use [`spd_solve`].
pub fn spd_inverse(matrix: MatRef<'_, f64>) -> Result<Mat<f64>, CurvatureError> {
    let llt = matrix
        .llt(Side::Lower)
        .map_err(|_| CurvatureError::NotPositiveDefinite {
            size: matrix.nrows(),
        })?;
    let inverse = llt.inverse();
    check_finite(inverse, "Cholesky inverse")
}

/// [`spd_inverse`] in f32.
pub fn spd_inverse_f32(matrix: MatRef<'_, f32>) -> Result<Mat<f32>, CurvatureError> {
    let llt = matrix
        .llt(Side::Lower)
        .map_err(|_| CurvatureError::NotPositiveDefinite {
            size: matrix.nrows(),
        })?;
    let inverse = llt.inverse();
    let finite =
        (0..inverse.ncols()).all(|j| (0..inverse.nrows()).all(|i| inverse[(i, j)].is_finite()));
    if finite {
        Ok(inverse)
    } else {
        Err(CurvatureError::NonFinite {
            what: "Cholesky inverse",
        })
    }
}

/// Solves `matrix * x = rhs` for a symmetric positive definite `matrix` by Cholesky.
pub fn spd_solve(
    matrix: MatRef<'_, f64>,
    rhs: MatRef<'_, f64>,
) -> Result<Mat<f64>, CurvatureError> {
    let llt = matrix
        .llt(Side::Lower)
        .map_err(|_| CurvatureError::NotPositiveDefinite {
            size: matrix.nrows(),
        })?;
    check_finite(llt.solve(rhs), "Cholesky solve")
}

/// Solves `matrix * x = rhs` for a general square `matrix` by LU with partial pivoting.
pub fn lu_solve(matrix: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Result<Mat<f64>, CurvatureError> {
    check_finite(matrix.partial_piv_lu().solve(rhs), "LU solve")
}

/// Eigen-decomposition of a symmetric matrix: (eigenvalues ascending, eigenvectors as columns).
pub fn symmetric_eigen(matrix: MatRef<'_, f64>) -> Result<(Vec<f64>, Mat<f64>), CurvatureError> {
    eigen(matrix, |v| v)
}

/// [`symmetric_eigen`] in f32 (as KAISA's): 2-3x faster on the large K-FAC factors; eigenvalues
/// ascending (returned as f64), eigenvectors as columns.
pub fn symmetric_eigen_f32(
    matrix: MatRef<'_, f32>,
) -> Result<(Vec<f64>, Mat<f32>), CurvatureError> {
    eigen(matrix, f64::from)
}

/// Eigen-decomposition in `T`, the eigenvalues widened to f64; refuses a non-finite matrix and
/// reports non-finite eigenvalues.
fn eigen<T: faer::traits::RealField + Copy>(
    matrix: MatRef<'_, T>,
    widen: fn(T) -> f64,
) -> Result<(Vec<f64>, Mat<T>), CurvatureError> {
    let finite =
        (0..matrix.ncols()).all(|j| (0..matrix.nrows()).all(|i| widen(matrix[(i, j)]).is_finite()));
    if !finite {
        return Err(CurvatureError::NonFinite {
            what: "factor before eigendecomposition",
        });
    }
    let evd =
        matrix
            .self_adjoint_eigen(Side::Lower)
            .map_err(|_| CurvatureError::NoConvergence {
                what: "symmetric eigendecomposition",
            })?;
    let values: Vec<f64> = (0..matrix.nrows()).map(|i| widen(evd.S()[i])).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(CurvatureError::NonFinite {
            what: "eigenvalues",
        });
    }
    Ok((values, evd.U().to_owned()))
}

/// Singular values of a matrix, descending.
pub fn singular_values(matrix: MatRef<'_, f64>) -> Result<Vec<f64>, CurvatureError> {
    let mut values = matrix
        .singular_values()
        .map_err(|_| CurvatureError::NoConvergence {
            what: "singular values",
        })?;
    values.sort_by(|a, b| b.total_cmp(a));
    Ok(values)
}

/// Column-pivoted QR `matrix[:, piv] = Q R`: returns (Q, R, piv).
pub fn pivoted_qr(matrix: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>, Vec<usize>) {
    let qr = matrix.col_piv_qr();
    let (forward, _) = qr.P().arrays();
    let piv: Vec<usize> = forward.to_vec();
    (qr.compute_Q(), qr.R().to_owned(), piv)
}

/// Solves the upper-triangular system `upper * x = rhs` by back substitution.
pub fn upper_triangular_solve(upper: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Mat<f64> {
    let mut x = rhs.to_owned();
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        upper,
        x.as_mut(),
        faer::Par::Seq,
    );
    x
}

fn check_finite(matrix: Mat<f64>, what: &'static str) -> Result<Mat<f64>, CurvatureError> {
    if all_finite(matrix.as_ref()) {
        Ok(matrix)
    } else {
        Err(CurvatureError::NonFinite { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Mat<f64> {
        let x = Mat::from_fn(n, n, |i, j| {
            ((i * 7 + j * 3) % 5) as f64 - 2.0 + f64::from(u8::from(i == j))
        });
        &x * x.transpose() + Mat::<f64>::identity(n, n)
    }

    #[test]
    fn spd_inverse_inverts() {
        let a = spd(6);
        let inv = spd_inverse(a.as_ref()).unwrap();
        let err = (&a * &inv - Mat::<f64>::identity(6, 6)).norm_max();
        assert!(err < 1e-10, "{err}");
    }

    #[test]
    fn spd_inverse_rejects_indefinite() {
        let a = -spd(3);
        assert!(matches!(
            spd_inverse(a.as_ref()),
            Err(CurvatureError::NotPositiveDefinite { size: 3 })
        ));
    }

    #[test]
    fn pivoted_qr_reconstructs_permuted_columns() {
        let a = Mat::from_fn(5, 5, |i, j| ((i + 1) * (j + 2)) as f64 + (i * j % 3) as f64);
        let (q, r, piv) = pivoted_qr(a.as_ref());
        let qr = &q * &r;
        for (k, &p) in piv.iter().enumerate() {
            for i in 0..5 {
                assert!((qr[(i, k)] - a[(i, p)]).abs() < 1e-10);
            }
        }
        // Pivoting puts the largest remaining column first: |R_00| >= |R_11| >= ...
        for k in 1..5 {
            assert!(r[(k, k)].abs() <= r[(k - 1, k - 1)].abs() + 1e-12);
        }
    }

    #[test]
    fn eigen_reconstructs() {
        let a = spd(4);
        let (d, q) = symmetric_eigen(a.as_ref()).unwrap();
        let recon = &q * Mat::from_fn(4, 4, |i, j| if i == j { d[i] } else { 0.0 }) * q.transpose();
        assert!((recon - &a).norm_max() < 1e-10);
    }

    #[test]
    fn upper_solve_solves() {
        let u = Mat::from_fn(3, 3, |i, j| if j >= i { (i + j + 1) as f64 } else { 0.0 });
        let b = Mat::from_fn(3, 2, |i, j| (i + 2 * j) as f64);
        let x = upper_triangular_solve(u.as_ref(), b.as_ref());
        assert!((&u * &x - &b).norm_max() < 1e-12);
    }
}
