"""Runs a TorchScript model exported by finetuned on a 256x256 canonical PNG
and prints its softmax scores by label. Used by the export test."""
import json
import sys
import zipfile

import numpy as np
import torch
from PIL import Image

archive = zipfile.ZipFile(sys.argv[1])
card = json.loads(archive.read("model.json"))
module_path = sys.argv[1] + ".pt"
with open(module_path, "wb") as out:
    out.write(archive.read("model.pt"))
model = torch.jit.load(module_path)
pixels = np.asarray(Image.open(sys.argv[2]).convert("RGB"), dtype=np.uint8)
x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
with torch.no_grad():
    probs = model(torch.cat([x, x]))  # a batch of two: the batch size is free
assert probs.shape == (2, len(card["labels"])), probs.shape
print(json.dumps(dict(zip(card["labels"], probs[1].tolist()))))
