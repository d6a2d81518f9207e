//! The handshake that opens every connection.
//!
//! 1. **Preamble.** Both sides send 8 bytes at once: `mshwrk`, the protocol
//!    version and the security mode. A stream that does not start this way is
//!    not a meshwork node; a different mode is refused with a clear error
//!    (an encrypted node never falls back to plaintext).
//! 2. **Security stage** ([`crate::noise`]): the Noise XXpsk0 handshake
//!    authenticates both static keys and turns the stream into an encrypted
//!    one. In the (opt-in) plaintext mode this stage does nothing.
//! 3. **Hello**, inside the encrypted channel. The initiator sends its Hello
//!    at once; the responder checks it with [`check_hello`] (pure,
//!    unit-tested below) and the admission policy (allow list, bans) before
//!    answering with its own, which the initiator checks the same way: same
//!    network, same version, not ourselves, and the node id is the key just
//!    authenticated. A refusal is a Disconnect with the reason, then close.

use std::time::Duration;

use futures_util::StreamExt;
use meshwork_wire::proto::{Disconnect, Hello, PeerCount};
use meshwork_wire::{FrameCodec, Message, NodeId, PROTOCOL_VERSION, encode_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::config::Security;
use crate::transport::BoxStream;
use crate::{Config, TransportError, noise};

/// A boxed read half (plain or decrypting).
pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// A boxed write half (plain or encrypting).
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// What the handshake hands to the connection: both halves of the stream
/// (the read half with whatever it has already buffered) and the peer's Hello.
pub(crate) struct Handshaken {
    pub(crate) reader: FramedRead<BoxRead, FrameCodec>,
    pub(crate) writer: BoxWrite,
    pub(crate) hello: Hello,
    pub(crate) node_id: NodeId,
    /// A round trip measured during the handshake, if this side could:
    /// with Noise both sides (each writes a message and reads the answer),
    /// in plaintext the initiator (its Hello, then the responder's, which
    /// answers it). The connection's first RTT sample.
    pub(crate) rtt: Option<Duration>,
}

/// Initial capacity of a connection's frame read buffer.
pub(crate) const READ_BUFFER: usize = 2 * 1024;

/// The first bytes on every stream.
const PREAMBLE_MAGIC: &[u8; 6] = b"mshwrk";
/// Length of the preamble.
pub(crate) const PREAMBLE_LEN: usize = 8;

fn mode_byte(security: Security) -> u8 {
    match security {
        Security::InsecurePlaintext => 0,
        Security::Noise => 1,
    }
}

/// Our preamble: magic, protocol version (low byte), security mode.
pub(crate) fn preamble(security: Security) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..6].copy_from_slice(PREAMBLE_MAGIC);
    p[6] = PROTOCOL_VERSION as u8;
    p[7] = mode_byte(security);
    p
}

/// Checks the peer's preamble against ours. Pure.
pub(crate) fn check_preamble(
    ours: Security,
    theirs: &[u8; PREAMBLE_LEN],
) -> Result<(), TransportError> {
    if &theirs[..6] != PREAMBLE_MAGIC {
        return Err(TransportError::NotMeshwork);
    }
    if theirs[6] != PROTOCOL_VERSION as u8 {
        return Err(TransportError::IncompatibleVersion {
            ours: PROTOCOL_VERSION,
            theirs: u32::from(theirs[6]),
        });
    }
    if theirs[7] != mode_byte(ours) {
        let theirs = match theirs[7] {
            0 => "plaintext".to_string(),
            1 => "noise".to_string(),
            n => format!("unknown mode {n}"),
        };
        return Err(TransportError::SecurityMismatch {
            ours: ours.name(),
            theirs,
        });
    }
    Ok(())
}

/// Our Hello, advertising `listen_addrs` and, if the application keeps one,
/// our count of peers ([`Endpoint::set_peer_count`](crate::Endpoint::set_peer_count)).
pub(crate) fn local_hello(
    config: &Config,
    listen_addrs: Vec<String>,
    peer_count: Option<PeerCount>,
) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        network_id: config.network_id.clone(),
        node_id: config.node_id().as_bytes().clone(),
        listen_addrs,
        metadata: config.metadata.clone(),
        capabilities: config.capabilities,
        peer_count,
    }
}

