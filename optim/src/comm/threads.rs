//! An in-process communicator: P threads of one process exchanging buffers in memory (tests,
//! and several devices driven from one process).

use std::sync::{Arc, Barrier, Mutex};

use super::Communicator;

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// Creates the communicators of a group of threads.
pub struct ThreadGroup;

impl ThreadGroup {
    /// One communicator per worker, to be moved into `size` threads.
    pub fn create(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); size]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One thread's end of a [`ThreadGroup`].
pub struct ThreadComm {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Deposits `data`, waits for everyone, reads with `read`, waits again (so slots can be reused).
    fn exchange<T>(&self, data: Option<&[f32]>, read: impl FnOnce(&[Vec<f32>]) -> T) -> T {
        if let Some(data) = data {
            self.shared.slots.lock().expect("no poisoned slot")[self.rank] = data.to_vec();
        }
        self.shared.barrier.wait();
        let out = read(&self.shared.slots.lock().expect("no poisoned slot"));
        self.shared.barrier.wait();
        out
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) {
        let sum = self.exchange(Some(data), |slots| {
            let mut sum = vec![0.0f32; slots[0].len()];
            for slot in slots {
                for (s, v) in sum.iter_mut().zip(slot) {
                    *s += v;
                }
            }
            sum
        });
        data.copy_from_slice(&sum);
    }

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        self.exchange(Some(local), |slots| slots.concat())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) {
        let mine = (self.rank == root).then_some(&*data);
        let value = self.exchange(mine, |slots| slots[root].clone());
        data.copy_from_slice(&value);
    }

    fn abort(&self, message: &str) -> ! {
        panic!("worker {} aborted the group: {message}", self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_agree_on_every_thread() {
        let results: Vec<_> = std::thread::scope(|s| {
            ThreadGroup::create(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut sum = vec![r, 1.0];
                        c.all_reduce_sum(&mut sum);
                        let gathered = c.all_gather(&[r, r]);
                        let mut b = vec![r; 2];
                        c.broadcast(&mut b, 2);
                        (sum, gathered, b)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        for (sum, gathered, b) in results {
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }
}
