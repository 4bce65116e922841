//! Fuzz target `daemon_config`: see [`mechwatch_fuzz::daemon_config::daemon_config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mechwatch_fuzz::daemon_config::daemon_config(data));
