//! The workers of a data-parallel run: the communicator, who writes outputs, and the checks
//! that keep ranks in step (same configuration, same stop decision, same weights).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use hylo_optim::comm::{Communicator, Single};

/// The communicator of this process and its place in the job.
#[derive(Clone)]
pub struct Workers {
    /// Collectives among the workers.
    pub comm: Arc<dyn Communicator>,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            comm: Arc::new(Single),
        }
    }
}

impl Workers {
    /// Workers over `comm`.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
    }

    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of workers.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Whether this worker writes the run's files (rank 0).
    pub fn writes(&self) -> bool {
        self.rank() == 0
    }

    /// Whether there is more than one worker.
    pub fn distributed(&self) -> bool {
        self.size() > 1
    }

    /// Fails on every worker when the workers were given different configurations.
    pub fn check_same_config(&self, config: &str) -> Result<(), String> {
        if !self.distributed() {
            return Ok(());
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        config.hash(&mut hasher);
        let h = hasher.finish();
        // Four 16-bit pieces: exact in f32.
        let mine: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
        let all = self.comm.all_gather(&mine);
        let differing: Vec<usize> = all
            .chunks(4)
            .enumerate()
            .filter(|(_, c)| *c != &mine[..])
            .map(|(r, _)| r)
            .collect();
        if differing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "configuration mismatch: rank {} was started with other arguments than rank(s) {:?}; \
                 every rank must get the same command line",
                self.rank(),
                differing
            ))
        }
    }

    /// True on every worker when any worker wants to stop.
    pub fn any(&self, flag: bool) -> bool {
        if !self.distributed() {
            return flag;
        }
        let mut v = [f32::from(u8::from(flag))];
        self.comm.all_reduce_sum(&mut v);
        v[0] > 0.0
    }

    /// Sums `values` over the workers.
    pub fn sum(&self, values: &mut [f32]) {
        if self.distributed() {
            self.comm.all_reduce_sum(values);
        }
    }

    /// Checks that every worker holds bit-identical weights and BatchNorm statistics (a 64-bit
    /// FNV-1a hash of every float's bits, compared across workers); returns the hash.
    pub fn check_same_weights<B: Backend, M: Module<B>>(&self, model: &M) -> Result<u64, String> {
        // A record synchronises the BatchNorm statistics a forward pass left pending.
        let _ = model.clone().into_record();
        let mut hash = BitHash(0xcbf2_9ce4_8422_2325);
        model.visit(&mut hash);
        let h = hash.0;
        if !self.distributed() {
            return Ok(h);
        }
        // Four 16-bit pieces: exact in f32.
        let mine: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
        let all = self.comm.all_gather(&mine);
        let differing: Vec<usize> = all
            .chunks(4)
            .enumerate()
            .filter(|(_, c)| *c != &mine[..])
            .map(|(r, _)| r)
            .collect();
        if differing.is_empty() {
            Ok(h)
        } else {
            Err(format!(
                "ranks disagree on the weights: rank {}'s hash {h:016x} differs from rank(s) \
                 {differing:?}",
                self.rank()
            ))
        }
    }
}

/// FNV-1a over the bits of every float, in visiting order.
struct BitHash(u64);

impl<B: Backend> ModuleVisitor<B> for BitHash {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = hylo_optim::host::read_f32(param.val());
        for v in values {
            for byte in v.to_bits().to_le_bytes() {
                self.0 ^= u64::from(byte);
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
}

impl Workers {
    /// In a distributed run, checks that every rank ends with the same weights and logs it.
    pub fn agree<B: burn::tensor::backend::AutodiffBackend, M: burn::module::AutodiffModule<B>>(
        &self,
        model: &M,
        log: &impl Fn(&str),
    ) -> Result<(), String> {
        if self.distributed() {
            let hash = self.check_same_weights::<B, M>(model)?;
            log(&format!(
                "all {} ranks agree on the weights (bitwise hash {hash:016x})",
                self.size()
            ));
        }
        Ok(())
    }
}
