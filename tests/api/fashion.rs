//! Real photos for tests and benchmarks: Debian's Fashion-MNIST (28×28
//! grayscale clothing), unpacked by `scripts/setup` into the fixtures cache.

use std::io::Read;
use std::path::PathBuf;

/// Fashion-MNIST's class names, by label.
pub const FASHION_CLASSES: [&str; 10] = [
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
];

/// Which of the two published sets to read.
#[derive(Clone, Copy)]
#[allow(dead_code)] // the tests read only the test set
pub enum FashionSet {
    Train,
    Test,
}

fn fixtures_dir() -> PathBuf {
    let cache = std::env::var_os("FINETUNED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/finetuned")
        });
    cache.join("fixtures/fashion-mnist")
}

/// Photos of the wanted labels, skipping the first `skip` of each label and
/// taking the next `per_class`, in the set's order.
pub fn fashion_photos(
    set: FashionSet,
    labels: &[usize],
    skip: usize,
    per_class: usize,
) -> Vec<(usize, image::GrayImage)> {
    let prefix = match set {
        FashionSet::Train => "train",
        FashionSet::Test => "t10k",
    };
    let read = |name: String| {
        let path = fixtures_dir().join(&name);
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup", path.display()));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut bytes)
            .expect("gunzip");
        bytes
    };
    let images = read(format!("{prefix}-images-idx3-ubyte.gz"));
    let all_labels = read(format!("{prefix}-labels-idx1-ubyte.gz"));
    let mut seen = vec![0; FASHION_CLASSES.len()];
    let mut out = Vec::new();
    for (i, &label) in all_labels[8..].iter().enumerate() {
        let label = label as usize;
        if !labels.contains(&label) {
            continue;
        }
        seen[label] += 1;
        if seen[label] > skip && seen[label] <= skip + per_class {
            let pixels = images[16 + i * 784..16 + (i + 1) * 784].to_vec();
            out.push((label, image::GrayImage::from_raw(28, 28, pixels).unwrap()));
        }
    }
    out
}

/// The first `per_class` test-set photos of each wanted label.
#[allow(dead_code)] // used by the tests, not the benchmarks
pub fn fashion_mnist(labels: &[usize], per_class: usize) -> Vec<(usize, image::GrayImage)> {
    fashion_photos(FashionSet::Test, labels, 0, per_class)
}
