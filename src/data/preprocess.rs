//! The one preprocessing path. Training, evaluation and `/predict` all go
//! through these two functions, so a served model sees exactly what its
//! evaluation saw.
//!
//! 1. [`decode_at`] (once per image, at ingest or at request time):
//!    decode, convert to RGB, resize the shorter side to the dataset's
//!    stored size ([`STORED_SIZE`] by default) keeping the aspect ratio, and
//!    center-crop to a square, kept as uint8 CHW.
//! 2. [`model_input`] (per batch, as tensor ops on the model's device):
//!    center-crop the classic 224/256 fraction, resize to the model's input
//!    size, scale to [0, 1], normalize by the backbone's mean and std.

use std::io::Cursor;

use fast_image_resize as fir;
use image::ImageDecoder;
use image::{DynamicImage, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Default side of the stored square images.
pub const STORED_SIZE: u32 = 256;
/// Bytes of one stored image at the default side (3 × 256 × 256).
pub const STORED_BYTES: usize = stored_bytes(STORED_SIZE);
/// Sides a dataset may be stored at.
pub const STORED_SIZES: std::ops::RangeInclusive<u32> = 32..=1024;
/// The center crop taken from a stored image before resizing is this share
/// of its side (the 224-of-256 crop torchvision's ImageNet evaluation uses).
const CROP_NUMERATOR: i64 = 224;
const CROP_DENOMINATOR: i64 = 256;

/// Bytes of one stored image of this side.
pub const fn stored_bytes(side: u32) -> usize {
    3 * (side as usize) * (side as usize)
}
/// Images larger than this many pixels are refused before full decode.
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Per-channel normalization the backbone's weights were trained with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Normalization {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Normalization {
    pub const IMAGENET: Normalization = Normalization {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

/// [`decode_at`] the default stored size.
pub fn decode_canonical(bytes: &[u8]) -> Result<Vec<u8>, String> {
    decode_at(bytes, STORED_SIZE)
}

/// Decodes an encoded image into its canonical stored form: `side`² × 3
/// bytes of uint8 RGB, channels first.
pub fn decode_at(bytes: &[u8], side: u32) -> Result<Vec<u8>, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    // The header's size is checked before any pixel is decoded
    // (decompression bombs), and the camera's EXIF orientation applied.
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(format!(
            "{width}x{height} pixels is more than the {MAX_PIXELS}-pixel limit"
        ));
    }
    let orientation = decoder.orientation().map_err(|e| e.to_string())?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    image.apply_orientation(orientation);
    let rgb = DynamicImage::ImageRgb8(image.into_rgb8());
    let mut square = fir::images::Image::new(side, side, fir::PixelType::U8x3);
    // Shorter side to `side`, centered crop to a square; bilinear with the
    // filter widened when shrinking (antialiased), SIMD-accelerated.
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
        .fit_into_destination(None);
    fir::Resizer::new()
        .resize(&rgb, &mut square, &options)
        .map_err(|e| e.to_string())?;
    let plane = (side * side) as usize;
    let mut chw = vec![0u8; stored_bytes(side)];
    for (i, pixel) in square.buffer().chunks_exact(3).enumerate() {
        chw[i] = pixel[0];
        chw[plane + i] = pixel[1];
        chw[2 * plane + i] = pixel[2];
    }
    Ok(chw)
}

/// Turns canonical images into model input. Accepts uint8 `[N, 3, S, S]`
/// on any device; returns float `[N, 3, size, size]` on the same device.
pub fn model_input(stored: &Tensor, image_size: i64, norm: &Normalization) -> Tensor {
    normalize(&center_view(stored, image_size), norm)
}

/// The evaluation view of canonical images: the center crop, resized to
/// `image_size`, in [0, 1].
pub fn center_view(stored: &Tensor, image_size: i64) -> Tensor {
    let side = stored.size()[2];
    let crop_size = (side * CROP_NUMERATOR + CROP_DENOMINATOR / 2) / CROP_DENOMINATOR;
    let offset = (side - crop_size) / 2;
    let crop = to_unit(
        &stored
            .narrow(2, offset, crop_size)
            .narrow(3, offset, crop_size),
    );
    resize(&crop, image_size)
}

