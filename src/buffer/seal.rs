//! Optional encryption of record bodies at rest (`[buffer.encryption]`).
//!
//! A sealed body replaces the plain body inside the same checksummed frame:
//!
//! ```text
//! version u8 (1) | flags u8 (FLAG_SEALED only) | cipher u8 | key id u32 | nonce [12]
//!   | AEAD(plain body) | tag [16]
//! ```
//!
//! The first 19 bytes are the associated data, so none of them can be changed unnoticed.
//! The plain body inside is the ordinary one (`format.rs`), so a sealed record decodes like
//! any other once opened. Overhead: 35 bytes per record.
//!
//! **Nonces** are a random 4-byte prefix drawn when the log is opened, then an 8-byte
//! counter: unique within one open, and across opens unless two draws of 32 random bits
//! collide *and* both opens seal as many records. Sequence numbers are not used, because a
//! number whose append never became durable may be given out again after a crash (see
//! `mod.rs`), and its first, torn ciphertext may still be on the disk.
//!
//! **Keys** are 32 bytes, written as 64 hex digits in a file only its owner may read. A key's
//! id is the first four bytes of SHA-256 over a fixed label and the key, so keys need no
//! names: after a rotation the old key file stays listed in `previous_key_files` until the
//! records sealed with it are delivered, and each record finds its key by id. A record whose
//! key is not configured is not skipped: reading stops there with an error that names the
//! key id, and resumes once the key is back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::Deserialize;

/// The flag bit of a sealed body (`format.rs` owns the other bits; `mod.rs` draws them all).
pub(crate) const FLAG_SEALED: u8 = 0x10;
const HEADER_LEN: usize = 1 + 1 + 1 + 4 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Bytes a sealed body has beyond the plain body it holds.
pub(crate) const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
const KEY_LEN: usize = 32;
const KEY_ID_LABEL: &[u8] = b"edgegate log key id v1\0";

/// The AEAD used for new records. Records name their own, so changing it needs no migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    /// Fast in software: the choice for boards without AES instructions (Raspberry Pi 2–4).
    #[default]
    Chacha20Poly1305,
    /// Fast where the CPU has AES instructions (x86-64, ARMv8 with the crypto extension).
    Aes256Gcm,
}

impl Cipher {
    fn code(self) -> u8 {
        match self {
            Cipher::Chacha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    fn from_code(code: u8) -> Option<Cipher> {
        match code {
            1 => Some(Cipher::Chacha20Poly1305),
            2 => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }

    fn key(self, bytes: &[u8; KEY_LEN]) -> LessSafeKey {
        let algorithm = match self {
            Cipher::Chacha20Poly1305 => &CHACHA20_POLY1305,
            Cipher::Aes256Gcm => &AES_256_GCM,
        };
        // Both algorithms take 32-byte keys, so this cannot fail.
        LessSafeKey::new(UnboundKey::new(algorithm, bytes).expect("a 32-byte key"))
    }
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} may be read by other users (mode {mode:04o}): make it readable by the gateway's user only (chmod 600)"
    )]
    Exposed { path: String, mode: u32 },
    #[error(
        "{path} must hold one key of 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`"
    )]
    Format { path: String },
}

/// Reads a key file: 64 hex digits, surrounding whitespace allowed, mode 0600 or stricter.
pub fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN], KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let read_error = |source| KeyFileError::Read {
        path: shown.clone(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_error)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed {
            path: shown,
            mode: mode & 0o7777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let hex = text.trim().as_bytes();
    let mut key = [0u8; KEY_LEN];
    if hex.len() != 2 * KEY_LEN {
        return Err(KeyFileError::Format { path: shown });
    }
    for (byte, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => *byte = (hi * 16 + lo) as u8,
            _ => return Err(KeyFileError::Format { path: shown }),
        }
    }
    Ok(key)
}

fn key_id(key: &[u8; KEY_LEN]) -> u32 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(KEY_ID_LABEL);
    ctx.update(key);
    let digest = ctx.finish();
    let d = digest.as_ref();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// What opening a sealed body found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsealed {
    /// The record was sealed with a key that is not configured (its id).
    UnknownKey(u32),
    /// Not a sealed body this version can open, or it fails authentication.
    Corrupt,
}

/// The keys of one log: the one new records are sealed with and every one records may have
/// been sealed with. Never printed.
pub struct LogKeys {
    cipher: Cipher,
    current_id: u32,
    /// By key id: the key for each cipher.
    keys: HashMap<u32, [LessSafeKey; 2]>,
    nonce_prefix: [u8; 4],
    counter: AtomicU64,
}

