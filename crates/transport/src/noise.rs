//! The encrypted channel: a Noise `XXpsk0` handshake, then every byte of the
//! stream travels in Noise transport messages.
//!
//! ```text
//!  initiator                                   responder
//!    preamble "mshwrk" 1 1 ───────────────────►
//!    msg1: psk, e (not waiting) ───────────────►   (a non-member fails here:
//!                 ◄──────────────────────────── preamble   no DH, no identity revealed)
//!                 ◄──────────────────────────── msg2: e, ee, s, es
//!    msg3: s, se, then the Hello ──────────────►
//!    ═══════════════ transport messages, both ways ═══════════════
//! ```
//!
//! Each Noise message travels as a 2-byte big-endian length and the message
//! (at most 65 535 bytes, 16 of them the authentication tag). The stream above
//! is cut into such messages on write and reassembled on read, so frames of
//! any size pass through, and a reader never buffers more than one message.
//!
//! The PSK is derived from the network key ([`crate::NetworkKey`]) when one is
//! configured: a node without the same key fails at the first message, before
//! the responder does any Diffie-Hellman or reveals its identity.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use sha2::{Digest, Sha256};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::TransportError;
use crate::config::Security;
use crate::identity::{Identity, NetworkKey};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XXpsk0_25519_AESGCM_BLAKE2s";

/// Largest Noise message, ciphertext and tag included.
const MAX_MESSAGE: usize = 65_535;
/// Authentication tag added to every message.
const TAG_LEN: usize = 16;
/// Largest plaintext carried by one transport message.
pub(crate) const MAX_PLAINTEXT: usize = MAX_MESSAGE - TAG_LEN;
/// Ciphertext buffered by a writer before it insists on draining to the socket.
const WRITE_HIGH_WATER: usize = 128 * 1024;
/// Buffers larger than this are released when they empty, so an idle
/// connection holds almost nothing.
const KEEP_CAPACITY: usize = 4 * 1024;
/// Bytes read while the next message's length is still unknown.
const LENGTH_PROBE: usize = 2 * 1024;

/// The PSK both sides must share: derived from the network key, or a fixed
/// value when there is none. (The network id is checked in the Hello instead,
/// where a mismatch can be reported clearly.)
pub(crate) fn derive_psk(key: Option<&NetworkKey>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"meshwork/noise-psk/v1");
    match key {
        Some(k) => {
            h.update([1]);
            h.update(k.digest());
        }
        None => h.update([0]),
    }
    h.finalize().into()
}

fn crypto_err(stage: &'static str, e: snow::Error) -> TransportError {
    TransportError::Crypto(format!("{stage}: {e}"))
}

async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(2 + msg.len());
    buf.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    buf.extend_from_slice(msg);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8; MAX_MESSAGE],
) -> Result<usize, TransportError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    r.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

/// Runs the Noise handshake on `read`/`write` and returns the transport
/// state and the peer's authenticated static key.
pub(crate) async fn handshake<R, W>(
    read: &mut R,
    write: &mut W,
    initiator: bool,
    identity: &Identity,
    psk: &[u8; 32],
    prologue: &[u8],
    mut peer_preamble: Option<Security>,
) -> Result<(StatelessTransportState, [u8; 32]), TransportError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e| crypto_err("noise parameters", e))?;
    let builder = snow::Builder::new(params)
        .local_private_key(identity.secret_key())
        .and_then(|b| b.psk(0, psk))
        .and_then(|b| b.prologue(prologue))
        .map_err(|e| crypto_err("noise setup", e))?;
    let mut state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(|e| crypto_err("noise setup", e))?;

    let mut msg = Box::new([0u8; MAX_MESSAGE]);
    let mut payload = Box::new([0u8; MAX_MESSAGE]);
    // XX: initiator writes, reads, writes; the responder mirrors it.
    for step in 0..3 {
        let our_turn = (step % 2 == 0) == initiator;
        if our_turn {
            let n = state
                .write_message(&[], &mut msg[..])
                .map_err(|e| crypto_err("noise handshake write", e))?;
            write_message(write, &msg[..n]).await?;
        } else {
            // The peer's preamble arrives before its first Noise message; the
            // initiator sent message 1 without waiting for it.
            if let Some(security) = peer_preamble.take() {
                crate::handshake::read_preamble(read, security).await?;
            }
            let n = read_message(read, &mut msg).await.map_err(|e| match e {
                TransportError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    TransportError::Crypto(format!(
                        "peer closed the connection at noise message {} \
                         (another network key, or it refused us)",
                        step + 1
                    ))
                }
                other => other,
            })?;
            state
                .read_message(&msg[..n], &mut payload[..])
                .map_err(|_| {
                    TransportError::Crypto(format!(
                        "noise handshake message {} did not authenticate \
                         (another network key, another network, or not a meshwork node)",
                        step + 1
                    ))
                })?;
        }
    }
    let remote: [u8; 32] = state
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| TransportError::Crypto("peer sent no static key".into()))?;
    let transport = state
        .into_stateless_transport_mode()
        .map_err(|e| crypto_err("noise transport", e))?;
    Ok((transport, remote))
}

