"""Loads a model exported by finetuned into torchvision's MobileNetV2 and
prints its softmax scores for a 256x256 canonical PNG, following the
preprocessing contract in model.json. Used by the export test."""
import json
import sys
import zipfile

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import load

archive = zipfile.ZipFile(sys.argv[1])
card = json.loads(archive.read("model.json"))
state = load(archive.read("weights.safetensors"))
model = torchvision.models.mobilenet_v2()
model.classifier[1] = torch.nn.Linear(1280, len(card["labels"]))
state = {("classifier.1." + k[5:] if k.startswith("head.") else k): v for k, v in state.items()}
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
model.eval()

pixels = np.asarray(Image.open(sys.argv[2]).convert("RGB"), dtype=np.float32) / 255.0
x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
x = x[:, :, 16:240, 16:240]
size = card["image_size"]
if size != 224:
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
norm = card["preprocessing"]["normalization"]
x = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
with torch.no_grad():
    probs = model(x).softmax(-1)[0]
print(json.dumps(dict(zip(card["labels"], probs.tolist()))))
