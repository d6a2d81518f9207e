use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio_util::codec::{Decoder, Encoder};

use crate::proto::Envelope;
use crate::{Limits, Message, WireError, validate};

/// Default largest frame, in bytes (16 MiB), not counting the length prefix.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Size of the big-endian `u32` length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// The largest frame the `u32` prefix can express. Every configured maximum
/// is clamped to this.
pub const MAX_FRAME_LEN_LIMIT: usize = u32::MAX as usize;

/// The length-prefixed frame codec: `u32` big-endian length, then one
/// protobuf [`Envelope`].
///
/// Decoding yields validated [`Message`]s. A frame whose announced length is
/// over [`max_frame_len`](FrameCodec::max_frame_len) is refused as soon as its
/// prefix arrives; a frame that ends early at EOF is [`WireError::Truncated`].
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: usize,
    limits: Limits,
    decoded_bytes: u64,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCodec {
    /// A codec with the default maximum frame length and [`Limits`].
    pub fn new() -> Self {
        FrameCodec {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            limits: Limits::default(),
            decoded_bytes: 0,
        }
    }

    /// Sets the largest frame accepted in either direction.
    ///
    /// Values above `u32::MAX` are clamped, since the prefix cannot express them.
    pub fn with_max_frame_len(mut self, max: usize) -> Self {
        self.max_frame_len = max.min(MAX_FRAME_LEN_LIMIT);
        self
    }

    /// Changes the largest frame accepted from now on (clamped like
    /// [`with_max_frame_len`](Self::with_max_frame_len)): a handshake reads
    /// the peer's Hello under a small limit, then lifts it.
    pub fn set_max_frame_len(&mut self, max: usize) {
        self.max_frame_len = max.min(MAX_FRAME_LEN_LIMIT);
    }

    /// Sets the field limits applied to decoded messages.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The largest frame accepted, in bytes, not counting the prefix.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// The field limits applied to decoded messages.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes of complete frames decoded so far, prefixes included.
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded_bytes
    }
}

/// Encodes one message as a complete frame (prefix included).
///
/// Useful to encode once on the caller's task and hand the bytes to a writer.
pub fn encode_frame(msg: &Message, max_frame_len: usize) -> Result<Bytes, WireError> {
    let max_frame_len = max_frame_len.min(MAX_FRAME_LEN_LIMIT);
    let len = msg.encoded_len();
    if len > max_frame_len {
        return Err(WireError::FrameTooLarge {
            len,
            max: max_frame_len,
        });
    }
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_LEN + len);
    put_frame(msg, len, &mut buf);
    Ok(buf.freeze())
}

fn put_frame(msg: &Message, len: usize, dst: &mut BytesMut) {
    if let Message::Concern(c) = msg {
        put_concern(c, dst);
        return;
    }
    dst.reserve(LENGTH_PREFIX_LEN + len);
    // `len <= max_frame_len <= u32::MAX` was checked by the caller.
    dst.put_u32(len as u32);
    msg.encode(dst);
}

/// Appends a Concern frame, payload included.
fn put_concern(c: &crate::proto::Concern, dst: &mut BytesMut) {
    let (head, n) = concern_head(c);
    dst.reserve(n + c.payload.len());
    dst.extend_from_slice(&head[..n]);
    dst.extend_from_slice(&c.payload);
}

/// Room for a Concern frame's bytes before its payload: the prefix (4), the
/// Envelope's key and length (1 + 10), then the Concern's fields, each a key
/// and a varint (1 + 10 at most), and the payload's key and length (1 + 10).
const CONCERN_HEAD_MAX: usize = LENGTH_PREFIX_LEN + 11 + 5 * 11 + 11;

/// Appends `v` as a protobuf varint at `out[*at..]`.
fn put_varint(out: &mut [u8; CONCERN_HEAD_MAX], at: &mut usize, mut v: u64) {
    while v >= 0x80 {
        out[*at] = (v as u8) | 0x80;
        v >>= 7;
        *at += 1;
    }
    out[*at] = v as u8;
    *at += 1;
}

