//! Node identity: a long-term X25519 key pair, the node id derived from it,
//! and the key files that keep both across restarts.
//!
//! The node id *is* the 32-byte X25519 public key. The Noise handshake proves
//! that the peer holds the matching secret key, so no node can claim another's
//! id. X25519 rather than Ed25519: Noise authenticates static X25519 keys
//! directly, so one key does the whole job with no signature step.

use std::fmt;
use std::io::Write;
use std::path::Path;

use curve25519_dalek::MontgomeryPoint;
use meshwork_wire::NodeId;
use sha2::{Digest, Sha256};

use crate::TransportError;
use crate::signature::SigningKey;

/// A node's long-term key pair. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Identity {
    secret: [u8; 32],
    public: [u8; 32],
    node_id: NodeId,
    /// The same secret in the form that signs (see [`Identity::sign`]).
    signing: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

const KEY_FILE_HEADER: &str =
    "# meshwork node key (X25519 secret). Whoever holds this file is this node.";
const NETWORK_KEY_HEADER: &str = "# meshwork network key. Every member holds the same file.";

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        Self::from_secret(rand::random())
    }

    /// The identity whose X25519 secret key is `secret`.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        let node_id = NodeId::from_bytes(public.to_vec())
            .unwrap_or_else(|_| unreachable!("a 32-byte id is valid"));
        Identity {
            signing: SigningKey::new(&secret),
            secret,
            public,
            node_id,
        }
    }

    /// The node id: the public key.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public
    }

    pub(crate) fn secret_key(&self) -> &[u8; 32] {
        &self.secret
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// Loads the identity from `path`, or creates the file (mode 0600) with a
    /// new identity if it does not exist.
    ///
    /// An existing file is never replaced: one that cannot be parsed, or that
    /// other users can read, is an error ([`TransportError::KeyFile`]).
    pub fn load_or_create(path: &Path) -> Result<Self, TransportError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate();
                let text = format!("{KEY_FILE_HEADER}\n{}\n", hex(&identity.secret));
                create_private_file(path, text.as_bytes())?;
                Ok(identity)
            }
            Err(e) => Err(key_error(path, format!("cannot read: {e}"))),
        }
    }

    /// Loads the identity from an existing key file.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let text = read_private_file(path)?;
        if text.lines().any(|l| l.trim() == NETWORK_KEY_HEADER) {
            return Err(key_error(
                path,
                "this is a network key (`meshwork keygen --network-key`), not a node key",
            ));
        }
        let hex_line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| key_error(path, "no key in file"))?;
        let bytes = unhex(hex_line)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| key_error(path, "corrupt key (expected 64 hex digits)"))?;
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes);
        Ok(Self::from_secret(secret))
    }
}

/// A network key: a shared secret that only members of a network hold.
///
/// Nodes without the same key cannot complete the Noise handshake; a node
/// without any key only talks to other nodes without one.
#[derive(Clone)]
pub struct NetworkKey([u8; 32]);

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkKey(..)")
    }
}

impl NetworkKey {
    /// Shortest secret accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A network key from secret bytes (hashed; at least 16 bytes).
    pub fn from_secret(secret: &[u8]) -> Result<Self, TransportError> {
        if secret.len() < Self::MIN_LEN {
            return Err(TransportError::KeyFile {
                path: String::new(),
                reason: format!("a network key needs at least {} bytes", Self::MIN_LEN),
            });
        }
        Ok(NetworkKey(Sha256::digest(secret).into()))
    }

    /// A fresh random key, in the text form [`NetworkKey::load`] reads.
    pub fn generate_text() -> String {
        let bytes: [u8; 32] = rand::random();
        format!("{NETWORK_KEY_HEADER}\n{}\n", hex(&bytes))
    }

    /// Writes a new random network key to `path` (mode 0600). Fails if the
    /// file exists.
    pub fn create(path: &Path) -> Result<Self, TransportError> {
        create_private_file(path, Self::generate_text().as_bytes())?;
        Self::load(path)
    }

