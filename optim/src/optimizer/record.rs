//! The optimizer's whole state as a Burn `Record`: step counters, damping, momentum buffers and
//! every layer's curvature, so that a save and reload gives the same next step bit for bit.

use burn::module::ParamId;
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::damping::Period;
use super::{Curvature, LayerMeta, LayerState, NaturalGradient};
use crate::capture::LayerGeometry;
use crate::precond::{HyloMode, KfacState, LowRankState};
use crate::rows::PerSampleRows;

/// Saved state of a [`NaturalGradient`] optimizer.
#[derive(Record)]
pub struct NaturalGradientRecord<B: Backend> {
    /// Steps taken.
    pub step: usize,
    /// Curvature refreshes done (drives the damping schedule).
    pub refreshes: usize,
    /// Damping in force.
    pub damping: f64,
    /// Gradient norm at the last HyLo refresh.
    pub last_grad_norm: Option<f64>,
    /// HyLo mode at the last refresh: 0 = KID, 1 = KIS.
    pub mode: Option<u8>,
    /// Momentum buffers, flattened.
    pub momentum: Vec<MomentumRecord<B>>,
    /// Preconditioned layers.
    pub layers: Vec<LayerRecord<B>>,
    /// Adaptive damping: the refresh period under way (none in earlier versions' records).
    pub period: Option<PeriodRecord<B>>,
    /// Adaptive damping: the reduction ratio awaiting the next refresh.
    pub reduction_ratio: Option<f64>,
}

/// The refresh period under way (adaptive damping).
#[derive(Record)]
pub struct PeriodRecord<B: Backend> {
    /// Each preconditioned layer's parameters at the period's start.
    pub start: Vec<LayerMatrixRecord<B>>,
    /// Each preconditioned layer's gradient at the refresh step.
    pub gradients: Vec<LayerMatrixRecord<B>>,
}

/// One layer's `[d_out, d_in']` matrix.
#[derive(Record)]
pub struct LayerMatrixRecord<B: Backend> {
    /// Weight parameter id.
    pub weight_id: u64,
    /// The matrix.
    pub matrix: Tensor<B, 2>,
}

/// One momentum buffer.
#[derive(Record)]
pub struct MomentumRecord<B: Backend> {
    /// Parameter id.
    pub id: u64,
    /// Flattened buffer.
    pub buffer: Tensor<B, 1>,
}

/// One preconditioned layer.
#[derive(Record)]
pub struct LayerRecord<B: Backend> {
    /// Weight parameter id.
    pub weight_id: u64,
    /// Bias parameter id.
    pub bias_id: Option<u64>,
    /// Geometry, encoded by [`encode_geometry`].
    pub geometry: Vec<usize>,
    /// 1 low-rank Kronecker rows, 2 low-rank dense rows, 3 low-rank without rows (damped
    /// identity), 4 K-FAC (factors and eigendecompositions), 5 K-FAC (factors and damped
    /// inverses); 0 (no curvature) is read from earlier versions' records.
    pub kind: u8,
    /// Damping of a low-rank state.
    pub damping: f64,
    /// Rows of each dense per-sample gradient (kind 2).
    pub d_out: usize,
    /// The state's tensors, in the order of its kind.
    pub tensors: Vec<Tensor<B, 2>>,
}

const KIND_EMPTY: u8 = 0;
const KIND_KRONECKER: u8 = 1;
const KIND_DENSE: u8 = 2;
const KIND_IDENTITY: u8 = 3;
const KIND_KFAC: u8 = 4;
const KIND_KFAC_INVERSE: u8 = 5;

fn encode_geometry(g: &LayerGeometry) -> Vec<usize> {
    match g {
        LayerGeometry::Linear { d_in, d_out, bias } => vec![0, *d_in, *d_out, *bias as usize],
        LayerGeometry::Conv2d {
            channels_in,
            channels_out,
            kernel,
            stride,
            dilation,
            padding,
            bias,
        } => {
            let mut v = vec![1, *channels_in, *channels_out];
            v.extend(kernel.iter().chain(stride).chain(dilation).chain(padding));
            v.push(*bias as usize);
            v
        }
    }
}