/// Decrypting read half.
pub(crate) struct NoiseReader<R> {
    inner: R,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Ciphertext read from `inner` and not yet decrypted.
    cipher: BytesMut,
    /// Plaintext decrypted and not yet handed out.
    plain: BytesMut,
}

/// Encrypting write half.
pub(crate) struct NoiseWriter<W> {
    inner: W,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Length-prefixed ciphertext waiting for `inner`.
    cipher: BytesMut,
}

impl<R> fmt::Debug for NoiseReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseReader")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl<W> fmt::Debug for NoiseWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseWriter")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

/// Wraps both halves of a stream after a completed handshake.
pub(crate) fn split<R, W>(
    read: R,
    write: W,
    state: StatelessTransportState,
) -> (NoiseReader<R>, NoiseWriter<W>) {
    let state = Arc::new(state);
    (
        NoiseReader {
            inner: read,
            state: state.clone(),
            nonce: 0,
            cipher: BytesMut::new(),
            plain: BytesMut::new(),
        },
        NoiseWriter {
            inner: write,
            state,
            nonce: 0,
            cipher: BytesMut::new(),
        },
    )
}

fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = BytesMut::new();
    }
}

impl<R: AsyncRead + Unpin> NoiseReader<R> {
    /// Decrypts the first whole message in `cipher`, if there is one.
    fn decrypt_one(&mut self) -> io::Result<bool> {
        if self.cipher.len() < 2 {
            return Ok(false);
        }
        let len = u16::from_be_bytes([self.cipher[0], self.cipher[1]]) as usize;
        if len < TAG_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "noise message shorter than its tag",
            ));
        }
        if self.cipher.len() < 2 + len {
            return Ok(false);
        }
        self.plain.clear();
        self.plain.resize(len - TAG_LEN, 0);
        // Decrypted where it lies, then skipped: splitting it off would
        // make the buffer shared (an allocation and atomic counts per
        // message).
        let n = self
            .state
            .read_message(self.nonce, &self.cipher[2..2 + len], &mut self.plain)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "noise message did not authenticate",
                )
            })?;
        self.cipher.advance(2 + len);
        self.nonce += 1;
        self.plain.truncate(n);
        release_if_empty(&mut self.cipher);
        Ok(true)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for NoiseReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = buf.remaining().min(this.plain.len());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                release_if_empty(&mut this.plain);
                return Poll::Ready(Ok(()));
            }
            if this.decrypt_one()? {
                continue;
            }
            // Room for exactly the rest of this message once its length is
            // known (at most 64 KiB); a small read until then, so an idle
            // connection does not hold a message-sized buffer.
            let want = if this.cipher.len() >= 2 {
                2 + u16::from_be_bytes([this.cipher[0], this.cipher[1]]) as usize
            } else {
                LENGTH_PROBE
            };
            this.cipher
                .reserve(want.saturating_sub(this.cipher.len()).max(2));
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.cipher
            ))?;
            if n == 0 {
                return if this.cipher.is_empty() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a noise message",
                    )))
                };
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> NoiseWriter<W> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.cipher.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.cipher))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cipher.advance(n);
        }
        release_if_empty(&mut self.cipher);
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for NoiseWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cipher.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        let start = this.cipher.len();
        this.cipher.resize(start + 2 + n + TAG_LEN, 0);
        let written = this
            .state
            .write_message(this.nonce, &buf[..n], &mut this.cipher[start + 2..])
            .map_err(|e| io::Error::other(format!("noise encryption failed: {e}")))?;
        this.nonce += 1;
        this.cipher[start..start + 2].copy_from_slice(&(written as u16).to_be_bytes());
        this.cipher.truncate(start + 2 + written);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn pair(
        psk_a: [u8; 32],
        psk_b: [u8; 32],
    ) -> (
        Result<(StatelessTransportState, [u8; 32]), TransportError>,
        Result<(StatelessTransportState, [u8; 32]), TransportError>,
        Identity,
        Identity,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let responder_id = ib.clone();
        let (ra, rb) = tokio::join!(
            handshake(&mut ar, &mut aw, true, &ia, &psk_a, b"p", None),
            async move {
                let r = handshake(&mut br, &mut bw, false, &responder_id, &psk_b, b"p", None).await;
                // A failed responder closes the stream, as the endpoint does.
                drop((br, bw));
                r
            }
        );
        (ra, rb, ia, ib)
    }

    #[tokio::test]
    async fn handshake_authenticates_both_static_keys() {
        let psk = derive_psk(None);
        let (a, b, ia, ib) = pair(psk, psk).await;
        assert_eq!(&a.unwrap().1, ib.public_key());
        assert_eq!(&b.unwrap().1, ia.public_key());
    }

    #[tokio::test]
    async fn different_psks_fail_at_the_first_message() {
        let key = NetworkKey::from_secret(b"0123456789abcdef").unwrap();
        let (a, b, _, _) = pair(derive_psk(None), derive_psk(Some(&key))).await;
        assert!(
            matches!(b, Err(TransportError::Crypto(ref m)) if m.contains("message 1")),
            "{b:?}"
        );
        assert!(a.is_err());
    }

    #[test]
    fn psk_depends_on_the_key() {
        let k1 = NetworkKey::from_secret(b"0123456789abcdef").unwrap();
        let k2 = NetworkKey::from_secret(b"fedcba9876543210").unwrap();
        let psks = [
            derive_psk(None),
            derive_psk(Some(&k1)),
            derive_psk(Some(&k2)),
        ];
        assert_ne!(psks[0], psks[1]);
        assert_ne!(psks[0], psks[2]);
        assert_ne!(psks[1], psks[2]);
        assert_eq!(derive_psk(Some(&k1)), psks[1]);
    }

    async fn encrypted_pair() -> (
        NoiseReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        NoiseWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
    ) {
        let psk = derive_psk(None);
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let (ra, rb) = tokio::join!(
            handshake(&mut ar, &mut aw, true, &ia, &psk, b"", None),
            handshake(&mut br, &mut bw, false, &ib, &psk, b"", None)
        );
        let (_, a_writer) = split(ar, aw, ra.unwrap().0);
        let (b_reader, _) = split(br, bw, rb.unwrap().0);
        (b_reader, a_writer)
    }

    #[tokio::test]
    async fn sizes_around_the_message_limit_round_trip() {
        let (mut reader, mut writer) = encrypted_pair().await;
        for len in [
            1,
            MAX_PLAINTEXT - 1,
            MAX_PLAINTEXT,
            MAX_PLAINTEXT + 1,
            3 * 1024 * 1024,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let send = data.clone();
            let (_, got) = tokio::join!(
                async {
                    writer.write_all(&send).await.unwrap();
                    writer.flush().await.unwrap();
                },
                async {
                    let mut got = vec![0u8; len];
                    reader.read_exact(&mut got).await.unwrap();
                    got
                }
            );
            assert_eq!(got, data, "len {len}");
        }
        // Idle again: buffers released.
        assert!(reader.cipher.capacity() <= KEEP_CAPACITY);
        assert!(reader.plain.capacity() <= KEEP_CAPACITY);
        assert!(writer.cipher.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test]
    async fn tampered_ciphertext_is_an_error_not_a_panic() {
        let psk = derive_psk(None);
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        let (ra, rb) = tokio::join!(
            handshake(&mut ar, &mut aw, true, &ia, &psk, b"", None),
            handshake(&mut br, &mut bw, false, &ib, &psk, b"", None)
        );
        let state = ra.unwrap().0;
        let mut msg = vec![0u8; 64];
        let n = state.write_message(0, b"hello", &mut msg).unwrap();
        msg[5] ^= 1;
        let mut wire = (n as u16).to_be_bytes().to_vec();
        wire.extend_from_slice(&msg[..n]);
        aw.write_all(&wire).await.unwrap();
        let (mut reader, _) = split(br, bw, rb.unwrap().0);
        let mut out = [0u8; 16];
        let err = reader.read(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    proptest! {
        // Each case runs a handshake; PROPTEST_CASES=N runs more (see docs/testing.md).
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
        ))]

        /// Whatever a stranger sends as handshake messages, the responder
        /// fails cleanly.
        #[test]
        fn random_handshake_messages_never_panic(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..3)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(1 << 16);
                let (mut br, mut bw) = tokio::io::split(b);
                let (_ar, mut aw) = tokio::io::split(a);
                let mut wire = Vec::new();
                for m in &msgs {
                    wire.extend_from_slice(&(m.len() as u16).to_be_bytes());
                    wire.extend_from_slice(m);
                }
                aw.write_all(&wire).await.unwrap();
                drop(aw);
                let id = Identity::generate();
                let r = handshake(&mut br, &mut bw, false, &id, &derive_psk(None), b"", None).await;
                assert!(r.is_err());
            });
        }

        /// Random bytes after a good handshake are an error or an end, never a panic.
        #[test]
        fn random_transport_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (mut reader, writer) = encrypted_pair().await;
                let mut raw = writer.inner;
                raw.write_all(&bytes).await.unwrap();
                drop(raw);
                let mut out = vec![0u8; 1024];
                loop {
                    match reader.read(&mut out).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
        }
    }
}
