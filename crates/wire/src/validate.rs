use crate::proto::{ConcernKind, DisconnectReason, PeerInfo};
use crate::{Message, NodeId, WireError};

/// Bounds on decoded fields. Anything over a bound is a [`WireError::Invalid`].
///
/// The defaults are generous for real use and small enough that one message
/// cannot make a node allocate much beyond the frame itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest network id, in bytes.
    pub max_network_id_len: usize,
    /// Most listen addresses in a Hello, or addresses in a PeerInfo.
    pub max_addrs: usize,
    /// Longest address string, in bytes.
    pub max_addr_len: usize,
    /// Most metadata entries in a Hello.
    pub max_metadata_entries: usize,
    /// Longest metadata key or value, in bytes.
    pub max_metadata_len: usize,
    /// Most peers in a Discovered message.
    pub max_discovered_peers: usize,
    /// Most alternative peers in a Disconnect.
    pub max_alternatives: usize,
    /// Longest Disconnect message text, in bytes.
    pub max_text_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_network_id_len: 128,
            max_addrs: 16,
            max_addr_len: 256,
            max_metadata_entries: 64,
            max_metadata_len: 1024,
            max_discovered_peers: 256,
            max_alternatives: 16,
            max_text_len: 1024,
        }
    }
}

impl Limits {
    /// The longest frame body any message but a Concern can take within
    /// these limits (a Discovered, Hello or Disconnect at its largest, with
    /// room for every tag and length prefix). Longer frames that are not a
    /// single Concern are refused before they are decoded: decoding comes
    /// before the counts are checked, and a frame of empty entries decodes
    /// into many times its size (2 wire bytes, 56 bytes of memory each).
    pub fn max_control_frame_len(&self) -> usize {
        let discovered = self.max_discovered_peers.saturating_mul(self.peer_len()) + FIELD;
        self.max_handshake_frame_len().max(discovered + FIELD)
    }

    /// The longest frame body a peer may send during the handshake, where
    /// only a Hello or a Disconnect (a refusal) is expected. Until a peer's
    /// Hello is accepted its frames are held to this, so that a stranger
    /// who completed the Noise handshake (anyone can) cannot make the node
    /// reserve a full frame's buffer (16 MiB by default) per pending
    /// handshake.
    pub fn max_handshake_frame_len(&self) -> usize {
        // The fixed fields, and a peer count at its longest (two varints).
        let hello = (self.max_network_id_len + NodeId::MAX_LEN + 8 * FIELD + FIELD + 2 * VARINT)
            .saturating_add(self.addrs_len())
            .saturating_add(
                self.max_metadata_entries
                    .saturating_mul(2 * self.max_metadata_len + 3 * FIELD),
            );
        let disconnect = (self.max_text_len + 4 * FIELD)
            .saturating_add(self.max_alternatives.saturating_mul(self.peer_len()));
        hello.max(disconnect) + FIELD
    }

    /// A list of addresses at its longest.
    fn addrs_len(&self) -> usize {
        self.max_addrs.saturating_mul(self.max_addr_len + FIELD)
    }

    /// A PeerInfo at its longest (`age_ms` included).
    fn peer_len(&self) -> usize {
        (NodeId::MAX_LEN + 2 * FIELD + VARINT).saturating_add(self.addrs_len())
    }
}

/// A tag and a length prefix, generously.
const FIELD: usize = 8;
/// A tag and a 64-bit varint at its longest (ten bytes).
const VARINT: usize = 11;

fn check_len(field: &'static str, len: usize, max: usize, unit: &str) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::invalid(
            field,
            format!("{len} {unit}, at most {max} allowed"),
        ));
    }
    Ok(())
}

fn check_node_id(field: &'static str, id: &bytes::Bytes) -> Result<(), WireError> {
    if id.is_empty() {
        return Err(WireError::invalid(field, "empty"));
    }
    check_len(field, id.len(), NodeId::MAX_LEN, "bytes")
}

fn check_addrs(field: &'static str, addrs: &[String], limits: &Limits) -> Result<(), WireError> {
    check_len(field, addrs.len(), limits.max_addrs, "addresses")?;
    for addr in addrs {
        check_len(field, addr.len(), limits.max_addr_len, "bytes")?;
    }
    Ok(())
}

fn check_peers(
    field: &'static str,
    id_field: &'static str,
    addr_field: &'static str,
    peers: &[PeerInfo],
    max: usize,
    limits: &Limits,
) -> Result<(), WireError> {
    check_len(field, peers.len(), max, "peers")?;
    for peer in peers {
        check_node_id(id_field, &peer.node_id)?;
        check_addrs(addr_field, &peer.addrs, limits)?;
    }
    Ok(())
}

