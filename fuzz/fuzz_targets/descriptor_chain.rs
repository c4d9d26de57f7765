#![no_main]
// See fuzz/src/chain.rs for the input format and the checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkmesh_fuzz::chain::run(data));
