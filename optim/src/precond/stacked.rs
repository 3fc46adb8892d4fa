//! Several layers' states of one shape (low-rank or K-FAC), stacked along a leading axis so that
//! a step applies all of them in a few batched products (on a GPU: a few kernels for the group
//! instead of a few per layer).

use burn::tensor::{backend::Backend, Tensor};

use super::{KfacState, LowRankState};
use crate::rows::PerSampleRows;

/// What decides whether two layers' states can be stacked: the same kind of curvature (low-rank
/// rows or K-FAC decompositions), the same shapes, and the same damping where the state holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StackKey {
    /// Kronecker rows: `(n, d_out, d_in')`.
    Kronecker([usize; 3], u64),
    /// Dense rows: `(n, d_out, d_in')`.
    Dense([usize; 3], u64),
    /// No curvature (the damped identity) for a gradient `[d_out, d_in']`.
    Identity([usize; 2], u64),
    /// K-FAC eigendecompositions for a gradient `[d_out, d_in']` (damped at each step).
    KfacEigen([usize; 2]),
    /// K-FAC inverses for a gradient `[d_out, d_in']`, damped at inversion.
    KfacInverse([usize; 2], u64),
    /// K-FAC before its first decomposition: the damped identity at each step's damping.
    KfacIdentity([usize; 2]),
}

impl StackKey {
    /// The key of `state` for a layer whose gradient is `[d_out, d_in']`.
    pub fn of<B: Backend>(state: &LowRankState<B>, shape: [usize; 2]) -> Self {
        let damping = state.damping.to_bits();
        match (&state.rows, &state.m) {
            (Some(PerSampleRows::Kronecker { a, .. }), Some(_)) => {
                Self::Kronecker([a.dims()[0], shape[0], shape[1]], damping)
            }
            (Some(PerSampleRows::Dense { j, .. }), Some(_)) => {
                Self::Dense([j.dims()[0], shape[0], shape[1]], damping)
            }
            _ => Self::Identity(shape, damping),
        }
    }

    /// The key of a K-FAC `state` for a layer whose gradient is `[d_out, d_in']`.
    pub fn of_kfac<B: Backend>(state: &KfacState<B>, shape: [usize; 2]) -> Self {
        match (&state.inverses, &state.a_eigen, &state.g_eigen) {
            (Some((_, _, damping)), _, _) => Self::KfacInverse(shape, damping.to_bits()),
            (None, Some(_), Some(_)) => Self::KfacEigen(shape),
            _ => Self::KfacIdentity(shape),
        }
    }
}

/// The stacked curvature of `L` layers.
#[derive(Clone, Debug)]
enum StackedRows<B: Backend> {
    /// `a` `[L, n, d_in']`, `g` `[L, n, d_out]`, `m` `[L, n, n]`.
    Kronecker {
        a: Tensor<B, 3>,
        g: Tensor<B, 3>,
        m: Tensor<B, 3>,
    },
    /// `j` `[L, n, d_out * d_in']`, `m` `[L, n, n]`.
    Dense { j: Tensor<B, 3>, m: Tensor<B, 3> },
    /// No kept rows.
    Identity,
}

/// `L` low-rank states of one [`StackKey`], applied at once to gradients `[L, d_out, d_in']`.
#[derive(Clone, Debug)]
pub struct LowRankStack<B: Backend> {
    rows: StackedRows<B>,
    damping: f64,
    len: usize,
}

