//! DSSE envelopes (Dead Simple Signing Envelope) with Ed25519 signatures.
//!
//! Signatures cover `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`,
//! with LEN the ASCII decimal byte length. Verification happens before the payload is parsed;
//! both standard and URL-safe base64 are accepted; the keyid is a hint, not signed.

use std::collections::BTreeSet;

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::LogError;

pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

/// Decode standard or URL-safe base64, padded or not.
pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let trimmed = s.trim_end_matches('=');
    let padded = format!("{trimmed}{}", "=".repeat((4 - trimmed.len() % 4) % 4));
    STANDARD
        .decode(&padded)
        .or_else(|_| URL_SAFE.decode(&padded))
        .ok()
}

impl Envelope {
    /// An envelope around `body` with one signature already computed over its PAE.
    pub fn new(payload_type: &str, body: &[u8], keyid: &str, sig: &Signature) -> Self {
        Self {
            payload: STANDARD.encode(body),
            payload_type: payload_type.to_string(),
            signatures: vec![EnvelopeSignature {
                keyid: Some(keyid.to_string()),
                sig: STANDARD.encode(sig.to_bytes()),
            }],
        }
    }

    /// Verify that at least `threshold` distinct trusted keys signed the PAE, and that the
    /// payload type is supported. Returns the payload bytes only then.
    pub fn verify(
        &self,
        trusted: &[(String, VerifyingKey)],
        threshold: usize,
        supported_types: &[&str],
    ) -> Result<Vec<u8>, LogError> {
        if threshold == 0 || !supported_types.contains(&self.payload_type.as_str()) {
            return Err(LogError::Signature);
        }
        let body = decode_b64(&self.payload).ok_or(LogError::Signature)?;
        let msg = pae(&self.payload_type, &body);
        let mut signers = BTreeSet::new();
        for s in &self.signatures {
            let Some(sig) = decode_b64(&s.sig)
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .map(|b| Signature::from_bytes(&b))
            else {
                continue;
            };
            for (i, (id, key)) in trusted.iter().enumerate() {
                if s.keyid.as_ref().is_some_and(|k| k != id) {
                    continue;
                }
                if key.verify(&msg, &sig).is_ok() {
                    signers.insert(i);
                    break;
                }
            }
        }
        if signers.len() >= threshold {
            Ok(body)
        } else {
            Err(LogError::Signature)
        }
    }
}
