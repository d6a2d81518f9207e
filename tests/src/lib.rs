//! Shared helpers for the cross-crate integration tests in `tests/tests/`.

use std::collections::{HashMap, VecDeque};

use meshwork::Node;
use meshwork::wire::NodeId;

/// True when every node has at least `min` peers among `nodes`, by
/// `peers_of`, and all of them form one connected graph.
pub fn one_graph<I>(nodes: &[&Node], min: usize, peers_of: impl Fn(&Node) -> I) -> bool
where
    I: IntoIterator<Item = NodeId>,
{
    let index: HashMap<&NodeId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.node_id(), i))
        .collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            peers_of(n)
                .into_iter()
                .filter_map(|id| index.get(&id).copied())
                .collect()
        })
        .collect();
    if nodes.is_empty() || adj.iter().any(|a| a.len() < min) {
        return false;
    }
    let mut seen = vec![false; nodes.len()];
    seen[0] = true;
    let mut queue = VecDeque::from([0]);
    while let Some(i) = queue.pop_front() {
        for &j in &adj[i] {
            if !std::mem::replace(&mut seen[j], true) {
                queue.push_back(j);
            }
        }
    }
    seen.iter().all(|s| *s)
}
