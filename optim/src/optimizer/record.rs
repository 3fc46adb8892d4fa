//! The optimizer's whole state as a Burn `Record`: step counters, damping, momentum buffers and
//! every layer's curvature, so that a save and reload gives the same next step bit for bit.

use std::collections::BTreeMap;

use burn::module::ParamId;
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::damping::Period;
use super::{Curvature, LayerMeta, LayerState, NaturalGradient};
use crate::capture::LayerGeometry;
use crate::precond::{FisherWeights, HyloMode, KfacState, LowRankState};
use crate::rows::PerSampleRows;

/// Layout version of [`NaturalGradientRecord`]; a record of another version is refused. Version
/// 2 (hylo-optim 0.2) added the Fisher weights of low-rank states and adaptive damping's period
/// snapshot; version 3 (0.3) the step-length factor. Records of earlier versions cannot be read
/// (the recorder fails on them).
pub const RECORD_FORMAT: u32 = 3;

/// Saved state of a [`NaturalGradient`] optimizer.
#[derive(Record)]
pub struct NaturalGradientRecord<B: Backend> {
    /// [`RECORD_FORMAT`] of the code that wrote it.
    pub format: u32,
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
    pub momentum: Vec<ParamRecord<B>>,
    /// Preconditioned layers.
    pub layers: Vec<LayerRecord<B>>,
    /// Adaptive damping: the period under way.
    pub period: Option<PeriodRecord<B>>,
    /// Adaptive damping: `[loss before, loss after, predicted change]` awaiting the next step.
    pub loss_change: Option<Tensor<B, 1>>,
    /// The next step refreshes whatever the schedule (after a rejected period).
    pub force_refresh: bool,
    /// Periods rejected so far.
    pub rejected_periods: usize,
    /// Periods rejected in a row.
    pub consecutive_rejections: usize,
    /// The first judged period's loss (reference of a slow blow-up).
    pub first_loss: Option<f64>,
    /// The step-length factor on the learning rate.
    pub step_scale: f64,
}

/// The period under way (adaptive damping), by parameter id, flattened.
#[derive(Record)]
pub struct PeriodRecord<B: Backend> {
    /// Every float of the model at the period's start.
    pub params: Vec<ParamRecord<B>>,
    /// The momentum buffers at the period's start.
    pub momentum: Vec<ParamRecord<B>>,
    /// The gradients of the period's first step.
    pub gradients: Vec<ParamRecord<B>>,
    /// The loss of the period's first batch, when the training loop handed it over.
    pub before: Option<Tensor<B, 1>>,
}

/// One flattened tensor of a parameter.
#[derive(Record)]
pub struct ParamRecord<B: Backend> {
    /// Parameter id.
    pub id: u64,
    /// The values.
    pub values: Tensor<B, 1>,
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
    /// inverses).
    pub kind: u8,
    /// Damping of a low-rank state.
    pub damping: f64,
    /// Rows of each dense per-sample gradient (kind 2).
    pub d_out: usize,
    /// Low-rank states: the sample count of a mean Fisher (`FisherWeights::Mean`), or 0 when
    /// the last tensor is the Fisher's weight matrix.
    pub fisher_count: usize,
    /// The state's tensors, in the order of its kind.
    pub tensors: Vec<Tensor<B, 2>>,
}

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
            let (kind, damping, d_out, mut tensors) = match &layer.curvature {
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
            let fisher_count = match &layer.curvature {
                Curvature::LowRank(state) if kind != KIND_IDENTITY => match &state.fisher {
                    FisherWeights::Mean(count) => *count,
                    FisherWeights::Matrix(w) => {
                        tensors.push(out::<B>(w));
                        0
                    }
                },
                _ => 1,
            };
            LayerRecord {
                weight_id: layer.meta.weight_id.val(),
                bias_id: layer.meta.bias_id.map(|id| id.val()),
                geometry: encode_geometry(&layer.meta.geometry),
                kind,
                damping,
                d_out,
                fisher_count,
                tensors,
            }
        })
        .collect();
    NaturalGradientRecord {
        format: RECORD_FORMAT,
        step: optim.step,
        refreshes: optim.refreshes,
        damping: optim.damping,
        last_grad_norm: optim.last_grad_norm,
        mode: optim.mode.map(|m| match m {
            HyloMode::Kid => 0,
            HyloMode::Kis => 1,
        }),
        momentum: params_to_record(&optim.momentum),
        layers,
        period: optim.period.as_ref().map(|p| PeriodRecord {
            params: params_to_record(&p.params),
            momentum: params_to_record(&p.momentum),
            gradients: params_to_record(&p.gradients),
            before: p.before.clone().map(Tensor::from_inner),
        }),
        loss_change: optim.loss_change.clone().map(Tensor::from_inner),
        force_refresh: optim.force_refresh,
        rejected_periods: optim.rejected_periods,
        consecutive_rejections: optim.consecutive_rejections,
        first_loss: optim.first_loss,
        step_scale: optim.step_scale,
    }
}