/// The Concern's varint fields by tag, in tag order. int32 `kind`: a
/// negative value is sign-extended to ten bytes, as prost does.
fn concern_varints(c: &crate::proto::Concern) -> [(u8, u64); 5] {
    [
        (1, u64::from(c.command)),
        (2, c.request_id),
        (3, i64::from(c.kind) as u64),
        (4, u64::from(c.ttl)),
        (5, u64::from(c.flags)),
    ]
}

/// The length of a Concern's encoding (the Envelope's field 6's content),
/// defaults omitted: what prost's `encoded_len` gives, without its
/// per-field calls.
fn concern_body_len(c: &crate::proto::Concern) -> usize {
    use prost::encoding::encoded_len_varint;
    let mut n = 0;
    for (_, v) in concern_varints(c) {
        if v != 0 {
            n += 1 + encoded_len_varint(v);
        }
    }
    if !c.payload.is_empty() {
        n += 1 + encoded_len_varint(c.payload.len() as u64) + c.payload.len();
    }
    n
}

/// The length of `msg`'s frame body (without the prefix): exactly
/// `msg.encoded_len()`, worked out without prost's generic code for a
/// Concern, the frame every request and reply is (its size is checked
/// against the frame limit before it is queued).
pub fn encoded_len(msg: &Message) -> usize {
    match msg {
        Message::Concern(c) => {
            let body = concern_body_len(c);
            1 + prost::encoding::encoded_len_varint(body as u64) + body
        }
        _ => msg.encoded_len(),
    }
}

/// A Concern frame's bytes up to its payload, built on the stack: prefix,
/// Envelope key and length, the Concern's fields in tag order with defaults
/// omitted, and the payload's key and length. Byte for byte what prost
/// writes (a test checks it), without a call into the buffer per byte:
/// this is the frame every request and reply is.
fn concern_head(c: &crate::proto::Concern) -> ([u8; CONCERN_HEAD_MAX], usize) {
    use prost::encoding::{WireType, encoded_len_varint};
    // Single-byte keys: tag << 3 | wire type, for tags 1 to 6.
    const fn key(tag: u8, wire: WireType) -> u8 {
        tag << 3 | wire as u8
    }
    let mut fields = [0u8; CONCERN_HEAD_MAX];
    let mut n = 0;
    for (tag, v) in concern_varints(c) {
        if v != 0 {
            fields[n] = key(tag, WireType::Varint);
            n += 1;
            put_varint(&mut fields, &mut n, v);
        }
    }
    if !c.payload.is_empty() {
        fields[n] = key(6, WireType::LengthDelimited);
        n += 1;
        put_varint(&mut fields, &mut n, c.payload.len() as u64);
    }
    let body_len = n + c.payload.len();
    let frame_len = 1 + encoded_len_varint(body_len as u64) + body_len;
    let mut head = [0u8; CONCERN_HEAD_MAX];
    // `frame_len <= max_frame_len <= u32::MAX` was checked by the caller.
    head[..LENGTH_PREFIX_LEN].copy_from_slice(&(frame_len as u32).to_be_bytes());
    let mut at = LENGTH_PREFIX_LEN;
    head[at] = key(6, WireType::LengthDelimited);
    at += 1;
    put_varint(&mut head, &mut at, body_len as u64);
    head[at..at + n].copy_from_slice(&fields[..n]);
    (head, at + n)
}

/// Appends one message as a complete frame to `dst`, except that the payload
/// of a [`Message::Concern`] of at least `split_at` bytes is not copied: it is
/// returned, to be written right after `dst` (zero-copy for large payloads).
///
/// `dst` followed by the returned bytes is exactly what [`encode_frame`]
/// produces. The caller checks its size limit first (`msg.encoded_len()`),
/// which must not exceed [`MAX_FRAME_LEN_LIMIT`].
pub fn encode_frame_into(msg: &Message, dst: &mut BytesMut, split_at: usize) -> Option<Bytes> {
    match msg {
        Message::Concern(c) if c.payload.len() >= split_at && split_at > 0 => {
            let (head, n) = concern_head(c);
            dst.extend_from_slice(&head[..n]);
            Some(c.payload.clone())
        }
        // No length to compute first: the head is built with it.
        Message::Concern(c) => {
            put_concern(c, dst);
            None
        }
        _ => {
            put_frame(msg, msg.encoded_len(), dst);
            None
        }
    }
}

