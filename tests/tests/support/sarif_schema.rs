//! The SARIF 2.1.0 JSON schema, for the tests that validate mechwatch's SARIF reports.

use std::path::Path;

/// The SARIF 2.1.0 JSON schema (OASIS), as shipped inside the `serde-sarif` crate's sources.
pub fn sarif_schema() -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let o = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "serde-sarif")
        .expect("serde-sarif in the dependency graph")["manifest_path"]
        .as_str()
        .unwrap()
        .to_string();
    let path = Path::new(&manifest)
        .parent()
        .unwrap()
        .join("src/schema.json");
    // The published schema's `run.language` pattern has a stray `]` that Rust's regex engines
    // reject when compiling the schema; mechwatch never emits `language`, so that one pattern
    // is replaced by what it means.
    let text = std::fs::read_to_string(path).unwrap().replace(
        "^[a-zA-Z]{2}|^[a-zA-Z]{2}-[a-zA-Z]{2}]?$",
        "^[a-zA-Z]{2}(-[a-zA-Z]{2})?$",
    );
    serde_json::from_str(&text).unwrap()
}
