//! How arguments, results and application errors are encoded.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The encoding of a call's arguments and outcome, chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// postcard: compact binary serde (the typed clients' choice).
    #[default]
    Postcard,
    /// JSON (for tools and the admin API): arguments are an array.
    Json,
}

impl Codec {
    /// The number on the wire.
    pub fn to_wire(self) -> u32 {
        match self {
            Codec::Postcard => 0,
            Codec::Json => 1,
        }
    }

    /// From the number on the wire.
    pub fn from_wire(n: u32) -> Option<Codec> {
        match n {
            0 => Some(Codec::Postcard),
            1 => Some(Codec::Json),
            _ => None,
        }
    }

    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, String> {
        match self {
            Codec::Postcard => postcard_behind(value, Vec::with_capacity),
            Codec::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| e.to_string()),
        }
    }

    /// `value` encoded as the whole answer of a call that returned it
    /// (`RpcMessage { outcome { result } }`, the bytes a caller receives):
    /// with postcard, written once behind its header. What the code of
    /// `#[service]` calls ([`Service::call_framed`](crate::Service::call_framed));
    /// not part of the stable API.
    #[doc(hidden)]
    pub fn encode_framed<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, String> {
        match self {
            Codec::Postcard => postcard_behind(value, |size| {
                let mut out = Vec::with_capacity(crate::rpc::framed_len(size));
                crate::rpc::put_ok_header(&mut out, size);
                out
            }),
            Codec::Json => self.encode(value).map(|v| crate::rpc::frame_ok(&v)),
        }
    }

    /// Decodes a `T` from the whole of `bytes`: bytes left over after the
    /// value are an error, not ignored (they mean the two sides disagree
    /// on the type: say two traits served under one name, the caller's
    /// `get(u64, String)` read by a provider's `get(String)`).
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            // `postcard::from_bytes` ignores what follows the value.
            Codec::Postcard => match postcard::take_from_bytes(bytes) {
                Ok((value, [])) => Ok(value),
                Ok((_, rest)) => Err(format!(
                    "{} byte{} left over after the value (a different type on the other side?)",
                    rest.len(),
                    if rest.len() == 1 { "" } else { "s" }
                )),
                Err(e) => Err(e.to_string()),
            },
            // serde_json rejects anything but whitespace after the value.
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    /// Decodes the argument tuple `T` of a method taking `arity`
    /// arguments; in JSON, an array of the wrong length is told as such
    /// (serde's own message for it is about trailing characters or an
    /// early end). Used by the code `#[service]` generates.
    pub fn decode_args<T: DeserializeOwned>(self, bytes: &[u8], arity: usize) -> Result<T, String> {
        self.decode(bytes).map_err(|e| {
            if self != Codec::Json {
                return e;
            }
            let plural = if arity == 1 { "" } else { "s" };
            match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(serde_json::Value::Array(a)) if a.len() != arity => {
                    format!(
                        "expected {arity} argument{plural} (a JSON array), got {}",
                        a.len()
                    )
                }
                Ok(v) if !v.is_array() => {
                    format!("the arguments are a JSON array of {arity} value{plural}, not {v}")
                }
                _ => e,
            }
        })
    }
}

