//! Where a sealed backup's key comes from: the node's `hsm_secret`, or a key file.
//!
//! The key is what `lightning-cli makesecret string="cln-backup encryption v1"` returns on
//! the node: CLN's `makesecret`, HKDF-SHA256 (empty salt) over the node's secret with info
//! `derived secrets`, then HKDF-SHA256 (empty salt) over that with the label as info.
//!
//! The node's secret comes from `hsm_secret`, in one of two formats:
//! - legacy: exactly 32 bytes, used as they are;
//! - mnemonic (v25.12+): 32 bytes (all zero unless a passphrase protects the words) then the
//!   BIP39 words; the secret is the 64-byte BIP39 seed, PBKDF2-HMAC-SHA512 over the words,
//!   salt `mnemonic`, 2048 rounds.
//!
//! A passphrase-protected `hsm_secret` (a 73-byte legacy encrypted one, or a mnemonic one
//! whose first 32 bytes are not zero) cannot be read without lightningd: such nodes use a
//! key file. A key file is one line: `cln-backup-key-v1 <64 hex digits>`, mode 0600.
//!
//! The fingerprint, shown by `backup-cli verify` and stored in the backup, is the first 16
//! hex digits of SHA-256 of the key: it names the key without revealing it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::{Digest, Sha256, Sha512};
use zeroize::{Zeroize, Zeroizing};

/// The `makesecret` label of the backup's encryption key.
pub const LABEL: &str = "cln-backup encryption v1";
pub const HSM_SECRET: &str = "hsm_secret";
const KEY_FILE_TAG: &str = "cln-backup-key-v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error(
        "{path} is protected by a passphrase, so cln-backup cannot derive the key from it; give the backup its own \
         key: `backup-cli init --key-file PATH` (and --key-file PATH to restore and verify)"
    )]
    Passphrase { path: PathBuf },
    #[error("no key for this sealed backup: looked for {}. Give --hsm-secret PATH (the node's hsm_secret) or --key-file PATH", .looked.join(", "))]
    Missing { looked: Vec<String> },
    #[error(
        "this backup was sealed with key {expected}, you gave {given} (from {from}): give the hsm_secret of the node \
         this backup belongs to, or its key file"
    )]
    Wrong { expected: String, given: String, from: String },
}

/// The backup's 32-byte AEAD key. Never printed; zeroed when dropped.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; 32]>,
    /// Where it came from, for messages.
    pub origin: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} from {})", self.fingerprint(), self.origin)
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32], origin: impl Into<String>) -> Key {
        Key { bytes: Zeroizing::new(bytes), origin: origin.into() }
    }
    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
    /// First 16 hex digits of SHA-256 of the key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.bytes)
    }
}

pub fn fingerprint(key: &[u8; 32]) -> String {
    hex(&Sha256::digest(key)[..8])
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// CLN's `makesecret`: the secret lightningd derives for `label` from the node's secret.
pub fn makesecret(node_secret: &[u8], label: &str) -> [u8; 32] {
    let mut derived = Zeroizing::new([0u8; 32]);
    // 32 bytes always fit an HKDF-SHA256 output (max 8160): the expands cannot fail.
    let _ = Hkdf::<Sha256>::new(None, node_secret).expand(b"derived secrets", &mut derived[..]);
    let mut out = [0u8; 32];
    let _ = Hkdf::<Sha256>::new(None, &derived[..]).expand(label.as_bytes(), &mut out);
    out
}

/// The node's secret from the bytes of an `hsm_secret` file (see the module docs).
pub fn node_secret_from_hsm_secret(bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    match bytes.len() {
        32 => return Ok(Zeroizing::new(bytes.to_vec())),
        73 => return Err("passphrase".into()),
        n if n < 32 + 12 => return Err(format!("{n} bytes: neither a 32-byte secret nor a 32-byte hash and words")),
        _ => {}
    }
    if bytes[..32].iter().any(|&b| b != 0) {
        return Err("passphrase".into());
    }
    let words = std::str::from_utf8(&bytes[32..]).map_err(|_| "the words after the first 32 bytes are not UTF-8")?;
    let words: Vec<&str> = words.split_whitespace().collect();
    if ![12, 15, 18, 21, 24].contains(&words.len()) || words.iter().any(|w| !w.bytes().all(|c| c.is_ascii_lowercase()))
    {
        return Err(format!("{} words after the first 32 bytes, not a BIP39 mnemonic", words.len()));
    }
    let mnemonic = Zeroizing::new(words.join(" "));
    let mut seed = Zeroizing::new(vec![0u8; 64]);
    pbkdf2::pbkdf2_hmac::<Sha512>(mnemonic.as_bytes(), b"mnemonic", 2048, &mut seed);
    Ok(seed)
}

/// The backup key of a node from its `hsm_secret` file.
pub fn key_from_hsm_secret(path: &Path) -> Result<Key, KeyError> {
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyError::Io { path: path.into(), source })?);
    let secret = node_secret_from_hsm_secret(&bytes).map_err(|what| {
        if what == "passphrase" {
            KeyError::Passphrase { path: path.into() }
        } else {
            KeyError::Format { path: path.into(), what: format!("not an hsm_secret: {what}") }
        }
    })?;
    Ok(Key::from_bytes(makesecret(&secret, LABEL), path.display().to_string()))
}

