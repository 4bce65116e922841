//! The audit log read by the tools reviewers already have (issue 23, items 7 and 8): OpenSSL
//! loads our keys and checks our signatures (and we check its); Go's `golang.org/x/mod/sumdb/note`
//! verifies our checkpoints and `sumdb/tlog` recomputes their Merkle roots from an export;
//! exported statements are in-toto Statement v1 whose subjects `sha256sum -c` matches to the
//! checkpoint's files; an export verifies without the database.
//!
//! OpenSSL and Go (`golang-go`, `golang-golang-x-mod-dev`) are installed by `scripts/test-all`.
//! The Python checks (`cryptography`, `in-toto-attestation`) run with the interpreter that
//! `$MECHWATCH_SAELENS_PYTHON` names, where it has those modules, and say so when skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use audit_log::dsse::{decode_b64, pae, Envelope, IN_TOTO_PAYLOAD_TYPE};
use base64::Engine;
use e2e::*;

const PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/audit_interop.py");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} ({e}); scripts/test-all installs it"))
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn generate(dir: &Path, name: &str) -> (PathBuf, PathBuf, Output) {
    let key = dir.join(name);
    let o = mechwatch(&["key", "generate", "--out", s(&key)]);
    ok(&o, "key generate");
    (
        key.clone(),
        PathBuf::from(format!("{}.pub", key.display())),
        o,
    )
}

fn append(db: &Path, key: &Path, n: u64) {
    let o = mechwatch(&[
        "log",
        "stress-append",
        "--db",
        s(db),
        "--key",
        s(key),
        "--count",
        &n.to_string(),
    ]);
    ok(&o, "stress-append");
}

fn export(db: &Path, out: &Path, seq: Option<u64>) {
    let mut args = vec!["log", "export", "--db", s(db), "--format", "dsse"];
    let seq = seq.map(|n| n.to_string());
    if let Some(n) = &seq {
        args.extend(["--seq", n]);
    }
    args.extend(["--out", s(out)]);
    ok(&mechwatch(&args), "log export");
}

fn checkpoint(db: &Path, key: &Path, out: &Path) {
    ok(
        &mechwatch(&[
            "log",
            "checkpoint",
            "--db",
            s(db),
            "--key",
            s(key),
            "--out",
            s(out),
        ]),
        "log checkpoint",
    );
}

/// The interpreter `$MECHWATCH_SAELENS_PYTHON` names, if it can import `module`.
fn python_with(module: &str) -> Option<String> {
    let py = std::env::var("MECHWATCH_SAELENS_PYTHON").ok()?;
    let has = Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("skipping the Python `{module}` check: {py} cannot import it");
    }
    has.then_some(py)
}

