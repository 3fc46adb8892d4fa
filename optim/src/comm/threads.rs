//! An in-process communicator: P threads of one process exchanging buffers in memory (tests,
//! and several devices driven from one process).
//!
//! Each worker must own its model: build it from bytes or a fresh record in its own thread
//! rather than cloning one shared module. Burn 0.21's autodiff graph can deadlock when threads
//! share graph nodes (such as the same parameter tensors).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::Communicator;

/// The rendezvous all workers of a group meet at.
#[derive(Default)]
struct Rendezvous {
    slots: Vec<Vec<f32>>,
    /// Workers that arrived in the current phase.
    arrived: usize,
    /// Completed phases; a waiting worker leaves when it changes.
    phase: u64,
    /// Why the group broke up (the first worker to panic, abort or leave); once set, a
    /// collective that cannot complete panics.
    failure: Option<String>,
}

struct Shared {
    size: usize,
    state: Mutex<Rendezvous>,
    turn: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Rendezvous> {
        // A worker that panicked while holding the lock leaves no partial state behind that
        // matters: its failure is recorded below and everyone else gives up.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until all workers arrived; panics if a worker failed or left before that.
    fn meet<'a>(&'a self, mut state: MutexGuard<'a, Rendezvous>) -> MutexGuard<'a, Rendezvous> {
        let phase = state.phase;
        state.arrived += 1;
        if state.arrived == self.size {
            state.arrived = 0;
            state.phase += 1;
            self.turn.notify_all();
            return state;
        }
        while state.phase == phase && state.failure.is_none() {
            state = self.turn.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.phase == phase {
            let failure = state.failure.clone().unwrap_or_default();
            drop(state);
            panic!("the group cannot go on: {failure}");
        }
        state
    }

    fn fail(&self, message: String) {
        let mut state = self.lock();
        state.failure.get_or_insert(message);
        self.turn.notify_all();
    }
}

/// Creates the communicators of a group of threads.
pub struct ThreadGroup;

impl ThreadGroup {
    /// One communicator per worker, to be moved into `size` threads.
    pub fn create(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(Rendezvous {
                slots: vec![Vec::new(); size],
                ..Rendezvous::default()
            }),
            turn: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One thread's end of a [`ThreadGroup`]; once it is dropped (its thread panicked or finished),
/// a collective that still waits for it panics instead of waiting forever.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Deposits `data`, waits for everyone, reads with `read`, waits again (so slots can be reused).
    fn exchange<T>(&self, data: Option<&[f32]>, read: impl FnOnce(&[Vec<f32>]) -> T) -> T {
        let mut state = self.shared.lock();
        if let Some(data) = data {
            state.slots[self.rank] = data.to_vec();
        }
        let state = self.shared.meet(state);
        let out = read(&state.slots);
        drop(self.shared.meet(state));
        out
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "left the group"
        };
        self.shared.fail(format!("worker {} {why}", self.rank));
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
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
        let message = format!("worker {} aborted the group: {message}", self.rank);
        self.shared.fail(message.clone());
        panic!("{message}")
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

    /// Runs `work` on every worker of a group of `size`; returns each thread's outcome.
    fn run_group(size: usize, work: impl Fn(ThreadComm) + Sync) -> Vec<Result<(), String>> {
        std::thread::scope(|s| {
            let work = &work;
            ThreadGroup::create(size)
                .into_iter()
                .map(|c| s.spawn(move || work(c)))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| {
                    h.join().map_err(|e| {
                        e.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    })
                })
                .collect()
        })
    }

    #[test]
    fn many_rounds_keep_the_phases_apart() {
        let outcomes = run_group(3, |c| {
            for round in 0..300 {
                let mut v = vec![(c.rank() + round) as f32];
                c.all_reduce_sum(&mut v);
                assert_eq!(v[0], (3 * round + 3) as f32);
                let g = c.all_gather(&[c.rank() as f32 * round as f32]);
                assert_eq!(g, vec![0.0, round as f32, 2.0 * round as f32]);
            }
        });
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    }

    #[test]
    fn a_panicking_worker_fails_its_peers_instead_of_hanging_them() {
        let outcomes = run_group(3, |c| {
            let mut v = vec![1.0];
            c.all_reduce_sum(&mut v);
            if c.rank() == 1 {
                panic!("worker one's own failure");
            }
            c.all_reduce_sum(&mut v);
        });
        assert!(outcomes[1].as_ref().unwrap_err().contains("own failure"));
        for rank in [0, 2] {
            let err = outcomes[rank].as_ref().unwrap_err();
            assert!(err.contains("worker 1 panicked"), "{err}");
        }
    }

    #[test]
    fn abort_and_early_exit_end_the_collectives_of_the_others() {
        let outcomes = run_group(2, |c| {
            if c.rank() == 0 {
                c.abort("bad shard");
            }
            c.broadcast(&mut [0.0], 0);
        });
        assert!(outcomes[1].as_ref().unwrap_err().contains("bad shard"));
        let outcomes = run_group(2, |c| {
            if c.rank() == 1 {
                c.all_gather(&[1.0]);
            }
        });
        let err = outcomes[1].as_ref().unwrap_err();
        assert!(err.contains("worker 0 left the group"), "{err}");
        assert!(outcomes[0].is_ok());
    }
}