/// uint8 pixels to float in [0, 1].
pub fn to_unit(stored: &Tensor) -> Tensor {
    stored.to_kind(Kind::Float) / 255.0
}

/// Antialiased bilinear resize of a float batch to `size` × `size`.
pub fn resize(images: &Tensor, size: i64) -> Tensor {
    let (h, w) = (images.size()[2], images.size()[3]);
    if h == size && w == size {
        images.shallow_clone()
    } else {
        images.internal_upsample_bilinear2d_aa([size, size], false, None, None)
    }
}

/// Side of the canonical image scaled so that its center crop is `image_size`
/// (the working size of training augmentation).
pub fn working_size(image_size: i64) -> i64 {
    (image_size * CROP_DENOMINATOR + CROP_NUMERATOR / 2) / CROP_NUMERATOR
}

/// Fraction of the canonical image the center crop covers.
pub const CROP_FRACTION: f64 = CROP_NUMERATOR as f64 / CROP_DENOMINATOR as f64;

/// Subtracts the mean and divides by the std, per channel.
pub fn normalize(images: &Tensor, norm: &Normalization) -> Tensor {
    let (mean, std) = norm.tensors(images.device());
    normalize_with(images, &mean, &std)
}

/// [`normalize`] with the mean and std tensors made once, by the caller.
pub fn normalize_with(images: &Tensor, mean: &Tensor, std: &Tensor) -> Tensor {
    (images - mean) / std
}

impl Normalization {
    /// Mean and std as `[1, 3, 1, 1]` tensors. Serving makes them once per
    /// loaded model; made outside a TorchScript trace, they enter it as
    /// constants (a copy from Rust memory inside one would not be recorded).
    pub fn tensors(&self, device: tch::Device) -> (Tensor, Tensor) {
        let make = |values: &[f64; 3]| {
            Tensor::from_slice(values)
                .to_kind(Kind::Float)
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        (make(&self.mean), make(&self.std))
    }
}

/// Stacks canonical images (all of one side) into a uint8 tensor.
pub fn stack_canonical(images: &[Vec<u8>]) -> Tensor {
    let side = images
        .first()
        .map_or(0, |i| ((i.len() / 3) as f64).sqrt() as i64);
    let flat: Vec<u8> = images.concat();
    Tensor::from_slice(&flat).view([images.len() as i64, 3, side, side])
}

#[cfg(test)]
mod exif_tests {
    use super::*;

    /// A JPEG with an EXIF APP1 segment holding only an orientation tag.
    fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        let mut tiff = b"II*\0\x08\0\0\0".to_vec(); // little endian, IFD at 8
        tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes());
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // Left half red, right half blue; orientation 6 shows it rotated 90°
        // clockwise: red on top, blue below.
        let img = image::RgbImage::from_fn(200, 100, |x, _| {
            if x < 100 {
                image::Rgb([220, 20, 20])
            } else {
                image::Rgb([20, 20, 220])
            }
        });
        let pixel = |chw: &[u8], row: usize, col: usize| {
            let plane = (STORED_SIZE * STORED_SIZE) as usize;
            let i = row * STORED_SIZE as usize + col;
            (chw[i], chw[2 * plane + i])
        };
        let rotated = decode_canonical(&jpeg_with_orientation(&img, 6)).unwrap();
        let (r, b) = pixel(&rotated, 10, 60);
        assert!(r > 150 && b < 100, "top should be red: r={r} b={b}");
        let (r, b) = pixel(&rotated, 245, 60);
        assert!(b > 150 && r < 100, "bottom should be blue: r={r} b={b}");
        // Without the tag the same spot is red (the left half).
        let plain = decode_canonical(&jpeg_with_orientation(&img, 1)).unwrap();
        let (r, _) = pixel(&plain, 245, 60);
        assert!(r > 150);
    }
}
