//! Fuzz target `audit_record`: see [`mechwatch_fuzz::checks::audit_record`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::audit_record(data));