/// Decides whether we accept the peer's Hello. Pure: no I/O, no clock.
///
/// Rules, in order: the network id must equal ours; the protocol version must
/// equal ours (version 1 has no compatible neighbours yet); the node id must
/// not be ours; and, on an encrypted connection, the node id must be the key
/// the peer authenticated with (`authenticated`).
pub(crate) fn check_hello(
    ours: &Hello,
    theirs: &Hello,
    authenticated: Option<&NodeId>,
    must_match: &[String],
) -> Result<NodeId, TransportError> {
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
    let claimed = NodeId::from_bytes(theirs.node_id.clone())?;
    if let Some(authenticated) = authenticated {
        if &claimed != authenticated {
            return Err(TransportError::IdentityMismatch {
                claimed,
                authenticated: authenticated.clone(),
            });
        }
    }
    for key in must_match {
        let ours = ours.metadata.get(key).cloned().unwrap_or_default();
        let theirs = theirs.metadata.get(key);
        if theirs != Some(&ours) {
            return Err(TransportError::IncompatibleSettings {
                key: key.clone(),
                ours,
                theirs: theirs.cloned(),
            });
        }
    }
    Ok(claimed)
}

/// Reads the peer's preamble and checks it.
pub(crate) async fn read_preamble<R: AsyncRead + Unpin>(
    read: &mut R,
    security: Security,
) -> Result<(), TransportError> {
    let mut theirs = [0u8; PREAMBLE_LEN];
    read.read_exact(&mut theirs).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Protocol("peer closed the stream during the handshake".into())
        } else {
            TransportError::Io(e)
        }
    })?;
    check_preamble(security, &theirs)
}

/// Decides whether a peer that passed every protocol check may stay
/// (allow list, bans, and on the responder the application's [`Gate`]).
/// Called with its authenticated node id, and its Hello once read (the
/// initiator decides before it has one).
///
/// [`Gate`]: crate::Gate
pub(crate) type Admission<'a> =
    &'a (dyn Fn(&NodeId, Option<&Hello>) -> Result<(), TransportError> + Sync);

/// Runs the whole handshake on a fresh stream, within the configured timeout.
pub(crate) async fn handshake(
    stream: BoxStream,
    config: &Config,
    hello: Hello,
    initiator: bool,
    admit: Admission<'_>,
) -> Result<Handshaken, TransportError> {
    let timeout = config.handshake_timeout;
    match tokio::time::timeout(timeout, exchange(stream, config, hello, initiator, admit)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "handshake",
            after: timeout,
        }),
    }
}

/// The stream's read and write halves. A TCP stream splits into halves that
/// share nothing but the socket; any other stream is split by tokio, whose
/// halves take a lock on every read and write.
fn split_stream(stream: BoxStream) -> Result<(BoxRead, BoxWrite), TransportError> {
    if !(stream.as_ref() as &dyn std::any::Any).is::<tokio::net::TcpStream>() {
        let (read, write) = tokio::io::split(stream);
        return Ok((Box::new(read), Box::new(write)));
    }
    let any: Box<dyn std::any::Any> = stream;
    let tcp = any
        .downcast::<tokio::net::TcpStream>()
        .map_err(|_| TransportError::Protocol("the stream changed type while split".into()))?;
    let (read, write) = tcp.into_split();
    Ok((Box::new(read), Box::new(write)))
}

