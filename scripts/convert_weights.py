"""Converts a torchvision state dict (.pth, zip or legacy format) to safetensors.

tch cannot read torch's legacy pickle format, and safetensors round-trips
bit-exactly. BatchNorm's `num_batches_tracked` counters are dropped: tch's
BatchNorm has no such variable.
"""
import os
import sys

import torch
from safetensors.torch import save_file


def main(src: str, dst: str) -> None:
    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = {
        name: tensor.contiguous()
        for name, tensor in state.items()
        if not name.endswith("num_batches_tracked")
    }
    save_file(tensors, dst + ".part")
    os.replace(dst + ".part", dst)
    print(f"converted {len(tensors)} tensors: {src} -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