impl<B: Backend> LowRankStack<B> {
    /// Stacks `states` (all of one [`StackKey`], at least one). Returns the stack and, for each
    /// state, the same state whose rows and `M` are views of the stack (no second copy of the
    /// curvature is kept once the caller replaces its states by them).
    pub fn new(states: &[&LowRankState<B>]) -> (Self, Vec<LowRankState<B>>) {
        let len = states.len();
        assert!(len > 0, "a stack of no states");
        let damping = states[0].damping;
        let m = || {
            let ms = states
                .iter()
                .filter_map(|s| s.m.clone())
                .collect::<Vec<_>>();
            stack(ms)
        };
        let rows = match (&states[0].rows, &states[0].m) {
            (Some(PerSampleRows::Kronecker { .. }), Some(_)) => {
                let (a, g): (Vec<_>, Vec<_>) = states
                    .iter()
                    .filter_map(|s| match &s.rows {
                        Some(PerSampleRows::Kronecker { a, g }) => Some((a.clone(), g.clone())),
                        _ => None,
                    })
                    .unzip();
                StackedRows::Kronecker {
                    a: stack(a),
                    g: stack(g),
                    m: m(),
                }
            }
            (Some(PerSampleRows::Dense { .. }), Some(_)) => {
                let j = states
                    .iter()
                    .filter_map(|s| match &s.rows {
                        Some(PerSampleRows::Dense { j, .. }) => Some(j.clone()),
                        _ => None,
                    })
                    .collect();
                StackedRows::Dense {
                    j: stack(j),
                    m: m(),
                }
            }
            _ => StackedRows::Identity,
        };
        let views = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut state = (*s).clone();
                match (&rows, &state.rows) {
                    (StackedRows::Kronecker { a, g, m }, Some(PerSampleRows::Kronecker { .. })) => {
                        state.rows = Some(PerSampleRows::Kronecker {
                            a: view(a, i),
                            g: view(g, i),
                        });
                        state.m = Some(view(m, i));
                    }
                    (StackedRows::Dense { j, m }, Some(PerSampleRows::Dense { d_out, .. })) => {
                        state.rows = Some(PerSampleRows::Dense {
                            j: view(j, i),
                            d_out: *d_out,
                        });
                        state.m = Some(view(m, i));
                    }
                    _ => {}
                }
                state
            })
            .collect();
        (Self { rows, damping, len }, views)
    }

    /// Number of stacked layers `L`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no layer is stacked (never: [`LowRankStack::new`] needs one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The directions `(1/lambda) [g_l - J_l^T M_l J_l g_l]` of gradients `[L, d_out, d_in']`,
    /// each as [`LowRankState::apply`] gives it.
    pub fn apply(&self, grads: Tensor<B, 3>) -> Tensor<B, 3> {
        let [len, d_out, d_in] = grads.dims();
        let correction = match &self.rows {
            StackedRows::Kronecker { a, g, m } => {
                // J g: <g_i a_i^T, G> = (g_i^T G) . a_i, [L, n, 1].
                let u = g.clone().matmul(grads.clone()).mul(a.clone()).sum_dim(2);
                let u = m.clone().matmul(u);
                // J^T u = sum_i u_i g_i a_i^T = (g o u)^T a.
                Some(g.clone().mul(u).swap_dims(1, 2).matmul(a.clone()))
            }
            StackedRows::Dense { j, m } => {
                let u = j
                    .clone()
                    .matmul(grads.clone().reshape([len, d_out * d_in, 1]));
                let u = m.clone().matmul(u);
                Some(
                    u.swap_dims(1, 2)
                        .matmul(j.clone())
                        .reshape([len, d_out, d_in]),
                )
            }
            StackedRows::Identity => None,
        };
        match correction {
            Some(c) => (grads - c) / self.damping,
            None => grads / self.damping,
        }
    }
}

/// The stacked K-FAC decompositions of `L` layers.
#[derive(Clone, Debug)]
enum StackedFactors<B: Backend> {
    /// `q_a` `[L, d_in', d_in']`, `d_a` `[L, 1, d_in']`, `q_g` `[L, d_out, d_out]`, `d_g`
    /// `[L, d_out, 1]`.
    Eigen {
        q_a: Tensor<B, 3>,
        d_a: Tensor<B, 3>,
        q_g: Tensor<B, 3>,
        d_g: Tensor<B, 3>,
    },
    /// `a_inv` `[L, d_in', d_in']`, `g_inv` `[L, d_out, d_out]`.
    Inverse {
        a_inv: Tensor<B, 3>,
        g_inv: Tensor<B, 3>,
    },
    /// No decomposition yet.
    Identity,
}

/// `L` K-FAC states of one [`StackKey`], applied at once to gradients `[L, d_out, d_in']`.
#[derive(Clone, Debug)]
pub struct KfacStack<B: Backend> {
    factors: StackedFactors<B>,
    len: usize,
}

