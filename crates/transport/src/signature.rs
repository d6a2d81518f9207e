//! Signatures that anyone can check against a node id alone: XEdDSA.
//!
//! A node id is an X25519 public key (see [`Identity`]), which cannot sign.
//! XEdDSA (Signal's specification, "The XEdDSA and VXEdDSA Signature
//! Schemes", revision 1) signs with the X25519 secret key itself: the
//! Montgomery point maps to the Edwards point with the same `y` and sign
//! bit 0, the secret scalar is negated if its own Edwards point has sign
//! bit 1, and the signature is an ordinary Ed25519 signature under that
//! Edwards key, with a randomised nonce. So no second key pair is needed,
//! and a message that travels through other nodes (a flood) carries proof
//! of its origin that every node can check with nothing but the origin's id.
//!
//! A signature is 64 bytes (`R || s`). Verification refuses ids that are
//! not points of the curve or that are of small order (a signature under
//! those proves nothing), non-canonical `s`, and any `R` other than the one
//! the equation gives.

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use meshwork_wire::NodeId;
use sha2::{Digest, Sha512};

use crate::{Identity, TransportError};

/// Bytes of a signature.
pub const SIGNATURE_LEN: usize = 64;

/// A signature made with [`Identity::sign`], checked with [`verify`].
pub type Signature = [u8; SIGNATURE_LEN];

/// The signing half of an identity: the Edwards secret scalar and public key.
#[derive(Clone)]
pub(crate) struct SigningKey {
    /// `a`: the clamped X25519 scalar, negated when its point has sign 1.
    scalar: Scalar,
    /// `A = aB`, compressed; its sign bit is always 0.
    public: [u8; 32],
}

impl SigningKey {
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        let k = Scalar::from_bytes_mod_order(clamp_integer(*secret));
        let e = EdwardsPoint::mul_base(&k).compress();
        let (scalar, public) = if e.as_bytes()[31] & 0x80 != 0 {
            let a = -k;
            (a, EdwardsPoint::mul_base(&a).compress().to_bytes())
        } else {
            (k, e.to_bytes())
        };
        SigningKey { scalar, public }
    }

    fn sign(&self, message: &[u8]) -> Signature {
        // hash1(a || M || Z): the nonce, from the secret, the message and 64
        // random bytes (a weak random source still gives distinct nonces
        // for distinct messages; a good one hides even repeated ones).
        let z: [u8; 64] = {
            let mut z = [0u8; 64];
            z[..32].copy_from_slice(&rand::random::<[u8; 32]>());
            z[32..].copy_from_slice(&rand::random::<[u8; 32]>());
            z
        };
        let mut h1 = Sha512::new();
        h1.update([0xFE]);
        h1.update([0xFF; 31]);
        h1.update(self.scalar.as_bytes());
        h1.update(message);
        h1.update(z);
        let r = Scalar::from_bytes_mod_order_wide(&h1.finalize().into());
        let big_r = EdwardsPoint::mul_base(&r).compress();
        let h = challenge(big_r.as_bytes(), &self.public, message);
        let s = r + h * self.scalar;
        let mut sig = [0u8; SIGNATURE_LEN];
        sig[..32].copy_from_slice(big_r.as_bytes());
        sig[32..].copy_from_slice(s.as_bytes());
        sig
    }
}

