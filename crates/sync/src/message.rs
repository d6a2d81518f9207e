//! Decoding sync messages from peers within bounds.
//!
//! A repeated field costs its receiver far more memory than wire bytes: an
//! empty `Entry` is 2 bytes on the wire and over a hundred once decoded, so
//! a 16 MiB payload of empty entries would become more than a gigabyte of
//! structs before a single one could be checked (and the sync concern
//! handles 8 requests at once). [`decode`] counts the repeated elements of
//! a message first, with a walk over its fields that allocates nothing, and
//! refuses one that holds more than any node sends.

use bytes::{Buf, Bytes};
use prost::Message as _;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

use crate::proto;

/// Most entries one message may carry. Nodes send at most 2048 (a chunk of
/// anti-entropy; an eager push carries at most 256): twice that leaves room
/// for other versions' choices.
pub(crate) const MAX_ENTRIES: usize = 4096;
/// Most bucket numbers or hashes one message may carry: there are 256
/// buckets.
pub(crate) const MAX_BUCKETS: usize = 256;

/// Why a payload was not decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// Not a valid sync message.
    #[error("malformed sync message: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// A field longer than what is left of its message.
    #[error("malformed sync message: a field runs past its end")]
    Truncated,
    /// More repeated elements than any node sends.
    #[error("sync message with {count} {what}, at most {max} allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
}

/// Decodes a sync message from a peer, refusing one with more than
/// [`MAX_ENTRIES`] entries or [`MAX_BUCKETS`] buckets before decoding it.
pub(crate) fn decode(payload: Bytes) -> Result<proto::SyncMessage, DecodeError> {
    let mut counts = Counts::default();
    count_message(&payload, &mut counts)?;
    check("entries", counts.entries, MAX_ENTRIES)?;
    check("buckets", counts.buckets, MAX_BUCKETS)?;
    Ok(proto::SyncMessage::decode(payload)?)
}

fn check(what: &'static str, count: usize, max: usize) -> Result<(), DecodeError> {
    if count > max {
        return Err(DecodeError::TooMany { what, count, max });
    }
    Ok(())
}

/// Repeated elements seen so far, over every body (a oneof field may come
/// more than once, and prost merges repeats of the same one).
#[derive(Default)]
struct Counts {
    entries: usize,
    buckets: usize,
}

/// What a repeated field of a body holds.
#[derive(Clone, Copy)]
enum Repeated {
    /// `Entry` messages, one per occurrence.
    Entries,
    /// Numbers, one per occurrence or packed.
    Buckets,
}

/// The repeated field (by tag) of each body of a `SyncMessage` (by its tag
/// there); see proto/sync.proto.
fn repeated_field(body_tag: u32) -> Option<(u32, Repeated)> {
    match body_tag {
        // Push.entries
        7 => Some((3, Repeated::Entries)),
        // Entries.entries, Chunk.entries
        1 | 5 => Some((1, Repeated::Entries)),
        // Ack.newer
        6 => Some((2, Repeated::Entries)),
        // DigestAnswer.buckets
        3 => Some((2, Repeated::Buckets)),
        // Pull.buckets
        4 => Some((1, Repeated::Buckets)),
        _ => None,
    }
}

/// Counts the repeated elements of a `SyncMessage`.
fn count_message(mut buf: &[u8], counts: &mut Counts) -> Result<(), DecodeError> {
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match (repeated_field(tag), wire_type) {
            (Some(field), WireType::LengthDelimited) => {
                let body = length_delimited(&mut buf)?;
                count_body(body, field, counts)?;
            }
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(())
}

/// Counts the occurrences of `field` in one body.
fn count_body(
    mut buf: &[u8],
    (field, kind): (u32, Repeated),
    counts: &mut Counts,
) -> Result<(), DecodeError> {
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if tag != field {
            skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
            continue;
        }
        match (kind, wire_type) {
            (Repeated::Buckets, WireType::LengthDelimited) => {
                // Packed: one number per byte without the continuation bit.
                let packed = length_delimited(&mut buf)?;
                counts.buckets += packed.iter().filter(|b| **b & 0x80 == 0).count();
            }
            (Repeated::Buckets, _) => {
                counts.buckets += 1;
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
            }
            (Repeated::Entries, _) => {
                counts.entries += 1;
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
            }
        }
    }
    Ok(())
}

