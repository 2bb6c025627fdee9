//! The key format: `keel_` + URL-safe base64 (no padding) of 30 random bytes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "keel_";
const RANDOM_BYTES: usize = 30;
/// 30 bytes encode to exactly 40 base64 characters, so there is no padding to strip.
const RANDOM_CHARS: usize = RANDOM_BYTES * 4 / 3;
/// Length of every Keel key.
pub(crate) const KEY_LEN: usize = PREFIX.len() + RANDOM_CHARS;
/// How much of a key is stored in clear to identify it in listings.
pub(crate) const DISPLAY_PREFIX_LEN: usize = 12;

/// SHA-256 of the whole key string. A plain hash suffices (no salt, no slow KDF)
/// because keys carry 240 random bits: there is no dictionary to attack.
pub(crate) type KeyHash = [u8; 32];

pub(crate) fn generate() -> SecretString {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut key);
    SecretString::from(key)
}

/// Whether `key` has the shape of a Keel key; cheap, so garbage never reaches the database.
pub(crate) fn is_well_formed(key: &str) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(PREFIX)
        && key[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(crate) fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// The clear part shown in listings and logs; callers pass only well-formed keys,
/// which are ASCII, so slicing cannot split a character.
pub(crate) fn display_prefix(key: &str) -> &str {
    key.get(..DISPLAY_PREFIX_LEN).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(a.expose_secret()), "{}", a.expose_secret());
        assert!(is_well_formed(b.expose_secret()));
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(display_prefix(a.expose_secret()).len(), 12);
    }

    #[test]
    fn malformed_keys_are_recognised() {
        let good = format!("keel_{}", "A".repeat(40));
        assert!(is_well_formed(&good));
        for bad in [
            String::new(),
            "keel_".to_owned(),
            format!("keel_{}", "A".repeat(39)),
            format!("keel_{}", "A".repeat(41)),
            format!("KEEL_{}", "A".repeat(40)),
            format!("kee1_{}", "A".repeat(40)),
            format!("keel_{}=", "A".repeat(39)),
            format!("keel_{}é", "A".repeat(38)),
            format!("keel_{} ", "A".repeat(39)),
        ] {
            assert!(!is_well_formed(&bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        // echo -n abc | sha256sum
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let got: String = hash("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, expected);
    }
}