/// `value` in postcard, appended to what `head` makes for the value's size
/// (a vector with room for exactly the value after whatever it holds).
///
/// The exact size first (postcard only counts, cheaply), then the value
/// into a vector of just that size: postcard writes byte by byte, and
/// growing a vector from empty costs several reallocations; and a vector
/// with room to spare costs one more allocation to become `Bytes`, a full
/// one none.
fn postcard_behind<T: Serialize + ?Sized>(
    value: &T,
    head: impl FnOnce(usize) -> Vec<u8>,
) -> Result<Bytes, String> {
    let size = postcard::serialize_with_flavor::<T, _, usize>(
        value,
        postcard::ser_flavors::Size::default(),
    )
    .map_err(|e| e.to_string())?;
    postcard::to_extend(value, head(size))
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip_argument_tuples() {
        for codec in [Codec::Postcard, Codec::Json] {
            let bytes = codec.encode(&(3i64, "x".to_string())).unwrap();
            let back: (i64, String) = codec.decode(&bytes).unwrap();
            assert_eq!(back, (3, "x".into()));
            assert!(codec.decode::<(i64, String)>(b"\xff").is_err());
            assert_eq!(Codec::from_wire(codec.to_wire()), Some(codec));
        }
        assert_eq!(Codec::from_wire(7), None);
        assert_eq!(&Codec::Json.encode(&(1, 2)).unwrap()[..], b"[1,2]");
    }

    #[test]
    fn a_json_argument_list_of_the_wrong_length_says_so() {
        let two = |b: &[u8]| Codec::Json.decode_args::<(i64, String)>(b, 2);
        assert_eq!(two(br#"[1,"x"]"#), Ok((1, "x".into())));
        assert_eq!(
            two(br#"[1,"x",3]"#).unwrap_err(),
            "expected 2 arguments (a JSON array), got 3"
        );
        assert_eq!(
            two(b"[1]").unwrap_err(),
            "expected 2 arguments (a JSON array), got 1"
        );
        assert_eq!(
            Codec::Json.decode_args::<(i64,)>(b"5", 1).unwrap_err(),
            "the arguments are a JSON array of 1 value, not 5"
        );
        // The right length with a wrong type keeps serde's message.
        assert!(two(br#"["x",1]"#).unwrap_err().contains("invalid type"));
        assert!(two(b"[1,").is_err());
        assert!(
            Codec::Postcard
                .decode_args::<(i64, String)>(b"\xff", 2)
                .is_err()
        );
    }

    /// A value followed by more bytes is not that value: postcard's
    /// `from_bytes` would take the prefix and drop the rest, so a caller
    /// and a provider disagreeing on a method's types "succeeded" with
    /// garbage. Both codecs refuse it.
    #[test]
    fn bytes_left_over_after_the_value_are_a_decode_error() {
        // (u64, String) read as (String,): 1 is a length, then one byte.
        let bytes = Codec::Postcard.encode(&(1u64, "abc".to_string())).unwrap();
        let e = Codec::Postcard.decode::<(String,)>(&bytes).unwrap_err();
        assert!(e.contains("3 bytes left over"), "{e}");
        let e = Codec::Postcard
            .decode_args::<(String,)>(&bytes, 1)
            .unwrap_err();
        assert!(e.contains("left over"), "{e}");
        // A byte vector read as a string: the length, then a prefix.
        let bytes = Codec::Postcard.encode(&vec![1u8, 1, 1, 65]).unwrap();
        assert!(Codec::Postcard.decode::<u8>(&bytes).is_err());
        assert!(Codec::Postcard.decode::<String>(&[1, 65, 0]).is_err());
        assert_eq!(Codec::Postcard.decode::<String>(&[1, 65]), Ok("A".into()));
        // JSON: trailing data refused, trailing whitespace allowed.
        assert!(Codec::Json.decode::<(u8,)>(b"[1] 2").is_err());
        assert!(Codec::Json.decode::<(u8,)>(b"[1][2]").is_err());
        assert!(Codec::Json.decode::<u8>(b"1x").is_err());
        assert_eq!(Codec::Json.decode::<(u8,)>(b"[1] \n"), Ok((1,)));
        assert!(Codec::Json.decode_args::<(u8,)>(b"[1] 2", 1).is_err());
    }

    proptest::proptest! {
        /// The `#[service]` macro sends `Vec<u8>` values as byte strings
        /// (`serde_bytes`): both codecs must write exactly what a sequence
        /// of `u8`s gives, and read either form, so clients and providers
        /// built before the change still agree.
        #[test]
        fn byte_strings_are_wire_compatible_with_byte_sequences(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            n in proptest::prelude::any::<i64>(),
        ) {
            for codec in [Codec::Postcard, Codec::Json] {
                let as_seq = codec.encode(&(&data, n)).unwrap();
                let as_bytes = codec.encode(&(serde_bytes::Bytes::new(&data), n)).unwrap();
                proptest::prop_assert_eq!(&as_seq, &as_bytes);
                let (back, m): (serde_bytes::ByteBuf, i64) = codec.decode(&as_seq).unwrap();
                proptest::prop_assert_eq!((back.into_vec(), m), (data.clone(), n));
                let (back, m): (Vec<u8>, i64) = codec.decode(&as_bytes).unwrap();
                proptest::prop_assert_eq!((back, m), (data.clone(), n));
            }
        }
    }
}