/// Takes a length-delimited field's bytes off the front of `buf`.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let len = decode_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|len| *len <= buf.len())
        .ok_or(DecodeError::Truncated)?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::sync_message::Body;

    fn encoded(body: Body) -> Bytes {
        Bytes::from(proto::SyncMessage { body: Some(body) }.encode_to_vec())
    }

    fn entry(key: &str) -> proto::Entry {
        proto::Entry {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"v"),
            stamp: 1 << 16,
            ..Default::default()
        }
    }

    /// The entries or buckets prost decodes from `bytes`.
    fn elements(bytes: &[u8]) -> usize {
        match proto::SyncMessage::decode(bytes).unwrap().body {
            Some(Body::Push(p)) => p.entries.len(),
            Some(Body::Pull(p)) => p.buckets.len(),
            _ => 0,
        }
    }

    fn entries(n: usize) -> Vec<proto::Entry> {
        (0..n).map(|i| entry(&i.to_string())).collect()
    }

    #[test]
    fn messages_within_the_bounds_decode_as_prost_decodes_them() {
        let bodies = [
            Body::Push(proto::Push {
                id: 7,
                origin: Bytes::from_static(b"o"),
                entries: entries(MAX_ENTRIES),
            }),
            Body::Entries(proto::Entries {
                entries: entries(3),
                repair: true,
            }),
            Body::Chunk(proto::Chunk {
                entries: entries(2),
                more: true,
                next_bucket: 4,
                next_key: Bytes::from_static(b"k"),
            }),
            Body::Answer(proto::DigestAnswer {
                equal: false,
                buckets: (0..MAX_BUCKETS as u64).map(|b| b << 50).collect(),
                entries: 9,
            }),
            Body::Pull(proto::Pull {
                buckets: (0..MAX_BUCKETS as u32).collect(),
                ..Default::default()
            }),
            Body::Digest(proto::DigestQuery { root: 5 }),
            Body::Ack(proto::Ack {
                applied: 2,
                newer: vec![proto::Entry::default(); 3],
            }),
            Body::Prune(proto::Prune {}),
        ];
        for body in bodies {
            let payload = encoded(body.clone());
            assert_eq!(decode(payload).unwrap().body, Some(body));
        }
    }

    #[test]
    fn too_many_entries_are_refused_before_decoding() {
        // Empty entries: 2 bytes each on the wire, the cheapest to send.
        let empty = || {
            Body::Chunk(proto::Chunk {
                entries: vec![proto::Entry::default(); MAX_ENTRIES + 1],
                ..Default::default()
            })
        };
        let err = decode(encoded(empty())).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooMany { what: "entries", count, .. } if count == MAX_ENTRIES + 1),
            "{err}"
        );
        // The entries an Ack carries back count the same.
        let ack = Body::Ack(proto::Ack {
            applied: 0,
            newer: vec![proto::Entry::default(); MAX_ENTRIES + 1],
        });
        assert!(matches!(
            decode(encoded(ack)),
            Err(DecodeError::TooMany {
                what: "entries",
                ..
            })
        ));
        // Split over two Push bodies, which prost would merge into one.
        let half = proto::Push {
            entries: vec![proto::Entry::default(); MAX_ENTRIES / 2 + 1],
            ..Default::default()
        };
        let mut twice = encoded(Body::Push(half.clone())).to_vec();
        twice.extend_from_slice(&encoded(Body::Push(half)));
        assert_eq!(elements(&twice), MAX_ENTRIES + 2, "prost merges the two");
        assert!(matches!(
            decode(Bytes::from(twice)),
            Err(DecodeError::TooMany {
                what: "entries",
                ..
            })
        ));
    }

    #[test]
    fn too_many_buckets_are_refused_packed_or_not() {
        let packed = encoded(Body::Pull(proto::Pull {
            buckets: vec![1; MAX_BUCKETS + 1],
            ..Default::default()
        }));
        assert!(matches!(
            decode(packed),
            Err(DecodeError::TooMany { what: "buckets", count, .. }) if count == MAX_BUCKETS + 1
        ));
        // Unpacked: field 1 of Pull as single varints (tag byte 0x08).
        let pull: Vec<u8> = [0x08, 0x01].repeat(MAX_BUCKETS + 1);
        let mut unpacked = vec![0x22]; // SyncMessage field 4 (Pull), length-delimited
        let mut len = pull.len();
        while len >= 0x80 {
            unpacked.push((len as u8) | 0x80);
            len >>= 7;
        }
        unpacked.push(len as u8);
        unpacked.extend_from_slice(&pull);
        assert_eq!(
            elements(&unpacked),
            MAX_BUCKETS + 1,
            "prost reads unpacked numbers too"
        );
        assert!(matches!(
            decode(Bytes::from(unpacked)),
            Err(DecodeError::TooMany {
                what: "buckets",
                ..
            })
        ));
    }

    proptest::proptest! {
        /// Garbage never panics, and the walk refuses nothing prost decodes
        /// that is within the bounds (under 256 bytes, nothing can pass
        /// them: an element takes at least one byte).
        #[test]
        fn the_walk_refuses_nothing_prost_decodes_within_the_bounds(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)
        ) {
            let payload = Bytes::from(bytes);
            let ours = decode(payload.clone()).ok();
            let theirs = proto::SyncMessage::decode(payload).ok();
            proptest::prop_assert_eq!(ours, theirs);
        }

        /// Valid messages of random entries decode the same way through the
        /// walk, up to the bound.
        #[test]
        fn pushes_of_random_entries_decode_like_prost(
            keys in proptest::collection::vec("[a-z]{0,8}", 0..64),
            origin in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let body = Body::Push(proto::Push {
                id: keys.len() as u64,
                origin: Bytes::from(origin),
                entries: keys.iter().map(|k| entry(k)).collect(),
            });
            proptest::prop_assert_eq!(decode(encoded(body.clone())).unwrap().body, Some(body));
        }
    }
}
