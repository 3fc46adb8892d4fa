//! Assignment of layers to the workers that factorise them.

/// Owner of each job: longest processing time first, each job to the least-loaded worker
/// (ties to the lower rank), so every worker computes the same assignment.
pub fn assign_owners(costs: &[f64], workers: usize) -> Vec<usize> {
    let workers = workers.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0.0f64; workers];
    let mut owners = vec![0; costs.len()];
    for job in order {
        let (worker, _) = load
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(&b.0)))
            .expect("at least one worker");
        owners[job] = worker;
        load[worker] += costs[job];
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_balances_the_load() {
        // LPT on [7, 5, 4, 3, 3, 2] over 2 workers: 7->0, 5->1, 4->1 (9), 3->0 (10), 3->1 (12),
        // 2->0 (12): a perfect balance.
        let costs = [3.0, 7.0, 2.0, 5.0, 4.0, 3.0];
        let owners = assign_owners(&costs, 2);
        let load = |w| -> f64 {
            costs
                .iter()
                .zip(&owners)
                .filter(|(_, &o)| o == w)
                .map(|(c, _)| c)
                .sum()
        };
        assert_eq!((load(0), load(1)), (12.0, 12.0), "{owners:?}");
        assert_eq!(owners[1], 0, "the largest job goes to worker 0");
        assert_eq!(assign_owners(&costs, 1), vec![0; 6]);
        assert_eq!(assign_owners(&[1.0, 1.0, 1.0], 3), vec![0, 1, 2]);
    }
}