/// `SHA-512(R || A || M) mod l`, Ed25519's challenge.
fn challenge(r: &[u8; 32], a: &[u8; 32], message: &[u8]) -> Scalar {
    let mut h = Sha512::new();
    h.update(r);
    h.update(a);
    h.update(message);
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// The Edwards public key (sign bit 0) of a node id, if the id is a 32-byte
/// curve point of large order.
fn edwards_key(id: &NodeId) -> Option<EdwardsPoint> {
    let u: [u8; 32] = id.as_bytes().as_ref().try_into().ok()?;
    // u must be canonical (< p = 2^255 - 19): a second encoding of a point
    // would be a second id for the same key.
    if !is_canonical_field(&u) {
        return None;
    }
    let a = MontgomeryPoint(u).to_edwards(0)?;
    (!a.is_small_order()).then_some(a)
}

/// Whether 32 little-endian bytes are a field element below 2^255 - 19.
fn is_canonical_field(u: &[u8; 32]) -> bool {
    // p = 2^255 - 19: 0xED, then 30 bytes of 0xFF, then 0x7F.
    if u[31] & 0x80 != 0 {
        return false;
    }
    if u[31] < 0x7F || u[1..31].iter().any(|&b| b != 0xFF) {
        return true;
    }
    u[0] < 0xED
}

impl Identity {
    /// Signs `message` with this node's secret key (XEdDSA, see
    /// [`verify`]). Callers put a purpose label at the start of `message`
    /// so that a signature made for one purpose serves no other.
    pub fn sign(&self, message: &[u8]) -> Signature {
        self.signing_key().sign(message)
    }
}

/// Checks that `signature` was made by the node whose id is `signer` over
/// exactly `message`. Checking many messages of one signer is cheaper
/// through its [`VerifyingKey`], made once.
pub fn verify(signer: &NodeId, message: &[u8], signature: &[u8]) -> Result<(), TransportError> {
    VerifyingKey::from_node_id(signer)?.verify(message, signature)
}

/// A node id in the form that checks signatures: mapping an id to its
/// Edwards point costs about a third of a verification, so callers that
/// see one signer often keep this.
#[derive(Clone, Debug)]
pub struct VerifyingKey {
    point: EdwardsPoint,
    compressed: [u8; 32],
}

impl VerifyingKey {
    /// The key of `id`; an error if the id is not a 32-byte curve point of
    /// large order (no signature under such an id proves anything).
    pub fn from_node_id(id: &NodeId) -> Result<Self, TransportError> {
        let point = edwards_key(id).ok_or_else(|| {
            TransportError::BadSignature("the signer id is not a usable public key".into())
        })?;
        Ok(VerifyingKey {
            compressed: point.compress().to_bytes(),
            point,
        })
    }

    /// Checks that `signature` was made by this key over exactly `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), TransportError> {
        let bad = |why: &str| TransportError::BadSignature(why.to_string());
        let sig: &[u8; SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| bad("a signature is 64 bytes"))?;
        let (r, s) = sig.split_at(32);
        let r: [u8; 32] = r.try_into().unwrap_or([0; 32]);
        let s: [u8; 32] = s.try_into().unwrap_or([0; 32]);
        let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s))
            .ok_or_else(|| bad("non-canonical s"))?;
        let h = challenge(&r, &self.compressed, message);
        // R' = sB - hA; the signature holds when R' encodes to R exactly.
        let check =
            EdwardsPoint::vartime_double_scalar_mul_basepoint(&-h, &self.point, &s).compress();
        if check == CompressedEdwardsY(r) {
            Ok(())
        } else {
            Err(bad("does not match the message and signer"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(bytes: [u8; 32]) -> NodeId {
        NodeId::from_bytes(bytes.to_vec()).unwrap()
    }

    #[test]
    fn a_signature_verifies_under_the_signers_id_only() {
        let alice = Identity::generate();
        let bob = Identity::generate();
        let sig = alice.sign(b"label|hello");
        verify(alice.node_id(), b"label|hello", &sig).unwrap();
        assert!(verify(alice.node_id(), b"label|hellp", &sig).is_err());
        assert!(verify(bob.node_id(), b"label|hello", &sig).is_err());
        // Two signatures of one message differ (random nonce); both hold.
        let again = alice.sign(b"label|hello");
        assert_ne!(sig, again);
        verify(alice.node_id(), b"label|hello", &again).unwrap();
    }

    #[test]
    fn every_bit_of_a_signature_matters() {
        let alice = Identity::generate();
        let sig = alice.sign(b"m");
        for bit in 0..SIGNATURE_LEN * 8 {
            let mut bad = sig;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(verify(alice.node_id(), b"m", &bad).is_err(), "bit {bit}");
        }
        assert!(verify(alice.node_id(), b"m", &sig[..63]).is_err());
    }

    #[test]
    fn both_signs_of_the_secret_scalar_sign() {
        // About half of all secrets have an Edwards point with sign bit 1,
        // which signing must negate: try until both kinds were seen.
        let (mut negated, mut kept) = (0, 0);
        for i in 0u8..64 {
            let identity = Identity::from_secret([i.wrapping_mul(37).wrapping_add(1); 32]);
            let k = Scalar::from_bytes_mod_order(clamp_integer(*identity.secret_key()));
            if EdwardsPoint::mul_base(&k).compress().as_bytes()[31] & 0x80 != 0 {
                negated += 1;
            } else {
                kept += 1;
            }
            let sig = identity.sign(&[i]);
            verify(identity.node_id(), &[i], &sig).unwrap();
        }
        assert!(negated > 0 && kept > 0, "{negated} negated, {kept} kept");
    }

    #[test]
    fn signatures_are_plain_ed25519_under_the_mapped_key() {
        // Checked by a second implementation: ring's Ed25519 verifier, given
        // the Edwards form of the id, accepts what we sign.
        use ring::signature::{ED25519, UnparsedPublicKey};
        for _ in 0..16 {
            let alice = Identity::generate();
            let a = edwards_key(alice.node_id()).unwrap().compress().to_bytes();
            let sig = alice.sign(b"cross-check");
            UnparsedPublicKey::new(&ED25519, a)
                .verify(b"cross-check", &sig)
                .unwrap();
            assert!(
                UnparsedPublicKey::new(&ED25519, a)
                    .verify(b"cross-checK", &sig)
                    .is_err()
            );
        }
    }

    #[test]
    fn unusable_ids_and_non_canonical_s_are_refused() {
        let alice = Identity::generate();
        let sig = alice.sign(b"m");
        // Small-order points (0, 1, the 8-torsion u), a non-canonical u and
        // a short id.
        let mut p_plus_1 = [0xFF; 32];
        p_plus_1[0] = 0xEE;
        p_plus_1[31] = 0x7F;
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one, p_plus_1] {
            assert!(verify(&id_of(bad), b"m", &sig).is_err());
        }
        let short = NodeId::from_bytes(vec![7; 16]).unwrap();
        assert!(verify(&short, b"m", &sig).is_err());
        // s + l encodes the same scalar, non-canonically.
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut bumped = sig;
        let mut carry = 0u16;
        for i in 0..32 {
            let v = bumped[32 + i] as u16 + l[i] as u16 + carry;
            bumped[32 + i] = v as u8;
            carry = v >> 8;
        }
        assert!(verify(alice.node_id(), b"m", &bumped).is_err());
    }

    #[test]
    fn field_canonicity() {
        let mut p = [0xFF; 32];
        p[0] = 0xED;
        p[31] = 0x7F;
        assert!(!is_canonical_field(&p));
        p[0] = 0xEC;
        assert!(is_canonical_field(&p));
        assert!(is_canonical_field(&[0; 32]));
        let mut high = [0u8; 32];
        high[31] = 0x80;
        assert!(!is_canonical_field(&high));
    }
}
