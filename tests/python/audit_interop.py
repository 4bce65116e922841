"""Reference tools read mechwatch's audit keys and attestations (tests/tests/audit_interop.rs).

  keys PRIVATE PUBLIC EXPORT   Python `cryptography` loads our PKCS#8 private key and SPKI
                               public key, they match, and every DSSE signature in EXPORT
                               verifies over its PAE.
  attestation EXPORT           the in-toto reference bindings (`in-toto-attestation`) parse
                               every exported payload as a Statement v1 and validate it.

Prints one `ok ...` line; exits non-zero with the reason otherwise.
"""

import base64
import json
import sys


def envelopes(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pae(payload_type, body):
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def keys(private_path, public_path, export_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with open(private_path, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    with open(public_path, "rb") as f:
        public = serialization.load_pem_public_key(f.read())
    assert isinstance(private, Ed25519PrivateKey), type(private)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert private.public_key().public_bytes(*raw) == public.public_bytes(*raw)
    n = 0
    for env in envelopes(export_path):
        body = base64.b64decode(env["payload"])
        sig = base64.b64decode(env["signatures"][0]["sig"])
        public.verify(sig, pae(env["payloadType"], body))  # raises InvalidSignature
        n += 1
    print(f"ok keys: {n} signatures verified")


def attestation(export_path):
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    n = 0
    for env in envelopes(export_path):
        body = base64.b64decode(env["payload"]).decode()
        pb = json_format.Parse(body, statement_pb2.Statement())  # unknown fields are errors
        Statement.copy_from_pb(pb).validate()
        for s in pb.subject:
            assert s.name and len(s.digest["sha256"]) == 64, s
        n += 1
    print(f"ok attestation: {n} statements")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"keys": keys, "attestation": attestation}[cmd](*args)
