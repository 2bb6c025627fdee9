//! Encryption of connection URLs at rest: AES-256-GCM under a key ring.
//!
//! The ring's first key encrypts; every key decrypts, so a new key can be put in
//! front, `keel admin rotate-key` re-encrypts the rows, and the old key is dropped
//! afterwards, all without downtime. The tenant and instance id are bound in as
//! associated data, so a ciphertext copied onto another row does not decrypt.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 12;

/// Why the key ring could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key ring setting does not parse.
    #[error("invalid encryption key ring: {0}")]
    InvalidKeyRing(String),
    /// A row was encrypted under a key id the ring does not have.
    #[error("no encryption key with id {0:?} in the key ring; add it back to KEEL_ENCRYPTION_KEYS")]
    UnknownKey(String),
    /// The ciphertext or its associated data was altered, or the key is wrong.
    #[error("ciphertext under key {0:?} does not decrypt: wrong key or tampered row")]
    Decrypt(String),
}

/// A sealed value and the id of the key that sealed it.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// Id of the encrypting key.
    pub key_id: String,
    /// Nonce followed by ciphertext and tag.
    pub bytes: Vec<u8>,
}

/// Encryption keys by id; the first one encrypts.
pub struct KeyRing {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

impl KeyRing {
    /// Parses `id:base64key[,id:base64key...]`; each key is 32 bytes of standard base64.
    pub fn parse(spec: &SecretString) -> Result<Self, CryptoError> {
        let mut keys = Vec::new();
        for entry in spec
            .expose_secret()
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (id, encoded) = entry.split_once(':').ok_or_else(|| {
                CryptoError::InvalidKeyRing(
                    "each entry must be <key-id>:<base64 of 32 bytes>".into(),
                )
            })?;
            if id.is_empty()
                || id.len() > 32
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(CryptoError::InvalidKeyRing(format!(
                    "key id {id:?} must be 1 to 32 letters, digits, '-' or '_'"
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| {
                    CryptoError::InvalidKeyRing(format!("key {id:?} is not valid base64"))
                })?;
            if bytes.len() != 32 {
                return Err(CryptoError::InvalidKeyRing(format!(
                    "key {id:?} is {} bytes; AES-256 needs 32 (generate one with: head -c 32 /dev/urandom | base64)",
                    bytes.len()
                )));
            }
            if keys.iter().any(|(existing, _)| existing == id) {
                return Err(CryptoError::InvalidKeyRing(format!(
                    "key id {id:?} appears twice"
                )));
            }
            keys.push((
                id.to_owned(),
                Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
            ));
        }
        if keys.is_empty() {
            return Err(CryptoError::InvalidKeyRing(
                "no keys; set KEEL_ENCRYPTION_KEYS=<key-id>:<base64 of 32 bytes>".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// A ring with one fresh random key, for tests and demos.
    pub fn generate(id: &str) -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self {
            keys: vec![(
                id.to_owned(),
                Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
            )],
        }
    }

    /// Id of the key that encrypts.
    pub fn primary_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Encrypts `plaintext` under the primary key, bound to `aad`.
    pub fn seal(&self, plaintext: &str, aad: &[u8]) -> Sealed {
        let (id, cipher) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad,
                },
            )
            // AES-GCM encryption fails only for inputs over 64 GiB, which validation rules out.
            .unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&ciphertext);
        Sealed {
            key_id: id.clone(),
            bytes,
        }
    }

    /// Decrypts a value sealed by [`KeyRing::seal`] with the same `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<SecretString, CryptoError> {
        let cipher = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .map(|(_, cipher)| cipher)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.bytes.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt(sealed.key_id.clone()));
        }
        let (nonce, ciphertext) = sealed.bytes.split_at(NONCE_LEN);
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt(sealed.key_id.clone()))?;
        String::from_utf8(plaintext)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Decrypt(sealed.key_id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Result<KeyRing, CryptoError> {
        KeyRing::parse(&SecretString::from(spec.to_owned()))
    }

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "HwAeAR0CHAMbBBoFGQYYBxcIFgkVChQLEwwSDREOEA8=";

    #[test]
    fn round_trip_and_rotation() {
        let old = ring(&format!("k1:{K1}")).expect("ring");
        let sealed = old.seal("postgres://app:pw@db/shop", b"t|id");
        assert_eq!(sealed.key_id, "k1");
        let rotated = ring(&format!("k2:{K2},k1:{K1}")).expect("ring");
        assert_eq!(rotated.primary_id(), "k2");
        let clear = rotated
            .open(&sealed, b"t|id")
            .expect("old key still decrypts");
        assert_eq!(clear.expose_secret(), "postgres://app:pw@db/shop");
        assert_eq!(rotated.seal("x", b"a").key_id, "k2");
    }

    #[test]
    fn associated_data_and_tampering_are_detected() {
        let keys = ring(&format!("k1:{K1}")).expect("ring");
        let mut sealed = keys.seal("secret", b"tenant-a|1");
        assert!(matches!(
            keys.open(&sealed, b"tenant-b|1"),
            Err(CryptoError::Decrypt(_))
        ));
        let last = sealed.bytes.len() - 1;
        sealed.bytes[last] ^= 1;
        assert!(matches!(
            keys.open(&sealed, b"tenant-a|1"),
            Err(CryptoError::Decrypt(_))
        ));
        let foreign = Sealed {
            key_id: "k9".into(),
            bytes: vec![0; 40],
        };
        assert!(matches!(
            keys.open(&foreign, b""),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn bad_key_rings_say_what_to_fix() {
        for (spec, needle) in [
            ("", "no keys"),
            ("k1", "<key-id>:<base64"),
            ("k1:!!!", "not valid base64"),
            ("k1:AAAA", "needs 32"),
            (&format!("k1:{K1},k1:{K2}"), "appears twice"),
            (&format!("bad id:{K1}"), "key id"),
        ] {
            let err = ring(spec).expect_err(spec).to_string();
            assert!(err.contains(needle), "{spec:?}: {err}");
            assert!(!err.contains(K1), "error leaks the key: {err}");
        }
    }

    #[test]
    fn debug_shows_ids_only() {
        let keys = ring(&format!("k1:{K1}")).expect("ring");
        let shown = format!("{keys:?}");
        assert!(shown.contains("k1") && !shown.contains(K1), "{shown}");
    }
}