#[test]
fn regression_openssl_rejects_the_keys_mechwatch_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, public, o) = generate(dir, "signing.pem");
    assert!(
        stderr(&o).contains("checkpoint note verifier key: mechwatch+"),
        "{}",
        stderr(&o)
    );
    ok(
        &run("openssl", &["pkey", "-in", s(&key), "-noout"]),
        "openssl pkey -in private",
    );
    ok(
        &run("openssl", &["pkey", "-pubin", "-in", s(&public), "-noout"]),
        "openssl pkey -pubin",
    );
    // OpenSSL, `key public` and `key generate` agree on the public key.
    let pem = std::fs::read_to_string(&public).unwrap();
    let o = run("openssl", &["pkey", "-in", s(&key), "-pubout"]);
    ok(&o, "openssl pkey -pubout");
    assert_eq!(stdout(&o), pem);
    let o = mechwatch(&["key", "public", "--key", s(&key)]);
    ok(&o, "key public");
    assert_eq!(stdout(&o), pem);
    let rederived = dir.join("rederived.pub");
    ok(
        &mechwatch(&["key", "public", "--key", s(&key), "--out", s(&rederived)]),
        "key public --out",
    );
    assert_eq!(std::fs::read_to_string(&rederived).unwrap(), pem);

    // OpenSSL signs a DSSE PAE with our private key; our DSSE verifier accepts it.
    let body = br#"{"_type":"https://in-toto.io/Statement/v1"}"#;
    let msg = dir.join("pae.bin");
    std::fs::write(&msg, pae(IN_TOTO_PAYLOAD_TYPE, body)).unwrap();
    let sig = dir.join("openssl.sig");
    ok(
        &run(
            "openssl",
            &[
                "pkeyutl",
                "-sign",
                "-inkey",
                s(&key),
                "-rawin",
                "-in",
                s(&msg),
                "-out",
                s(&sig),
            ],
        ),
        "openssl pkeyutl -sign",
    );
    let vk = audit_log::keys::load_public(&public).unwrap();
    let trusted = [(audit_log::keys::key_id(&vk), vk)];
    let sig_bytes = std::fs::read(&sig).unwrap();
    let mut env = Envelope::new(
        IN_TOTO_PAYLOAD_TYPE,
        body,
        &trusted[0].0,
        &ed25519_dalek_signature(&sig_bytes),
    );
    assert_eq!(
        env.verify(&trusted, 1, &[IN_TOTO_PAYLOAD_TYPE]).unwrap(),
        body
    );
    env.payload = base64::engine::general_purpose::STANDARD.encode(b"{}");
    assert!(env.verify(&trusted, 1, &[IN_TOTO_PAYLOAD_TYPE]).is_err());

    // We sign (a record, exported alone with --seq); `openssl pkeyutl -verify -rawin` accepts.
    let db = dir.join("audit.db");
    append(&db, &key, 2);
    let one = dir.join("one.json");
    export(&db, &one, Some(1));
    let env: Envelope = serde_json::from_str(&std::fs::read_to_string(&one).unwrap()).unwrap();
    let body = decode_b64(&env.payload).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st["predicate"]["log"]["seq"], 1);
    std::fs::write(&msg, pae(&env.payload_type, &body)).unwrap();
    std::fs::write(&sig, decode_b64(&env.signatures[0].sig).unwrap()).unwrap();
    let o = run(
        "openssl",
        &[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            s(&public),
            "-rawin",
            "-in",
            s(&msg),
            "-sigfile",
            s(&sig),
        ],
    );
    ok(&o, "openssl pkeyutl -verify");
    assert!(stdout(&o).contains("Signature Verified Successfully"));

    // A key OpenSSL generated signs the log, and its OpenSSL-derived public key verifies it.
    let ossl_key = dir.join("openssl.pem");
    ok(
        &run(
            "openssl",
            &["genpkey", "-algorithm", "ed25519", "-out", s(&ossl_key)],
        ),
        "openssl genpkey",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ossl_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ossl_pub = dir.join("openssl.pub");
    ok(
        &run(
            "openssl",
            &["pkey", "-in", s(&ossl_key), "-pubout", "-out", s(&ossl_pub)],
        ),
        "openssl pkey -pubout",
    );
    let db2 = dir.join("openssl.db");
    append(&db2, &ossl_key, 3);
    let o = mechwatch(&["log", "verify", "--db", s(&db2), "--pubkey", s(&ossl_pub)]);
    ok(&o, "log verify with an OpenSSL key");

    // Python `cryptography` loads both files and checks the exported signatures.
    if let Some(py) = python_with("cryptography") {
        let all = dir.join("all.jsonl");
        export(&db, &all, None);
        let o = run(&py, &[PY, "keys", s(&key), s(&public), s(&all)]);
        ok(&o, "python cryptography");
        assert!(stdout(&o).contains("ok keys: 2 signatures verified"));
    }
}

fn ed25519_dalek_signature(b: &[u8]) -> audit_log::keys::Signature {
    audit_log::keys::Signature::from_bytes(&b.try_into().expect("64-byte signature"))
}

#[test]
fn a_key_that_is_missing_or_of_the_wrong_kind_says_what_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, public, _) = generate(dir, "signing.pem");
    let db = dir.join("audit.db");
    append(&db, &key, 1);
    let missing = dir.join("missing.pem");
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["log", "verify", "--db", s(&db), "--pubkey", s(&missing)],
            "missing.pem: no such key file",
        ),
        (
            vec!["log", "verify", "--db", s(&db), "--pubkey", s(&key)],
            "this is a private key, but a public key is expected here",
        ),
        (
            vec!["log", "stress-append", "--db", s(&db), "--key", s(&public)],
            "this is a public key, but a private (signing) key is needed here",
        ),
        (
            vec!["key", "public", "--key", s(&missing)],
            "missing.pem: no such key file; create a signing key with `mechwatch key generate",
        ),
        (
            vec!["key", "public", "--pubkey", s(&key), "--note-verifier"],
            "this is a private key",
        ),
    ];
    for (args, want) in cases {
        let o = mechwatch(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        let secret = std::fs::read_to_string(&key).unwrap();
        assert!(!stderr(&o).contains(secret.lines().nth(1).unwrap()));
    }
}

