//! Image decode + resize time, in process, one thread: what inferd does to a
//! camera JPEG before a 224×224 classifier (EfficientNet-Lite0's input,
//! center-crop), now and before, and libjpeg-turbo's reduced-scale decode
//! (measured, not used: its pixels are not the reference's). Driven by
//! scripts/bench_decode.py, which runs Pillow and OpenCV beside it.
//!
//!     cargo run --release --example decode_bench -- SECONDS FILE.jpg...
//!
//! Prints one JSON line per file and path: {"file", "width", "height", "path", "ms"}.

use image::RgbImage;
use inferd::config::Limits;
use inferd::pipeline::image::{ImageInputSpec, decode};
use std::time::{Duration, Instant};

/// Median milliseconds of `f` over about `seconds` (at least 5 runs).
fn time(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let mut runs = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while runs.len() < 5 || Instant::now() < end {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Before: the image crate's whole decode (zune-jpeg).
fn image_crate(bytes: &[u8]) -> RgbImage {
    image::load_from_memory(bytes).unwrap().into_rgb8()
}

/// Before, for inputs much smaller than the photo: jpeg-decoder's reduced-scale IDCT,
/// the smallest eighth that keeps the center-crop's need (what inferd did until libjpeg-turbo).
fn jpeg_decoder_scaled(bytes: &[u8], need: u32) -> RgbImage {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.read_info().unwrap();
    let info = d.info().unwrap();
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    let s = [1u32, 2, 4].into_iter().find(|s| (w.min(h) * s).div_ceil(8) >= need).unwrap_or(8);
    let (sw, sh) = d.scale((w * s).div_ceil(8) as u16, (h * s).div_ceil(8) as u16).unwrap();
    let px = d.decode().unwrap();
    RgbImage::from_raw(u32::from(sw), u32::from(sh), px).unwrap()
}

/// libjpeg-turbo's reduced-scale decode (DCT scaling), the smallest eighth that keeps the need.
fn turbojpeg_scaled(bytes: &[u8], need: u32) -> RgbImage {
    use turbojpeg_sys as tj;
    unsafe {
        let h = tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32);
        assert_eq!(tj::tj3DecompressHeader(h, bytes.as_ptr(), bytes.len() as tj::size_t), 0);
        let (w, hh) =
            (tj::tj3Get(h, tj::TJPARAM_TJPARAM_JPEGWIDTH as i32), tj::tj3Get(h, tj::TJPARAM_TJPARAM_JPEGHEIGHT as i32));
        let s = [1, 2, 4].into_iter().find(|s| (w.min(hh) * s + 7) / 8 >= need as i32).unwrap_or(8);
        let (num, denom) = match s {
            1 => (1, 8),
            2 => (1, 4),
            4 => (1, 2),
            _ => (1, 1),
        };
        assert_eq!(tj::tj3SetScalingFactor(h, tj::tjscalingfactor { num, denom }), 0);
        let (sw, sh) = ((w * s + 7) / 8, (hh * s + 7) / 8);
        let mut out = vec![0u8; (sw * sh * 3) as usize];
        let rc = tj::tj3Decompress8(
            h,
            bytes.as_ptr(),
            bytes.len() as tj::size_t,
            out.as_mut_ptr(),
            sw * 3,
            tj::TJPF_TJPF_RGB,
        );
        assert_eq!(rc, 0);
        tj::tj3Destroy(h);
        RgbImage::from_raw(sw as u32, sh as u32, out).unwrap()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().expect("SECONDS FILE...").parse().expect("seconds");
    let files: Vec<String> = args.collect();
    // As the daemon's decode threads run: one thread, a one-thread rayon pool.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let spec: ImageInputSpec = serde_json::from_value(serde_json::json!({
        "tensor": "images", "width": 224, "height": 224, "resize": "center-crop",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
    }))
    .unwrap();
    let limits = Limits::default();
    pool.install(|| {
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let (w, h) = decode(&bytes, &limits).unwrap().dimensions();
            let line = |path: &str, ms: f64| {
                println!("{}", serde_json::json!({"file": file, "width": w, "height": h, "path": path, "ms": ms}));
            };
            line("inferd decode (libjpeg-turbo)", time(seconds, || drop(decode(&bytes, &limits).unwrap())));
            line(
                "inferd decode + resize + tensor",
                time(seconds, || drop(spec.tensor_and_size(&bytes, &limits).unwrap())),
            );
            line("before: image crate decode", time(seconds, || drop(image_crate(&bytes))));
            line(
                "before: image crate decode + resize + tensor",
                time(seconds, || drop(spec.tensor_of(image_crate(&bytes)).unwrap())),
            );
            line(
                "before: jpeg-decoder scaled decode + resize + tensor",
                time(seconds, || drop(spec.tensor_of(jpeg_decoder_scaled(&bytes, 224)).unwrap())),
            );
            line(
                "left off: libjpeg-turbo scaled decode + resize + tensor",
                time(seconds, || drop(spec.tensor_of(turbojpeg_scaled(&bytes, 224)).unwrap())),
            );
        }
    });
}
