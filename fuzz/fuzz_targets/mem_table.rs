#![no_main]
// See fuzz/src/memtable.rs for the input format and the checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkmesh_fuzz::memtable::run(data));