const GO_VERIFIER: &str = r#"// Verifies a mechwatch checkpoint with golang.org/x/mod/sumdb/note and recomputes its
// root from a DSSE export with golang.org/x/mod/sumdb/tlog (RFC 6962 hashing).
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func die(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}

func main() {
	verifier, err := note.NewVerifier(os.Args[1])
	if err != nil {
		die("verifier key", err)
	}
	msg, err := os.ReadFile(os.Args[2])
	if err != nil {
		die("checkpoint", err)
	}
	n, err := note.Open(msg, note.VerifierList(verifier))
	if err != nil {
		die("note.Open", err)
	}
	lines := strings.Split(n.Text, "\n")
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		die("size", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		die("root", err)
	}
	f, err := os.Open(os.Args[3])
	if err != nil {
		die("export", err)
	}
	var hashes []tlog.Hash
	reader := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			out[i] = hashes[x]
		}
		return out, nil
	})
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<26)
	var count int64
	for count < size && sc.Scan() {
		var env struct {
			Payload string `json:"payload"`
		}
		if err := json.Unmarshal(sc.Bytes(), &env); err != nil {
			die("envelope", err)
		}
		data, err := base64.StdEncoding.DecodeString(env.Payload)
		if err != nil {
			die("payload", err)
		}
		h, err := tlog.StoredHashes(count, data, reader)
		if err != nil {
			die("hashes", err)
		}
		hashes = append(hashes, h...)
		count++
	}
	got, err := tlog.TreeHash(count, reader)
	if err != nil {
		die("tree hash", err)
	}
	if count != size || got != root {
		die("root", fmt.Errorf("%d records hash to %x, the checkpoint says %d, %x", count, got, size, root))
	}
	fmt.Printf("verified by %s: origin %s size %d root %s\n", n.Sigs[0].Name, lines[0], size, hex.EncodeToString(root[:]))
}
"#;

