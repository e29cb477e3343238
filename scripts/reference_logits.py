"""ImageNet logits of a backbone's reference PyTorch implementation, for
`finetuned weights verify`: torchvision's MobileNetV2, ResNets and EfficientNets, or EfficientNet-Lite
from the efficientnet-lite-pytorch package, with the same safetensors
weights finetuned loads (every tensor must be used, by name).

usage: reference_logits.py NAME WEIGHTS.safetensors INPUT.safetensors OUT.safetensors
INPUT holds `input` [N, 3, H, W] (already preprocessed); OUT gets `logits`."""
import sys

import torch
from safetensors.torch import load_file, save_file


def reference(name: str) -> torch.nn.Module:
    if name == "mobilenet_v2":
        import torchvision

        return torchvision.models.mobilenet_v2()
    if name.startswith(("resnet", "efficientnet_b")):
        import torchvision

        return getattr(torchvision.models, name)()
    if name.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(name.replace("_", "-"))
    raise SystemExit(f"no reference implementation for {name}")


def main(name: str, weights: str, inputs: str, out: str) -> None:
    torch.set_num_threads(1)
    model = reference(name)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"weights do not match the reference: missing {missing}, unexpected {unexpected}")
    model.eval()
    with torch.no_grad():
        logits = model(load_file(inputs)["input"])
    save_file({"logits": logits.contiguous()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
