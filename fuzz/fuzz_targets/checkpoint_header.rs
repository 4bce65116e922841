//! Fuzz target `checkpoint_header`: see [`mechwatch_fuzz::checks::checkpoint_header`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::checkpoint_header(data));