/// Reads a key file (`cln-backup-key-v1 <64 hex>`).
pub fn read_key_file(path: &Path) -> Result<Key, KeyError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?);
    let bad = |what: &str| KeyError::Format { path: path.into(), what: what.into() };
    let mut parts = text.split_whitespace();
    if parts.next() != Some(KEY_FILE_TAG) {
        return Err(bad("not a cln-backup key file (it should start with cln-backup-key-v1)"));
    }
    let hexkey = parts.next().ok_or_else(|| bad("no key after cln-backup-key-v1"))?;
    let mut raw = Zeroizing::new(unhex(hexkey).ok_or_else(|| bad("the key is not hex"))?);
    let arr: [u8; 32] = raw.as_slice().try_into().map_err(|_| bad("the key is not 64 hex digits"))?;
    raw.zeroize();
    Ok(Key::from_bytes(arr, path.display().to_string()))
}

/// Reads a key file, or creates one with a fresh random key (mode 0600) if it does not
/// exist. Returns the key and whether it was created.
pub fn read_or_create_key_file(path: &Path) -> Result<(Key, bool), KeyError> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok((read_key_file(path)?, false));
    }
    let io = |source| KeyError::Io { path: path.into(), source };
    let mut k = Zeroizing::new([0u8; 32]);
    random(&mut k[..]).map_err(io)?;
    let line = Zeroizing::new(format!("{KEY_FILE_TAG} {}\n", hex(&k[..])));
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
    crate::fsutil::fsync_dir(crate::fsutil::parent_of(path))
        .map_err(|e| KeyError::Format { path: path.into(), what: e.to_string() })?;
    Ok((Key::from_bytes(*k, path.display().to_string()), true))
}

/// Warns (as text) when a key file is readable by others.
pub fn key_file_mode_warning(path: &Path) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| format!("{} has mode {mode:o}: make it private with chmod 600", path.display()))
}

/// Fills `buf` from the kernel's random source.
pub fn random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let r = unsafe { libc::getrandom(buf[n..].as_mut_ptr().cast(), buf.len() - n, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        n += r as usize;
    }
    Ok(())
}

/// Where to look for the key of a sealed backup, in this order: an explicit key file or
/// hsm_secret; the key file recorded at init; `hsm_secret` in each directory of `search`.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    pub hsm_secret: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub search: Vec<PathBuf>,
}

impl KeySource {
    /// The plugin's source: the node's `hsm_secret` in its lightning dir.
    pub fn lightning_dir(dir: &Path) -> KeySource {
        KeySource { search: vec![dir.to_path_buf()], ..Default::default() }
    }

    /// Finds and reads the key. `recorded_key_file` comes from the backup's metadata.
    /// `Ok(None)`: nothing found (the caller decides whether that is an error).
    pub fn find(&self, recorded_key_file: Option<&Path>) -> Result<Option<Key>, KeyError> {
        if let Some(p) = &self.key_file {
            return read_key_file(p).map(Some);
        }
        if let Some(p) = &self.hsm_secret {
            return key_from_hsm_secret(p).map(Some);
        }
        if let Some(p) = recorded_key_file {
            return match read_key_file(p) {
                Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
                r => r.map(Some),
            };
        }
        for dir in &self.search {
            let p = dir.join(HSM_SECRET);
            match key_from_hsm_secret(&p) {
                Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                r => return r.map(Some),
            }
        }
        Ok(None)
    }

    /// The places `find` looks, for a "missing key" message.
    pub fn places(&self, recorded_key_file: Option<&Path>) -> Vec<String> {
        let mut v = vec![];
        if let Some(p) = &self.key_file {
            v.push(format!("key file {}", p.display()));
        } else if let Some(p) = &self.hsm_secret {
            v.push(p.display().to_string());
        } else if let Some(p) = recorded_key_file {
            v.push(format!("the key file recorded at init, {}", p.display()));
        } else {
            v.extend(self.search.iter().map(|d| d.join(HSM_SECRET).display().to_string()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_hsm_secret_vector() {
        let mut hsm = b"lightning-1".to_vec();
        hsm.resize(32, 0);
        let secret = node_secret_from_hsm_secret(&hsm).unwrap();
        assert_eq!(
            hex(&makesecret(&secret, LABEL)),
            "1184b49ee56f7823c642e19e8db783b9c1a9f61a0cbc46044f0cf47e5f6bdefb"
        );
    }

    #[test]
    fn mnemonic_hsm_secret_vector() {
        let mut hsm = vec![0u8; 32];
        hsm.extend_from_slice(b"hockey enroll sure trip track rescue original plate abandon abandon abandon account");
        let secret = node_secret_from_hsm_secret(&hsm).unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(
            hex(&makesecret(&secret, LABEL)),
            "f2dc78f604fed97ec979e67293ce63b9252acdd2be51221d93e8069b30c807d7"
        );
    }

    #[test]
    fn formats_refused_and_files() {
        assert_eq!(node_secret_from_hsm_secret(&[1u8; 73]).unwrap_err(), "passphrase");
        let mut p = vec![1u8; 32];
        p.extend_from_slice(
            b"abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
        );
        assert_eq!(node_secret_from_hsm_secret(&p).unwrap_err(), "passphrase");
        assert!(node_secret_from_hsm_secret(&[0u8; 40]).is_err());
        let d = tempfile::tempdir().unwrap();
        let kf = d.path().join("k");
        let (k, created) = read_or_create_key_file(&kf).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(&kf).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = read_or_create_key_file(&kf).unwrap();
        assert!(!created);
        assert_eq!(k.bytes(), k2.bytes());
        assert_eq!(k.fingerprint().len(), 16);
        assert!(!format!("{k:?}").contains(&hex(k.bytes())), "Debug must not show the key");
        fs::write(d.path().join(HSM_SECRET), [1u8; 73]).unwrap();
        let src = KeySource::lightning_dir(d.path());
        assert!(matches!(src.find(None), Err(KeyError::Passphrase { .. })));
        assert!(KeySource::lightning_dir(&d.path().join("nope")).find(None).unwrap().is_none());
    }
}
