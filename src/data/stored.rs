//! The decode-once store of a dataset: one safetensors file per split
//! (uint8 images `[N, 3, S, S]`, int64 labels `[N]`), written as a
//! stream so a split never has to fit in memory, and an index of which
//! source file each stored image came from.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use tch::Tensor;

use super::preprocess::stored_bytes;
use super::DataError;

pub const TRAIN_FILE: &str = "train.safetensors";
pub const VAL_FILE: &str = "val.safetensors";
pub const TEST_FILE: &str = "test.safetensors";
pub const INDEX_FILE: &str = "index.json";

/// Where each stored image came from, per split, in stored order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Index {
    pub train: Vec<IndexEntry>,
    pub val: Vec<IndexEntry>,
    pub test: Vec<IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    pub path: String,
    pub label: usize,
}

impl Index {
    pub fn split(&self, name: &str) -> Option<&[IndexEntry]> {
        match name {
            "train" => Some(&self.train),
            "val" => Some(&self.val),
            "test" => Some(&self.test),
            _ => None,
        }
    }

    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(dir.join(INDEX_FILE))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        crate::durable::write_bytes(
            &dir.join(INDEX_FILE),
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }
}

/// Writes a split file from images supplied one at a time (the count is
/// known up front, so the header comes first).
pub struct SplitWriter {
    out: BufWriter<File>,
    /// Where the file goes once whole; it is written beside it until then.
    path: PathBuf,
    partial: PathBuf,
    expected: usize,
    image_bytes: usize,
    labels: Vec<i64>,
}

impl SplitWriter {
    /// A file for `count` images of `side` × `side` pixels.
    pub fn create(path: &Path, count: usize, side: u32) -> std::io::Result<Self> {
        let total = count * stored_bytes(side);
        let header = json!({
            "images": {"dtype": "U8", "shape": [count, 3, side, side], "data_offsets": [0, total]},
            "labels": {"dtype": "I64", "shape": [count], "data_offsets": [total, total + 8 * count]},
        })
        .to_string();
        // The data starts 8-byte aligned, as safetensors readers expect.
        let padded = header.len().div_ceil(8) * 8;
        let header = format!("{header:<padded$}");
        let partial = path.with_extension("partial");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&partial)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            partial,
            expected: count,
            image_bytes: stored_bytes(side),
            labels: Vec::with_capacity(count),
        })
    }

    pub fn push(&mut self, pixels: &[u8], label: usize) -> std::io::Result<()> {
        assert_eq!(pixels.len(), self.image_bytes, "a canonical image");
        assert!(
            self.labels.len() < self.expected,
            "more images than declared"
        );
        self.out.write_all(pixels)?;
        self.labels.push(label as i64);
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        assert_eq!(
            self.labels.len(),
            self.expected,
            "fewer images than declared"
        );
        for label in &self.labels {
            self.out.write_all(&label.to_le_bytes())?;
        }
        self.out
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        match self.path.parent() {
            Some(dir) => crate::durable::sync_dir(dir),
            None => Ok(()),
        }
    }
}

/// Reads a stored split: uint8 images `[N, 3, S, S]` and int64 labels `[N]`.
pub fn load_split(dir: &Path, file: &str) -> Result<(Tensor, Tensor), DataError> {
    let tensors = Tensor::read_safetensors(dir.join(file))?;
    let mut images = None;
    let mut labels = None;
    for (name, tensor) in tensors {
        match name.as_str() {
            "images" => images = Some(tensor),
            "labels" => labels = Some(tensor),
            _ => {}
        }
    }
    match (images, labels) {
        (Some(images), Some(labels)) => Ok((images, labels)),
        _ => Err(DataError::Io(std::io::Error::other(format!(
            "{} lacks its images or labels",
            dir.join(file).display()
        )))),
    }
}

/// Reads one stored image (canonical CHW bytes) out of a split file without
/// loading the rest.
pub fn read_image(path: &Path, slot: usize) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 1 << 20 {
        return Err(std::io::Error::other("implausible safetensors header"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    let start = header["images"]["data_offsets"][0]
        .as_u64()
        .ok_or_else(|| std::io::Error::other("no images tensor"))?;
    let count = header["images"]["shape"][0].as_u64().unwrap_or(0);
    let side = header["images"]["shape"][2].as_u64().unwrap_or(0) as u32;
    let image_bytes = stored_bytes(side);
    if slot as u64 >= count {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no image {slot} in {}", path.display()),
        ));
    }
    file.seek(SeekFrom::Start(
        8 + header_len + start + (slot * image_bytes) as u64,
    ))?;
    let mut pixels = vec![0u8; image_bytes];
    file.read_exact(&mut pixels)?;
    Ok(pixels)
}

/// A small PNG of a canonical image, for a UI's thumbnails.
pub fn thumbnail_png(pixels: &[u8], thumbnail_side: u32) -> Vec<u8> {
    let side = ((pixels.len() / 3) as f64).sqrt() as u32;
    let plane = (side * side) as usize;
    let rgb = image::RgbImage::from_fn(side, side, |x, y| {
        let i = (y * side + x) as usize;
        image::Rgb([pixels[i], pixels[plane + i], pixels[2 * plane + i]])
    });
    let small = image::imageops::thumbnail(&rgb, thumbnail_side, thumbnail_side);
    let mut png = Vec::new();
    small
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encoding a PNG in memory");
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_split_file_is_read_by_libtorch_and_by_slot() {
        let dir = std::env::temp_dir().join(format!("stored-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(TRAIN_FILE);
        let images: Vec<Vec<u8>> = (0..3u8).map(|v| vec![v * 40; stored_bytes(64)]).collect();
        let mut writer = SplitWriter::create(&path, 3, 64).unwrap();
        for (i, image) in images.iter().enumerate() {
            writer.push(image, i + 4).unwrap();
        }
        writer.finish().unwrap();

        let tensors = tch::Tensor::read_safetensors(&path).unwrap();
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .shallow_clone()
        };
        assert_eq!(get("images").size(), vec![3, 3, 64, 64]);
        assert_eq!(get("images").int64_value(&[2, 1, 5, 5]), 80);
        assert_eq!(Vec::<i64>::try_from(get("labels")).unwrap(), vec![4, 5, 6]);
        assert_eq!(read_image(&path, 1).unwrap(), images[1]);
        assert!(read_image(&path, 3).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
