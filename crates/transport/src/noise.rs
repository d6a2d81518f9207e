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
//!
//! `snow` runs the handshake. The transport phase after it is done here with
//! `ring`'s AES-256-GCM directly, with the keys snow's Split() gives, in place
//! in the read and write buffers: the same bytes as snow's transport messages
//! (Noise spec 5.1 and 12.3) without snow's per-message copies and checks.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use zeroize::Zeroizing;

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

/// One direction of the Noise transport phase: the AES-256-GCM key Split()
/// gave it and the next nonce.
///
/// The nonce is 4 zero bytes then the 64-bit counter, big-endian; associated
/// data is empty; the 16-byte tag follows the ciphertext (Noise spec 5.1 and
/// 12.3, what snow's `ring` resolver does). The counter's last value,
/// 2^64-1, is reserved by the spec: once every other one is spent, sealing
/// and opening fail, and the connection with them, as in snow.
pub(crate) struct CipherState {
    key: LessSafeKey,
    nonce: u64,
}

impl fmt::Debug for CipherState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CipherState")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl CipherState {
    fn new(key: &[u8; 32]) -> Result<Self, TransportError> {
        let key = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| TransportError::Crypto("noise transport key rejected".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            nonce: 0,
        })
    }

    /// The nonce for the next message, unless the counter is spent.
    fn nonce(&self) -> io::Result<Nonce> {
        if self.nonce == u64::MAX {
            return Err(io::Error::other(
                "noise nonces exhausted (2^64-1 messages): the connection must be reopened",
            ));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.nonce.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Encrypts `in_out` where it lies and returns the tag to append.
    fn seal_in_place(&mut self, in_out: &mut [u8]) -> io::Result<Tag> {
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce()?, Aad::empty(), in_out)
            .map_err(|_| io::Error::other("noise encryption failed"))?;
        self.nonce += 1;
        Ok(tag)
    }

    /// Authenticates and decrypts `in_out` (ciphertext then tag) where it
    /// lies; returns the plaintext, the front of `in_out`.
    fn open_in_place<'a>(&mut self, in_out: &'a mut [u8]) -> io::Result<&'a mut [u8]> {
        let plain = self
            .key
            .open_in_place(self.nonce()?, Aad::empty(), in_out)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "noise message did not authenticate",
                )
            })?;
        self.nonce += 1;
        Ok(plain)
    }
}

/// Both directions' ciphers after a completed handshake.
#[derive(Debug)]
pub(crate) struct TransportCiphers {
    send: CipherState,
    receive: CipherState,
}

impl TransportCiphers {
    /// Splits a finished handshake into the sending and receiving ciphers
    /// (the first key is the initiator's to send with). The raw keys are
    /// wiped once ring has them.
    fn from_handshake(state: &mut snow::HandshakeState) -> Result<Self, TransportError> {
        if !state.is_handshake_finished() {
            return Err(TransportError::Crypto(
                "noise transport before the handshake finished".into(),
            ));
        }
        let (initiator_key, responder_key) = state.dangerously_get_raw_split();
        let (initiator_key, responder_key) =
            (Zeroizing::new(initiator_key), Zeroizing::new(responder_key));
        let (send, receive) = if state.is_initiator() {
            (&initiator_key, &responder_key)
        } else {
            (&responder_key, &initiator_key)
        };
        Ok(Self {
            send: CipherState::new(send)?,
            receive: CipherState::new(receive)?,
        })
    }
}

