//! The `concerns` bench: the concerns layer (`meshwork-concerns`) on top of
//! the peer manager, each figure against a baseline measured in the same
//! run, the sides taking turns ([`crate::harness::rotate`]).
//!
//! - Request/reply through an echo concern between two nodes over loopback
//!   TCP, 64 B payloads (see [`request`]):
//!   - `request_seq_64B` (µs per call, one request at a time) and
//!     `pipelined64_64B` (replies/s with 64 requests in flight, target
//!     ≥ 0.5× raw): the concerns layer with
//!     [`Config::with_insecure_plaintext`] against raw framed TCP
//!     (the `transport` bench's baseline, `raw`), like for like;
//!   - `*_noise`: the same with the default [`Config`] (Noise), against raw;
//!   - `*_layer`: plaintext concerns against plaintext bare endpoints
//!     exchanging the same Concern frames (the `transport` bench's meshwork
//!     side, `endpoints`): what the concerns and peers layers add to the
//!     transport.
//! - `flood_100_nodes` (µs): from `broadcast` on one node of a converged
//!   100-node in-memory mesh (default [`PeersConfig`]) until the last of
//!   the 99 others has it in its concern, against `unicast`: one node
//!   sending the same payload directly to each of 99 others it is linked
//!   to, until the last has it. `flood_100_nodes_hops`: the same flood
//!   against `hops`, the origin's eccentricity in the mesh times the
//!   one-hop delivery time of a direct send, i.e. the flood with nothing
//!   paid for fanning out (see [`flood`]).
//! - `routed_request_5_hops` (µs): a request and its reply routed along a
//!   line of 6 in-memory nodes, route already learnt, against `direct`: the
//!   same request to a neighbour. Were routed hops as cheap as direct ones,
//!   the ratio would be 5 (see [`routed`]).
//!
//! [`Config`]: meshwork_transport::Config
//! [`Config::with_insecure_plaintext`]: meshwork_transport::Config::with_insecure_plaintext
//! [`PeersConfig`]: meshwork_peers::PeersConfig

pub(crate) mod flood;
pub(crate) mod request;
pub(crate) mod routed;

use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use meshwork_concerns::wire::NodeId;
use meshwork_concerns::{BoxError, Concern, Concerns, Context, Reply};

use crate::harness::Options;
use crate::report::Figure;

/// The bench's name, in every figure.
pub(crate) const BENCH: &str = "concerns";
/// The echo concern's command id.
pub(crate) const ECHO: u32 = 7;
/// Payload of every request and broadcast.
const PAYLOAD: usize = 64;
/// Time a single request may take before the run fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers every request with its own payload, with the default
/// concurrency (16 at once).
#[derive(Debug)]
pub(crate) struct Echo;

#[async_trait]
impl Concern for Echo {
    fn command(&self) -> u32 {
        ECHO
    }

    fn name(&self) -> &str {
        "echo"
    }

    async fn on_request(
        &self,
        _ctx: &Context,
        _from: &NodeId,
        payload: Bytes,
    ) -> Result<Option<Reply>, BoxError> {
        Ok(Some(Reply::new(payload)))
    }
}

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    request: request::Plan,
    flood: flood::Plan,
    routed: routed::Plan,
}

impl Plan {
    /// The plan for a full run, or a shorter one with `quick`.
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                request: request::Plan::QUICK,
                flood: flood::Plan::QUICK,
                routed: routed::Plan::QUICK,
            }
        } else {
            Plan {
                request: request::Plan::FULL,
                flood: flood::Plan::FULL,
                routed: routed::Plan::FULL,
            }
        }
    }
}

/// Runs the bench: request/reply over TCP, flood, routed request.
pub(crate) async fn run(opts: &Options) -> Result<Vec<Figure>> {
    let plan = Plan::new(opts.quick);
    let mut figures = request::measure(opts, plan.request).await?;
    figures.extend(flood::measure(opts, plan.flood).await?);
    figures.push(routed::measure(opts, plan.routed).await?);
    Ok(figures)
}

/// Shuts down the concerns layer of every node, then every peer manager.
async fn stop(nodes: &[Concerns]) {
    futures_util::future::join_all(nodes.iter().map(Concerns::shutdown)).await;
    futures_util::future::join_all(nodes.iter().map(|n| n.peers().shutdown())).await;
}

/// The median of `samples` in µs, failing on none.
fn median_micros(samples: &mut [Duration]) -> Result<f64> {
    crate::transport::median_micros(samples)
}

/// Checks that a reply echoes a payload of `size` bytes.
fn check_echo(reply: &Bytes, size: usize) -> Result<()> {
    if reply.len() != size {
        bail!("reply of {} bytes, sent {size}", reply.len());
    }
    Ok(())
}
