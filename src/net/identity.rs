//! Static X25519 keys of the transport: the server's (a file beside its first backup) and
//! the node's (derived from its hsm_secret), their public halves and fingerprints.
//! All curve arithmetic is snow's; nothing here is hand-rolled crypto.

use std::io::Write;
use std::path::Path;

use snow::resolvers::{CryptoResolver, DefaultResolver};

use crate::error::StoreError;
use crate::fsutil;

/// HKDF info label under which the node's transport key is derived from hsm_secret
/// (`keys::makesecret(secret, TRANSPORT_LABEL)` once that exists).
pub const TRANSPORT_LABEL: &[u8] = b"cln-backup transport v1";

pub type PublicKey = [u8; 32];

/// The secret half of a static key. Never printed or logged.
#[derive(Clone)]
pub struct SecretKey(pub [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn generate() -> Result<SecretKey, String> {
        let params = super::transport::params().map_err(|e| format!("Noise parameters: {e}"))?;
        let kp = snow::Builder::new(params).generate_keypair().map_err(|e| format!("could not generate a key: {e}"))?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&kp.private);
        Ok(SecretKey(k))
    }

    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
            dh.set(&self.0);
            out.copy_from_slice(dh.pubkey());
        }
        out
    }
}

pub fn to_hex(k: &PublicKey) -> String {
    hex::encode(k)
}

pub fn parse_public(s: &str) -> Result<PublicKey, String> {
    let b = hex::decode(s.trim()).map_err(|_| format!("'{}' is not a hex key", s.trim()))?;
    b.try_into().map_err(|_| format!("'{}' is not a 32-byte key (64 hex digits)", s.trim()))
}

/// A short form for logs and status: the first 16 hex digits.
pub fn fingerprint(k: &PublicKey) -> String {
    hex::encode(&k[..8])
}

/// The server's static key: read from `path`, or made there (0600, atomically) on first start.
/// Returns the key and whether it was made now.
pub fn load_or_create_server_key(path: &Path) -> Result<(SecretKey, bool), StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let b = hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                StoreError::Invalid {
                    path: path.into(),
                    what: "not a server key (64 hex digits); move it away to make a new one (clients must then pair again)"
                        .into(),
                }
            })?;
            Ok((SecretKey(b), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = SecretKey::generate().map_err(|what| StoreError::Invalid { path: path.into(), what })?;
            let text = format!("{}\n", hex::encode(k.0));
            fsutil::write_atomic(path, false, |f, tmp| {
                f.write_all(text.as_bytes()).map_err(StoreError::io("write", tmp))
            })?;
            Ok((k, true))
        }
        Err(e) => Err(StoreError::io("read server key", path)(e)),
    }
}

/// The node's transport key: CLN's `makesecret` over the node's secret with the label
/// `TRANSPORT_LABEL`, the value `lightning-cli makesecret string="cln-backup transport v1"`
/// gives on the same node.
pub fn node_key_from_secret(secret: &[u8]) -> SecretKey {
    let label = std::str::from_utf8(TRANSPORT_LABEL).unwrap_or("cln-backup transport v1");
    SecretKey(crate::keys::makesecret(secret, label))
}

/// Reads `hsm_secret` from a lightning dir and derives the node's transport key.
pub fn node_key_from_lightning_dir(ldir: &Path) -> Result<SecretKey, String> {
    let p = ldir.join("hsm_secret");
    let b = std::fs::read(&p).map_err(|e| {
        format!(
            "cannot read the node's {} ({e}): a socket: backup authenticates the node with a key derived from it. \
             Give the lightning dir that holds hsm_secret (start lightningd once without the plugin to make one)",
            p.display()
        )
    })?;
    // Both formats: the legacy 32 bytes, or the mnemonic one (its BIP39 seed).
    let secret = crate::keys::node_secret_from_hsm_secret(&b).map_err(|e| {
        if e == "passphrase" {
            format!(
                "{} is protected by a passphrase, which cln-backup cannot read before lightningd's init: a \
                 socket: destination needs the node's key from it",
                p.display()
            )
        } else {
            format!("{}: {e}", p.display())
        }
    })?;
    Ok(node_key_from_secret(&secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_files() {
        let k = SecretKey::generate().unwrap();
        let p = k.public();
        assert_ne!(p, [0u8; 32]);
        assert_eq!(parse_public(&to_hex(&p)).unwrap(), p);
        assert!(parse_public("abc").is_err());
        assert!(parse_public("00").unwrap_err().contains("32-byte"));
        assert_eq!(fingerprint(&p).len(), 16);
        assert!(!format!("{k:?}").contains(&hex::encode(k.0)));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("server-key");
        let (a, made) = load_or_create_server_key(&f).unwrap();
        assert!(made);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        let (b, made) = load_or_create_server_key(&f).unwrap();
        assert!(!made);
        assert_eq!(a.0, b.0);
        std::fs::write(&f, "junk").unwrap();
        assert!(load_or_create_server_key(&f).unwrap_err().to_string().contains("not a server key"));
        let n1 = node_key_from_secret(&[7u8; 32]);
        assert_eq!(n1.0, node_key_from_secret(&[7u8; 32]).0);
        assert_ne!(n1.0, node_key_from_secret(&[8u8; 32]).0);
        assert!(node_key_from_lightning_dir(d.path()).unwrap_err().contains("hsm_secret"));
    }
}