impl<B: Backend> KfacStack<B> {
    /// Stacks `states` (all of one [`StackKey`], at least one); returns the stack and each state
    /// with its decomposition replaced by views of the stack (as [`LowRankStack::new`]).
    pub fn new(states: &[&KfacState<B>]) -> (Self, Vec<KfacState<B>>) {
        let len = states.len();
        assert!(len > 0, "a stack of no states");
        let gather = |pick: &dyn Fn(&KfacState<B>) -> Option<Tensor<B, 2>>| {
            stack(states.iter().filter_map(|s| pick(s)).collect())
        };
        let first = states[0];
        let factors = if first.inverses.is_some() {
            StackedFactors::Inverse {
                a_inv: gather(&|s| s.inverses.as_ref().map(|i| i.0.clone())),
                g_inv: gather(&|s| s.inverses.as_ref().map(|i| i.1.clone())),
            }
        } else if first.a_eigen.is_some() && first.g_eigen.is_some() {
            StackedFactors::Eigen {
                q_a: gather(&|s| s.a_eigen.as_ref().map(|e| e.0.clone())),
                d_a: gather(&|s| s.a_eigen.as_ref().map(|e| e.1.clone())),
                q_g: gather(&|s| s.g_eigen.as_ref().map(|e| e.0.clone())),
                d_g: gather(&|s| s.g_eigen.as_ref().map(|e| e.1.clone())),
            }
        } else {
            StackedFactors::Identity
        };
        let views = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut state = (*s).clone();
                match &factors {
                    StackedFactors::Inverse { a_inv, g_inv } => {
                        if let Some(inverses) = &mut state.inverses {
                            inverses.0 = view(a_inv, i);
                            inverses.1 = view(g_inv, i);
                        }
                    }
                    StackedFactors::Eigen { q_a, d_a, q_g, d_g } => {
                        state.a_eigen = Some((view(q_a, i), view(d_a, i)));
                        state.g_eigen = Some((view(q_g, i), view(d_g, i)));
                    }
                    StackedFactors::Identity => {}
                }
                state
            })
            .collect();
        (Self { factors, len }, views)
    }

    /// Number of stacked layers `L`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no layer is stacked (never: [`KfacStack::new`] needs one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The directions of gradients `[L, d_out, d_in']` at damping `damping`, each as
    /// [`KfacState::apply`] gives it.
    pub fn apply(&self, grads: Tensor<B, 3>, damping: f64) -> Tensor<B, 3> {
        match &self.factors {
            StackedFactors::Inverse { a_inv, g_inv } => {
                g_inv.clone().matmul(grads).matmul(a_inv.clone())
            }
            StackedFactors::Eigen { q_a, d_a, q_g, d_g } => {
                let rotated = q_g
                    .clone()
                    .swap_dims(1, 2)
                    .matmul(grads)
                    .matmul(q_a.clone());
                let scaled = rotated / (d_g.clone().matmul(d_a.clone()) + damping);
                q_g.clone()
                    .matmul(scaled)
                    .matmul(q_a.clone().swap_dims(1, 2))
            }
            StackedFactors::Identity => grads / damping,
        }
    }
}

/// Row `i` of a stack `[L, r, c]`, as `[r, c]` (a view).
fn view<B: Backend>(t: &Tensor<B, 3>, i: usize) -> Tensor<B, 2> {
    let [_, r, c] = t.dims();
    t.clone().narrow(0, i, 1).reshape([r, c])
}