fn params_to_record<B: AutodiffBackend>(
    values: &BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
) -> Vec<ParamRecord<B>> {
    values
        .iter()
        .map(|(id, v)| ParamRecord {
            id: *id,
            values: Tensor::from_inner(v.clone()),
        })
        .collect()
}

fn params_from_record<B: AutodiffBackend>(
    records: Vec<ParamRecord<B>>,
) -> BTreeMap<u64, Tensor<B::InnerBackend, 1>> {
    records
        .into_iter()
        .map(|r| (r.id, r.values.inner()))
        .collect()
}

pub(super) fn load_record<B: AutodiffBackend>(
    mut optim: NaturalGradient<B>,
    record: NaturalGradientRecord<B>,
) -> NaturalGradient<B> {
    if record.format != RECORD_FORMAT {
        tracing::error!(
            format = record.format,
            expected = RECORD_FORMAT,
            "optimizer record of another layout version: ignored, the optimizer starts afresh"
        );
        return optim;
    }
    optim.step = record.step;
    optim.refreshes = record.refreshes;
    optim.damping = record.damping;
    optim.step_scale = record.step_scale;
    optim.last_grad_norm = record.last_grad_norm;
    optim.mode = record
        .mode
        .map(|m| if m == 0 { HyloMode::Kid } else { HyloMode::Kis });
    optim.momentum = params_from_record(record.momentum);
    optim.layers.clear();
    optim.blocks = None;
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
        let fisher = if layer.fisher_count == 0 {
            t.pop().map(FisherWeights::Matrix)
        } else {
            Some(FisherWeights::Mean(layer.fisher_count))
        };
        let curvature = match (layer.kind, t.len(), fisher) {
            (KIND_KRONECKER, 3, Some(fisher)) => {
                let m = t.pop();
                let g = t.pop().expect("length checked");
                let a = t.pop().expect("length checked");
                Curvature::LowRank(LowRankState {
                    rows: Some(PerSampleRows::Kronecker { a, g }),
                    m,
                    damping: layer.damping,
                    fisher,
                })
            }
            (KIND_DENSE, 2, Some(fisher)) => {
                let m = t.pop();
                let j = t.pop().expect("length checked");
                Curvature::LowRank(LowRankState {
                    rows: Some(PerSampleRows::Dense {
                        j,
                        d_out: layer.d_out,
                    }),
                    m,
                    damping: layer.damping,
                    fisher,
                })
            }
            (KIND_IDENTITY, 0, _) => Curvature::LowRank(LowRankState::identity(layer.damping)),
            (KIND_KFAC, 2 | 6, _) => {
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
            (KIND_KFAC_INVERSE, 4, _) => {
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
            (kind, count, _) => {
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
    optim.period = record.period.map(|p| Period {
        params: params_from_record(p.params),
        momentum: params_from_record(p.momentum),
        gradients: params_from_record(p.gradients),
        before: p.before.map(Tensor::inner),
    });
    optim.loss_change = record.loss_change.map(Tensor::inner);
    optim.force_refresh = record.force_refresh;
    optim.rejected_periods = record.rejected_periods;
    optim.consecutive_rejections = record.consecutive_rejections;
    optim.first_loss = record.first_loss;
    let armed = optim.is_curvature_step(optim.step);
    optim.capture.arm(armed);
    optim.request_period();
    optim
}
