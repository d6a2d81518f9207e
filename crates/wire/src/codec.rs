use std::ops::Range;

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
    let len = encoded_len(msg);
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
    let mut head = [0u8; CONCERN_HEAD_MAX];
    let span = concern_head(c, &mut head);
    let head = &head[span];
    dst.reserve(head.len() + c.payload.len());
    dst.extend_from_slice(head);
    dst.extend_from_slice(&c.payload);
}

/// Where a Concern's fields start in the head buffer of [`concern_head`]:
/// after room for the prefix (4) and the Envelope's key and length (1 +
/// 10), which are written right-aligned before them once the fields'
/// length is known.
const CONCERN_FIELDS_AT: usize = LENGTH_PREFIX_LEN + 1 + 10;

/// Room for a Concern frame's bytes before its payload: the prefix and
/// Envelope key and length ([`CONCERN_FIELDS_AT`]), then the Concern's
/// fields, each a key and a varint (1 + 10 at most), and the payload's key
/// and length (1 + 10); rounded up to whole 16-byte words, zeroed with a
/// few vector stores. [`put_varint`]'s 8-byte store never reaches past
/// where a ten-byte varint would end.
const CONCERN_HEAD_MAX: usize = (CONCERN_FIELDS_AT + 5 * 11 + 11).next_multiple_of(16);