/// `tensors` (each `[r, c]`) stacked as `[L, r, c]`; a single one is only reshaped.
fn stack<B: Backend>(mut tensors: Vec<Tensor<B, 2>>) -> Tensor<B, 3> {
    if tensors.len() == 1 {
        return tensors.remove(0).unsqueeze_dim(0);
    }
    Tensor::stack(tensors, 0)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests read freely.
mod tests {
    use super::*;
    use crate::precond::FisherWeights;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type B = Flex;
    /// Rows of `n` samples for a gradient `[d_out, d_in']`, or none.
    type MakeRows = fn(usize, usize, usize) -> Option<PerSampleRows<B>>;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn state(rows: Option<PerSampleRows<B>>, damping: f64) -> LowRankState<B> {
        let m = rows.as_ref().map(|r| {
            let n = r.len();
            let x = random([n, n]);
            x.clone().matmul(x.transpose()) / n as f64
        });
        LowRankState {
            rows,
            m,
            damping,
            fisher: FisherWeights::Mean(4),
        }
    }

    fn kronecker(n: usize, d_out: usize, d_in: usize) -> PerSampleRows<B> {
        PerSampleRows::Kronecker {
            a: random([n, d_in]),
            g: random([n, d_out]),
        }
    }

    fn dense(n: usize, d_out: usize, d_in: usize) -> PerSampleRows<B> {
        PerSampleRows::Dense {
            j: random([n, d_out * d_in]),
            d_out,
        }
    }

    fn assert_close(a: Tensor<B, 2>, b: Tensor<B, 2>) {
        let a: Vec<f32> = a.into_data().to_vec().unwrap();
        let b: Vec<f32> = b.into_data().to_vec().unwrap();
        let scale = b.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * scale.max(1.0), "{x} vs {y}");
        }
    }

    /// Every kind of state, stacked one, three at a time, gives each layer the direction its
    /// own state gives, and the views it returns are the states it was given.
    #[test]
    fn a_stack_applies_each_layers_own_state() {
        let (d_out, d_in, n) = (5, 7, 4);
        let kinds: [MakeRows; 3] = [
            |n, o, i| Some(kronecker(n, o, i)),
            |n, o, i| Some(dense(n, o, i)),
            |_, _, _| None,
        ];
        for kind in kinds {
            for count in [1, 3] {
                let states: Vec<_> = (0..count)
                    .map(|_| state(kind(n, d_out, d_in), 0.3))
                    .collect();
                let keys: Vec<_> = states
                    .iter()
                    .map(|s| StackKey::of(s, [d_out, d_in]))
                    .collect();
                assert!(keys.iter().all(|k| *k == keys[0]));
                let refs: Vec<_> = states.iter().collect();
                let (stack, views) = LowRankStack::new(&refs);
                assert_eq!(stack.len(), count);
                let grads: Vec<Tensor<B, 2>> = (0..count).map(|_| random([d_out, d_in])).collect();
                let stacked = stack.apply(Tensor::stack(grads.clone(), 0));
                for (i, g) in grads.iter().enumerate() {
                    let own = states[i].apply(g.clone());
                    let got = stacked.clone().narrow(0, i, 1).reshape([d_out, d_in]);
                    assert_close(got, own.clone());
                    assert_close(views[i].apply(g.clone()), own);
                    assert_eq!(views[i].rank(), states[i].rank());
                }
            }
        }
    }

    fn spd(d: usize) -> Tensor<B, 2> {
        let x = random([d, d + 2]);
        x.clone().matmul(x.transpose()) / d as f64
    }

    /// K-FAC states (eigen, inverse, not yet decomposed), stacked one, three at a time, give
    /// each layer the direction its own state gives.
    #[test]
    fn a_kfac_stack_applies_each_layers_own_state() {
        use crate::precond::KfacMethod;
        let (d_out, d_in, damping) = (4, 6, 0.3);
        for method in [Some(KfacMethod::Eigen), Some(KfacMethod::Inverse), None] {
            for count in [1, 3] {
                let states: Vec<_> = (0..count)
                    .map(|_| {
                        let mut s = KfacState::new(spd(d_in), spd(d_out));
                        if let Some(m) = method {
                            s.invert(m, damping).unwrap();
                        }
                        s
                    })
                    .collect();
                let keys: Vec<_> = states
                    .iter()
                    .map(|s| StackKey::of_kfac(s, [d_out, d_in]))
                    .collect();
                assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
                let refs: Vec<_> = states.iter().collect();
                let (stack, views) = KfacStack::new(&refs);
                assert_eq!(stack.len(), count);
                let grads: Vec<Tensor<B, 2>> = (0..count).map(|_| random([d_out, d_in])).collect();
                let stacked = stack.apply(Tensor::stack(grads.clone(), 0), damping);
                for (i, g) in grads.iter().enumerate() {
                    let own = states[i].apply(g.clone(), damping);
                    let got = stacked.clone().narrow(0, i, 1).reshape([d_out, d_in]);
                    assert_close(got, own.clone());
                    assert_close(views[i].apply(g.clone(), damping), own);
                }
            }
        }
        let mut eigen = KfacState::new(spd(d_in), spd(d_out));
        eigen.invert(KfacMethod::Eigen, damping).unwrap();
        let mut inverse = eigen.clone();
        inverse.invert(KfacMethod::Inverse, damping).unwrap();
        let key = |s: &KfacState<B>| StackKey::of_kfac(s, [d_out, d_in]);
        assert_ne!(key(&eigen), key(&inverse));
        assert_ne!(key(&eigen), key(&KfacState::new(spd(d_in), spd(d_out))));
    }

    #[test]
    fn keys_tell_kinds_shapes_and_damping_apart() {
        let k = |s: &LowRankState<B>| StackKey::of(s, [5, 7]);
        let a = state(Some(kronecker(4, 5, 7)), 0.3);
        assert_eq!(k(&a), k(&state(Some(kronecker(4, 5, 7)), 0.3)));
        assert_ne!(k(&a), k(&state(Some(kronecker(3, 5, 7)), 0.3)));
        assert_ne!(k(&a), k(&state(Some(kronecker(4, 5, 7)), 0.2)));
        assert_ne!(k(&a), k(&state(Some(dense(4, 5, 7)), 0.3)));
        assert_ne!(k(&a), k(&state(None, 0.3)));
        assert_ne!(
            StackKey::of(&state(None, 0.3), [5, 7]),
            StackKey::of(&state(None, 0.3), [5, 8])
        );
    }
}
