//! The meshwork sides: two [`Node`]s over loopback TCP, the server serving
//! the echo service, the client calling it through its typed client; and
//! the same two nodes exchanging the same 64 bytes through an echo concern
//! ([`Context::request`]), the layer the RPC calls ride on.
//!
//! [`Context::request`]: meshwork::concerns::Context::request

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use meshwork::Node;
use meshwork::concerns::Context;
use meshwork::transport::Address;

use super::{CALL_TIMEOUT, PAYLOAD, Plan, check_echo};
use crate::concerns::{ECHO, Echo as EchoConcern};
use crate::transport::{NETWORK, Window, keep_in_flight};

/// The service's name.
const SERVICE: &str = "echo";
/// Time for the nodes to link up and the client to learn of the service.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// The benchmarked service: one method that answers its argument.
#[meshwork::service]
pub(crate) trait Echo {
    /// Answers `data`.
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

/// The implementation.
#[derive(Debug)]
struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// A server node serving the echo service and a client node seeded with
/// it, linked and aware of the service.
struct Pair {
    server: Node,
    client: Node,
}

impl Pair {
    /// Starts both nodes, plaintext or with the defaults (Noise), and waits
    /// until the client has the server as a neighbour providing the
    /// service.
    async fn start(plaintext: bool) -> Result<Self> {
        let server = node(plaintext, None).await?;
        let client = match server.listen_addrs().first().cloned() {
            Some(addr) => node(plaintext, Some(addr)).await,
            None => Err(anyhow::anyhow!("the server listens nowhere")),
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                server.shutdown().await;
                return Err(e);
            }
        };
        let pair = Pair { server, client };
        if let Err(e) = pair.ready().await {
            pair.finish().await;
            return Err(e);
        }
        Ok(pair)
    }

    /// Serves the echo service and waits until the client sees it served by
    /// a neighbour.
    async fn ready(&self) -> Result<()> {
        self.server
            .rpc()
            .serve(SERVICE, EchoServer::new(Echoer))
            .await
            .context("serving the echo service")?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let providers = self.client.rpc().providers(SERVICE);
            if providers
                .iter()
                .any(|p| &p.node_id == self.server.node_id() && p.reach == "neighbour")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the client did not see the service served by a neighbour within {READY_LIMIT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The client's typed client of the service.
    fn echo(&self) -> EchoClient {
        self.client
            .rpc()
            .client::<EchoClient>(SERVICE)
            .with_deadline(CALL_TIMEOUT)
    }

    /// A call through the echo concern: the client's request to the server.
    async fn request(&self, ctx: &Context, payload: &Bytes) -> Result<Bytes> {
        ctx.request(self.server.node_id(), payload.clone(), CALL_TIMEOUT)
            .await
            .context("concern request")
    }

    /// The client's context of the echo concern.
    fn concern(&self) -> Context {
        self.client.concerns().context(ECHO)
    }

    /// Shuts both nodes down.
    async fn finish(self) {
        futures_util::future::join(self.client.shutdown(), self.server.shutdown()).await;
    }
}

/// A node listening on loopback, seeded with `seed` if given.
async fn node(plaintext: bool, seed: Option<Address>) -> Result<Node> {
    let listen: Address = "tcp://127.0.0.1:0".parse().context("listen address")?;
    let mut builder = Node::builder(NETWORK).listen(listen).concern(EchoConcern);
    if let Some(seed) = seed {
        builder = builder.seed(seed);
    }
    if plaintext {
        builder = builder.insecure_plaintext();
    }
    builder.start().await.context("starting a node")
}

/// What a side calls: the RPC service, or the echo concern underneath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The typed client of the echo service.
    Rpc,
    /// [`Context::request`] to the echo concern.
    Concern,
}

/// Sequential calls; every measured round trip.
pub(crate) async fn seq(plaintext: bool, via: Via, plan: Plan) -> Result<Vec<Duration>> {
    let pair = Pair::start(plaintext).await?;
    let result = seq_on(&pair, via, plan).await;
    pair.finish().await;
    result
}

/// The calls of [`seq`] on a running pair.
async fn seq_on(pair: &Pair, via: Via, plan: Plan) -> Result<Vec<Duration>> {
    let client = pair.echo();
    let ctx = pair.concern();
    let payload = vec![0xa5u8; PAYLOAD];
    let bytes = Bytes::from(payload.clone());
    let mut samples = Vec::with_capacity(plan.rounds);
    let mut deadline = None;
    for n in 0..plan.warmup + plan.rounds {
        if n == plan.warmup {
            deadline = Some(Instant::now() + plan.budget);
        }
        let start = Instant::now();
        let rtt = match via {
            Via::Rpc => {
                let reply = client.echo(payload.clone()).await.context("rpc call")?;
                let rtt = start.elapsed();
                check_echo(&reply)?;
                rtt
            }
            Via::Concern => {
                let reply = pair.request(&ctx, &bytes).await?;
                let rtt = start.elapsed();
                check_echo(&reply)?;
                rtt
            }
        };
        if n >= plan.warmup {
            samples.push(rtt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    Ok(samples)
}

/// [`DEPTH`](crate::transport::DEPTH) calls in flight; calls per second.
pub(crate) async fn in_flight(plaintext: bool, via: Via, window: Window) -> Result<f64> {
    let pair = Pair::start(plaintext).await?;
    let result = match via {
        Via::Rpc => in_flight_on(&pair, window).await,
        Via::Concern => requests_in_flight_on(&pair, window).await,
    };
    pair.finish().await;
    result
}

/// [`DEPTH`](crate::transport::DEPTH) requests in flight through the echo concern on a running pair.
async fn requests_in_flight_on(pair: &Pair, window: Window) -> Result<f64> {
    let ctx = pair.concern();
    let payload = Bytes::from(vec![0xa5u8; PAYLOAD]);
    keep_in_flight(
        window,
        || pair.request(&ctx, &payload),
        |reply| check_echo(&reply?),
    )
    .await
}

/// The calls of [`in_flight`] through the RPC service on a running pair.
async fn in_flight_on(pair: &Pair, window: Window) -> Result<f64> {
    let client = pair.echo();
    let payload = vec![0xa5u8; PAYLOAD];
    keep_in_flight(
        window,
        || client.echo(payload.clone()),
        |reply| check_echo(&reply.context("rpc call")?),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_meshwork_sides_run() {
        let plan = Plan {
            warmup: 5,
            rounds: 20,
            budget: Duration::from_millis(50),
            window: Window {
                warmup: Duration::from_millis(5),
                length: Duration::from_millis(20),
            },
        };
        for (plaintext, via) in [(true, Via::Rpc), (false, Via::Rpc), (false, Via::Concern)] {
            assert!(!seq(plaintext, via, plan).await.unwrap().is_empty());
            assert!(in_flight(plaintext, via, plan.window).await.unwrap() > 0.0);
        }
    }
}
