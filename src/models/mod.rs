//! Networks: the backbone catalogue, the backbone architectures, and the
//! classifier a job trains on one of them.
//!
//! - [`catalogue`]: the backbones finetuned offers, as static data.
//! - [`arch`]: which network a catalogue entry is; builds or folds it.
//! - [`classifier`]: a backbone under a new head, with frozen stages.
//! - [`mobilenet_v2`], [`efficientnet_lite`], [`efficientnet`], [`resnet`]:
//!   one architecture family each, for training and (folded) for serving.
//! - [`folded`]: serving networks with BatchNorm folded into convolutions.
//! - [`layers`]: what the families share (stages, padding, pooling).
//! - [`script`], [`script_ops`]: uploaded TorchScript backbones.
//! - [`import`], [`verify`]: installing users' weights and checking a
//!   backbone against PyTorch.
//!
//! Dependencies point one way: `classifier → catalogue → arch → families →
//! folded → layers`, and `layers` needs nothing here.

pub mod arch;
pub mod catalogue;
pub mod classifier;
pub mod efficientnet;
pub mod efficientnet_lite;
pub mod folded;
pub mod import;
pub mod layers;
pub mod mobilenet_v2;
pub mod resnet;
pub mod script;
pub mod script_ops;
pub mod verify;

pub use arch::Arch;
pub use catalogue::{find, BackboneSpec, CATALOGUE};
pub use classifier::Classifier;
