//! Fuzz the policy parser and validator: arbitrary text must give a policy or errors whose
//! locations lie inside the text, never a panic. Paths resolve inside a fixed folder that
//! holds one prompt file, so references to files are exercised too.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mechwatch-fuzz-policy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("prompts")).unwrap();
        std::fs::write(dir.join("prompts/a.txt"), "one\ntwo\n").unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = folder().join("policy.toml");
    if let Err(errors) = policies::Policy::parse(&path, text, "0") {
        assert!(!errors.is_empty());
        let lines = text.split('\n').count();
        for e in errors {
            if let Some(at) = e.at {
                assert!(at.line >= 1 && at.line <= lines && at.col >= 1, "{e}");
            }
            let _ = e.to_string();
        }
    }
});
