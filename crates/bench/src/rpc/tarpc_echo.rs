//! The tarpc side: an echo service over tarpc's serde transport (bincode in
//! length-delimited frames) on one loopback TCP connection with
//! `TCP_NODELAY`, served as tarpc's examples do (`BaseChannel::execute`,
//! each request spawned as a task), called through the generated client
//! with the default configurations.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use tarpc::server::{BaseChannel, Channel as _};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tarpc::{client, context, serde_transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{CALL_TIMEOUT, PAYLOAD, Plan, check_echo};
use crate::transport::{Window, keep_in_flight};

/// What tarpc's service macro generates is public; it is used here only.
#[allow(unreachable_pub, missing_docs)]
mod service {
    /// The benchmarked service: one method that answers its argument.
    #[tarpc::service]
    pub trait Echo {
        /// Answers `data`.
        async fn echo(data: Vec<u8>) -> Vec<u8>;
    }
}

use service::{Echo, EchoClient};

/// The implementation.
#[derive(Debug, Clone)]
struct Echoer;

impl Echo for Echoer {
    async fn echo(self, _: context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// A client connected to a server task serving one connection.
struct Pair {
    client: EchoClient,
    server: JoinHandle<()>,
}

impl Pair {
    /// Listens on loopback, connects, and serves the accepted connection.
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .context("binding the tarpc listener")?;
        let addr = listener.local_addr().context("tarpc listener address")?;
        let server = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(stream) = nodelay(stream) else {
                return;
            };
            let transport = serde_transport::new(
                Framed::new(stream, LengthDelimitedCodec::new()),
                Bincode::default(),
            );
            BaseChannel::with_defaults(transport)
                .execute(Echoer.serve())
                .for_each(|call| async {
                    tokio::spawn(call);
                })
                .await;
        });
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => nodelay(s),
            Err(e) => Err(e).context("tarpc connect"),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                server.abort();
                return Err(e);
            }
        };
        let transport = serde_transport::new(
            Framed::new(stream, LengthDelimitedCodec::new()),
            Bincode::default(),
        );
        let client = EchoClient::new(client::Config::default(), transport).spawn();
        Ok(Pair { client, server })
    }

    /// Drops the client (closing the connection) and waits for the server.
    async fn finish(self) {
        drop(self.client);
        let abort = self.server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Sets `TCP_NODELAY`, as meshwork and the raw baseline do.
fn nodelay(stream: TcpStream) -> Result<TcpStream> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    Ok(stream)
}

/// A context whose deadline is [`CALL_TIMEOUT`] from now.
fn ctx() -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + CALL_TIMEOUT;
    ctx
}

/// Sequential calls; every measured round trip.
pub(crate) async fn seq(plan: Plan) -> Result<Vec<Duration>> {
    let pair = Pair::start().await?;
    let result = seq_on(&pair.client, plan).await;
    pair.finish().await;
    result
}

/// The calls of [`seq`] on a connected client.
async fn seq_on(client: &EchoClient, plan: Plan) -> Result<Vec<Duration>> {
    let payload = vec![0xa5u8; PAYLOAD];
    let mut samples = Vec::with_capacity(plan.rounds);
    let mut deadline = None;
    for n in 0..plan.warmup + plan.rounds {
        if n == plan.warmup {
            deadline = Some(Instant::now() + plan.budget);
        }
        let start = Instant::now();
        let reply = client
            .echo(ctx(), payload.clone())
            .await
            .context("tarpc call")?;
        let rtt = start.elapsed();
        check_echo(&reply)?;
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
pub(crate) async fn in_flight(window: Window) -> Result<f64> {
    let pair = Pair::start().await?;
    let result = in_flight_on(&pair.client, window).await;
    pair.finish().await;
    result
}

/// The calls of [`in_flight`] on a connected client.
async fn in_flight_on(client: &EchoClient, window: Window) -> Result<f64> {
    let payload = vec![0xa5u8; PAYLOAD];
    keep_in_flight(
        window,
        || client.echo(ctx(), payload.clone()),
        |reply| check_echo(&reply.context("tarpc call")?),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tarpc_side_runs() {
        let plan = Plan {
            warmup: 5,
            rounds: 20,
            budget: Duration::from_millis(50),
            window: Window {
                warmup: Duration::from_millis(5),
                length: Duration::from_millis(20),
            },
        };
        assert!(!seq(plan).await.unwrap().is_empty());
        assert!(in_flight(plan.window).await.unwrap() > 0.0);
    }
}