/// Writes `v` as a protobuf varint at `out[at..]` and returns the index
/// just after it.
///
/// A varint of more than one byte is written as one 8-byte word (its 7-bit
/// groups spread in three steps, not a byte at a time: request ids are
/// random, so nine or ten bytes long, in every request and reply), plus
/// the ninth and tenth bytes if it has them. Bytes after the varint, up to
/// `at + 10`, may be overwritten: only the next varint goes there.
#[inline(always)]
fn put_varint(out: &mut [u8; CONCERN_HEAD_MAX], at: usize, v: u64) -> usize {
    if v < 0x80 {
        out[at] = v as u8;
        return at + 1;
    }
    let len = prost::encoding::encoded_len_varint(v);
    // The low 56 bits: 28-bit halves to 32-bit lanes, 14-bit quarters to
    // 16-bit lanes, then 7-bit groups to bytes.
    let x = v & 0x00ff_ffff_ffff_ffff;
    let x = (x & 0x0fff_ffff) | (x & 0x00ff_ffff_f000_0000) << 4;
    let x = (x & 0x0000_3fff_0000_3fff) | (x & 0x0fff_c000_0fff_c000) << 2;
    let x = (x & 0x007f_007f_007f_007f) | (x & 0x3f80_3f80_3f80_3f80) << 1;
    // A continuation bit on every byte but the last (2 <= len).
    let more = 0x8080_8080_8080_8080u64 >> (8 * 9usize.saturating_sub(len));
    out[at..at + 8].copy_from_slice(&(x | more).to_le_bytes());
    if len > 8 {
        // Bits 56 to 62 in the ninth byte, bit 63 in the tenth (a 0 past
        // the end of a nine-byte varint).
        let top = v >> 63;
        out[at + 8] = (v >> 56) as u8 & 0x7f | (top as u8) << 7;
        out[at + 9] = top as u8;
    }
    at + len
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

/// Writes a Concern frame's bytes up to its payload into `head` (zeroed,
/// on the caller's stack) and returns where they are in it: prefix, Envelope key and length, the
/// Concern's fields in tag order with defaults omitted, and the payload's
/// key and length. Byte for byte what prost writes (a test checks it),
/// without a call into the buffer per byte: this is the frame every
/// request and reply is.
///
/// The fields are written first, at [`CONCERN_FIELDS_AT`]; the prefix and
/// the Envelope's key and length, known only then, go right before them.
fn concern_head(c: &crate::proto::Concern, head: &mut [u8; CONCERN_HEAD_MAX]) -> Range<usize> {
    use prost::encoding::{WireType, encoded_len_varint};
    // Single-byte keys: tag << 3 | wire type, for tags 1 to 6.
    const fn key(tag: u8, wire: WireType) -> u8 {
        tag << 3 | wire as u8
    }
    let mut at = CONCERN_FIELDS_AT;
    for (tag, v) in concern_varints(c) {
        if v != 0 {
            head[at] = key(tag, WireType::Varint);
            at = put_varint(head, at + 1, v);
        }
    }
    if !c.payload.is_empty() {
        head[at] = key(6, WireType::LengthDelimited);
        at = put_varint(head, at + 1, c.payload.len() as u64);
    }
    let body_len = at - CONCERN_FIELDS_AT + c.payload.len();
    let len_len = encoded_len_varint(body_len as u64);
    let frame_len = 1 + len_len + body_len;
    let start = CONCERN_FIELDS_AT - len_len - 1 - LENGTH_PREFIX_LEN;
    // `frame_len <= max_frame_len <= u32::MAX` was checked by the caller.
    head[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(frame_len as u32).to_be_bytes());
    head[start + LENGTH_PREFIX_LEN] = key(6, WireType::LengthDelimited);
    // A byte at a time: a word would run over the fields.
    let mut v = body_len as u64;
    for b in &mut head[start + LENGTH_PREFIX_LEN + 1..CONCERN_FIELDS_AT] {
        *b = v as u8 | 0x80;
        v >>= 7;
    }
    head[CONCERN_FIELDS_AT - 1] &= 0x7f;
    start..at
}

/// Appends one message as a complete frame to `dst`, except that the payload
/// of a [`Message::Concern`] of at least `split_at` bytes is not copied: it is
/// returned, to be written right after `dst` (zero-copy for large payloads).
///
/// `dst` followed by the returned bytes is exactly what [`encode_frame`]
/// produces. The caller checks its size limit first ([`encoded_len`]),
/// which must not exceed [`MAX_FRAME_LEN_LIMIT`].
pub fn encode_frame_into(msg: &Message, dst: &mut BytesMut, split_at: usize) -> Option<Bytes> {
    match msg {
        Message::Concern(c) if c.payload.len() >= split_at && split_at > 0 => {
            let mut head = [0u8; CONCERN_HEAD_MAX];
            let span = concern_head(c, &mut head);
            dst.extend_from_slice(&head[span]);
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
    // A Concern in its plain form needs no more validation than its kind
    // (FrameCodec::decode does the same on its buffer); anything else goes
    // to prost and `validate`.
    match simple_concern(&body) {
        Some(c) => {
            validate::check_concern_kind(c.kind)?;
            let payload = body.slice(c.payload.clone());
            Ok(Message::Concern(c.with_payload(payload)))
        }
        None => decode_other(body, limits),
    }
}

/// A frame body that is not a Concern in its plain form, decoded by prost
/// and validated.
#[inline(never)]
fn decode_other(body: Bytes, limits: &Limits) -> Result<Message, WireError> {
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
    let msg = Envelope::decode(body)?
        .body
        .ok_or(WireError::EmptyEnvelope)?;
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
/// A one-byte varint (keys' neighbours: kinds, lengths, small values) is
/// read inline; longer ones eight bytes at a time by [`read_varint_word`].
#[inline(always)]
fn read_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let rest = buf.get(*at..)?;
    match rest.first() {
        Some(&b) if b < 0x80 => {
            *at += 1;
            Some(u64::from(b))
        }
        _ => read_varint_word(buf, at),
    }
}

/// [`read_varint`] of a varint longer than one byte.
///
/// With eight bytes at hand, the first eight are read as one word and their
/// 7-bit groups put together in three steps, without a branch or a step
/// per byte: request ids are random, so nine or ten bytes long, in every
/// request and reply.
#[inline(always)]
fn read_varint_word(buf: &[u8], at: &mut usize) -> Option<u64> {
    let rest = buf.get(*at..)?;
    let Some(word) = rest.first_chunk::<8>().map(|w| u64::from_le_bytes(*w)) else {
        return read_varint_slow(buf, at);
    };
    // The high bit of each byte that ends the varint, if one of the eight
    // does; the bytes after the first of them are masked off (none is if
    // none ends it: `ends - 1` is then all ones).
    let ends = !word & 0x8080_8080_8080_8080;
    let word = word & (ends ^ ends.wrapping_sub(1)) & 0x7f7f_7f7f_7f7f_7f7f;
    // 7-bit groups to 14 bits in 16-bit lanes, to 28 bits in 32-bit lanes,
    // to 56 bits.
    let v = (word & 0x007f_007f_007f_007f) | (word >> 1 & 0x3f80_3f80_3f80_3f80);
    let v = (v & 0x0000_3fff_0000_3fff) | (v >> 2 & 0x0fff_c000_0fff_c000);
    let mut v = (v & 0x0fff_ffff) | (v >> 4 & 0x00ff_ffff_f000_0000);
    if ends != 0 {
        *at += (ends.trailing_zeros() as usize + 1) / 8;
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
#[cold]
#[inline(never)]
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

/// A Concern read by [`simple_concern`]: its fields but the payload, and
/// where the payload is in the frame body.
struct PlainConcern {
    command: u32,
    request_id: u64,
    kind: i32,
    ttl: u32,
    flags: u32,
    payload: Range<usize>,
}

impl PlainConcern {
    /// The Concern, with its payload (the bytes at `self.payload`).
    #[inline(always)]
    fn with_payload(self, payload: Bytes) -> crate::proto::Concern {
        crate::proto::Concern {
            command: self.command,
            request_id: self.request_id,
            kind: self.kind,
            ttl: self.ttl,
            flags: self.flags,
            payload,
        }
    }
}

/// The Concern in `body` if the body is one in its plain form: the
/// Envelope's field 6 covering the whole body, and in it only the
/// Concern's own fields with their own wire types, in any order, repeats
/// allowed (the last wins, as in protobuf). The payload is given as a
/// range of `body`, for the caller to slice (not copy).
///
/// `None` for anything else (unknown fields, other messages, malformed
/// bytes): the caller decodes it with prost, which says what is wrong. So
/// this path gives exactly prost's result, only sooner, for the frame
/// every request and reply is.
#[inline(always)]
fn simple_concern(buf: &[u8]) -> Option<PlainConcern> {
    if buf.first() != Some(&0x32) {
        return None;
    }
    let mut at = 1;
    let len = read_varint(buf, &mut at)?;
    if len != (buf.len() - at) as u64 {
        return None;
    }
    // Fields 1 to 5 (varints) by tag - 1, and where the payload is.
    let mut varints = [0u64; 5];
    let mut payload = 0..0;
    while let Some(&key) = buf.get(at) {
        at += 1;
        match key {
            // Tags 1 to 5, wire type 0: one read for all five.
            0x08 | 0x10 | 0x18 | 0x20 | 0x28 => {
                varints[usize::from(key >> 3) - 1] = read_varint(buf, &mut at)?;
            }
            // Tag 6, length-delimited: the payload.
            0x32 => {
                let n = read_varint(buf, &mut at)?;
                let end = at.checked_add(usize::try_from(n).ok()?)?;
                if end > buf.len() {
                    return None;
                }
                payload = at..end;
                at = end;
            }
            _ => return None,
        }
    }
    // int32 and uint32 keep the low 32 bits, as prost does.
    let [command, request_id, kind, ttl, flags] = varints;
    Some(PlainConcern {
        command: command as u32,
        request_id,
        kind: kind as i32,
        ttl: ttl as u32,
        flags: flags as u32,
        payload,
    })
}

/// Frames above this many bytes leave the read buffer to themselves.
const SHARE_LIMIT: usize = 16 * 1024;

/// After a frame of `total` bytes was split off `src`: when it was large,
/// moves what follows it (and the room the next reads fill) to a buffer of
/// its own. Frames handed out are views of the read buffer; a small one
/// read into the tail of a large frame's allocation would keep all of it
/// alive for as long as it is kept (a queued request, a cached id), which a
/// peer could use to make a node hold megabytes for every few bytes it
/// counts.
fn unshare_after_large(src: &mut BytesMut, total: usize) {
    if total > SHARE_LIMIT {
        *src = BytesMut::from(&src[..]);
    }
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
        self.decoded_bytes += total as u64;
        if let Some(c) = simple_concern(&src[LENGTH_PREFIX_LEN..total]) {
            // The payload is split off the buffer itself: no Bytes for the
            // whole body to slice it from (and drop), and none at all for
            // an empty payload.
            if let Err(e) = validate::check_concern_kind(c.kind) {
                src.advance(total);
                return Err(e);
            }
            let payload = if c.payload.is_empty() {
                src.advance(total);
                Bytes::new()
            } else {
                src.advance(LENGTH_PREFIX_LEN + c.payload.start);
                let payload = src.split_to(c.payload.len()).freeze();
                // Fields may follow the payload.
                src.advance(len - c.payload.end);
                payload
            };
            unshare_after_large(src, total);
            return Ok(Some(Message::Concern(c.with_payload(payload))));
        }
        src.advance(LENGTH_PREFIX_LEN);
        let body = src.split_to(len).freeze();
        unshare_after_large(src, total);
        decode_other(body, &self.limits).map(Some)
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
        let len = encoded_len(msg);
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
        Concern, ConcernKind, Disconnect, DisconnectReason, Discovered, Hello, PeerCount, PeerInfo,
        Ping, Pong,
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

    /// A frame read after a large one in the same buffer is not a view of
    /// the large frame's allocation: kept, it would keep all of it alive
    /// (hostile review, round seven). Both kinds of frame: a concern's
    /// payload, split off directly, and a whole body otherwise.
    #[test]
    fn a_small_frame_after_a_large_one_does_not_share_its_allocation() {
        let concern = |len: usize| {
            Message::Concern(Concern {
                command: 1,
                request_id: 7,
                kind: ConcernKind::Request as i32,
                ttl: 0,
                flags: 0,
                payload: vec![9u8; len].into(),
            })
        };
        let ping = Message::Ping(Ping {
            nonce: 3,
            timestamp_micros: 4,
        });
        for (large, small) in [(concern(1 << 20), concern(10)), (concern(1 << 20), ping)] {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            codec.encode(&large, &mut buf).unwrap();
            codec.encode(&small, &mut buf).unwrap();
            let Some(Message::Concern(big)) = codec.decode(&mut buf).unwrap() else {
                panic!("not the large frame");
            };
            // The rest of the read buffer no longer lies within the large
            // frame's allocation (which is at least the frame long).
            let start = big.payload.as_ptr() as usize;
            let rest = buf.as_ptr() as usize;
            assert!(
                !(start..start + (2 << 20)).contains(&rest),
                "the rest of the buffer is still in the large frame's allocation"
            );
            assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), small);
            assert!(buf.is_empty());
        }
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
            age_ms: Some(u64::MAX),
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
            peer_count: Some(PeerCount {
                linked: u32::MAX,
                min_peers: u32::MAX,
            }),
        }));
        let peer = PeerInfo {
            node_id: Bytes::from(vec![1; crate::NodeId::MAX_LEN]),
            addrs,
            age_ms: Some(u64::MAX),
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
            peer_count: Some(PeerCount {
                linked: 4,
                min_peers: 2,
            }),
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
        (node_id(), addrs(), proptest::option::of(any::<u64>())).prop_map(
            |(node_id, addrs, age_ms)| PeerInfo {
                node_id,
                addrs,
                age_ms,
            },
        )
    }

    fn peer_count() -> impl Strategy<Value = Option<PeerCount>> {
        proptest::option::of(
            (any::<u32>(), any::<u32>())
                .prop_map(|(linked, min_peers)| PeerCount { linked, min_peers }),
        )
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
                any::<u64>(),
                peer_count()
            )
                .prop_map(|(v, net, id, listen, metadata, caps, count)| {
                    Message::Hello(Box::new(Hello {
                        protocol_version: v,
                        network_id: net,
                        node_id: id,
                        listen_addrs: listen,
                        metadata,
                        capabilities: caps,
                        peer_count: count,
                    }))
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(nonce, ts)| Message::Ping(Ping {
                nonce,
                timestamp_micros: ts
            })),
            (any::<u64>(), any::<u64>(), peer_count()).prop_map(|(nonce, ts, count)| {
                Message::Pong(Pong {
                    nonce,
                    timestamp_micros: ts,
                    peer_count: count,
                })
            }),
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
                peer_count: None,
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

    /// Frame bodies that look like Concerns: keys (mostly the Concern's)
    /// with arbitrary bytes after each, inside a well-formed Envelope field
    /// 6; and real frames of any message, given with the body.
    fn concern_like_body() -> impl Strategy<Value = (Vec<u8>, Option<Message>)> {
        let key = prop_oneof![
            Just(0x08u8),
            Just(0x10),
            Just(0x18),
            Just(0x20),
            Just(0x28),
            Just(0x32),
            any::<u8>(),
        ];
        let fields = vec((key, vec(any::<u8>(), 0..12)), 0..6).prop_map(|fields| {
            let fields: Vec<u8> = fields
                .into_iter()
                .flat_map(|(key, rest)| std::iter::once(key).chain(rest))
                .collect();
            let mut body = vec![0x32];
            prost::encoding::encode_varint(fields.len() as u64, &mut body);
            body.extend_from_slice(&fields);
            (body, None)
        });
        let real = message().prop_map(|msg| {
            let frame = encode_frame(&msg, usize::MAX).unwrap();
            (frame[LENGTH_PREFIX_LEN..].to_vec(), Some(msg))
        });
        prop_oneof![fields, real]
    }

    proptest! {
        /// Whatever the fast path reads, prost reads the same; it may only
        /// pass on (to prost) what it does not read.
        #[test]
        fn the_concern_fast_path_agrees_with_prost((body, msg) in concern_like_body()) {
            let body = Bytes::from(body);
            if let Some(c) = simple_concern(&body) {
                let payload = body.slice(c.payload.clone());
                let c = c.with_payload(payload);
                let by_prost = Envelope::decode(body.clone()).unwrap().body;
                prop_assert_eq!(by_prost, Some(Message::Concern(c)));
            } else if let Some(msg) = msg {
                prop_assert!(!matches!(msg, Message::Concern(_)), "a Concern was not read");
            }
        }
    }

    proptest! {
        /// The codec reads a Concern straight from its buffer (the payload
        /// split off it): the same message or error as `decode_frame`,
        /// which is prost's and `validate`'s, and exactly the frame taken
        /// from the buffer, whatever the frame holds.
        #[test]
        fn the_codec_decodes_what_decode_frame_decodes(
            (body, _) in concern_like_body(),
            next in vec(any::<u8>(), 0..8),
        ) {
            let mut buf = BytesMut::from(&(body.len() as u32).to_be_bytes()[..]);
            buf.extend_from_slice(&body);
            buf.extend_from_slice(&next);
            let mut codec = FrameCodec::new();
            let ours = codec.decode(&mut buf);
            let theirs = decode_frame(Bytes::from(body.clone()), &Limits::default());
            match (ours, theirs) {
                (Ok(Some(a)), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                (a, b) => prop_assert!(false, "codec {:?}, decode_frame {:?}", a, b),
            }
            prop_assert_eq!(&buf[..], &next[..]);
            prop_assert_eq!(codec.decoded_bytes(), (LENGTH_PREFIX_LEN + body.len()) as u64);
        }
    }

    #[test]
    fn a_concern_with_fields_after_its_payload_is_read_whole() {
        let c = Concern {
            command: 300,
            request_id: u64::MAX,
            kind: ConcernKind::Reply as i32,
            payload: Bytes::from_static(b"payload"),
            ..Default::default()
        };
        let mut inner = c.encode_to_vec();
        inner.extend_from_slice(&[0x20, 0x05, 0x08, 0x07]); // ttl 5, command 7 (last wins)
        let body = field(6, &inner);
        let mut buf = BytesMut::from(&(body.len() as u32).to_be_bytes()[..]);
        buf.extend_from_slice(&body);
        let ping = Message::Ping(Ping {
            nonce: 1,
            timestamp_micros: 2,
        });
        FrameCodec::new().encode(&ping, &mut buf).unwrap();
        let mut codec = FrameCodec::new();
        let expected = Concern {
            command: 7,
            ttl: 5,
            ..c
        };
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Message::Concern(expected.clone()))
        );
        assert_eq!(
            decode_frame(Bytes::from(body), &Limits::default()).unwrap(),
            Message::Concern(expected)
        );
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ping));
        assert!(buf.is_empty());
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

        /// Every varint length from one byte to ten is written as prost
        /// writes it, and nothing before it is touched.
        #[test]
        fn varints_are_written_as_prost_writes_them(v in any::<u64>(), shift in 0u32..64) {
            let v = v >> shift;
            let mut expected = Vec::new();
            prost::encoding::encode_varint(v, &mut expected);
            let mut out = [0xaau8; CONCERN_HEAD_MAX];
            let end = put_varint(&mut out, 3, v);
            prop_assert_eq!(&out[..3], &[0xaa; 3]);
            prop_assert_eq!(&out[3..end], &expected[..]);
        }

        /// Concern frames with fields of every varint length (not mostly
        /// ten bytes, as `any::<u64>()` gives) are what prost writes, whole
        /// and split, and the fast length is theirs.
        #[test]
        fn concern_frames_of_every_field_length_are_what_prost_writes(
            values in [any::<u64>(); 5],
            shifts in proptest::array::uniform5(0u32..64),
            payload_len in prop_oneof![Just(0usize), 1usize..200, 16_000usize..17_000],
            split_at in 0usize..300,
        ) {
            let v = |i: usize| values[i] >> shifts[i];
            let msg = Message::Concern(Concern {
                command: v(0) as u32,
                request_id: v(1),
                kind: v(2) as i32,
                ttl: v(3) as u32,
                flags: v(4) as u32,
                payload: vec![5; payload_len].into(),
            });
            let envelope = Envelope { body: Some(msg.clone()) };
            let mut expected = (envelope.encoded_len() as u32).to_be_bytes().to_vec();
            envelope.encode(&mut expected).unwrap();
            prop_assert_eq!(encoded_len(&msg), envelope.encoded_len());
            prop_assert_eq!(&encode_frame(&msg, usize::MAX).unwrap()[..], &expected[..]);
            let mut head = BytesMut::new();
            let tail = encode_frame_into(&msg, &mut head, split_at);
            let mut joined = head.to_vec();
            joined.extend_from_slice(&tail.unwrap_or_default());
            prop_assert_eq!(joined, expected);
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