    /// Loads a network key file: any content of at least 16 bytes, ignoring
    /// `#` comment lines and surrounding white space. The file must not be
    /// readable by other users.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let text = read_private_file(path)?;
        if text.lines().any(|l| l.trim() == KEY_FILE_HEADER) {
            return Err(key_error(
                path,
                "this is a node key (`meshwork keygen --key`), not a network key",
            ));
        }
        let secret: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        Self::from_secret(secret.as_bytes()).map_err(|_| {
            key_error(
                path,
                format!("network key shorter than {} bytes", Self::MIN_LEN),
            )
        })
    }

    pub(crate) fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> TransportError {
    TransportError::KeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_private_file(path: &Path) -> Result<String, TransportError> {
    let meta = std::fs::metadata(path).map_err(|e| key_error(path, format!("cannot read: {e}")))?;
    if meta.is_dir() {
        return Err(key_error(path, "a directory, not a key file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_error(
                path,
                format!("readable by other users (mode {mode:o}); run chmod 600 on it"),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    std::fs::read_to_string(path).map_err(|e| key_error(path, format!("cannot read: {e}")))
}

fn create_private_file(path: &Path, contents: &[u8]) -> Result<(), TransportError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| key_error(path, format!("cannot create: {e}")))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(|e| key_error(path, format!("cannot write: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path `name` in a fresh directory of its own, removed with the
    /// directory (and the key file in it) when dropped.
    fn temp_path(name: &str) -> TempPath {
        let dir = std::env::temp_dir().join(format!(
            "meshwork-identity-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempPath(dir.join(name))
    }

    struct TempPath(std::path::PathBuf);

    impl std::ops::Deref for TempPath {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempPath {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn node_id_is_the_public_key() {
        let a = Identity::generate();
        assert_eq!(a.node_id().as_bytes().as_ref(), a.public_key());
        let same = Identity::from_secret(*a.secret_key());
        assert_eq!(same.node_id(), a.node_id());
        assert_ne!(Identity::generate().node_id(), a.node_id());
        assert!(!format!("{a:?}").contains(&hex(a.secret_key())));
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let path = temp_path("node.key");
        let created = Identity::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let loaded = Identity::load_or_create(&path).unwrap();
        assert_eq!(loaded.node_id(), created.node_id());
    }

    #[test]
    fn corrupt_key_file_is_an_error_and_is_kept() {
        let path = temp_path("bad.key");
        create_private_file(&path, b"# header\nnot hex at all\n").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(
            matches!(&err, TransportError::KeyFile { reason, .. } if reason.contains("corrupt")),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# header\nnot hex at all\n",
            "never silently replaced"
        );
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("open.key");
        Identity::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    /// A node key given as the network key, or the other way round, or a
    /// directory, is refused with a reason that names the mistake.
    #[test]
    fn the_wrong_kind_of_key_file_is_refused() {
        let node_key = temp_path("node.key");
        Identity::load_or_create(&node_key).unwrap();
        let net_key = temp_path("net.key");
        NetworkKey::create(&net_key).unwrap();
        let reason = |e: TransportError| match e {
            TransportError::KeyFile { reason, .. } => reason,
            other => panic!("not a key file error: {other}"),
        };
        let e = reason(Identity::load_or_create(&net_key).unwrap_err());
        assert!(e.contains("is a network key"), "{e}");
        let e = reason(NetworkKey::load(&node_key).unwrap_err());
        assert!(e.contains("is a node key"), "{e}");
        let dir = node_key.parent().unwrap();
        for e in [
            Identity::load_or_create(dir).unwrap_err(),
            NetworkKey::load(dir).unwrap_err(),
        ] {
            let e = reason(e);
            assert!(e.contains("directory"), "{e}");
        }
    }

    #[test]
    fn network_keys() {
        let path = temp_path("net.key");
        let created = NetworkKey::create(&path).unwrap();
        assert_eq!(NetworkKey::load(&path).unwrap().digest(), created.digest());
        assert!(NetworkKey::create(&path).is_err(), "never overwritten");
        assert!(NetworkKey::from_secret(b"short").is_err());
        assert_ne!(
            NetworkKey::from_secret(b"0123456789abcdef")
                .unwrap()
                .digest(),
            NetworkKey::from_secret(b"0123456789abcdeF")
                .unwrap()
                .digest()
        );
    }
}
