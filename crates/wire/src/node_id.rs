use std::fmt;

use bytes::Bytes;

use crate::WireError;

/// A node's identity on the mesh: 1 to [`NodeId::MAX_LEN`] opaque bytes.
///
/// Cloning is cheap (reference counted). `Display` prints lowercase hex,
/// which `parse` (`FromStr`) reads back;
/// [`NodeId::short`] prints the first 8 hex digits for logs and tables.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Bytes);

impl NodeId {
    /// Longest node id the protocol accepts, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Wraps bytes as a node id, refusing an empty or over-long one.
    ///
    /// The bytes are copied: an id decoded from a frame is a slice of the
    /// frame's buffer, and keeping that slice (in an address book, a
    /// seen-cache, a route table) would keep the whole buffer, up to the
    /// frame limit, alive with it.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<Self, WireError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(WireError::invalid("node_id", "empty"));
        }
        if bytes.len() > Self::MAX_LEN {
            return Err(WireError::invalid(
                "node_id",
                format!("{} bytes, at most {} allowed", bytes.len(), Self::MAX_LEN),
            ));
        }
        Ok(NodeId(Bytes::copy_from_slice(&bytes)))
    }

    /// Parses the hex form printed by `Display`: any id of 1 to
    /// [`MAX_LEN`](Self::MAX_LEN) bytes. A node's id under Noise (the
    /// default) is its 32-byte public key, 64 hex digits; the 8 digits of
    /// [`short`](Self::short) (and of `Debug`) parse as another, 4-byte id
    /// that no node has. Check the length where only full ids make sense.
    pub fn from_hex(hex: &str) -> Result<Self, WireError> {
        if hex.len() % 2 != 0 {
            return Err(WireError::invalid("node_id", "odd number of hex digits"));
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WireError::invalid("node_id", "not hexadecimal"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| WireError::invalid("node_id", "not hexadecimal"))?;
        Self::from_bytes(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The first 8 hex digits, enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Parses what `Display` prints, as [`NodeId::from_hex`] does:
/// `"ab12...".parse::<NodeId>()`.
impl std::str::FromStr for NodeId {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, WireError> {
        Self::from_hex(s)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_does_not_keep_the_buffer_it_was_read_from() {
        let frame = Bytes::from(vec![7u8; 1 << 20]);
        let id = NodeId::from_bytes(frame.slice(100..132)).unwrap();
        let start = frame.as_ptr() as usize;
        let at = id.as_bytes().as_ptr() as usize;
        assert!(
            !(start..start + frame.len()).contains(&at),
            "the id still points into the frame"
        );
        assert_eq!(id.as_bytes(), &frame.slice(100..132));
    }

    #[test]
    fn hex_round_trip() {
        let id = NodeId::from_bytes(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(id.to_string(), "deadbeef0102030405");
        assert_eq!(id.short(), "deadbeef");
        assert_eq!(NodeId::from_hex(&id.to_string()).unwrap(), id);
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        assert_eq!("DEADBEEF".parse::<NodeId>().unwrap().short(), "deadbeef");
        assert!("abc".parse::<NodeId>().is_err());
    }

    #[test]
    fn refuses_bad_ids() {
        assert!(NodeId::from_bytes(Vec::new()).is_err());
        assert!(NodeId::from_bytes(vec![1u8; 65]).is_err());
        assert!(NodeId::from_bytes(vec![1u8; 64]).is_ok());
        assert!(NodeId::from_hex("abc").is_err());
        assert!(NodeId::from_hex("zz").is_err());
        assert!(NodeId::from_hex("é1").is_err());
        assert!(NodeId::from_hex("+a").is_err(), "no signs");
    }
}
