//! JPEG through libjpeg-turbo, decoded as Pillow and OpenCV decode it: the
//! same library (built from source with its SIMD code, statically linked),
//! the same settings (accurate integer IDCT, fancy upsampling, block
//! smoothing for progressive scans), so the pixels are Pillow's
//! `Image.open(f).convert("RGB")` value for value, CMYK and YCCK included
//! (Pillow's own CMYK→RGB formula). The corpus test in `image.rs` holds it to
//! that (scripts/make_jpeg_fixtures.py).

use crate::config::Limits;
use crate::error::InferError;
use image::RgbImage;
use image::metadata::Orientation;
use std::cell::RefCell;
use std::ffi::CStr;
use turbojpeg_sys as tj;

/// Progressive scans allowed in one image: real encoders write at most a few
/// dozen; a file of thousands of tiny scans makes the decoder redo the image
/// for each (libjpeg-turbo's advice for untrusted input).
const SCAN_LIMIT: i32 = 500;

/// One TurboJPEG decompressor per thread, reused from job to job (it resets
/// itself at each call, after an error too).
struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

impl Handle {
    fn message(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned()
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: a valid handle and a parameter of the TurboJPEG 3 API.
        unsafe { tj::tj3Get(self.0, param as i32) }
    }

    fn set(&self, param: tj::TJPARAM, value: i32) -> Result<(), InferError> {
        // SAFETY: as in get.
        match unsafe { tj::tj3Set(self.0, param as i32, value) } {
            0 => Ok(()),
            _ => Err(internal(format!("libjpeg-turbo setting {param}: {}", self.message()))),
        }
    }
}

fn internal(message: String) -> InferError {
    InferError::new(crate::error::ErrorKind::Internal, message)
}

/// Decodes a JPEG (the caller checked its size in bytes and that its last
/// scan is complete) to RGB under `limits`, turned upright by its EXIF
/// orientation when `limits.exif_orientation` is on. Width and height are
/// read from the header and checked before the pixel buffer is allocated.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RgbImage, InferError> {
    let handle = match HANDLE.with(|cell| cell.borrow_mut().take()) {
        Some(handle) => handle,
        None => {
            // SAFETY: tj3Init has no preconditions; a null return is checked.
            let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
            if raw.is_null() {
                return Err(internal("libjpeg-turbo could not start a decompressor".into()));
            }
            Handle(raw)
        }
    };
    let (img, clean) = decode_with(&handle, bytes, limits)?;
    // A decompressor that met bad data is not reused: libjpeg keeps state (tables, the marker
    // reader's place) that a failed or warned-about image can leave half-set for the next one.
    if clean {
        HANDLE.with(|cell| *cell.borrow_mut() = Some(handle));
    }
    Ok(match limits.exif_orientation {
        true => upright(img, exif_orientation(bytes)),
        false => img,
    })
}

/// The pixels, and whether the decode was clean (no warning).
fn decode_with(h: &Handle, bytes: &[u8], limits: &Limits) -> Result<(RgbImage, bool), InferError> {
    let corrupt = |what: String| InferError::bad_input(format!("corrupt or unsupported JPEG image: {what}"));
    // SAFETY: the buffer is valid for its length; TurboJPEG only reads it.
    if unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), bytes.len() as tj::size_t) } != 0 {
        return Err(corrupt(h.message()));
    }
    let (w, h_px) = (h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH), h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
    let (w, hh) = (u32::try_from(w).unwrap_or(0), u32::try_from(h_px).unwrap_or(0));
    let pixels = u64::from(w) * u64::from(hh);
    if pixels == 0 {
        return Err(InferError::bad_input(format!("the JPEG image has no pixels ({w}x{hh})")));
    }
    if w.max(hh) > limits.max_image_side || pixels > limits.max_image_pixels {
        return Err(InferError::bad_input(format!(
            "the JPEG image is {w}x{hh} = {pixels} pixels, over the limits (max side {} px, max {} pixels)",
            limits.max_image_side, limits.max_image_pixels
        )));
    }
    // Pillow reads 8-bit lossy JPEG (libjpeg's 8-bit interface); 12-bit and lossless files are refused there too.
    if h.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0 || h.get(tj::TJPARAM_TJPARAM_PRECISION) != 8 {
        return Err(InferError::bad_input(format!(
            "unsupported JPEG image: {}-bit {} (8-bit baseline, progressive and arithmetic-coded JPEGs are read)",
            h.get(tj::TJPARAM_TJPARAM_PRECISION),
            if h.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0 { "lossless" } else { "lossy" }
        )));
    }
    let cmyk = matches!(h.get(tj::TJPARAM_TJPARAM_COLORSPACE) as u32, tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK);
    let (format, channels) = match cmyk {
        true => (tj::TJPF_TJPF_CMYK, 4usize),
        false => (tj::TJPF_TJPF_RGB, 3usize),
    };
    // Whole-image coefficient buffers of a progressive file: 2 bytes a sample, up to 4 components.
    let max_mb = (limits.max_image_pixels.saturating_mul(8) >> 20).saturating_add(64);
    h.set(tj::TJPARAM_TJPARAM_MAXMEMORY, i32::try_from(max_mb).unwrap_or(i32::MAX))?;
    h.set(tj::TJPARAM_TJPARAM_MAXPIXELS, i32::try_from(limits.max_image_pixels).unwrap_or(i32::MAX))?;
    h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT)?;
    // Pillow's (and libjpeg's) defaults: ISLOW IDCT, fancy upsampling, decode through warnings.
    h.set(tj::TJPARAM_TJPARAM_FASTDCT, 0)?;
    h.set(tj::TJPARAM_TJPARAM_FASTUPSAMPLE, 0)?;
    h.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 0)?;
    let row = w as usize * channels;
    let mut out = vec![0u8; row * hh as usize];
    // SAFETY: `out` holds `hh` rows of `row` bytes in `format`, as TurboJPEG writes them.
    let status = unsafe {
        tj::tj3Decompress8(h.0, bytes.as_ptr(), bytes.len() as tj::size_t, out.as_mut_ptr(), row as i32, format)
    };
    // SAFETY: a valid handle.
    if status != 0 && unsafe { tj::tj3GetErrorCode(h.0) } != tj::TJERR_TJERR_WARNING as i32 {
        return Err(corrupt(h.message()));
    }
    // A warning (corrupt entropy-coded data that libjpeg recovered from) keeps the pixels, as Pillow keeps them.
    let rgb = match cmyk {
        true => cmyk_to_rgb(&out),
        false => out,
    };
    let img = RgbImage::from_raw(w, hh, rgb).ok_or_else(|| internal("libjpeg-turbo returned a short image".into()))?;
    Ok((img, status == 0))
}