/// Decodes and validates one frame body (without its prefix).
pub fn decode_frame(body: Bytes, limits: &Limits) -> Result<Message, WireError> {
    let msg = match simple_concern(&body) {
        Some(c) => Message::Concern(c),
        None => {
            let max = limits.max_control_frame_len();
            if body.len() > max && !single_concern(&body) {
                return Err(WireError::invalid(
                    "frame",
                    format!(
                        "{} bytes, more than any message but a Concern can take ({max})",
                        body.len()
                    ),
                ));
            }
            Envelope::decode(body)?
                .body
                .ok_or(WireError::EmptyEnvelope)?
        }
    };
    validate(&msg, limits)?;
    Ok(msg)
}

/// True if `body` is one Envelope field 6 (a Concern) covering it all,
/// whatever the Concern holds: such a frame decodes into scalars and one
/// byte slice, never into more than its size.
fn single_concern(body: &[u8]) -> bool {
    let mut at = 1;
    body.first() == Some(&0x32)
        && read_varint(body, &mut at).is_some_and(|len| len == (body.len() - at) as u64)
}

/// Reads a protobuf varint at `buf[*at..]`: `None` if it runs past the end
/// or past ten bytes, or overflows 64 bits (what prost refuses too).
///
/// With eight bytes at hand, the first eight are read as one word and their
/// 7-bit groups put together without a branch per byte: request ids are
/// random, so nine or ten bytes long, in every request and reply.
fn read_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let rest = buf.get(*at..)?;
    let Some(word) = rest.first_chunk::<8>().map(|w| u64::from_le_bytes(*w)) else {
        return read_varint_slow(buf, at);
    };
    if word & 0x80 == 0 {
        *at += 1;
        return Some(word & 0x7f);
    }
    // The high bit of each byte that ends the varint, if one of the eight
    // does; the bytes after the first of them are masked off.
    let ends = !word & 0x8080_8080_8080_8080;
    let n = ends.trailing_zeros() as usize / 8 + 1;
    let word = if n < 8 {
        word & (u64::MAX >> (64 - 8 * n))
    } else {
        word
    };
    let mut v = 0;
    for i in 0..8 {
        v |= ((word >> (8 * i)) & 0x7f) << (7 * i);
    }
    if ends != 0 {
        *at += n;
        return Some(v);
    }
    // Nine or ten bytes: the ninth gives bits 56 to 62, the tenth bit 63.
    let b = *rest.get(8)?;
    v |= u64::from(b & 0x7f) << 56;
    if b < 0x80 {
        *at += 9;
        return Some(v);
    }
    let b = *rest.get(9)?;
    if b > 1 {
        return None;
    }
    *at += 10;
    Some(v | u64::from(b) << 63)
}

/// [`read_varint`] a byte at a time, near the end of the buffer.
fn read_varint_slow(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut i = *at;
    for shift in 0..10 {
        let b = *buf.get(i)?;
        i += 1;
        if shift == 9 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * shift);
        if b < 0x80 {
            *at = i;
            return Some(v);
        }
    }
    None
}