fn decode_geometry(v: &[usize]) -> Option<LayerGeometry> {
    match v {
        [0, d_in, d_out, bias] => Some(LayerGeometry::Linear {
            d_in: *d_in,
            d_out: *d_out,
            bias: *bias != 0,
        }),
        [1, ci, co, k0, k1, s0, s1, d0, d1, p0, p1, p2, p3, bias] => Some(LayerGeometry::Conv2d {
            channels_in: *ci,
            channels_out: *co,
            kernel: [*k0, *k1],
            stride: [*s0, *s1],
            dilation: [*d0, *d1],
            padding: [*p0, *p1, *p2, *p3],
            bias: *bias != 0,
        }),
        _ => None,
    }
}

fn out<B: AutodiffBackend>(t: &Tensor<B::InnerBackend, 2>) -> Tensor<B, 2> {
    Tensor::from_inner(t.clone())
}

pub(super) fn to_record<B: AutodiffBackend>(
    optim: &NaturalGradient<B>,
) -> NaturalGradientRecord<B> {
    let layers = optim
        .layers
        .values()
        .map(|layer| {
            let (kind, damping, d_out, tensors) = match &layer.curvature {
                Curvature::LowRank(state) => match (&state.rows, &state.m) {
                    (Some(PerSampleRows::Kronecker { a, g }), Some(m)) => (
                        KIND_KRONECKER,
                        state.damping,
                        0,
                        vec![out::<B>(a), out::<B>(g), out::<B>(m)],
                    ),
                    (Some(PerSampleRows::Dense { j, d_out }), Some(m)) => (
                        KIND_DENSE,
                        state.damping,
                        *d_out,
                        vec![out::<B>(j), out::<B>(m)],
                    ),
                    _ => (KIND_IDENTITY, state.damping, 0, vec![]),
                },
                Curvature::Kfac(state) => {
                    let mut t = vec![out::<B>(&state.a_factor), out::<B>(&state.g_factor)];
                    if let Some((a_inv, g_inv, damping)) = &state.inverses {
                        t.extend([out::<B>(a_inv), out::<B>(g_inv)]);
                        (KIND_KFAC_INVERSE, *damping, 0, t)
                    } else {
                        if let (Some((qa, da)), Some((qg, dg))) = (&state.a_eigen, &state.g_eigen) {
                            t.extend([out::<B>(qa), out::<B>(da), out::<B>(qg), out::<B>(dg)]);
                        }
                        (KIND_KFAC, 0.0, 0, t)
                    }
                }
            };
            LayerRecord {
                weight_id: layer.meta.weight_id.val(),
                bias_id: layer.meta.bias_id.map(|id| id.val()),
                geometry: encode_geometry(&layer.meta.geometry),
                kind,
                damping,
                d_out,
                tensors,
            }
        })
        .collect();
    NaturalGradientRecord {
        step: optim.step,
        refreshes: optim.refreshes,
        damping: optim.damping,
        last_grad_norm: optim.last_grad_norm,
        mode: optim.mode.map(|m| match m {
            HyloMode::Kid => 0,
            HyloMode::Kis => 1,
        }),
        momentum: optim
            .momentum
            .iter()
            .map(|(id, buf)| MomentumRecord {
                id: *id,
                buffer: Tensor::from_inner(buf.clone()),
            })
            .collect(),
        layers,
        period: optim.period.as_ref().map(|p| {
            let matrices = |v: &[(u64, Tensor<B::InnerBackend, 2>)]| {
                v.iter()
                    .map(|(id, m)| LayerMatrixRecord {
                        weight_id: *id,
                        matrix: out::<B>(m),
                    })
                    .collect()
            };
            PeriodRecord {
                start: matrices(&p.start),
                gradients: matrices(&p.gradients),
            }
        }),
        // Saving reads the pending ratio (one scalar).
        reduction_ratio: optim.reduction_ratio.clone().map(crate::host::read_scalar),
    }
}

