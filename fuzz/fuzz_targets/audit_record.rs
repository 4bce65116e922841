//! Fuzz the audit-log parsers: records (in-toto statements), DSSE envelopes and signed-note
//! checkpoints. Arbitrary bytes must yield an error, never a panic, and never a verified
//! envelope or checkpoint under a key that did not sign it.
#![no_main]

use audit_log::checkpoint::Checkpoint;
use audit_log::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
use audit_log::record::Statement;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let _ = serde_json::from_slice::<Statement>(data);
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        let trusted = [("k".to_string(), key)];
        assert!(env.verify(&trusted, 1, &[IN_TOTO_PAYLOAD_TYPE]).is_err());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(Checkpoint::verify(text, "mechwatch", &key).is_err());
    }
});
