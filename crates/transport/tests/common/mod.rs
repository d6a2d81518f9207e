//! Helpers shared by the transport integration tests: the same scenario runs
//! over TCP on loopback and over the in-memory network.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshwork_transport::mem::MemNetwork;
use meshwork_transport::{Address, BoxStream, Config, Endpoint, TcpTransport, Transport};
use meshwork_wire::proto::{Concern, ConcernKind, Hello};
use meshwork_wire::{FrameCodec, Message, PROTOCOL_VERSION, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// Which transport a test runs on.
#[derive(Clone, Debug)]
pub enum Net {
    Tcp,
    Mem(MemNetwork),
}

impl Net {
    pub fn mem() -> Self {
        Net::Mem(MemNetwork::new())
    }

    pub fn transport(&self, host: &str) -> Arc<dyn Transport> {
        match self {
            Net::Tcp => Arc::new(TcpTransport::new()),
            Net::Mem(net) => Arc::new(net.transport(host)),
        }
    }

    pub fn listen_addr(&self, host: &str) -> Address {
        match self {
            Net::Tcp => "tcp://127.0.0.1:0".parse().unwrap(),
            Net::Mem(_) => Address::mem(host),
        }
    }

    /// An endpoint for `host` with `config`, listening.
    pub async fn listening(&self, host: &str, config: Config) -> (Endpoint, Address) {
        let ep = Endpoint::with_transport(config, self.transport(host));
        let addr = ep.listen(&self.listen_addr(host)).await.unwrap();
        (ep, addr)
    }

    /// An endpoint for `host` with `config` that only dials.
    pub fn dialer(&self, host: &str, config: Config) -> Endpoint {
        Endpoint::with_transport(config, self.transport(host))
    }

    /// A raw stream to `addr`, from `host`, with no handshake: a scripted peer.
    pub async fn raw(&self, host: &str, addr: &Address) -> BoxStream {
        self.transport(host).dial(addr).await.unwrap().0
    }

    /// A raw stream to a plaintext endpoint that has exchanged preambles and
    /// is ready for frames (the first one being our Hello).
    pub async fn raw_plain(&self, host: &str, addr: &Address) -> BoxStream {
        let mut s = self.raw(host, addr).await;
        s.write_all(PLAIN_PREAMBLE).await.unwrap();
        let mut theirs = [0u8; 8];
        s.read_exact(&mut theirs).await.unwrap();
        assert_eq!(&theirs, PLAIN_PREAMBLE);
        s
    }
}

/// The preamble of a plaintext meshwork v1 node (docs/protocol.md).
pub const PLAIN_PREAMBLE: &[u8; 8] = b"mshwrk\x01\x00";

/// The default, encrypted configuration of the test network.
/// A Concern request frame numbered `n` (its request id).
pub fn concern_frame(n: u64, payload: impl Into<bytes::Bytes>) -> Message {
    Message::Concern(Concern {
        command: 1,
        request_id: n,
        kind: ConcernKind::Request as i32,
        ttl: 0,
        flags: 0,
        payload: payload.into(),
    })
}

pub fn config() -> Config {
    Config::new("test-net")
}

/// A plaintext configuration, for tests that script a raw peer.
pub fn plain() -> Config {
    config().with_insecure_plaintext()
}

/// Reads raw bytes until the stream ends or fails, with a timeout.
pub async fn read_raw_to_end(stream: &mut BoxStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("stream never ended");
    all
}

pub fn hello_from(config: &Config, version: u32, network: &str) -> Message {
    Message::Hello(Box::new(Hello {
        protocol_version: version,
        network_id: network.into(),
        node_id: config.node_id().as_bytes().clone(),
        listen_addrs: vec![],
        metadata: Default::default(),
        capabilities: 0,
        peer_count: None,
    }))
}

pub fn current_hello(config: &Config) -> Message {
    hello_from(config, PROTOCOL_VERSION, config.network_id())
}

/// Writes one message as a frame.
pub async fn write_msg(stream: &mut BoxStream, msg: &Message) {
    let frame = encode_frame(msg, 1 << 20).unwrap();
    stream.write_all(&frame).await.unwrap();
}

/// Reads one frame (or `None` at a clean end of stream), with a timeout.
pub async fn read_msg(stream: &mut BoxStream, buf: &mut BytesMut) -> Option<Message> {
    let mut codec = FrameCodec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(m) = codec.decode(buf).unwrap() {
                return Some(m);
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("read timed out")
}

/// Reads until the stream ends (or errors) and returns every message seen.
pub async fn read_to_end(stream: &mut BoxStream) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while let Some(m) = read_msg(stream, &mut buf).await {
        out.push(m);
    }
    out
}

/// Polls `cond` every 5 ms for up to 2 s; panics with `what` if it never holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs each `async fn(Net)` scenario once over TCP on loopback and once on
/// the in-memory network, as `<name>::tcp` and `<name>::mem`.
macro_rules! on_both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$name(super::common::Net::Tcp).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mem() {
                super::$name(super::common::Net::mem()).await
            }
        }
    )*};
}