/// The Concern in `body` if the body is one in its plain form: the
/// Envelope's field 6 covering the whole body, and in it only the
/// Concern's own fields with their own wire types, in any order, repeats
/// allowed (the last wins, as in protobuf). The payload is a slice of
/// `body`, not a copy.
///
/// `None` for anything else (unknown fields, other messages, malformed
/// bytes): the caller decodes it with prost, which says what is wrong. So
/// this path gives exactly prost's result, only sooner, for the frame
/// every request and reply is.
fn simple_concern(body: &Bytes) -> Option<crate::proto::Concern> {
    let buf = &body[..];
    if buf.first() != Some(&0x32) {
        return None;
    }
    let mut at = 1;
    let len = read_varint(buf, &mut at)?;
    if len != (buf.len() - at) as u64 {
        return None;
    }
    let mut c = crate::proto::Concern::default();
    while at < buf.len() {
        let key = buf[at];
        at += 1;
        match key {
            // Tags 1 to 5, varints; int32 and uint32 keep the low 32 bits.
            0x08 => c.command = read_varint(buf, &mut at)? as u32,
            0x10 => c.request_id = read_varint(buf, &mut at)?,
            0x18 => c.kind = read_varint(buf, &mut at)? as i32,
            0x20 => c.ttl = read_varint(buf, &mut at)? as u32,
            0x28 => c.flags = read_varint(buf, &mut at)? as u32,
            // Tag 6, length-delimited: the payload.
            0x32 => {
                let n = read_varint(buf, &mut at)?;
                let end = at.checked_add(usize::try_from(n).ok()?)?;
                if end > buf.len() {
                    return None;
                }
                c.payload = body.slice(at..end);
                at = end;
            }
            _ => return None,
        }
    }
    Some(c)
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if src.len() < LENGTH_PREFIX_LEN {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_LEN];
        prefix.copy_from_slice(&src[..LENGTH_PREFIX_LEN]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_frame_len {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        let total = LENGTH_PREFIX_LEN + len;
        if src.len() < total {
            // Make room for the rest of this frame only: the length is bounded above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_LEN);
        self.decoded_bytes += total as u64;
        let body = src.split_to(len).freeze();
        decode_frame(body, &self.limits).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
        match self.decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated {
                buffered: buf.len(),
            }),
        }
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), WireError> {
        let len = msg.encoded_len();
        if len > self.max_frame_len {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        put_frame(msg, len, dst);
        Ok(())
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        Concern, ConcernKind, Disconnect, DisconnectReason, Discovered, Hello, PeerInfo, Ping, Pong,
    };
    use proptest::collection::{btree_map, hash_map, vec};
    use proptest::prelude::*;

    fn roundtrip(msg: &Message) -> Message {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        codec.encode(msg, &mut buf).unwrap();
        let out = codec.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn exactly_a_length_prefix_waits_for_the_body() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        // The prefix stays buffered until the body arrives.
        assert_eq!(buf.len(), 4);
        // At EOF it is a truncated frame, not a panic and not silence.
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(WireError::Truncated { buffered: 4 })
        ));
    }

    #[test]
    fn a_zero_length_frame_is_an_empty_envelope() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::EmptyEnvelope)
        ));
    }

    #[test]
    fn partial_prefix_is_not_an_error() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::new().with_max_frame_len(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]); // 1025
        let cap_before = buf.capacity();
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        assert_eq!(buf.capacity(), cap_before, "nothing reserved for the frame");
        // u32::MAX with the default limit.
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let msg = Message::Concern(Concern {
            command: 1,
            request_id: 0,
            kind: ConcernKind::Request as i32,
            ttl: 0,
            flags: 0,
            payload: vec![0u8; 2000].into(),
        });
        let mut codec = FrameCodec::new().with_max_frame_len(1024);
        assert!(matches!(
            codec.encode(&msg, &mut BytesMut::new()),
            Err(WireError::FrameTooLarge { max: 1024, .. })
        ));
        assert!(encode_frame(&msg, 1024).is_err());
        assert!(encode_frame(&msg, 4096).is_ok());
    }

    /// `field` (tag `tag`, wire type 2) holding `inner`.
    fn field(tag: u8, inner: &[u8]) -> Vec<u8> {
        let mut out = vec![(tag << 3) | 2];
        let mut len = inner.len() as u64;
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn a_control_frame_too_big_for_any_is_refused_before_decoding() {
        let limits = Limits::default();
        let max = limits.max_control_frame_len();
        // A Discovered of empty PeerInfos (2 bytes each on the wire).
        let empties: Vec<u8> = [0x0a, 0x00].repeat(max / 2 + 1);
        let body = Bytes::from(field(4, &empties));
        let err = decode_frame(body, &limits).unwrap_err().to_string();
        assert!(err.contains("more than any message but a Concern"), "{err}");
        // Hidden behind a small Concern (the last field of a oneof wins).
        let small = Concern {
            command: 1,
            request_id: 1,
            kind: ConcernKind::Request as i32,
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        let mut both = field(6, &small.encode_to_vec());
        both.extend_from_slice(&field(4, &empties));
        let err = decode_frame(Bytes::from(both), &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than any message but a Concern"), "{err}");
        // The largest Discovered the limits allow still decodes.
        let peer = PeerInfo {
            node_id: Bytes::from(vec![1; crate::NodeId::MAX_LEN]),
            addrs: vec!["a".repeat(limits.max_addr_len); limits.max_addrs],
        };
        let full = Message::Discovered(Discovered {
            peers: vec![peer; limits.max_discovered_peers],
        });
        let frame = encode_frame(&full, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert!(frame.len() - 4 <= max, "{} > {max}", frame.len() - 4);
        assert_eq!(decode_frame(frame.slice(4..), &limits).unwrap(), full);
    }

    #[test]
    fn the_largest_hello_and_disconnect_fit_the_handshake_limit() {
        let limits = Limits::default();
        let max = limits.max_handshake_frame_len();
        let addrs = vec!["a".repeat(limits.max_addr_len); limits.max_addrs];
        // Distinct keys (a map), every key and value at its longest.
        let metadata = (0..limits.max_metadata_entries)
            .map(|i| {
                let key = format!("{i:0>width$}", width = limits.max_metadata_len);
                (key, "v".repeat(limits.max_metadata_len))
            })
            .collect();
        let hello = Message::Hello(Box::new(Hello {
            protocol_version: u32::MAX,
            network_id: "n".repeat(limits.max_network_id_len),
            node_id: Bytes::from(vec![1; crate::NodeId::MAX_LEN]),
            listen_addrs: addrs.clone(),
            metadata,
            capabilities: u64::MAX,
        }));
        let peer = PeerInfo {
            node_id: Bytes::from(vec![1; crate::NodeId::MAX_LEN]),
            addrs,
        };
        let disconnect = Message::Disconnect(Disconnect {
            reason: DisconnectReason::TooManyPeers as i32,
            message: "m".repeat(limits.max_text_len),
            alternatives: vec![peer; limits.max_alternatives],
        });
        for msg in [hello, disconnect] {
            let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_LEN).unwrap();
            assert!(frame.len() - 4 <= max, "{} > {max}", frame.len() - 4);
            assert_eq!(decode_frame(frame.slice(4..), &limits).unwrap(), msg);
        }
        // Far below a full frame: that is the point of it.
        assert!(max < 256 * 1024, "{max}");
    }

    #[test]
    fn a_big_concern_with_fields_we_do_not_know_still_decodes() {
        let limits = Limits::default();
        let payload = Bytes::from(vec![7; limits.max_control_frame_len() * 2]);
        let c = Concern {
            command: 9,
            request_id: 3,
            kind: ConcernKind::Request as i32,
            payload: payload.clone(),
            ..Default::default()
        };
        let mut inner = c.encode_to_vec();
        inner.extend_from_slice(&[0x78, 0x01]); // field 15, a varint: unknown
        let msg = decode_frame(Bytes::from(field(6, &inner)), &limits).unwrap();
        assert_eq!(msg, Message::Concern(c));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::Decode(_))));
    }

    #[test]
    fn frames_split_at_every_byte_decode_the_same() {
        let msg = Message::Hello(Box::new(Hello {
            protocol_version: 1,
            network_id: "net".into(),
            node_id: vec![7; 32].into(),
            listen_addrs: vec!["tcp://127.0.0.1:7000".into()],
            metadata: [("role".to_string(), "seed".to_string())].into(),
            capabilities: 3,
        }));
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_LEN).unwrap();
        for split in 0..frame.len() {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::from(&frame[..split]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            buf.extend_from_slice(&frame[split..]);
            assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), msg);
        }
    }

    #[tokio::test]
    async fn works_with_framed_streams() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_util::codec::{FramedRead, FramedWrite};

        let (a, b) = tokio::io::duplex(64);
        let mut tx = FramedWrite::new(a, FrameCodec::new());
        let mut rx = FramedRead::new(b, FrameCodec::new());
        let sent: Vec<Message> = (0..10)
            .map(|n| {
                Message::Ping(Ping {
                    nonce: n,
                    timestamp_micros: n * 10,
                })
            })
            .collect();
        let to_send = sent.clone();
        tokio::spawn(async move {
            for m in to_send {
                tx.send(m).await.unwrap();
            }
        });
        for m in &sent {
            assert_eq!(&rx.next().await.unwrap().unwrap(), m);
        }
        // Writer dropped: clean end of stream.
        assert!(rx.next().await.is_none());
    }

    fn node_id() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 1..=64).prop_map(Bytes::from)
    }

    fn addrs() -> impl Strategy<Value = Vec<String>> {
        vec("[a-z0-9:/.\\[\\]]{0,40}", 0..=4)
    }

    fn peer_info() -> impl Strategy<Value = PeerInfo> {
        (node_id(), addrs()).prop_map(|(node_id, addrs)| PeerInfo { node_id, addrs })
    }

    fn reason() -> impl Strategy<Value = i32> {
        1i32..=11
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u32>(),
                "[a-z-]{0,20}",
                node_id(),
                addrs(),
                hash_map("[a-z]{0,8}", "[ -~]{0,16}", 0..4),
                any::<u64>()
            )
                .prop_map(|(v, net, id, listen, metadata, caps)| {
                    Message::Hello(Box::new(Hello {
                        protocol_version: v,
                        network_id: net,
                        node_id: id,
                        listen_addrs: listen,
                        metadata,
                        capabilities: caps,
                    }))
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(nonce, ts)| Message::Ping(Ping {
                nonce,
                timestamp_micros: ts
            })),
            (any::<u64>(), any::<u64>()).prop_map(|(nonce, ts)| Message::Pong(Pong {
                nonce,
                timestamp_micros: ts
            })),
            vec(peer_info(), 0..8).prop_map(|peers| Message::Discovered(Discovered { peers })),
            (reason(), "[ -~]{0,40}", vec(peer_info(), 0..4)).prop_map(|(r, m, alts)| {
                Message::Disconnect(Disconnect {
                    reason: r,
                    message: m,
                    alternatives: alts,
                })
            }),
            (
                any::<u32>(),
                any::<u64>(),
                1i32..=3,
                any::<u32>(),
                any::<u32>(),
                vec(any::<u8>(), 0..256)
            )
                .prop_map(|(command, request_id, kind, ttl, flags, payload)| {
                    Message::Concern(Concern {
                        command,
                        request_id,
                        kind,
                        ttl,
                        flags,
                        payload: payload.into(),
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(msg in message()) {
            prop_assert_eq!(roundtrip(&msg), msg);
        }

        #[test]
        fn many_frames_in_one_buffer_round_trip(msgs in vec(message(), 0..16)) {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            for m in &msgs {
                codec.encode(m, &mut buf).unwrap();
            }
            let mut out = Vec::new();
            while let Some(m) = codec.decode_eof(&mut buf).unwrap() {
                out.push(m);
            }
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::new().with_max_frame_len(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode until an error or a need for more bytes; either is fine.
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = codec.decode_eof(&mut buf);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(Bytes::from(body), &Limits::default());
        }

        #[test]
        fn metadata_order_does_not_matter(m in btree_map("[a-z]{1,8}", "[a-z]{0,8}", 0..8)) {
            let msg = Message::Hello(Box::new(Hello {
                protocol_version: 1,
                network_id: "n".into(),
                node_id: vec![1].into(),
                listen_addrs: vec![],
                metadata: m.into_iter().collect(),
                capabilities: 0,
            }));
            prop_assert_eq!(roundtrip(&msg), msg);
        }
    }

    proptest! {
        #[test]
        fn split_encoding_matches_whole_encoding(msg in message(), split_at in 0usize..300) {
            let whole = encode_frame(&msg, usize::MAX).unwrap();
            let mut head = BytesMut::new();
            let tail = encode_frame_into(&msg, &mut head, split_at);
            let mut joined = head.to_vec();
            if let Some(t) = tail {
                joined.extend_from_slice(&t);
            }
            prop_assert_eq!(joined, whole.to_vec());
        }

        #[test]
        fn concern_frames_are_what_prost_writes(
            command in any::<u32>(),
            request_id in any::<u64>(),
            kind in any::<i32>(),
            ttl in any::<u32>(),
            flags in any::<u32>(),
            payload in vec(any::<u8>(), 0..300),
        ) {
            let msg = Message::Concern(Concern {
                command, request_id, kind, ttl, flags, payload: payload.into(),
            });
            let envelope = Envelope { body: Some(msg.clone()) };
            let mut expected = (envelope.encoded_len() as u32).to_be_bytes().to_vec();
            envelope.encode(&mut expected).unwrap();
            prop_assert_eq!(encode_frame(&msg, usize::MAX).unwrap().to_vec(), expected);
        }
    }

    proptest! {
        /// Whatever the fast path reads, prost reads the same; it may only
        /// pass on (to prost) what it does not read.
        #[test]
        fn the_concern_fast_path_agrees_with_prost(
            fields in vec((prop_oneof![
                Just(0x08u8), Just(0x10), Just(0x18), Just(0x20), Just(0x28), Just(0x32),
                any::<u8>(),
            ], vec(any::<u8>(), 0..12)), 0..6),
            canonical in any::<bool>(),
            msg in message(),
        ) {
            // Keys (mostly the Concern's) with arbitrary bytes after each,
            // inside a well-formed Envelope field 6; and real frames.
            let fields: Vec<u8> = fields
                .into_iter()
                .flat_map(|(key, rest)| std::iter::once(key).chain(rest))
                .collect();
            let mut body = vec![0x32];
            prost::encoding::encode_varint(fields.len() as u64, &mut body);
            body.extend_from_slice(&fields);
            if canonical {
                let frame = encode_frame(&msg, usize::MAX).unwrap();
                body = frame[LENGTH_PREFIX_LEN..].to_vec();
            }
            let body = Bytes::from(body);
            if let Some(c) = simple_concern(&body) {
                let by_prost = Envelope::decode(body.clone()).unwrap().body;
                prop_assert_eq!(by_prost, Some(Message::Concern(c)));
            } else if canonical {
                prop_assert!(!matches!(msg, Message::Concern(_)), "a Concern was not read");
            }
        }
    }

    #[test]
    fn varints_are_read_as_prost_reads_them() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x80],
            vec![0x7f],
            vec![0xff; 9],
            vec![0x80, 0x00],
        ];
        for last in [0x00, 0x01, 0x02, 0x7f, 0x80] {
            let mut ten = vec![0xff; 9];
            ten.push(last);
            cases.push(ten);
        }
        cases.push(vec![0xff; 11]);
        for case in cases {
            let mut at = 0;
            let ours = read_varint(&case, &mut at);
            let theirs = prost::encoding::decode_varint(&mut &case[..]).ok();
            assert_eq!(ours, theirs, "{case:02x?}");
        }
    }

    proptest! {
        /// Every varint, read where it ends the buffer and with bytes
        /// after it (the word-at-a-time path), as prost reads it: the
        /// same value, the same bytes taken, the same refusals.
        #[test]
        fn varints_are_read_as_prost_reads_them_anywhere(
            bytes in vec(any::<u8>(), 0..14),
            v in any::<u64>(),
            shift in 0u32..64,
            after in vec(any::<u8>(), 0..10),
        ) {
            // Every length from one byte to ten, not mostly ten.
            let mut encoded = Vec::new();
            prost::encoding::encode_varint(v >> shift, &mut encoded);
            for case in [bytes, encoded] {
                for tail in [&[][..], &after[..]] {
                    let buf = [&case[..], tail].concat();
                    let mut at = 0;
                    let ours = read_varint(&buf, &mut at);
                    let mut theirs_buf = &buf[..];
                    let theirs = prost::encoding::decode_varint(&mut theirs_buf).ok();
                    prop_assert_eq!(ours, theirs, "{:02x?}", buf);
                    if ours.is_some() {
                        prop_assert_eq!(at, buf.len() - theirs_buf.len());
                    }
                }
            }
        }

        /// The fast length of a Concern frame is prost's.
        #[test]
        fn the_fast_length_is_prosts(msg in message()) {
            prop_assert_eq!(encoded_len(&msg), msg.encoded_len());
        }
    }

    #[test]
    fn disconnect_helpers() {
        let d = Disconnect::new(DisconnectReason::TooManyPeers, "full");
        assert_eq!(d.reason_or_unspecified(), DisconnectReason::TooManyPeers);
        let bogus = Disconnect {
            reason: 77,
            ..d.clone()
        };
        assert_eq!(bogus.reason_or_unspecified(), DisconnectReason::Unspecified);
    }
}
