//! The DSSE protocol test vectors (secure-systems-lab/dsse `testvectors/vectors.json`,
//! RFC 8032 section 7.1 keys), transcribed as known answers.

use audit_log::dsse::{pae, Envelope, EnvelopeSignature};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

const SEED_A: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const PUB_A: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const SEED_B: &str = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";
const PUB_B: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const STATEMENT_B64: &str = "eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEifQ==";
const SIG_A: &str =
    "2WAfaHm5jluo0w+0rk8uVkluELJYWjSmU9x7EUzx+AyteDGJ4/nqyJXfmAUVFIAoQafWm7AxBZNw5M9ixNHiCA==";
const SIG_B: &str =
    "c1+67/aT0yqEpwx8PsVY3MLHsj9D0CZ014/Fv/QlG59P+9CobUZ7xECJ/V3USG0Ob9CiE5LjReEZUzNF2l7eBw==";
const PAE_STATEMENT: &str = "445353457631203238206170706c69636174696f6e2f766e642e696e2d746f746f2b6a736f6e203433207b225f74797065223a2268747470733a2f2f696e2d746f746f2e696f2f53746174656d656e742f7631227d";

struct Vector {
    id: &'static str,
    payload: &'static str,
    payload_type: &'static str,
    sigs: &'static [(Option<&'static str>, &'static str)],
    trusted: &'static [&'static str],
    threshold: usize,
    supported: &'static [&'static str],
    pae: &'static str,
    accept: bool,
}

const VECTORS: &[Vector] = &[
    Vector { id: "single-signature", payload: STATEMENT_B64, payload_type: IN_TOTO, sigs: &[(Some("A"), SIG_A)], trusted: &["A"], threshold: 1, supported: &[IN_TOTO], pae: PAE_STATEMENT, accept: true },
    Vector { id: "url-safe-base64", payload: "-_-_Pj8=", payload_type: IN_TOTO, sigs: &[(Some("A"), "P-_KHICeR7tI6S_YyejJTRtrXhcQyQ2LYPaL8h90KjC9qN8HU_svOQ6TuDOT1HIrsGW886DbWNWcCmX5twLrAw==")], trusted: &["A"], threshold: 1, supported: &[IN_TOTO], pae: "445353457631203238206170706c69636174696f6e2f766e642e696e2d746f746f2b6a736f6e203520fbffbf3e3f", accept: true },
    Vector { id: "payload-type-swapped", payload: STATEMENT_B64, payload_type: "application/vnd.example.other+json", sigs: &[(Some("A"), SIG_A)], trusted: &["A"], threshold: 1, supported: &[IN_TOTO, "application/vnd.example.other+json"], pae: PAE_STATEMENT, accept: false },
    Vector { id: "non-ascii-payload-type", payload: STATEMENT_B64, payload_type: "application/vnd.exämple+json", sigs: &[(Some("A"), "xmSk/ug66ysT7ayhkCIjhAq42zgZXSsEWuzUaNL7w2eGAdF/NU6/fRXPtmfN+5DNSAs5/i2lUnHjbbjPsu0tAw==")], trusted: &["A"], threshold: 1, supported: &["application/vnd.exämple+json"], pae: "445353457631203239206170706c69636174696f6e2f766e642e6578c3a46d706c652b6a736f6e203433207b225f74797065223a2268747470733a2f2f696e2d746f746f2e696f2f53746174656d656e742f7631227d", accept: true },
    Vector { id: "empty-payload", payload: "", payload_type: IN_TOTO, sigs: &[(Some("A"), "gSggCAaTLTYyRH6FIDBem6meyIynsYy8RTHVzwx9tnTb7Bg/1jMWnuVgI/gffqmbsC2VX5/jHfkkDqsj7CDbDg==")], trusted: &["A"], threshold: 1, supported: &[IN_TOTO], pae: "445353457631203238206170706c69636174696f6e2f766e642e696e2d746f746f2b6a736f6e203020", accept: true },
    Vector { id: "empty-payload-type", payload: STATEMENT_B64, payload_type: "", sigs: &[(Some("A"), "iC3q/+3Rm0+lpAJRueDmDh15PnwCfxKmS0NAfKsbv+zgulXQC/WM9trc+j1XEqlwDIg/vf/uNfebeD6sxInrDg==")], trusted: &["A"], threshold: 1, supported: &[IN_TOTO], pae: "445353457631203020203433207b225f74797065223a2268747470733a2f2f696e2d746f746f2e696f2f53746174656d656e742f7631227d", accept: false },
    Vector { id: "threshold-two-distinct-keys", payload: STATEMENT_B64, payload_type: IN_TOTO, sigs: &[(Some("A"), SIG_A), (Some("B"), SIG_B)], trusted: &["A", "B"], threshold: 2, supported: &[IN_TOTO], pae: PAE_STATEMENT, accept: true },
    Vector { id: "threshold-two-one-key-twice", payload: STATEMENT_B64, payload_type: IN_TOTO, sigs: &[(Some("A"), SIG_A), (Some("A"), SIG_A)], trusted: &["A", "B"], threshold: 2, supported: &[IN_TOTO], pae: PAE_STATEMENT, accept: false },
    Vector { id: "threshold-two-without-keyids", payload: STATEMENT_B64, payload_type: IN_TOTO, sigs: &[(None, SIG_A), (None, SIG_B)], trusted: &["A", "B"], threshold: 2, supported: &[IN_TOTO], pae: PAE_STATEMENT, accept: true },
];

fn key(name: &str) -> VerifyingKey {
    let hex_key = if name == "A" { PUB_A } else { PUB_B };
    VerifyingKey::from_bytes(&hex::decode(hex_key).unwrap().try_into().unwrap()).unwrap()
}

#[test]
fn every_dsse_test_vector_gives_the_expected_answer() {
    for v in VECTORS {
        let env = Envelope {
            payload: v.payload.into(),
            payload_type: v.payload_type.into(),
            signatures: v
                .sigs
                .iter()
                .map(|(k, s)| EnvelopeSignature {
                    keyid: k.map(str::to_string),
                    sig: s.to_string(),
                })
                .collect(),
        };
        let body = audit_log::dsse::decode_b64(v.payload).unwrap();
        // The PAE we compute is the one the vector's signatures cover (over the signed type).
        let signed_type = if v.id == "payload-type-swapped" {
            IN_TOTO
        } else {
            v.payload_type
        };
        assert_eq!(hex::encode(pae(signed_type, &body)), v.pae, "{}: PAE", v.id);
        let trusted: Vec<(String, VerifyingKey)> =
            v.trusted.iter().map(|k| (k.to_string(), key(k))).collect();
        let got = env.verify(&trusted, v.threshold, v.supported);
        assert_eq!(got.is_ok(), v.accept, "{}", v.id);
        if v.accept {
            assert_eq!(got.unwrap(), body);
        }
    }
}

#[test]
fn rfc8032_keys_produce_the_vector_signature() {
    let sk = SigningKey::from_bytes(&hex::decode(SEED_A).unwrap().try_into().unwrap());
    assert_eq!(hex::encode(sk.verifying_key().as_bytes()), PUB_A);
    let body = audit_log::dsse::decode_b64(STATEMENT_B64).unwrap();
    let sig = sk.sign(&pae(IN_TOTO, &body));
    assert_eq!(audit_log::dsse::decode_b64(SIG_A).unwrap(), sig.to_bytes());
    let sk_b = SigningKey::from_bytes(&hex::decode(SEED_B).unwrap().try_into().unwrap());
    assert_eq!(hex::encode(sk_b.verifying_key().as_bytes()), PUB_B);
}