#[test]
fn checkpoints_verify_with_go_sumdb_note_and_tlog() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, public, gen) = generate(dir, "signing.pem");
    let db = dir.join("audit.db");
    append(&db, &key, 11);
    let cp = dir.join("checkpoint.txt");
    checkpoint(&db, &key, &cp);
    append(&db, &key, 2);
    let all = dir.join("all.jsonl");
    export(&db, &all, None);

    let o = mechwatch(&["key", "public", "--pubkey", s(&public), "--note-verifier"]);
    ok(&o, "key public --note-verifier");
    let vkey = stdout(&o).trim().to_string();
    assert!(
        stderr(&gen).contains(&vkey),
        "key generate printed another verifier key: {}",
        stderr(&gen)
    );
    let o = mechwatch(&["key", "public", "--key", s(&key), "--note-verifier"]);
    assert_eq!(stdout(&o).trim(), vkey);

    // Build offline against Debian's golang-golang-x-mod-dev in GOPATH mode.
    let src = dir.join("verify.go");
    std::fs::write(&src, GO_VERIFIER).unwrap();
    let bin = dir.join("verify-checkpoint");
    let o = Command::new("go")
        .args(["build", "-o", s(&bin), s(&src)])
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("gocache"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .output()
        .expect("go is installed by scripts/test-all (golang-go, golang-golang-x-mod-dev)");
    ok(&o, "go build");

    let go = |vkey: &str, cp: &Path| run(s(&bin), &[vkey, s(cp), s(&all)]);
    let o = go(&vkey, &cp);
    ok(&o, "Go verifies the checkpoint");
    let ours = mechwatch(&[
        "log",
        "verify",
        "--export",
        s(&all),
        "--checkpoint",
        s(&cp),
        "--pubkey",
        s(&public),
    ]);
    ok(&ours, "log verify --export");
    let root = stdout(&ours)
        .split("(root ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap()
        .to_string();
    assert!(
        stdout(&o).starts_with("verified by mechwatch: origin mechwatch/")
            && stdout(&o).contains(&format!("size 11 root {root}")),
        "{}",
        stdout(&o)
    );

    // Go refuses a changed body and another key.
    let note = std::fs::read_to_string(&cp).unwrap();
    let forged = dir.join("forged.txt");
    std::fs::write(&forged, note.replacen("\n11\n", "\n10\n", 1)).unwrap();
    assert!(!go(&vkey, &forged).status.success());
    let (_, other_pub, _) = generate(dir, "other.pem");
    let o = mechwatch(&[
        "key",
        "public",
        "--pubkey",
        s(&other_pub),
        "--note-verifier",
    ]);
    assert!(!go(stdout(&o).trim(), &cp).status.success());
}

/// The in-toto Statement v1 and ResourceDescriptor shapes (in-toto/attestation `spec/v1`),
/// written out by hand as a JSON schema: the reference bindings are Python, checked below when
/// available.
fn statement_schema() -> serde_json::Value {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["_type", "subject", "predicateType"],
        "additionalProperties": false,
        "properties": {
            "_type": { "const": "https://in-toto.io/Statement/v1" },
            "subject": { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/subject" } },
            "predicateType": { "type": "string", "pattern": "^[a-z][a-z0-9+.-]*:[^ ]+$" },
            "predicate": { "type": "object" }
        },
        "$defs": {
            "subject": {
                "type": "object",
                "required": ["name", "digest"],
                "additionalProperties": false,
                "properties": {
                    "name": { "type": "string", "minLength": 1 },
                    "uri": { "type": "string" },
                    "digest": {
                        "type": "object",
                        "minProperties": 1,
                        "properties": { "sha256": { "type": "string", "pattern": "^[0-9a-f]{64}$" } },
                        "additionalProperties": { "type": "string", "pattern": "^[0-9a-f]+$" }
                    },
                    "content": { "type": "string" },
                    "downloadLocation": { "type": "string" },
                    "mediaType": { "type": "string" },
                    "annotations": { "type": "object" }
                }
            }
        }
    })
}

#[test]
fn regression_record_subjects_name_a_host_path_not_the_files() {
    let model = default_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, _, _) = generate(dir, "signing.pem");
    let db = dir.join("audit.db");
    // The real `check` path hashes the checkpoint, then fails on the policy: an error record
    // whose subjects are the checkpoint's files. The same `model_subject` feeds audit records.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "not toml [").unwrap();
    let o = mechwatch(&[
        "check",
        "--model",
        s(&model),
        "--policy",
        s(&bad),
        "--log",
        s(&db),
        "--key",
        s(&key),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    append(&db, &key, 1); // an error record without a model, for the schema check
    let all = dir.join("all.jsonl");
    export(&db, &all, None);
    let validator = jsonschema::validator_for(&statement_schema()).unwrap();
    let mut statements = Vec::new();
    for line in std::fs::read_to_string(&all).unwrap().lines() {
        let env: Envelope = serde_json::from_str(line).unwrap();
        let st: serde_json::Value =
            serde_json::from_slice(&decode_b64(&env.payload).unwrap()).unwrap();
        let errors: Vec<String> = validator.iter_errors(&st).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{st}");
        statements.push(st);
    }
    let subjects = statements[0]["subject"].as_array().unwrap();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    let name = model.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        subjects[0]["name"], name,
        "a relative name, not a host path"
    );
    assert_eq!(
        subjects[0]["annotations"]["checkpoint_root_sha256"],
        statements[0]["predicate"]["record"]["model"]["root_sha256"]
    );

    // `sha256sum -c` matches the subjects to the artifact, and not to other bytes.
    let sums = dir.join("SHA256SUMS");
    let listing: String = subjects
        .iter()
        .map(|s| {
            format!(
                "{}  {}\n",
                s["digest"]["sha256"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            )
        })
        .collect();
    std::fs::write(&sums, listing).unwrap();
    let check = |cwd: &Path| {
        Command::new("sha256sum")
            .args(["-c", s(&sums)])
            .current_dir(cwd)
            .output()
            .unwrap()
    };
    ok(&check(model.parent().unwrap()), "sha256sum -c on the model");
    let fake = dir.join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join(name), b"other bytes").unwrap();
    assert!(!check(&fake).status.success());

    if let Some(py) = python_with("in_toto_attestation") {
        let o = run(&py, &[PY, "attestation", s(&all)]);
        ok(&o, "in-toto-attestation");
        assert!(stdout(&o).contains("ok attestation: 2 statements"));
    }
}

