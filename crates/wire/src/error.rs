use std::io;

/// Everything that can go wrong turning bytes into messages and back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame's length prefix (or an outgoing message) exceeds the maximum.
    /// Nothing was buffered for it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length announced by the prefix, or of the message being encoded.
        len: usize,
        /// The codec's configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// The frame is not a valid protobuf `Envelope`.
    #[error("malformed envelope: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The envelope decoded but carries no message.
    #[error("envelope carries no message")]
    EmptyEnvelope,
    /// A field holds a value the protocol does not allow.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field, as `message.field`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The underlying reader or writer failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl WireError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        WireError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
