//! Fuzz target `policy_parser`: see [`mechwatch_fuzz::checks::policy_parser`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::checks::policy_parser(data));
