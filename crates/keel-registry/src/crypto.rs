//! Encryption of connection URLs at rest: AES-256-GCM under a key ring.
//!
//! The ring's first key encrypts; every key decrypts, so a new key can be put in
//! front, `keel admin rotate-key` re-encrypts the rows, and the old key is dropped
//! afterwards, all without downtime. The tenant and instance id are bound in as
//! associated data, so a ciphertext copied onto another row does not decrypt.
//!
//! A running process holds its ring through [`Keys`], which [`Keys::watch_file`] replaces whole
//! when the ring file changes: rotation never needs a restart.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest as _, Sha256};

const NONCE_LEN: usize = 12;

/// How often [`Keys::watch_file`] re-reads the ring file, as the TLS files are: by content, so a
/// Kubernetes Secret update (a symlink swapped to a new directory) is seen too.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Why the key ring could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key ring setting does not parse.
    #[error("invalid encryption key ring: {0}")]
    InvalidKeyRing(String),
    /// A row was encrypted under a key id the ring does not have.
    #[error(
        "credentials are encrypted under key {0:?}, which is not in this key ring: add key {0} to KEEL_ENCRYPTION_KEYS_FILE on every server"
    )]
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
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish()
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

    /// Ids of every key, the encrypting one first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
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

/// The key ring a process uses now: cheap to clone, every clone sees the same ring, and the ring
/// is replaced whole, so one operation takes one ring ([`Keys::current`]) and never mixes two.
#[derive(Clone)]
pub struct Keys {
    current: Arc<RwLock<Arc<KeyRing>>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().fmt(f)
    }
}

impl From<KeyRing> for Keys {
    fn from(ring: KeyRing) -> Self {
        Self::from(Arc::new(ring))
    }
}

impl From<Arc<KeyRing>> for Keys {
    fn from(ring: Arc<KeyRing>) -> Self {
        Self {
            current: Arc::new(RwLock::new(ring)),
        }
    }
}

impl Keys {
    /// The ring in use now.
    pub fn current(&self) -> Arc<KeyRing> {
        // The ring is swapped whole, so a panic elsewhere cannot leave it half-written.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the ring for every clone; operations already running finish with the old one.
    pub fn replace(&self, ring: KeyRing) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
    }

    /// Re-reads the ring file at `path` every 2 s until `stop` resolves, and replaces the ring
    /// when the file's contents changed and parse. A file that cannot be read or parsed keeps the
    /// ring in use, with one warning per distinct problem (which never quotes key material).
    pub async fn watch_file(self, path: PathBuf, stop: impl Future<Output = ()>) {
        self.watch_file_every(path, RELOAD_INTERVAL, stop).await;
    }

    async fn watch_file_every(
        self,
        path: PathBuf,
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        // The ring in use came from this file (or from the environment): a digest of what was
        // read, so the secret itself is not kept around just to notice a change.
        let mut seen: Option<[u8; 32]> = None;
        let mut last_problem: Option<String> = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let spec = match tokio::fs::read(&path).await.map(String::from_utf8) {
                Ok(Ok(text)) => SecretString::from(text),
                Ok(Err(_)) => {
                    self.warn_once(&mut last_problem, &path, "the file is not UTF-8".into());
                    continue;
                }
                Err(error) => {
                    self.warn_once(&mut last_problem, &path, error.to_string());
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(spec.expose_secret().as_bytes()).into();
            if seen == Some(digest) {
                continue;
            }
            let first_read = seen.is_none();
            // Remembered even when it fails: the same broken file is not warned about every
            // tick; the next change is read again.
            seen = Some(digest);
            match KeyRing::parse(&spec) {
                Ok(ring) => {
                    last_problem = None;
                    let before = self.current();
                    if first_read && before.key_ids() == ring.key_ids() {
                        // Most likely the very file the ring was built from at start.
                        self.replace(ring);
                        continue;
                    }
                    tracing::info!(
                        file = %path.display(),
                        key_ids = ?ring.key_ids(),
                        primary = ring.primary_id(),
                        "encryption key ring reloaded"
                    );
                    self.replace(ring);
                }
                Err(error) => self.warn_once(&mut last_problem, &path, error.to_string()),
            }
        }
    }

    fn warn_once(&self, last: &mut Option<String>, path: &std::path::Path, problem: String) {
        if last.as_deref() != Some(problem.as_str()) {
            tracing::warn!(
                file = %path.display(),
                error = %problem,
                key_ids = ?self.current().key_ids(),
                "cannot reload the encryption key ring; still using the previous one"
            );
            *last = Some(problem);
        }
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

    /// Waits (bounded) until the handle's primary key is `primary`.
    async fn wait_primary(keys: &Keys, primary: &str) {
        for _ in 0..200 {
            if keys.current().primary_id() == primary {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "primary is {:?}, not {primary:?}",
            keys.current().primary_id()
        );
    }

    #[tokio::test]
    async fn a_changed_ring_file_is_picked_up_and_a_bad_one_keeps_the_old_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("k1:{K1}\n")).expect("write");
        let keys = Keys::from(ring(&format!("k1:{K1}")).expect("ring"));
        let sealed_k1 = keys.current().seal("postgres://app:pw@db/shop", b"aad");
        let stop = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(keys.clone().watch_file_every(
            path.clone(),
            Duration::from_millis(20),
            stop.clone().cancelled_owned(),
        ));

        // The new key first, the old one kept: rows under either decrypt.
        std::fs::write(&path, format!("k2:{K2}\nk1:{K1}\n")).expect("write");
        wait_primary(&keys, "k2").await;
        assert_eq!(keys.current().key_ids(), ["k2", "k1"]);
        assert!(keys.current().open(&sealed_k1, b"aad").is_ok());

        // Broken files (bad base64, missing, empty) keep the ring in use.
        for broken in [Some("k3:!!!"), None, Some("")] {
            match broken {
                Some(text) => std::fs::write(&path, text).expect("write"),
                None => std::fs::remove_file(&path).expect("remove"),
            }
            tokio::time::sleep(Duration::from_millis(120)).await;
            assert_eq!(keys.current().key_ids(), ["k2", "k1"], "after {broken:?}");
        }

        // The next good file is applied again.
        std::fs::write(&path, format!("k1:{K1}")).expect("write");
        wait_primary(&keys, "k1").await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("watcher stops when told")
            .expect("watcher task");
    }

    #[test]
    fn unknown_key_names_the_id_and_the_fix() {
        let message = CryptoError::UnknownKey("k2".into()).to_string();
        assert!(
            message.contains("add key k2 to KEEL_ENCRYPTION_KEYS_FILE on every server"),
            "{message}"
        );
    }
}