/// Runs the Noise handshake on `read`/`write` and returns the transport
/// ciphers, the peer's authenticated static key, and the round trip from
/// our last message before the peer's to the peer's (message 1 to 2 for
/// the initiator, 2 to 3 for the responder; the peer's crypto included).
pub(crate) async fn handshake<R, W>(
    read: &mut R,
    write: &mut W,
    initiator: bool,
    identity: &Identity,
    psk: &[u8; 32],
    prologue: &[u8],
    mut peer_preamble: Option<Security>,
) -> Result<(TransportCiphers, [u8; 32], Option<Duration>), TransportError>
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
    // When our last message went out, and the round trip from then to the
    // peer's answer: each side writes one message and reads the answer to
    // it (the initiator messages 1 and 2, the responder 2 and 3).
    let mut wrote_at: Option<Instant> = None;
    let mut rtt = None;
    // XX: initiator writes, reads, writes; the responder mirrors it.
    for step in 0..3 {
        let our_turn = (step % 2 == 0) == initiator;
        if our_turn {
            let n = state
                .write_message(&[], &mut msg[..])
                .map_err(|e| crypto_err("noise handshake write", e))?;
            write_message(write, &msg[..n]).await?;
            wrote_at = Some(Instant::now());
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
            if let Some(at) = wrote_at.take() {
                rtt = Some(at.elapsed());
            }
        }
    }
    let remote: [u8; 32] = state
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| TransportError::Crypto("peer sent no static key".into()))?;
    Ok((TransportCiphers::from_handshake(&mut state)?, remote, rtt))
}

/// Decrypting read half.
pub(crate) struct NoiseReader<R> {
    inner: R,
    cipher: CipherState,
    /// Bytes read from `inner`. While `plain` is not zero, they start with
    /// that much of the current message's plaintext (decrypted where it lay)
    /// and its tag; after those, ciphertext not yet decrypted.
    buf: BytesMut,
    /// Plaintext at the front of `buf` not yet handed out.
    plain: usize,
}

/// Encrypting write half.
pub(crate) struct NoiseWriter<W> {
    inner: W,
    cipher: CipherState,
    /// Length-prefixed ciphertext waiting for `inner`.
    buf: BytesMut,
}

impl<R> fmt::Debug for NoiseReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseReader")
            .field("nonce", &self.cipher.nonce)
            .finish_non_exhaustive()
    }
}

impl<W> fmt::Debug for NoiseWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseWriter")
            .field("nonce", &self.cipher.nonce)
            .finish_non_exhaustive()
    }
}

/// Wraps both halves of a stream after a completed handshake.
pub(crate) fn split<R, W>(
    read: R,
    write: W,
    ciphers: TransportCiphers,
) -> (NoiseReader<R>, NoiseWriter<W>) {
    (
        NoiseReader {
            inner: read,
            cipher: ciphers.receive,
            buf: BytesMut::new(),
            plain: 0,
        },
        NoiseWriter {
            inner: write,
            cipher: ciphers.send,
            buf: BytesMut::new(),
        },
    )
}

fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = BytesMut::new();
    }
}