async fn exchange(
    stream: BoxStream,
    config: &Config,
    hello: Hello,
    initiator: bool,
    admit: Admission<'_>,
) -> Result<Handshaken, TransportError> {
    let (mut read, mut write) = split_stream(stream)?;

    // 1. Preamble, both ways at once. Nobody waits for the other's preamble
    // before sending what comes next (Noise message 1, or the initiator's
    // plaintext Hello); it is checked before the first read.
    let ours = preamble(config.security);
    write.write_all(&ours).await?;
    write.flush().await?;
    let hello = Message::Hello(Box::new(hello));
    // Our own Hello must pass the checks the peer will apply (a too-long
    // network id or too much metadata is a local configuration error).
    meshwork_wire::validate(&hello, &config.limits)?;
    let frame = encode_frame(&hello, config.max_frame_len)?;

    // 2. Security stage.
    // When the initiator's plaintext Hello went out (the responder's
    // answers it: a round trip), and the round trip Noise measured.
    let mut hello_sent: Option<Instant> = None;
    let (read, mut writer, authenticated, mut rtt): (BoxRead, BoxWrite, Option<NodeId>, _) =
        match config.security {
            Security::InsecurePlaintext => {
                if config.network_key.is_some() {
                    return Err(TransportError::Crypto(
                        "a network key cannot be enforced without encryption \
                         (remove with_insecure_plaintext or the network key)"
                            .into(),
                    ));
                }
                let sent = if initiator {
                    let sent = match write.write_all(&frame).await {
                        Ok(()) => write.flush().await,
                        Err(e) => Err(e),
                    };
                    hello_sent = Some(Instant::now());
                    sent
                } else {
                    Ok(())
                };
                // A peer refusing our preamble may have closed before our
                // Hello went out: its preamble, already sent, says why
                // (rather than the broken pipe our write ran into).
                read_preamble(&mut read, config.security).await?;
                sent?;
                (read, write, None, None)
            }
            Security::Noise => {
                let psk = noise::derive_psk(config.network_key.as_ref());
                let (state, remote, rtt) = noise::handshake(
                    &mut read,
                    &mut write,
                    initiator,
                    &config.identity,
                    &psk,
                    &ours,
                    Some(config.security),
                )
                .await?;
                let (r, w) = noise::split(read, write, state);
                let mut w: BoxWrite = Box::new(w);
                let id = NodeId::from_bytes(remote.to_vec())?;
                if initiator {
                    // We know who answered: refuse before saying who we are,
                    // so the responder sees a refusal, not a brief connection.
                    if let Err(err) = admit(&id, None) {
                        refuse(&mut w, &err, config).await;
                        return Err(err);
                    }
                    w.write_all(&frame).await?;
                    w.flush().await?;
                }
                (Box::new(r), w, Some(id), rtt)
            }
        };

    // 3. Hello. The initiator sent first (above); the responder checks it
    // before answering, so a refusal reaches the dialer as the first frame.
    // This costs no round trip: the initiator's Hello follows its last Noise
    // message, or its preamble, without waiting.
    // Until its Hello is accepted the peer may only send a Hello or a
    // Disconnect: a longer frame is refused before any room is reserved
    // for it (the limit is lifted below, once the peer is admitted).
    let codec = FrameCodec::new()
        .with_max_frame_len(
            config
                .max_frame_len
                .min(config.limits.max_handshake_frame_len()),
        )
        .with_limits(config.limits.clone());
    // Small to start with: an idle connection should cost little, and the
    // codec reserves room for a whole frame once it sees its length.
    let mut reader = FramedRead::with_capacity(read, codec, READ_BUFFER);
    let Message::Hello(our_hello) = hello else {
        unreachable!("built as a Hello above")
    };
    let theirs = read_hello(&mut reader, &mut writer, config).await?;
    if let Some(at) = hello_sent {
        rtt = Some(at.elapsed());
    }
    let checked = check_hello(
        &our_hello,
        &theirs,
        authenticated.as_ref(),
        &config.required_metadata,
    )
    .and_then(|id| {
        admit(&id, Some(&theirs))?;
        Ok(id)
    });
    match checked {
        Ok(node_id) => {
            reader.decoder_mut().set_max_frame_len(config.max_frame_len);
            if !initiator {
                writer.write_all(&frame).await?;
                writer.flush().await?;
            }
            Ok(Handshaken {
                reader,
                writer,
                hello: theirs,
                node_id,
                rtt,
            })
        }
        Err(err) => {
            refuse(&mut writer, &err, config).await;
            Err(err)
        }
    }
}

/// Reads the peer's Hello; a Disconnect instead is a refusal.
async fn read_hello(
    reader: &mut FramedRead<BoxRead, FrameCodec>,
    writer: &mut BoxWrite,
    config: &Config,
) -> Result<Hello, TransportError> {
    match reader.next().await {
        Some(Ok(Message::Hello(h))) => Ok(*h),
        Some(Ok(Message::Disconnect(d))) => Err(TransportError::Refused {
            reason: d.reason_or_unspecified(),
            message: d.message,
            alternatives: d.alternatives,
        }),
        Some(Ok(other)) => {
            let err = TransportError::Protocol(format!(
                "expected hello, got {} as the first message",
                other.kind()
            ));
            refuse(writer, &err, config).await;
            Err(err)
        }
        Some(Err(meshwork_wire::WireError::Io(e))) => Err(TransportError::Io(e)),
        Some(Err(e)) => {
            let err = TransportError::Wire(e);
            refuse(writer, &err, config).await;
            Err(err)
        }
        None => Err(TransportError::Protocol(
            "peer closed the stream during the handshake".into(),
        )),
    }
}