pub(super) fn load_record<B: AutodiffBackend>(
    mut optim: NaturalGradient<B>,
    record: NaturalGradientRecord<B>,
) -> NaturalGradient<B> {
    optim.step = record.step;
    optim.refreshes = record.refreshes;
    optim.damping = record.damping;
    optim.last_grad_norm = record.last_grad_norm;
    optim.mode = record
        .mode
        .map(|m| if m == 0 { HyloMode::Kid } else { HyloMode::Kis });
    optim.momentum = record
        .momentum
        .into_iter()
        .map(|m| (m.id, m.buffer.inner()))
        .collect();
    optim.layers.clear();
    for layer in record.layers {
        let Some(geometry) = decode_geometry(&layer.geometry) else {
            tracing::warn!(
                weight = layer.weight_id,
                "unreadable layer geometry in optimizer record: layer dropped"
            );
            continue;
        };
        let mut t: Vec<Tensor<B::InnerBackend, 2>> =
            layer.tensors.into_iter().map(Tensor::inner).collect();
        let curvature = match (layer.kind, t.len()) {
            (KIND_KRONECKER, 3) => {
                let m = t.pop();
                let g = t.pop().expect("length checked");
                let a = t.pop().expect("length checked");
                Curvature::LowRank(LowRankState {
                    rows: Some(PerSampleRows::Kronecker { a, g }),
                    m,
                    damping: layer.damping,
                })
            }
            (KIND_DENSE, 2) => {
                let m = t.pop();
                let j = t.pop().expect("length checked");
                Curvature::LowRank(LowRankState {
                    rows: Some(PerSampleRows::Dense {
                        j,
                        d_out: layer.d_out,
                    }),
                    m,
                    damping: layer.damping,
                })
            }
            (KIND_IDENTITY, 0) => Curvature::LowRank(LowRankState::identity(layer.damping)),
            // Written by earlier versions for a layer whose refresh had failed.
            (KIND_EMPTY, 0) => Curvature::LowRank(LowRankState::identity(record.damping)),
            (KIND_KFAC, 2 | 6) => {
                let mut it = t.into_iter();
                let a_factor = it.next().expect("length checked");
                let g_factor = it.next().expect("length checked");
                let mut state = KfacState::new(a_factor, g_factor);
                if let (Some(qa), Some(da), Some(qg), Some(dg)) =
                    (it.next(), it.next(), it.next(), it.next())
                {
                    state.a_eigen = Some((qa, da));
                    state.g_eigen = Some((qg, dg));
                }
                Curvature::Kfac(state)
            }
            (KIND_KFAC_INVERSE, 4) => {
                let mut it = t.into_iter();
                let (a_factor, g_factor, a_inv, g_inv) = (
                    it.next().expect("length checked"),
                    it.next().expect("length checked"),
                    it.next().expect("length checked"),
                    it.next().expect("length checked"),
                );
                let mut state = KfacState::new(a_factor, g_factor);
                state.inverses = Some((a_inv, g_inv, layer.damping));
                Curvature::Kfac(state)
            }
            (kind, count) => {
                tracing::warn!(
                    weight = layer.weight_id,
                    kind,
                    tensors = count,
                    "unreadable layer state in optimizer record: damped identity until the next refresh"
                );
                Curvature::LowRank(LowRankState::identity(record.damping))
            }
        };
        optim.layers.insert(
            layer.weight_id,
            LayerState {
                meta: LayerMeta {
                    weight_id: ParamId::from(layer.weight_id),
                    bias_id: layer.bias_id.map(ParamId::from),
                    geometry,
                },
                curvature,
            },
        );
    }
    let matrices = |v: Vec<LayerMatrixRecord<B>>| {
        v.into_iter()
            .map(|r| (r.weight_id, r.matrix.inner()))
            .collect()
    };
    optim.period = record.period.map(|p| Period {
        start: matrices(p.start),
        gradients: matrices(p.gradients),
    });
    // The ratio goes where the momentum buffers are (there are some once a step was taken).
    let device = optim.momentum.values().next().map(|t| t.device());
    optim.reduction_ratio = match (record.reduction_ratio, device) {
        (Some(rho), Some(device)) => Some(Tensor::from_floats([rho as f32], &device)),
        _ => None,
    };
    let armed = optim.is_curvature_step(optim.step);
    optim.capture.arm(armed);
    optim
}
