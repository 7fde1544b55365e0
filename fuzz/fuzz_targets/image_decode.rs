//! Image decoding under the daemon's limits (small ones here, so a bomb is
//! refused from its header): JPEG through libjpeg-turbo (scripts/fuzz.sh
//! builds it with AddressSanitizer and libFuzzer's coverage), PNG through the
//! image crate, both turned by their orientation tags.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = inferd::config::Limits {
        max_image_bytes: 1 << 20,
        max_image_pixels: 4_000_000,
        max_image_side: 4096,
        ..Default::default()
    };
    if let Ok(img) = inferd::pipeline::image::decode(data, &limits) {
        assert!(u64::from(img.width()) * u64::from(img.height()) <= limits.max_image_pixels);
        assert!(img.width() > 0 && img.height() > 0);
    }
});