/// Checks a decoded message against `limits`.
///
/// The codec calls this on every frame it decodes; it is public so that other
/// decoders (a fuzzer, a proxy) can apply the same rules.
pub fn validate(msg: &Message, limits: &Limits) -> Result<(), WireError> {
    match msg {
        Message::Hello(hello) => {
            check_len(
                "hello.network_id",
                hello.network_id.len(),
                limits.max_network_id_len,
                "bytes",
            )?;
            check_node_id("hello.node_id", &hello.node_id)?;
            check_addrs("hello.listen_addrs", &hello.listen_addrs, limits)?;
            check_len(
                "hello.metadata",
                hello.metadata.len(),
                limits.max_metadata_entries,
                "entries",
            )?;
            for (k, v) in &hello.metadata {
                check_len("hello.metadata", k.len(), limits.max_metadata_len, "bytes")?;
                check_len("hello.metadata", v.len(), limits.max_metadata_len, "bytes")?;
            }
        }
        Message::Ping(_) | Message::Pong(_) => {}
        Message::Discovered(d) => check_peers(
            "discovered.peers",
            "discovered.peers.node_id",
            "discovered.peers.addrs",
            &d.peers,
            limits.max_discovered_peers,
            limits,
        )?,
        Message::Disconnect(d) => {
            match DisconnectReason::try_from(d.reason) {
                Ok(DisconnectReason::Unspecified) => {
                    return Err(WireError::invalid("disconnect.reason", "unspecified"));
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(WireError::invalid(
                        "disconnect.reason",
                        format!("unknown value {}", d.reason),
                    ));
                }
            }
            check_len(
                "disconnect.message",
                d.message.len(),
                limits.max_text_len,
                "bytes",
            )?;
            check_peers(
                "disconnect.alternatives",
                "disconnect.alternatives.node_id",
                "disconnect.alternatives.addrs",
                &d.alternatives,
                limits.max_alternatives,
                limits,
            )?;
        }
        Message::Concern(c) => check_concern_kind(c.kind)?,
    }
    Ok(())
}

/// All [`validate`] checks of a Concern: its kind is specified and known.
///
/// The codec's fast path for Concern frames calls this alone (inlined, a
/// range check when it passes) instead of the whole of [`validate`].
#[inline]
pub(crate) fn check_concern_kind(kind: i32) -> Result<(), WireError> {
    match ConcernKind::try_from(kind) {
        Ok(ConcernKind::Unspecified) => Err(WireError::invalid("concern.kind", "unspecified")),
        Ok(_) => Ok(()),
        Err(_) => Err(WireError::invalid(
            "concern.kind",
            format!("unknown value {kind}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Concern, Disconnect, Discovered, Hello};

    fn hello() -> Hello {
        Hello {
            protocol_version: 1,
            network_id: "test".into(),
            node_id: vec![1, 2, 3].into(),
            listen_addrs: vec!["tcp://127.0.0.1:7000".into()],
            metadata: Default::default(),
            capabilities: 0,
            peer_count: None,
        }
    }

    fn check(msg: Message) -> Result<(), WireError> {
        validate(&msg, &Limits::default())
    }

    fn invalid_field(r: Result<(), WireError>) -> &'static str {
        match r {
            Err(WireError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_hello() {
        check(Message::Hello(Box::new(hello()))).unwrap();
    }

    #[test]
    fn refuses_empty_and_long_node_ids() {
        let mut h = hello();
        h.node_id = Default::default();
        assert_eq!(
            invalid_field(check(Message::Hello(Box::new(h)))),
            "hello.node_id"
        );
        let mut h = hello();
        h.node_id = vec![0u8; 65].into();
        assert_eq!(
            invalid_field(check(Message::Hello(Box::new(h)))),
            "hello.node_id"
        );
    }

    #[test]
    fn refuses_oversized_lists() {
        let mut h = hello();
        h.listen_addrs = vec!["tcp://127.0.0.1:1".into(); 17];
        assert_eq!(
            invalid_field(check(Message::Hello(Box::new(h)))),
            "hello.listen_addrs"
        );

        let mut h = hello();
        h.metadata = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(
            invalid_field(check(Message::Hello(Box::new(h)))),
            "hello.metadata"
        );

        let peer = PeerInfo {
            node_id: vec![9].into(),
            ..PeerInfo::default()
        };
        let d = Discovered {
            peers: vec![peer; 257],
        };
        assert_eq!(
            invalid_field(check(Message::Discovered(d))),
            "discovered.peers"
        );
    }

    #[test]
    fn refuses_bad_peer_entries() {
        let d = Discovered {
            peers: vec![PeerInfo::default()],
        };
        assert_eq!(
            invalid_field(check(Message::Discovered(d))),
            "discovered.peers.node_id"
        );
        let d = Discovered {
            peers: vec![PeerInfo {
                node_id: vec![1].into(),
                addrs: vec!["x".repeat(257)],
                age_ms: None,
            }],
        };
        assert_eq!(
            invalid_field(check(Message::Discovered(d))),
            "discovered.peers.addrs"
        );
    }

    #[test]
    fn refuses_unknown_and_unspecified_enums() {
        let mut d = Disconnect::new(DisconnectReason::Shutdown, "bye");
        check(Message::Disconnect(d.clone())).unwrap();
        d.reason = 999;
        assert_eq!(
            invalid_field(check(Message::Disconnect(d.clone()))),
            "disconnect.reason"
        );
        d.reason = 0;
        assert_eq!(
            invalid_field(check(Message::Disconnect(d))),
            "disconnect.reason"
        );

        let mut c = Concern {
            command: 1,
            request_id: 1,
            kind: ConcernKind::Request as i32,
            ttl: 0,
            flags: 0,
            payload: Default::default(),
        };
        check(Message::Concern(c.clone())).unwrap();
        c.kind = 42;
        assert_eq!(
            invalid_field(check(Message::Concern(c.clone()))),
            "concern.kind"
        );
        c.kind = 0;
        assert_eq!(invalid_field(check(Message::Concern(c))), "concern.kind");
    }
}
