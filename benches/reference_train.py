"""The reference a user would write by hand: a PyTorch eager fine-tuning loop
with torchvision transforms and a DataLoader over a folder of JPEGs.

Called by `cargo bench --bench training` in the same invocation as
finetuned's own worker, on the same images, weights and thread count; prints
one JSON line per mode with images/s of one training epoch.
"""
import argparse
import json
import time

import torch
import torchvision
from safetensors.torch import load_file
from torchvision import transforms as T


def build(weights: str, classes: int, mode: str) -> torch.nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(load_file(weights), strict=False)
    model.classifier[1] = torch.nn.Linear(1280, classes)
    if mode == "head":
        for p in model.features.parameters():
            p.requires_grad = False
    return model


def epoch(model, loader, opt, mode: str) -> float:
    model.train()
    if mode == "head":
        model.features.eval()  # frozen BatchNorm statistics, as finetuned does
    loss_fn = torch.nn.CrossEntropyLoss()
    seen, started = 0, time.perf_counter()
    for xs, ys in loader:
        opt.zero_grad()
        loss = loss_fn(model(xs), ys)
        loss.backward()
        opt.step()
        seen += len(ys)
    return seen / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True, help="folder of class folders of JPEGs")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--modes", default="head,full")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tf = T.Compose([
        T.Resize(256),
        T.CenterCrop(int(args.size * 256 / 224)),
        T.RandomAffine(degrees=20, scale=(0.8, 1.2)),
        T.CenterCrop(args.size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    data = torchvision.datasets.ImageFolder(args.images, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=0)
    for mode in args.modes.split(","):
        model = build(args.weights, len(data.classes), mode)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        epoch(model, loader, opt, mode)  # warm-up epoch
        print(json.dumps({"mode": mode, "images_per_second": epoch(model, loader, opt, mode)}), flush=True)


if __name__ == "__main__":
    main()
