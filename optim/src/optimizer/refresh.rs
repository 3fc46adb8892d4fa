//! Curvature refresh: turns the captures of a curvature step into each layer's new state.

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use super::distributed::Compression;
use super::{Curvature, LayerMeta, LayerState, Method, NaturalGradient};
use crate::capture::LayerCapture;
use crate::comm::CommBytes;
use crate::error::CurvatureError;
use crate::factors::{kfac_factors, per_sample_rows};
use crate::precond::{kid, kis, sngd, HyloMode, KfacState};

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// Refreshes the captured layers; returns the layers whose refresh failed (and why).
    pub(super) fn refresh(
        &mut self,
        captures: Vec<LayerCapture<B::InnerBackend>>,
        grads: &GradientsParams,
    ) -> (Vec<(ParamId, String)>, CommBytes) {
        for capture in &captures {
            self.layers
                .entry(capture.weight_id.val())
                .or_insert_with(|| LayerState {
                    meta: LayerMeta {
                        weight_id: capture.weight_id,
                        bias_id: capture.bias_id,
                        geometry: capture.geometry.clone(),
                    },
                    curvature: Curvature::Empty,
                });
        }
        match self.method.clone() {
            Method::Sngd => {
                self.advance_damping();
                if let Some(comm) = self.comm.clone() {
                    return self.refresh_low_rank_distributed(
                        &captures,
                        Compression::Full,
                        comm.as_ref(),
                    );
                }
                let failures = self
                    .refresh_low_rank(captures, |rows, damping, _| sngd::refresh(rows, damping));
                (failures, CommBytes::default())
            }
            Method::Hylo { rho, switch, seed } => {
                self.advance_damping();
                let norm = gradient_norm::<B>(&captures, &self.layers, grads);
                let mode = switch.mode(self.step, norm, self.last_grad_norm);
                self.last_grad_norm = Some(norm);
                self.mode = Some(mode);
                let step = self.step as u64;
                if let Some(comm) = self.comm.clone() {
                    let compression = match mode {
                        HyloMode::Kid => Compression::Kid { rho },
                        HyloMode::Kis => Compression::Kis {
                            rho,
                            seed: mix_seed(seed, step, 0),
                        },
                    };
                    return self.refresh_low_rank_distributed(
                        &captures,
                        compression,
                        comm.as_ref(),
                    );
                }
                let failures = self.refresh_low_rank(captures, move |rows, damping, index| {
                    let r = kis::kept_rows(rho, rows.len());
                    match mode {
                        HyloMode::Kid => kid::refresh(rows, damping, r),
                        HyloMode::Kis => {
                            kis::refresh(rows, damping, rho, mix_seed(seed, step, index))
                        }
                    }
                });
                (failures, CommBytes::default())
            }
            Method::Kfac {
                inverse_every,
                factor_decay,
            } => {
                let invert = self.step.is_multiple_of(inverse_every);
                if invert {
                    self.advance_damping();
                }
                if let Some(comm) = self.comm.clone() {
                    return self.refresh_kfac_distributed(
                        &captures,
                        factor_decay,
                        invert,
                        comm.as_ref(),
                    );
                }
                let mut failures = Vec::new();
                for capture in &captures {
                    let layer = self
                        .layers
                        .get_mut(&capture.weight_id.val())
                        .expect("registered above");
                    let (a_new, g_new) = kfac_factors(capture);
                    let mut state = match std::mem::replace(&mut layer.curvature, Curvature::Empty)
                    {
                        Curvature::Kfac(mut state) => {
                            state.update_factors(a_new, g_new, factor_decay);
                            state
                        }
                        _ => KfacState::new(a_new, g_new),
                    };
                    let needs_inverse = invert || state.a_eigen.is_none();
                    match needs_inverse.then(|| state.update_inverses()).transpose() {
                        Ok(_) => layer.curvature = Curvature::Kfac(state),
                        Err(e) => failures.push((capture.weight_id, e.to_string())),
                    }
                }
                (failures, CommBytes::default())
            }
        }
    }

    fn advance_damping(&mut self) {
        self.damping = self.config.damping.value_after(self.refreshes);
        self.refreshes += 1;
    }

    fn refresh_low_rank<F>(
        &mut self,
        captures: Vec<LayerCapture<B::InnerBackend>>,
        build: F,
    ) -> Vec<(ParamId, String)>
    where
        F: Fn(
            crate::rows::PerSampleRows<B::InnerBackend>,
            f64,
            u64,
        ) -> Result<crate::precond::LowRankState<B::InnerBackend>, CurvatureError>,
    {
        let mut failures = Vec::new();
        for (index, capture) in captures.iter().enumerate() {
            let rows = per_sample_rows(capture, self.config.conv_mode);
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            match build(rows, self.damping, index as u64) {
                Ok(state) => layer.curvature = Curvature::LowRank(state),
                Err(e) => {
                    layer.curvature = Curvature::Empty;
                    failures.push((capture.weight_id, e.to_string()));
                }
            }
        }
        failures
    }
}

/// Norm of the gradients of the captured layers (one host read).
fn gradient_norm<B: AutodiffBackend>(
    captures: &[LayerCapture<B::InnerBackend>],
    layers: &std::collections::BTreeMap<u64, LayerState<B::InnerBackend>>,
    grads: &GradientsParams,
) -> f64 {
    let squares: Vec<Tensor<B::InnerBackend, 1>> = captures
        .iter()
        .filter_map(|c| layers.get(&c.weight_id.val()))
        .filter_map(|layer| layer.meta.gradient::<B::InnerBackend>(grads))
        .map(|g| g.powi_scalar(2).sum())
        .collect();
    if squares.is_empty() {
        return 0.0;
    }
    let total: f64 = Tensor::cat(squares, 0).sum().into_scalar().elem();
    total.sqrt()
}

/// A seed for one layer's KIS draw at one step (SplitMix64 of the three numbers).
fn mix_seed(seed: u64, step: u64, layer: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ layer.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

use burn::tensor::ElementConversion;
