//! K-FAC refresh across P workers (KAISA; P = 1 with the `Single` communicator): the batch
//! factors are all-reduced (mean) and folded into the running averages on the device; at an
//! inversion step each layer's owner (longest processing time first) decomposes the factors and
//! broadcasts the result. With one worker the collectives are the identity and the factors
//! leave the device only to be decomposed.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::refresh::Failures;
use super::{Curvature, NaturalGradient};
use crate::capture::LayerCapture;
use crate::comm::{assign_owners, CommBytes, Communicator, Counted};
use crate::factors::kfac_factors;
use crate::host;
use crate::precond::{KfacMethod, KfacState};

fn from_vec<B: Backend>(values: &[f32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    host::upload_floats(values.to_vec(), shape, device)
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// K-FAC refresh: factors every call, decompositions by `method` when `invert` (or while a
    /// layer has none); returns the failed layers (they keep their previous decompositions) and
    /// the bytes moved.
    pub(super) fn refresh_kfac(
        &mut self,
        captures: &[LayerCapture<B::InnerBackend>],
        factor_decay: f64,
        invert: bool,
        method: KfacMethod,
        comm: &dyn Communicator,
    ) -> (Failures, CommBytes) {
        let damping = self.damping;
        let comm = Counted::new(comm);
        let (workers, rank) = (comm.size(), comm.rank());
        let mut factors: Vec<_> = captures.iter().map(kfac_factors).collect();
        if workers > 1 {
            let mut packed = Vec::new();
            for (a, g) in &factors {
                packed.extend(host::read_f32(a.clone()));
                packed.extend(host::read_f32(g.clone()));
            }
            comm.all_reduce_sum(&mut packed);
            let scale = 1.0 / workers as f32;
            packed.iter_mut().for_each(|v| *v *= scale);
            let mut at = 0;
            for (a, g) in &mut factors {
                let device = a.device();
                let (da, dg) = (a.dims()[0], g.dims()[0]);
                *a = from_vec(&packed[at..at + da * da], [da, da], &device);
                at += da * da;
                *g = from_vec(&packed[at..at + dg * dg], [dg, dg], &device);
                at += dg * dg;
            }
        }
        let mut needs = Vec::with_capacity(captures.len());
        for (capture, (a, g)) in captures.iter().zip(factors) {
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            let state = match std::mem::replace(
                &mut layer.curvature,
                Curvature::LowRank(crate::precond::LowRankState::identity(self.damping)),
            ) {
                Curvature::Kfac(mut state) => {
                    state.update_factors(a, g, factor_decay);
                    state
                }
                Curvature::LowRank(_) => KfacState::new(a, g),
            };
            needs.push(invert || !state.has_eigen());
            layer.curvature = Curvature::Kfac(state);
        }

        let dims: Vec<(usize, usize)> = captures
            .iter()
            .map(|c| (c.geometry.d_in_with_bias(), c.geometry.d_out()))
            .collect();
        let costs: Vec<f64> = dims
            .iter()
            .map(|&(da, dg)| (da.pow(3) + dg.pow(3)) as f64)
            .collect();
        let owners = assign_owners(&costs, workers);
        let mut failures = Vec::new();
        for (((capture, &(da, dg)), &owner), &need) in
            captures.iter().zip(&dims).zip(&owners).zip(&needs)
        {
            if !need {
                continue;
            }
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            let Curvature::Kfac(state) = &mut layer.curvature else {
                unreachable!("set above")
            };
            if workers == 1 {
                if let Err(e) = state.invert(method, damping) {
                    failures.push((capture.weight_id, e.to_string()));
                }
                continue;
            }
            let mut buf = vec![f32::NAN; KfacState::<B::InnerBackend>::host_len(method, da, dg)];
            if owner == rank {
                let mut local = state.clone();
                match local.invert(method, damping) {
                    Ok(()) => buf = local.eigen_to_host(),
                    Err(e) => failures.push((capture.weight_id, e.to_string())),
                }
            }
            comm.broadcast(&mut buf, owner);
            if buf.iter().all(|v| v.is_finite()) {
                state.decompositions_from_host(method, &buf, da, dg, damping);
            } else if owner != rank {
                failures.push((
                    capture.weight_id,
                    format!("eigendecomposition failed on worker {owner}"),
                ));
            }
        }
        (failures, comm.bytes.get())
    }
}
