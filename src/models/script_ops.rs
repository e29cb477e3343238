//! The operations an uploaded TorchScript backbone may use: pure tensor
//! computation and the control flow around it, nothing that reaches files,
//! the network, the process or foreign code.
//!
//! An allowlist, not a blocklist: it is the union of the operations in the
//! inlined code (every method, `__setstate__` included) of torchvision's
//! ResNet-18/50, MobileNetV2/V3, EfficientNet-B0/V2-S, ConvNeXt-T,
//! DenseNet-121, RegNetY-400MF, ShuffleNetV2, SqueezeNet, MNASNet, VGG-11,
//! AlexNet, GoogLeNet, Swin-T, ViT-B/16 and MaxViT-T, each both traced and
//! scripted with torch 2.13, plus the common activations, norms, pooling and
//! shape operations those happen not to use. `aten::from_file`,
//! `prim::CallFunction` on Python code, custom `ops.*` namespaces and every
//! other operation are refused.

use crate::native::ScriptOperation;

const ALLOWED: &[&str] = &[
    // Values, containers and control flow.
    "prim::Constant",
    "prim::GetAttr",
    "prim::If",
    "prim::Loop",
    "prim::ListConstruct",
    "prim::ListUnpack",
    "prim::ListIndex",
    "prim::TupleConstruct",
    "prim::TupleIndex",
    "prim::TupleUnpack",
    "prim::DictConstruct",
    "prim::NumToTensor",
    "prim::RaiseException",
    "prim::Uninitialized",
    "prim::unchecked_cast",
    "prim::device",
    "prim::dtype",
    "prim::is_nested",
    "prim::requires_grad",
    "prim::type",
    "prim::min",
    "prim::max",
    "aten::Bool",
    "aten::Float",
    "aten::Int",
    "aten::ScalarImplicit",
    "aten::__and__",
    "aten::__or__",
    "aten::__not__",
    "aten::__is__",
    "aten::__isnot__",
    "aten::__contains__",
    "aten::__getitem__",
    "aten::__range_length",
    "aten::__derive_index",
    "aten::_set_item",
    "aten::append",
    "aten::format",
    "aten::len",
    "aten::warn",
    "aten::dim",
    "aten::numel",
    "aten::size",
    "aten::is_floating_point",
    "aten::is_grad_enabled",
    "aten::is_autocast_enabled",
    // Comparisons and arithmetic.
    "aten::eq",
    "aten::ne",
    "aten::lt",
    "aten::le",
    "aten::gt",
    "aten::ge",
    "aten::all",
    "aten::any",
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::sub_",
    "aten::rsub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::div_",
    "aten::floordiv",
    "aten::floor_divide",
    "aten::remainder",
    "aten::neg",
    "aten::abs",
    "aten::pow",
    "aten::sqrt",
    "aten::rsqrt",
    "aten::exp",
    "aten::log",
    "aten::clamp",
    "aten::clamp_",
    "aten::clamp_min",
    "aten::clamp_max",
    "aten::sum",
    "aten::mean",
    "aten::max",
    "aten::min",
    "aten::amax",
    "aten::norm",
    "aten::einsum",
    "aten::matmul",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addmm",
    "aten::linear",
    // Layers.
    "aten::conv1d",
    "aten::conv2d",
    "aten::_convolution",
    "aten::batch_norm",
    "aten::layer_norm",
    "aten::group_norm",
    "aten::instance_norm",
    "aten::dropout",
    "aten::dropout_",
    "aten::bernoulli_",
    "aten::max_pool2d",
    "aten::avg_pool2d",
    "aten::adaptive_avg_pool2d",
    "aten::adaptive_max_pool2d",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::pad",
    "aten::constant_pad_nd",
    "aten::scaled_dot_product_attention",
    "aten::_native_multi_head_attention",
    "aten::channel_shuffle",
    "aten::pixel_shuffle",
    // Activations.
    "aten::relu",
    "aten::relu_",
    "aten::relu6",
    "aten::leaky_relu",
    "aten::leaky_relu_",
    "aten::elu",
    "aten::gelu",
    "aten::silu",
    "aten::silu_",
    "aten::mish",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::tanh",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::hardsigmoid",
    "aten::hardsigmoid_",
    "aten::hardswish",
    "aten::hardswish_",
    "aten::softmax",
    "aten::log_softmax",
    // Shapes and new tensors.
    "aten::cat",
    "aten::stack",
    "aten::chunk",
    "aten::split",
    "aten::clone",
    "aten::contiguous",
    "aten::copy",
    "aten::copy_",
    "aten::detach",
    "aten::expand",
    "aten::expand_as",
    "aten::flatten",
    "aten::unflatten",
    "aten::index",
    "aten::masked_fill",
    "aten::masked_fill_",
    "aten::permute",
    "aten::repeat",
    "aten::reshape",
    "aten::roll",
    "aten::select",
    "aten::slice",
    "aten::squeeze",
    "aten::unsqueeze",
    "aten::swapaxes",
    "aten::t",
    "aten::transpose",
    "aten::view",
    "aten::to",
    "aten::type_as",
    "aten::empty",
    "aten::zeros",
    "aten::zeros_like",
    "aten::ones",
    "aten::ones_like",
    "aten::new_zeros",
    "aten::arange",
    "aten::tensor",
    "aten::fill_",
    "aten::zero_",
];

/// Why each operation outside the allowlist is refused, with where it is.
pub fn refused(operations: &[ScriptOperation]) -> Vec<String> {
    operations
        .iter()
        .filter(|op| !ALLOWED.contains(&op.kind.as_str()))
        .map(|op| {
            let at = if op.location.is_empty() {
                String::new()
            } else {
                format!(" ({})", op.location)
            };
            format!(
                "uses `{}` in {}{at}: not a pure tensor operation backbones may use \
                 (file, network, process and custom operations are refused)",
                op.kind, op.function
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: &str) -> ScriptOperation {
        ScriptOperation {
            kind: kind.into(),
            function: "__torch__.Net.forward".into(),
            location: "net.py:7".into(),
        }
    }

    #[test]
    fn file_and_custom_operations_are_refused_with_where_they_are() {
        let reasons = refused(&[
            op("aten::conv2d"),
            op("aten::from_file"),
            op("my_ops::shell"),
        ]);
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("`aten::from_file` in __torch__.Net.forward (net.py:7)"));
        assert!(reasons[1].contains("`my_ops::shell`"));
    }

    #[test]
    fn the_allowlist_has_no_duplicates() {
        let mut sorted = ALLOWED.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED.len());
    }
}