/// Best effort: tell the peer why we refuse it, then close our side.
async fn refuse(writer: &mut BoxWrite, err: &TransportError, config: &Config) {
    let msg = match err {
        TransportError::Declined(d) => {
            let mut d = (**d).clone();
            d.message = crate::connection::truncate_text(std::mem::take(&mut d.message));
            Message::Disconnect(d)
        }
        _ => {
            let text = crate::connection::truncate_text(err.to_peer());
            Message::Disconnect(Disconnect::new(err.disconnect_reason(), text))
        }
    };
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
            peer_count: None,
        }
    }

    #[test]
    fn required_metadata_must_match() {
        let key = "sync.leasing".to_string();
        let with = |v: &str| {
            let mut h = hello("n", 1, 2);
            h.metadata.insert(key.clone(), v.into());
            h
        };
        let mut ours = hello("n", 1, 1);
        ours.metadata.insert(key.clone(), "on".into());
        let required = [key.clone()];
        check_hello(&ours, &with("on"), None, &required).unwrap();
        let err = check_hello(&ours, &with("off"), None, &required).unwrap_err();
        assert!(
            matches!(&err, TransportError::IncompatibleSettings { key: k, ours, theirs }
                if k == &key && ours == "on" && theirs.as_deref() == Some("off")),
            "{err:?}"
        );
        assert_eq!(
            err.disconnect_reason(),
            meshwork_wire::proto::DisconnectReason::IncompatibleSettings
        );
        let err = check_hello(&ours, &hello("n", 1, 2), None, &required).unwrap_err();
        assert!(matches!(
            err,
            TransportError::IncompatibleSettings { theirs: None, .. }
        ));
        // Not required: any value passes.
        check_hello(&ours, &with("off"), None, &[]).unwrap();
    }

    #[test]
    fn accepts_same_network_and_version() {
        let id = check_hello(&hello("n", 1, 1), &hello("n", 1, 2), None, &[]).unwrap();
        assert_eq!(id.as_bytes().as_ref(), &[2u8; 32][..]);
    }

    #[test]
    fn refuses_other_network() {
        let err = check_hello(&hello("a", 1, 1), &hello("b", 1, 2), None, &[]).unwrap_err();
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
        let err = check_hello(&hello("n", 1, 1), &hello("n", 2, 2), None, &[]).unwrap_err();
        assert!(matches!(
            err,
            TransportError::IncompatibleVersion { ours: 1, theirs: 2 }
        ));
    }

    #[test]
    fn refuses_self() {
        let err = check_hello(&hello("n", 1, 7), &hello("n", 1, 7), None, &[]).unwrap_err();
        assert!(matches!(err, TransportError::SelfConnection));
    }

    #[test]
    fn node_id_must_be_the_authenticated_key() {
        let real = NodeId::from_bytes(vec![2u8; 32]).unwrap();
        check_hello(&hello("n", 1, 1), &hello("n", 1, 2), Some(&real), &[]).unwrap();
        let err = check_hello(&hello("n", 1, 1), &hello("n", 1, 3), Some(&real), &[]).unwrap_err();
        assert!(matches!(err, TransportError::IdentityMismatch { .. }));
        assert_eq!(
            err.disconnect_reason(),
            meshwork_wire::proto::DisconnectReason::ProtocolError
        );
    }

    /// A server endpoint on `net`, and the two halves of a stream from
    /// `host` that has completed the Noise handshake with it (as anyone can)
    /// and has not sent its Hello yet.
    async fn authenticated_stranger(
        net: &crate::mem::MemNetwork,
        host: &str,
    ) -> (crate::Endpoint, BoxRead, BoxWrite) {
        use crate::{Endpoint, Identity, Transport};

        let server = Endpoint::new(Config::new("n"), net.transport("server"));
        let addr = server
            .listen(&"mem://server".parse().unwrap())
            .await
            .unwrap();
        let (stream, _) = net.transport(host).dial(&addr).await.unwrap();
        let (mut read, mut write) = tokio::io::split(stream);
        let ours = preamble(Security::Noise);
        write.write_all(&ours).await.unwrap();
        let mut theirs = [0u8; PREAMBLE_LEN];
        read.read_exact(&mut theirs).await.unwrap();
        let (state, _, _) = noise::handshake(
            &mut read,
            &mut write,
            true,
            &Identity::generate(),
            &noise::derive_psk(None),
            &ours,
            None,
        )
        .await
        .unwrap();
        let (r, w) = noise::split(read, write, state);
        (server, Box::new(r), Box::new(w))
    }

    /// A peer that authenticates with its own key but claims another node's
    /// id in its Hello is refused with a protocol error.
    #[tokio::test]
    async fn forged_node_id_is_refused() {
        use crate::Identity;
        use crate::mem::MemNetwork;

        let net = MemNetwork::new();
        let (server, r, mut w) = authenticated_stranger(&net, "forger").await;

        let victim = Identity::generate();
        let mut forged = local_hello(&Config::new("n"), vec![], None);
        forged.node_id = victim.node_id().as_bytes().clone();
        let frame = encode_frame(&Message::Hello(Box::new(forged)), 1 << 20).unwrap();
        w.write_all(&frame).await.unwrap();
        w.flush().await.unwrap();

        let mut reader = FramedRead::new(r, FrameCodec::new());
        match reader.next().await {
            Some(Ok(Message::Disconnect(d))) => {
                assert_eq!(
                    d.reason_or_unspecified(),
                    meshwork_wire::proto::DisconnectReason::ProtocolError
                );
                assert!(d.message.contains("authenticated"), "{}", d.message);
            }
            other => panic!("expected Disconnect(protocol error), got {other:?}"),
        }
        // Counted just after the Disconnect is written.
        let counted = async {
            while server.stats().failures.get("identity_mismatch") != Some(&1) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), counted)
            .await
            .expect("failure counted");
        server.shutdown().await;
    }

    /// Before its Hello is accepted, a peer's frame may be no longer than
    /// the longest Hello: announcing a longer one (here 1 MiB, well under
    /// the 16 MiB allowed afterwards) is refused at once, before the node
    /// reserves room for it or waits out the handshake timeout for its body.
    #[tokio::test(start_paused = true)]
    async fn a_frame_longer_than_any_hello_is_refused_during_the_handshake() {
        use crate::mem::MemNetwork;

        let net = MemNetwork::new();
        let (server, r, mut w) = authenticated_stranger(&net, "stranger").await;
        let announced = 1usize << 20;
        assert!(announced > Config::new("n").limits.max_handshake_frame_len());
        assert!(announced < Config::new("n").max_frame_len);
        w.write_all(&(announced as u32).to_be_bytes())
            .await
            .unwrap();
        w.write_all(&[0u8; 1024]).await.unwrap();
        w.flush().await.unwrap();

        let mut reader = FramedRead::new(r, FrameCodec::new());
        // Well inside the handshake timeout (10 s), which a node waiting
        // for the body would wait out.
        let refusal = tokio::time::timeout(std::time::Duration::from_secs(1), reader.next())
            .await
            .expect("refused at once, not after the handshake timeout");
        match refusal {
            Some(Ok(Message::Disconnect(d))) => {
                assert_eq!(
                    d.reason_or_unspecified(),
                    meshwork_wire::proto::DisconnectReason::ProtocolError
                );
                assert!(d.message.contains(&announced.to_string()), "{}", d.message);
            }
            other => panic!("expected Disconnect(protocol error), got {other:?}"),
        }
        server.shutdown().await;
    }

    #[test]
    fn preambles() {
        let noise = preamble(Security::Noise);
        check_preamble(Security::Noise, &noise).unwrap();
        assert!(matches!(
            check_preamble(Security::InsecurePlaintext, &noise),
            Err(TransportError::SecurityMismatch {
                ours: "plaintext",
                ..
            })
        ));
        assert!(matches!(
            check_preamble(Security::Noise, b"GET / HT"),
            Err(TransportError::NotMeshwork)
        ));
        let mut future = noise;
        future[6] = 2;
        assert!(matches!(
            check_preamble(Security::Noise, &future),
            Err(TransportError::IncompatibleVersion { ours: 1, theirs: 2 })
        ));
    }

    #[test]
    fn network_is_checked_before_identity() {
        // A node of another network with our id is reported as another network.
        let err = check_hello(&hello("a", 1, 7), &hello("b", 1, 7), None, &[]).unwrap_err();
        assert!(matches!(err, TransportError::WrongNetwork { .. }));
    }
}
