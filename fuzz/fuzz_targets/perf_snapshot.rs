#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mozaiks_fuzz::perf_snapshot(data));
