//! What a run is given ([`Setup`]: settings, data, devices, workers, and the epochs' batch
//! orders they imply) and its progress bars.

use burn::tensor::backend::AutodiffBackend;
use hylo_datasets::EpochOrder;
use hylo_optim::CaptureHandle;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::TrainArgs;
use crate::data::DataSources;
use crate::output;
use crate::workers::Workers;

/// What a run is given: settings, data, the capture handle, device and workers.
pub struct Setup<'a, B: AutodiffBackend> {
    /// The arguments.
    pub args: &'a TrainArgs,
    /// `classify` or `segment` (for `config.json`).
    pub command: &'a str,
    /// Training and validation data.
    pub data: &'a DataSources,
    /// Shared by the model and the optimizer.
    pub capture: &'a CaptureHandle,
    /// Where tensors live.
    pub device: &'a B::Device,
    /// This process and the others of a distributed run.
    pub workers: &'a Workers,
}

// References only: copied freely whatever the backend (a derive would ask `B: Copy`).
impl<B: AutodiffBackend> Clone for Setup<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: AutodiffBackend> Copy for Setup<'_, B> {}

impl<B: AutodiffBackend> Setup<'_, B> {
    /// Writes a line to `train.log` (the rank that writes).
    pub(super) fn log(&self, line: &str) {
        if self.workers.writes() {
            output::log(self.args.out_dir(), line);
        }
    }

    /// Steps of an epoch and this rank's share of a batch.
    pub(super) fn batches(&self) -> Result<(usize, usize), String> {
        let batch = self.args.batch_size as usize;
        let train_len = self.data.train.len();
        let size = self.workers.size();
        if train_len / batch == 0 {
            return Err(format!(
                "--batch-size {batch} is larger than the training set ({train_len} samples)"
            ));
        }
        if !batch.is_multiple_of(size) {
            return Err(format!(
                "--batch-size {batch} must be a multiple of the {size} ranks"
            ));
        }
        Ok((train_len / batch, batch / size))
    }

    /// This rank's batches of `epoch` (shuffled, augmented), from batch `skip` on.
    pub(super) fn order(&self, epoch: u64, skip: u64) -> EpochOrder {
        let (_, local) = self.batches().expect("checked at the start");
        EpochOrder::sharded(
            self.data.train.len(),
            self.args.batch_size as usize,
            self.args.seed,
            epoch,
            true,
            true,
            self.workers.rank(),
            self.workers.size(),
        )
        .skip_batches(skip as usize, local)
    }
}

/// The progress bars on stderr (hidden on ranks that do not write).
pub(super) struct Bars {
    pub(super) all: MultiProgress,
    pub(super) epochs: ProgressBar,
    pub(super) steps: ProgressBar,
}

impl Bars {
    pub(super) fn new(epochs: u64, done: u64, steps: u64, visible: bool) -> Self {
        let all = MultiProgress::new();
        if !visible {
            all.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let epochs = all.add(ProgressBar::new(epochs).with_position(done));
        epochs.set_style(
            ProgressStyle::with_template("epoch {pos}/{len} {wide_bar} {msg}").expect("template"),
        );
        let steps = all.add(ProgressBar::new(steps));
        steps.set_style(
            ProgressStyle::with_template("step {pos}/{len} {bar:30} {per_sec} {msg}")
                .expect("template"),
        );
        Self { all, epochs, steps }
    }
}