fn verify_export(export: &Path, cp: &Path, public: &Path) -> Output {
    mechwatch(&[
        "log",
        "verify",
        "--export",
        s(export),
        "--checkpoint",
        s(cp),
        "--pubkey",
        s(public),
    ])
}

#[test]
fn an_export_verifies_without_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, public, _) = generate(dir, "signing.pem");
    let (new_key, _, _) = generate(dir, "new.pem");
    let db = dir.join("audit.db");
    append(&db, &key, 3);
    ok(
        &mechwatch(&[
            "key",
            "rotate",
            "--db",
            s(&db),
            "--key",
            s(&key),
            "--new-key",
            s(&new_key),
        ]),
        "key rotate",
    );
    append(&db, &new_key, 2);
    let cp = dir.join("checkpoint.txt");
    checkpoint(&db, &new_key, &cp);
    append(&db, &new_key, 1);
    let all = dir.join("all.jsonl");
    export(&db, &all, None);
    let one = dir.join("five.json");
    export(&db, &one, Some(5));
    let lines: Vec<String> = std::fs::read_to_string(&all)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(std::fs::read_to_string(&one).unwrap().trim(), lines[5]);
    // No database from here on.
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("audit.db") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }

    let o = verify_export(&all, &cp, &public);
    ok(&o, "verify --export");
    assert!(
        stdout(&o).starts_with("ok: 7 exported records")
            && stdout(&o).contains("the first 6 match the checkpoint")
            && stdout(&o).contains("1 later records")
            && stdout(&o).contains(" -> "),
        "{}",
        stdout(&o)
    );

    let variant = |name: &str, lines: &[String]| {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        verify_export(&p, &cp, &public)
    };
    let fails = |o: Output, want: &str| {
        assert_eq!(o.status.code(), Some(1), "{want}: {}", stdout(&o));
        assert!(stdout(&o).contains(want), "{want}: {}", stdout(&o));
    };
    fails(
        variant("truncated.jsonl", &lines[..4]),
        "records are missing",
    );
    let mut gap = lines.clone();
    gap.remove(2);
    fails(variant("gap.jsonl", &gap), "seq 2: ");
    let mut swapped = lines.clone();
    swapped.swap(0, 1);
    fails(variant("swapped.jsonl", &swapped), "seq 0: ");
    // A payload changed by one byte: the signature no longer covers it.
    let mut changed = lines.clone();
    let mut env: Envelope = serde_json::from_str(&changed[1]).unwrap();
    let body = String::from_utf8(decode_b64(&env.payload).unwrap())
        .unwrap()
        .replace("stress record 1", "stress record X");
    env.payload = base64::engine::general_purpose::STANDARD.encode(body);
    changed[1] = serde_json::to_string(&env).unwrap();
    fails(variant("changed.jsonl", &changed), "seq 1: bad signature");
    let mut garbage = lines.clone();
    garbage[3] = "{not json".into();
    fails(variant("garbage.jsonl", &garbage), "seq 3: malformed");
    // A checkpoint of another log, and one signed by a stranger.
    let (other_key, _, _) = generate(dir, "other.pem");
    let other_db = dir.join("other.db");
    append(&other_db, &other_key, 6);
    let other_cp = dir.join("other-checkpoint.txt");
    checkpoint(&other_db, &other_key, &other_cp);
    let o = verify_export(&all, &other_cp, &public);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("does not verify with any key of this log"));

    // Files that are not there: could not check (2), not tampered.
    let o = verify_export(&dir.join("nope.jsonl"), &cp, &public);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("nope.jsonl"), "{}", stderr(&o));
}
