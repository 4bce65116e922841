//! Fuzz target `gguf_metadata`: see [`mechwatch_fuzz::checks::gguf_metadata`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::gguf_metadata(data));
