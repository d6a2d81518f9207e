//! The Hello exchange that opens every connection.
//!
//! Both sides send their Hello as soon as the stream is open, then read the
//! other's, so the exchange costs one round trip. Each side checks the other's
//! Hello with [`check_hello`] (pure, unit-tested below); on a refusal it sends a
//! Disconnect with the reason and closes.
//!
//! An encryption stage (issue: secure transport) slots in [`secure`]: it turns
//! the raw stream into an encrypted one before any frame is written, so the
//! Hello is already protected and nothing above changes.

use futures_util::StreamExt;
use meshwork_wire::proto::{Disconnect, Hello};
use meshwork_wire::{FrameCodec, Message, NodeId, PROTOCOL_VERSION, encode_frame};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::FramedRead;

use crate::transport::BoxStream;
use crate::{Config, TransportError};

/// What the handshake hands to the connection: both halves of the stream
/// (the read half with whatever it has already buffered) and the peer's Hello.
pub(crate) struct Handshaken {
    pub(crate) reader: FramedRead<ReadHalf<BoxStream>, FrameCodec>,
    pub(crate) writer: WriteHalf<BoxStream>,
    pub(crate) hello: Hello,
    pub(crate) node_id: NodeId,
}

/// Our Hello, advertising `listen_addrs`.
pub(crate) fn local_hello(config: &Config, listen_addrs: Vec<String>) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        network_id: config.network_id.clone(),
        node_id: config.node_id.as_bytes().clone(),
        listen_addrs,
        metadata: config.metadata.clone(),
        capabilities: config.capabilities,
    }
}

/// Decides whether we accept the peer's Hello. Pure: no I/O, no clock.
///
/// Rules, in order: the network id must equal ours; the protocol version must
/// equal ours (version 1 has no compatible neighbours yet); the node id must
/// not be ours.
pub(crate) fn check_hello(ours: &Hello, theirs: &Hello) -> Result<NodeId, TransportError> {
    if theirs.network_id != ours.network_id {
        return Err(TransportError::WrongNetwork {
            ours: ours.network_id.clone(),
            theirs: theirs.network_id.clone(),
        });
    }
    if theirs.protocol_version != ours.protocol_version {
        return Err(TransportError::IncompatibleVersion {
            ours: ours.protocol_version,
            theirs: theirs.protocol_version,
        });
    }
    if theirs.node_id == ours.node_id {
        return Err(TransportError::SelfConnection);
    }
    // The codec validated the id already; this only converts it.
    Ok(NodeId::from_bytes(theirs.node_id.clone())?)
}

/// The security stage between the socket and the framing. Plaintext for now:
/// the stream is returned as it is.
async fn secure(stream: BoxStream) -> Result<BoxStream, TransportError> {
    Ok(stream)
}

/// Runs the whole handshake on a fresh stream, within the configured timeout.
pub(crate) async fn handshake(
    stream: BoxStream,
    config: &Config,
    hello: Hello,
) -> Result<Handshaken, TransportError> {
    let timeout = config.handshake_timeout;
    match tokio::time::timeout(timeout, exchange(stream, config, hello)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "handshake",
            after: timeout,
        }),
    }
}

async fn exchange(
    stream: BoxStream,
    config: &Config,
    hello: Hello,
) -> Result<Handshaken, TransportError> {
    let stream = secure(stream).await?;
    let (read, mut writer) = tokio::io::split(stream);
    let codec = FrameCodec::new()
        .with_max_frame_len(config.max_frame_len)
        .with_limits(config.limits.clone());
    let mut reader = FramedRead::new(read, codec);

    let ours = hello.clone();
    let hello = Message::Hello(hello);
    // Our own Hello must pass the checks the peer will apply (a too-long
    // network id or too much metadata is a local configuration error).
    meshwork_wire::validate(&hello, &config.limits)?;
    let frame = encode_frame(&hello, config.max_frame_len)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;

    let theirs = match reader.next().await {
        Some(Ok(Message::Hello(h))) => h,
        Some(Ok(Message::Disconnect(d))) => {
            return Err(TransportError::Refused {
                reason: d.reason_or_unspecified(),
                message: d.message,
            });
        }
        Some(Ok(other)) => {
            let err = TransportError::Protocol(format!(
                "expected hello, got {} as the first message",
                other.kind()
            ));
            refuse(&mut writer, &err, config).await;
            return Err(err);
        }
        Some(Err(e)) => {
            let err = TransportError::Wire(e);
            refuse(&mut writer, &err, config).await;
            return Err(err);
        }
        None => {
            return Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed the stream during the handshake",
            )));
        }
    };
    match check_hello(&ours, &theirs) {
        Ok(node_id) => Ok(Handshaken {
            reader,
            writer,
            hello: theirs,
            node_id,
        }),
        Err(err) => {
            refuse(&mut writer, &err, config).await;
            Err(err)
        }
    }
}

/// Best effort: tell the peer why we refuse it, then close our side.
async fn refuse(writer: &mut WriteHalf<BoxStream>, err: &TransportError, config: &Config) {
    let text = crate::connection::truncate_text(err.to_string());
    let msg = Message::Disconnect(Disconnect::new(err.disconnect_reason(), text));
    if let Ok(frame) = encode_frame(&msg, config.max_frame_len) {
        let _ = writer.write_all(&frame).await;
        let _ = writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(net: &str, version: u32, id: u8) -> Hello {
        Hello {
            protocol_version: version,
            network_id: net.into(),
            node_id: vec![id; 32].into(),
            listen_addrs: vec![],
            metadata: Default::default(),
            capabilities: 0,
        }
    }

    #[test]
    fn accepts_same_network_and_version() {
        let id = check_hello(&hello("n", 1, 1), &hello("n", 1, 2)).unwrap();
        assert_eq!(id.as_bytes().as_ref(), &[2u8; 32][..]);
    }

    #[test]
    fn refuses_other_network() {
        let err = check_hello(&hello("a", 1, 1), &hello("b", 1, 2)).unwrap_err();
        assert!(
            matches!(err, TransportError::WrongNetwork { ref ours, ref theirs } if ours == "a" && theirs == "b")
        );
        assert_eq!(
            err.disconnect_reason(),
            meshwork_wire::proto::DisconnectReason::WrongNetwork
        );
    }

    #[test]
    fn refuses_other_version() {
        let err = check_hello(&hello("n", 1, 1), &hello("n", 2, 2)).unwrap_err();
        assert!(matches!(
            err,
            TransportError::IncompatibleVersion { ours: 1, theirs: 2 }
        ));
    }

    #[test]
    fn refuses_self() {
        let err = check_hello(&hello("n", 1, 7), &hello("n", 1, 7)).unwrap_err();
        assert!(matches!(err, TransportError::SelfConnection));
    }

    #[test]
    fn network_is_checked_before_identity() {
        // A node of another network with our id is reported as another network.
        let err = check_hello(&hello("a", 1, 7), &hello("b", 1, 7)).unwrap_err();
        assert!(matches!(err, TransportError::WrongNetwork { .. }));
    }
}
