//! Fuzz target `npz`: see [`mechwatch_fuzz::checks::npz`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::npz(data));