impl<R: AsyncRead + Unpin> NoiseReader<R> {
    /// Decrypts the first whole message in `buf` where it lies, if there is
    /// one, leaving its plaintext at the front. Only called with `plain` 0.
    fn decrypt_one(&mut self) -> io::Result<bool> {
        if self.buf.len() < 2 {
            return Ok(false);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len < TAG_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "noise message shorter than its tag",
            ));
        }
        if self.buf.len() < 2 + len {
            return Ok(false);
        }
        // Handed out from here and skipped, never split off: that would
        // make the buffer shared (an allocation and atomic counts per
        // message).
        let plain = self.cipher.open_in_place(&mut self.buf[2..2 + len])?.len();
        self.buf.advance(2);
        self.plain = plain;
        if plain == 0 {
            self.buf.advance(TAG_LEN);
            release_if_empty(&mut self.buf);
        }
        Ok(true)
    }

    /// Hands out as much of the current message's plaintext as `out` takes;
    /// skips its tag once all of it is out.
    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.plain);
        out.put_slice(&self.buf[..n]);
        self.plain -= n;
        if self.plain == 0 {
            self.buf.advance(n + TAG_LEN);
            release_if_empty(&mut self.buf);
        } else {
            self.buf.advance(n);
        }
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
            if this.plain != 0 {
                this.hand_out(buf);
                return Poll::Ready(Ok(()));
            }
            if this.decrypt_one()? {
                continue;
            }
            // Room for exactly the rest of this message once its length is
            // known (at most 64 KiB); a small read until then, so an idle
            // connection does not hold a message-sized buffer.
            let want = if this.buf.len() >= 2 {
                2 + u16::from_be_bytes([this.buf[0], this.buf[1]]) as usize
            } else {
                LENGTH_PROBE
            };
            this.buf.reserve(want.saturating_sub(this.buf.len()).max(2));
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.buf
            ))?;
            if n == 0 {
                return if this.buf.is_empty() {
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
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
        }
        release_if_empty(&mut self.buf);
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
        if this.buf.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        let start = this.buf.len();
        this.buf.reserve(2 + n + TAG_LEN);
        this.buf
            .extend_from_slice(&((n + TAG_LEN) as u16).to_be_bytes());
        this.buf.extend_from_slice(&buf[..n]);
        match this.cipher.seal_in_place(&mut this.buf[start + 2..]) {
            Ok(tag) => this.buf.extend_from_slice(tag.as_ref()),
            Err(e) => {
                this.buf.truncate(start);
                return Poll::Ready(Err(e));
            }
        }
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
        Result<(TransportCiphers, [u8; 32], Option<Duration>), TransportError>,
        Result<(TransportCiphers, [u8; 32], Option<Duration>), TransportError>,
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
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(&a.1, ib.public_key());
        assert_eq!(&b.1, ia.public_key());
        // Each side timed a round trip (messages 1-2, and 2-3).
        assert!(a.2.is_some() && b.2.is_some());
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
        assert!(reader.buf.capacity() <= KEEP_CAPACITY);
        assert!(writer.buf.capacity() <= KEEP_CAPACITY);
    }

    /// An initiator and a responder that have run the whole handshake in
    /// memory.
    fn snow_handshake() -> (snow::HandshakeState, snow::HandshakeState) {
        let psk = derive_psk(None);
        let build = |initiator: bool| {
            let identity = Identity::generate();
            let builder = snow::Builder::new(NOISE_PARAMS.parse().unwrap())
                .local_private_key(identity.secret_key())
                .and_then(|b| b.psk(0, &psk))
                .and_then(|b| b.prologue(b"p"))
                .unwrap();
            if initiator {
                builder.build_initiator().unwrap()
            } else {
                builder.build_responder().unwrap()
            }
        };
        let (mut initiator, mut responder) = (build(true), build(false));
        let (mut msg, mut payload) = ([0u8; 1024], [0u8; 1024]);
        for step in 0..3 {
            let (from, to) = if step % 2 == 0 {
                (&mut initiator, &mut responder)
            } else {
                (&mut responder, &mut initiator)
            };
            let n = from.write_message(&[], &mut msg).unwrap();
            to.read_message(&msg[..n], &mut payload).unwrap();
        }
        (initiator, responder)
    }

    /// Nonces the interop tests use: the first ones, past 32 bits, past 63
    /// bits, and the last usable one.
    const NONCES: [u64; 6] = [0, 1, 2, (1 << 32) + 3, (1 << 63) + 7, u64::MAX - 1];

    fn seal(cipher: &mut CipherState, nonce: u64, plain: &[u8]) -> Vec<u8> {
        cipher.nonce = nonce;
        let mut msg = plain.to_vec();
        let tag = cipher.seal_in_place(&mut msg).unwrap();
        msg.extend_from_slice(tag.as_ref());
        assert_eq!(cipher.nonce, nonce + 1);
        msg
    }

    #[test]
    fn transport_messages_are_snows_both_ways() {
        let (mut initiator, mut responder) = snow_handshake();
        // Ours and snow's, for the same side of the same handshake.
        let ours = [
            TransportCiphers::from_handshake(&mut initiator).unwrap(),
            TransportCiphers::from_handshake(&mut responder).unwrap(),
        ];
        let snows = [
            initiator.into_stateless_transport_mode().unwrap(),
            responder.into_stateless_transport_mode().unwrap(),
        ];
        for (side, (mut ours, snow_side)) in ours.into_iter().zip(&snows).enumerate() {
            let snow_peer = &snows[1 - side];
            for nonce in NONCES {
                let plain: Vec<u8> = (0..110u8).map(|i| i ^ nonce as u8 ^ side as u8).collect();

                // Ours sealed: byte for byte what snow writes, and snow's peer reads it.
                let sealed = seal(&mut ours.send, nonce, &plain);
                let mut expected = vec![0u8; plain.len() + TAG_LEN];
                let n = snow_side
                    .write_message(nonce, &plain, &mut expected)
                    .unwrap();
                assert_eq!(sealed, expected[..n], "side {side} nonce {nonce}");
                let mut read = vec![0u8; plain.len()];
                let n = snow_peer.read_message(nonce, &sealed, &mut read).unwrap();
                assert_eq!(read[..n], plain[..]);

                // snow's peer sealed: ours opens it.
                let mut msg = vec![0u8; plain.len() + TAG_LEN];
                let n = snow_peer.write_message(nonce, &plain, &mut msg).unwrap();
                msg.truncate(n);
                ours.receive.nonce = nonce;
                assert_eq!(ours.receive.open_in_place(&mut msg).unwrap(), &plain[..]);
                assert_eq!(ours.receive.nonce, nonce + 1);
            }
        }
    }

    #[test]
    fn tampered_or_misplaced_messages_do_not_open() {
        let (mut initiator, mut responder) = snow_handshake();
        let mut a = TransportCiphers::from_handshake(&mut initiator).unwrap();
        let mut b = TransportCiphers::from_handshake(&mut responder).unwrap();
        let sealed = seal(&mut a.send, 5, b"hello, mesh");
        // A flipped bit in the ciphertext, in the tag, a cut tag, another
        // nonce, the other direction's key: each an error, the nonce unspent.
        let mut cases = Vec::new();
        for at in [0, sealed.len() - 1] {
            let mut m = sealed.clone();
            m[at] ^= 0x20;
            cases.push((m, 5, false));
        }
        cases.push((sealed[..sealed.len() - 1].to_vec(), 5, false));
        cases.push((sealed.clone(), 6, false));
        cases.push((sealed.clone(), 5, true));
        for (i, (mut msg, nonce, wrong_direction)) in cases.into_iter().enumerate() {
            let cipher = if wrong_direction {
                &mut a.receive
            } else {
                &mut b.receive
            };
            cipher.nonce = nonce;
            let err = cipher.open_in_place(&mut msg).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "case {i}");
            assert_eq!(cipher.nonce, nonce, "case {i}");
        }
        b.receive.nonce = 5;
        let mut msg = sealed;
        assert_eq!(b.receive.open_in_place(&mut msg).unwrap(), b"hello, mesh");
    }

    #[tokio::test]
    async fn the_reserved_last_nonce_fails_the_connection() {
        let (mut reader, mut writer) = encrypted_pair().await;
        writer.cipher.nonce = u64::MAX - 1;
        reader.cipher.nonce = u64::MAX - 1;
        writer.write_all(b"last").await.unwrap();
        writer.flush().await.unwrap();
        let mut got = [0u8; 4];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"last");
        // Neither side may use 2^64-1: the writer refuses without writing
        // anything, the reader refuses what arrives.
        assert!(writer.write_all(b"more").await.is_err());
        assert!(writer.buf.is_empty());
        assert_eq!(writer.cipher.nonce, u64::MAX);
        let mut raw = writer.inner;
        raw.write_all(&[0, TAG_LEN as u8]).await.unwrap();
        raw.write_all(&[0; TAG_LEN]).await.unwrap();
        assert!(reader.read(&mut got).await.is_err());
    }

    #[tokio::test]
    async fn small_reads_and_empty_messages_pass_through() {
        let (mut reader, mut writer) = encrypted_pair().await;
        // An empty message between two others, each read a byte at a time.
        for part in [&b"abc"[..], b"", b"defg"] {
            futures_util::future::poll_fn(|cx| Pin::new(&mut writer).poll_write(cx, part))
                .await
                .unwrap();
        }
        writer.flush().await.unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        for _ in 0..7 {
            reader.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        assert_eq!(got, b"abcdefg");
        assert_eq!(reader.cipher.nonce, 3);
        assert!(reader.buf.is_empty());
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
        let mut msg = seal(&mut ra.unwrap().0.send, 0, b"hello");
        msg[5] ^= 1;
        let mut wire = (msg.len() as u16).to_be_bytes().to_vec();
        wire.extend_from_slice(&msg);
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
