//! Fuzz target `record_reader`: see [`mechwatch_fuzz::checks::record_reader`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::record_reader(data));
