#![no_main]
// See fuzz/src/ring/mod.rs for the input format and the checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkmesh_fuzz::ring::run(data));
