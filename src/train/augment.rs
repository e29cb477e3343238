//! Training augmentation, applied to whole batches with tensor ops on the
//! training device (so a GPU host does it on the GPU), drawn from libtorch's
//! seeded generator.
//!
//! Geometry (rotation, zoom, random resized crop, shift) is one affine
//! resampling of the canonical image; flips and colour jitter follow. With
//! augmentation disabled, training sees exactly the evaluation view.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::preprocess::{self, CROP_FRACTION};

/// What augmentation a job applies to training batches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Augmentation {
    /// Off: training batches are the evaluation view.
    pub enabled: bool,
    pub horizontal_flip: bool,
    pub vertical_flip: bool,
    /// Largest rotation, either way, in degrees.
    pub rotation_degrees: f64,
    /// Zoom range: the view is scaled by a factor in [1 - zoom, 1 + zoom].
    pub zoom: f64,
    /// Random resized crop: smallest share of the view's area kept (1: off).
    pub min_crop_area: f64,
    /// Colour jitter strengths: factors drawn from [1 - s, 1 + s] (0: off).
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
}

/// The classic recipe: horizontal flip, rotation ±20°, zoom 0.2.
impl Default for Augmentation {
    fn default() -> Self {
        Self {
            enabled: true,
            horizontal_flip: true,
            vertical_flip: false,
            rotation_degrees: 20.0,
            zoom: 0.2,
            min_crop_area: 1.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
        }
    }
}

impl Augmentation {
    /// Problems with the settings, as (field, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut check = |name, value: f64, min: f64, max: f64| {
            if !(min..=max).contains(&value) {
                out.push((name, format!("{value} is outside [{min}, {max}]")));
            }
        };
        check(
            "augmentation.rotation_degrees",
            self.rotation_degrees,
            0.0,
            180.0,
        );
        check("augmentation.zoom", self.zoom, 0.0, 0.9);
        check("augmentation.min_crop_area", self.min_crop_area, 0.05, 1.0);
        check("augmentation.brightness", self.brightness, 0.0, 0.9);
        check("augmentation.contrast", self.contrast, 0.0, 0.9);
        check("augmentation.saturation", self.saturation, 0.0, 0.9);
        out
    }

    /// Augmented training view of canonical uint8 images, in [0, 1],
    /// `[N, 3, image_size, image_size]` (normalization is the caller's).
    pub fn apply(&self, stored: &Tensor, image_size: i64) -> Tensor {
        if !self.enabled {
            return preprocess::center_view(stored, image_size);
        }
        let mut images = if self.has_geometry() {
            self.geometry(stored, image_size)
        } else {
            preprocess::center_view(stored, image_size)
        };
        if self.horizontal_flip {
            images = random_flip(&images, 3);
        }
        if self.vertical_flip {
            images = random_flip(&images, 2);
        }
        self.colour(&images)
    }

    /// Whether any random rotation, zoom or crop (and so shifting) applies.
    fn has_geometry(&self) -> bool {
        self.rotation_degrees > 0.0 || self.zoom > 0.0 || self.min_crop_area < 1.0
    }

    /// The distinct views training can see, when they are few: the evaluation
    /// view, and its mirror image with horizontal flips. `None` when the
    /// augmentation draws from a continuum (rotation, zoom, crop, colour).
    pub fn enumerable_views(&self) -> Option<Vec<View>> {
        if !self.enabled {
            return Some(vec![View::Plain]);
        }
        let colour = self.brightness > 0.0 || self.contrast > 0.0 || self.saturation > 0.0;
        if self.has_geometry() || colour || self.vertical_flip {
            return None;
        }
        Some(if self.horizontal_flip {
            vec![View::Plain, View::Mirrored]
        } else {
            vec![View::Plain]
        })
    }

    fn geometry(&self, stored: &Tensor, image_size: i64) -> Tensor {
        // Downscale first (antialiased), so resampling never aliases.
        let work = preprocess::resize(
            &preprocess::to_unit(stored),
            preprocess::working_size(image_size),
        );
        let n = work.size()[0];
        let device = work.device();
        let uniform = |lo: f64, hi: f64| Tensor::rand([n], (Kind::Float, device)) * (hi - lo) + lo;
        let angle =
            uniform(-self.rotation_degrees, self.rotation_degrees) * (std::f64::consts::PI / 180.0);
        let zoom = uniform(1.0 - self.zoom, 1.0 + self.zoom);
        let crop = uniform(self.min_crop_area, 1.0).sqrt();
        // Side of the sampled region, as a share of the working image.
        let scale = zoom * crop * CROP_FRACTION;
        // Shift anywhere that keeps the region inside the image.
        let room = (scale.neg() + 1.0).clamp_min(0.0);
        let tx = (Tensor::rand([n], (Kind::Float, device)) * 2.0 - 1.0) * &room;
        let ty = (Tensor::rand([n], (Kind::Float, device)) * 2.0 - 1.0) * &room;
        let (cos, sin) = (angle.cos() * &scale, angle.sin() * &scale);
        let theta = Tensor::stack(&[&cos, &(-&sin), &tx, &sin, &cos, &ty], 1).view([n, 2, 3]);
        let grid = Tensor::affine_grid_generator(&theta, [n, 3, image_size, image_size], false);
        // Bilinear, edge pixels repeated beyond the border (Keras' "nearest" fill).
        work.grid_sampler(&grid, 0, 1, false)
    }

    fn colour(&self, images: &Tensor) -> Tensor {
        if self.brightness == 0.0 && self.contrast == 0.0 && self.saturation == 0.0 {
            return images.shallow_clone();
        }
        let n = images.size()[0];
        let device = images.device();
        let factor =
            |s: f64| (Tensor::rand([n, 1, 1, 1], (Kind::Float, device)) * 2.0 - 1.0) * s + 1.0;
        let mut x = images * factor(self.brightness);
        let gray = |x: &Tensor| {
            let weights = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
                .view([1, 3, 1, 1])
                .to_device(device);
            (x * weights).sum_dim_intlist(Some([1i64].as_slice()), true, Kind::Float)
        };
        if self.contrast > 0.0 {
            let mean = gray(&x).mean_dim(Some([2i64, 3].as_slice()), true, Kind::Float);
            x = (&x - &mean) * factor(self.contrast) + mean;
        }
        if self.saturation > 0.0 {
            let g = gray(&x);
            x = (&x - &g) * factor(self.saturation) + g;
        }
        x.clamp(0.0, 1.0)
    }
}

/// One of the few views [`Augmentation::enumerable_views`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Plain,
    Mirrored,
}

impl View {
    /// This view of canonical images, in [0, 1].
    pub fn apply(self, stored: &Tensor, image_size: i64) -> Tensor {
        let plain = preprocess::center_view(stored, image_size);
        match self {
            View::Plain => plain,
            View::Mirrored => plain.flip([3]),
        }
    }
}

/// Flips each image along `dim` with probability one half.
fn random_flip(images: &Tensor, dim: i64) -> Tensor {
    let n = images.size()[0];
    let flip = Tensor::rand([n, 1, 1, 1], (Kind::Float, images.device())).lt(0.5);
    images.flip([dim]).where_self(&flip, images)
}
