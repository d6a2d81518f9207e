//! Times node-id signatures (XEdDSA): signing, checking with a kept
//! `VerifyingKey`, and checking from the bare node id (which maps it to its
//! Edwards point first), each the median of 5 rounds of 2 000.
//!
//! ```text
//! cargo run --release -p meshwork-transport --example signatures
//! ```

// A tool whose output is its figures.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use meshwork_transport::{Identity, VerifyingKey, verify};

const ROUNDS: usize = 5;
const PER_ROUND: u32 = 2_000;

/// The median time per call of `f` over [`ROUNDS`] rounds.
fn median(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                f();
            }
            start.elapsed() / PER_ROUND
        })
        .collect();
    times.sort();
    times[ROUNDS / 2]
}

fn main() {
    let identity = Identity::generate();
    let message = [7u8; 64];
    let signature = identity.sign(&message);
    let key = VerifyingKey::from_node_id(identity.node_id()).expect("a generated id is usable");
    let sign = median(|| {
        std::hint::black_box(identity.sign(&message));
    });
    let kept = median(|| {
        key.verify(&message, &signature).expect("holds");
    });
    let bare = median(|| {
        verify(identity.node_id(), &message, &signature).expect("holds");
    });
    println!(
        "64-byte message: sign {sign:.1?}, verify with a kept key {kept:.1?}, verify from the node id {bare:.1?}"
    );
}
