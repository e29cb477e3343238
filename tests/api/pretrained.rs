//! The pretrained weights are real: the untouched ImageNet MobileNetV2, run
//! through the service's own preprocessing, names real photos correctly.

use finetuned::data::preprocess::{self, Normalization};
use finetuned::models::{mobilenet_v2, verify};
use tch::nn::{self, Module, ModuleT};
use tch::Kind;

use crate::helpers::{fixtures_dir, weights_dir};

/// ImageNet class indices.
const ESPRESSO: i64 = 967;
const CATS: [i64; 3] = [281, 282, 285]; // tabby, tiger cat, Egyptian cat

/// scikit-image's `coffee` and `chelsea` through the service's decoding.
fn canonical_photos() -> tch::Tensor {
    let photos = ["coffee.png", "chelsea.png"].map(|name| {
        let bytes = std::fs::read(fixtures_dir().join(name)).expect("photo (run scripts/setup)");
        preprocess::decode_canonical(&bytes).expect("decodes")
    });
    preprocess::stack_canonical(&photos)
}

/// The two photos as MobileNetV2's input at 224.
fn photos() -> tch::Tensor {
    preprocess::model_input(&canonical_photos(), 224, &Normalization::IMAGENET)
}

#[test]
fn imagenet_mobilenet_v2_recognises_real_photos() {
    let mut vs = nn::VarStore::new(tch::Device::Cpu);
    let features = mobilenet_v2::features(&vs.root());
    let classifier = nn::linear(
        vs.root() / "classifier" / 1,
        mobilenet_v2::FEATURE_DIM,
        1000,
        Default::default(),
    );
    vs.load(weights_dir().join("mobilenet_v2.safetensors"))
        .expect("weights load by torchvision name (run scripts/setup)");
    assert_eq!(vs.variables().len(), 262);

    let input = photos();
    let probs = tch::no_grad(|| {
        classifier
            .forward(&features.forward_t(&input, false))
            .softmax(-1, Kind::Float)
    });
    let top: Vec<i64> = Vec::try_from(probs.argmax(-1, false)).unwrap();
    assert_eq!(top[0], ESPRESSO, "coffee.png");
    assert!(
        CATS.contains(&top[1]),
        "chelsea.png classified as {}",
        top[1]
    );
    assert!(
        probs.double_value(&[0, ESPRESSO]) > 0.5,
        "confident espresso"
    );
}

/// Serving folds BatchNorm into the convolutions; with the real weights (or
/// random ones for importable architectures) and real photos it computes
/// what the trained modules compute, for every backbone of the catalogue.
#[test]
fn the_folded_serving_network_equals_the_trained_one() {
    let _rng = crate::helpers::torch_rng_blocking();
    tch::manual_seed(7);
    for spec in finetuned::models::CATALOGUE {
        // Architectures whose weights users import are checked at random
        // initialization (shortcuts, pooling and activations all count).
        let weights = spec.weights_path(&weights_dir());
        let pretrained = spec.bundled.then_some(weights.as_path());
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let classifier = finetuned::models::Classifier::new(&mut vs, spec, 5, pretrained)
            .expect("weights load (run scripts/setup)");
        let checkpoint =
            std::env::temp_dir().join(format!("folded-{}.safetensors", uuid::Uuid::new_v4()));
        vs.save(&checkpoint).unwrap();
        let vars = finetuned::models::folded::Variables(
            tch::Tensor::read_safetensors(&checkpoint)
                .unwrap()
                .into_iter()
                .collect(),
        );
        std::fs::remove_file(&checkpoint).unwrap();
        let net = spec.folded(&vars).expect("folds");

        // Equality does not depend on the side; the big EfficientNets are
        // checked at no more than 260 px to keep the test short.
        let input = preprocess::model_input(
            &canonical_photos(),
            spec.default_image_size.min(260),
            &spec.normalization,
        );
        let (trained, folded) =
            tch::no_grad(|| (classifier.forward_t(&input, false), net.forward(&input)));
        let diff = (&trained - &folded).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{}: max |logit difference| {diff}", spec.name);
        let order = |t: &tch::Tensor| Vec::<Vec<i64>>::try_from(t.argsort(-1, true)).unwrap();
        assert_eq!(order(&trained), order(&folded), "{}", spec.name);
    }
}

/// Every backbone's untouched ImageNet network gives the logits of its
/// reference PyTorch implementation (run now by the virtualenv's torch) on
/// seven real photos: within 1e-4, with the same top-5.
#[test]
fn every_backbone_computes_what_pytorch_computes() {
    let python = crate::helpers::torch_python();
    // Imported architectures are verified in `backbones`.
    for spec in finetuned::models::CATALOGUE.iter().filter(|s| s.bundled) {
        let report = verify::against_pytorch(spec, &weights_dir(), &fixtures_dir(), &python)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        assert!(report.passed(), "{report:?}");
        assert_eq!(report.photos, 7);
        // coffee.png is an espresso to every backbone.
        assert_eq!(report.top1[1], ESPRESSO, "{report:?}");
    }
}
