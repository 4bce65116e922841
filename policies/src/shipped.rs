//! The policies shipped for the default model, embedded in the binary so that an installed
//! `mechwatch` carries them. `--policy default` writes them (once, under a folder named by
//! their digest) into `$MECHWATCH_HOME/policies/` and reads them from there like any other.

use std::path::PathBuf;

use probes::digest::sha256_hex;

/// `(path inside the policy folder, contents)`.
pub const FILES: &[(&str, &str)] = &[
    (
        "capability-cost.toml",
        include_str!("../shipped/capability-cost.toml"),
    ),
    (
        "harmful-recognition.toml",
        include_str!("../shipped/harmful-recognition.toml"),
    ),
    (
        "refusal-integrity.toml",
        include_str!("../shipped/refusal-integrity.toml"),
    ),
    (
        "prompts/harmful.txt",
        include_str!("../shipped/prompts/harmful.txt"),
    ),
    (
        "prompts/harmless.txt",
        include_str!("../shipped/prompts/harmless.txt"),
    ),
];

/// The folder holding the shipped policies, written if it is not there yet.
pub fn materialize() -> std::io::Result<PathBuf> {
    let mut all = String::new();
    for (path, text) in FILES {
        all.push_str(path);
        all.push('\0');
        all.push_str(&sha256_hex(text.as_bytes()));
        all.push('\0');
    }
    let dir = probes::fetch::home()
        .join("policies")
        .join(format!("shipped-{}", &sha256_hex(all.as_bytes())[..16]));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    for (path, text) in FILES {
        let p = tmp.join(path);
        std::fs::create_dir_all(p.parent().unwrap_or(&tmp))?;
        std::fs::write(p, text)?;
    }
    std::fs::write(tmp.join(".complete"), "")?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race; its copy is identical.
        Err(_) if dir.join(".complete").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