impl std::fmt::Debug for LogKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKeys")
            .field("cipher", &self.cipher)
            .field("current_id", &format_args!("{:08x}", self.current_id))
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl LogKeys {
    /// `current` seals new records; `previous` only open old ones.
    pub fn new(cipher: Cipher, current: &[u8; KEY_LEN], previous: &[[u8; KEY_LEN]]) -> LogKeys {
        let mut keys = HashMap::new();
        for key in std::iter::once(current).chain(previous) {
            keys.entry(key_id(key)).or_insert_with(|| {
                [
                    Cipher::Chacha20Poly1305.key(key),
                    Cipher::Aes256Gcm.key(key),
                ]
            });
        }
        let mut nonce_prefix = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce_prefix)
            .expect("the system's random number generator");
        LogKeys {
            cipher,
            current_id: key_id(current),
            keys,
            nonce_prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// The id of the key new records are sealed with (for logs: `{:08x}`).
    pub fn current_id(&self) -> u32 {
        self.current_id
    }

    fn key(&self, id: u32, cipher: Cipher) -> Option<&LessSafeKey> {
        let pair = self.keys.get(&id)?;
        Some(match cipher {
            Cipher::Chacha20Poly1305 => &pair[0],
            Cipher::Aes256Gcm => &pair[1],
        })
    }

    /// Seals `plain` (an encoded body) into a new sealed body.
    pub(crate) fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.nonce_prefix);
        nonce[4..].copy_from_slice(&count.to_le_bytes());
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(super::format::BODY_VERSION);
        out.push(FLAG_SEALED);
        out.push(self.cipher.code());
        out.extend_from_slice(&self.current_id.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let key = self
            .key(self.current_id, self.cipher)
            .expect("the current key is among the keys");
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&*header),
                body,
            )
            .expect("a body within AEAD limits");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens a sealed body (flags already seen to have [`FLAG_SEALED`]) into the plain body.
    pub(crate) fn open(&self, sealed: &[u8]) -> Result<Bytes, Unsealed> {
        if sealed.len() < OVERHEAD || sealed[1] != FLAG_SEALED {
            return Err(Unsealed::Corrupt);
        }
        let cipher = Cipher::from_code(sealed[2]).ok_or(Unsealed::Corrupt)?;
        let id = u32::from_le_bytes([sealed[3], sealed[4], sealed[5], sealed[6]]);
        let key = self.key(id, cipher).ok_or(Unsealed::UnknownKey(id))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[7..HEADER_LEN]);
        let (header, body) = sealed.split_at(HEADER_LEN);
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut body,
            )
            .map_err(|_| Unsealed::Corrupt)?;
        let len = plain.len();
        body.truncate(len);
        Ok(Bytes::from(body))
    }
}

/// The key id a sealed body names, if it is one (for error messages without the keys).
pub(crate) fn sealed_key_id(body: &[u8]) -> Option<u32> {
    (body.len() >= HEADER_LEN && body[1] == FLAG_SEALED)
        .then(|| u32::from_le_bytes([body[3], body[4], body[5], body[6]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cipher: Cipher, current: u8, previous: &[u8]) -> LogKeys {
        let previous: Vec<[u8; 32]> = previous.iter().map(|b| [*b; 32]).collect();
        LogKeys::new(cipher, &[current; 32], &previous)
    }

    #[test]
    fn sealed_bodies_open_with_either_cipher_and_hide_the_plain_text() {
        for cipher in [Cipher::Chacha20Poly1305, Cipher::Aes256Gcm] {
            let k = keys(cipher, 1, &[]);
            let plain = b"\x01\x01 the payload: temperature 21.5";
            let sealed = k.seal(plain);
            assert_eq!(sealed.len(), plain.len() + OVERHEAD);
            assert!(!sealed.windows(11).any(|w| w == b"temperature"));
            assert_eq!(&k.open(&sealed).expect("opens")[..], plain);
            // Two seals of the same body differ (fresh nonce).
            assert_ne!(k.seal(plain), sealed);
        }
    }

    #[test]
    fn any_changed_byte_fails_authentication() {
        let k = keys(Cipher::Chacha20Poly1305, 1, &[]);
        let sealed = k.seal(b"\x01\x01hello");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x20;
            assert!(k.open(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn rotated_keys_open_old_records_and_a_missing_key_is_named() {
        let old = keys(Cipher::Aes256Gcm, 7, &[]);
        let sealed = old.seal(b"\x01\x01old record");
        let rotated = keys(Cipher::Chacha20Poly1305, 8, &[7]);
        assert_eq!(
            &rotated.open(&sealed).expect("opens")[..],
            b"\x01\x01old record"
        );
        assert_ne!(rotated.current_id(), old.current_id());
        let forgotten = keys(Cipher::Chacha20Poly1305, 8, &[]);
        assert_eq!(
            forgotten.open(&sealed),
            Err(Unsealed::UnknownKey(old.current_id()))
        );
        assert_eq!(sealed_key_id(&sealed), Some(old.current_id()));
    }

    #[test]
    fn key_files_must_be_private_and_hold_64_hex_digits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(&format!("{}\n", "ab".repeat(32)), 0o600);
        assert_eq!(read_key_file(&path).expect("a good key"), [0xAB; 32]);
        write(&"ab".repeat(32), 0o644);
        assert!(matches!(
            read_key_file(&path),
            Err(KeyFileError::Exposed { mode: 0o644, .. })
        ));
        write(&"ab".repeat(31), 0o400);
        assert!(matches!(
            read_key_file(&path),
            Err(KeyFileError::Format { .. })
        ));
        write(&format!("{}zz", "ab".repeat(31)), 0o600);
        assert!(matches!(
            read_key_file(&path),
            Err(KeyFileError::Format { .. })
        ));
        assert!(matches!(
            read_key_file(&dir.path().join("absent")),
            Err(KeyFileError::Read { .. })
        ));
    }
}
