//! Fuzz the checkpoint header parsers (safetensors and GGUF) with arbitrary bytes: they must
//! return an error or a validated header, never panic or allocate without bound.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input");
    if let Ok(f) = probes::safetensors::SafetensorsFile::parse(path, data.to_vec()) {
        for t in &f.tensors {
            assert!(t.end <= f.bytes().len());
        }
    }
    if let Ok(g) = probes::gguf::GgufFile::parse(path, data.to_vec()) {
        for t in &g.tensors {
            assert!(t.end <= g.bytes().len());
            let _ = g.load_f32(t);
        }
    }
});