/// Pillow's reading of a 4-component JPEG: the samples are taken as Adobe's
/// inverted CMYK (`CMYK;I`, whatever the file says), then its `cmyk2rgb`:
/// `R = 255 - K' - C'·(255 - K')/255` with Pillow's rounding of the product.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = u32::from(px[3]); // 255 - (255 - k)
        for &c in &px[..3] {
            let c = 255 - u32::from(c);
            out.push(nk.saturating_sub(muldiv255(c, nk)) as u8);
        }
    }
    out
}

fn upright(img: RgbImage, orientation: Option<Orientation>) -> RgbImage {
    match orientation {
        None | Some(Orientation::NoTransforms) => img,
        Some(o) => {
            let mut dynamic = image::DynamicImage::ImageRgb8(img);
            dynamic.apply_orientation(o);
            dynamic.into_rgb8()
        }
    }
}

/// The orientation Pillow's `ImageOps.exif_transpose` reads: the first APP1
/// Exif segment's tag, else an XMP packet's `tiff:Orientation`. Only the
/// segments before the first scan are looked at; a tag that cannot be read
/// leaves the pixels as stored.
pub fn exif_orientation(bytes: &[u8]) -> Option<Orientation> {
    let (mut exif, mut xmp) = (None, None);
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            break;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => {
                i += 1;
                continue;
            }
            0xDA | 0xD9 => break,
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if len < 2 {
            break;
        }
        let segment = &bytes[i + 4..(i + 2 + len).min(bytes.len())];
        if marker == 0xE1 {
            if let Some(tiff) = segment.strip_prefix(b"Exif\0\0") {
                exif = exif.or(Some(tiff));
            } else if xmp.is_none() {
                xmp = segment.strip_prefix(b"http://ns.adobe.com/xap/1.0/\0");
            }
        }
        i += 2 + len;
    }
    exif.and_then(Orientation::from_exif_chunk).or_else(|| xmp.and_then(xmp_orientation))
}

/// `tiff:Orientation="N"` or `<tiff:Orientation>N<`, as Pillow's `getexif` finds it.
fn xmp_orientation(xmp: &[u8]) -> Option<Orientation> {
    let key = b"tiff:Orientation";
    let at = xmp.windows(key.len()).position(|w| w == key)? + key.len();
    let digit = match xmp.get(at..at + 2)? {
        [b'=', b'"'] | [b'>', _] => {
            let skip = if xmp[at] == b'=' { 2 } else { 1 };
            *xmp.get(at + skip)?
        }
        _ => return None,
    };
    digit.is_ascii_digit().then(|| Orientation::from_exif(digit - b'0')).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pillow_cmyk_conversion_rounds_as_pillow() {
        // Stored (Adobe-inverted) samples → Pillow's RGB: k stored 255 is no ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // nk = 200, c' = 155: 200 - (155*200+128 → 122) = 78
        assert_eq!(cmyk_to_rgb(&[100, 100, 100, 200]), [78, 78, 78]);
    }

    #[test]
    fn xmp_orientation_is_read_in_both_spellings() {
        assert_eq!(xmp_orientation(b"<x tiff:Orientation=\"6\"/>"), Some(Orientation::Rotate90));
        assert_eq!(xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"), Some(Orientation::Rotate180));
        assert_eq!(xmp_orientation(b"<tiff:Orientation>x"), None);
        assert_eq!(xmp_orientation(b"nothing here"), None);
    }
}
