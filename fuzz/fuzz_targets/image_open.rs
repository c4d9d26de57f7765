#![no_main]
// See fuzz/src/image.rs for the input format and the checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkmesh_fuzz::image::run(data));
