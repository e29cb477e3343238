"""The reference a user would write by hand: a PyTorch eager fine-tuning loop
with torchvision transforms and a DataLoader over a folder of JPEGs.

Called by `cargo bench --bench training` in the same invocation as
finetuned's own worker, on the same images, weights, image size, batch size,
augmentation and thread count; prints one JSON line per mode with images/s
of the measured epochs (after a warm-up epoch).

The augmentation is the classic recipe finetuned's jobs default to: the
square image scaled so that its 224/256 centre crop is `--size`, a random
rotation of up to ±20° and zoom of ±20 %, the centre `--size` crop, a random
horizontal flip. The DataLoader decodes and augments in `--workers` worker
processes (2 by default, what a user would pick on 2 cores so decoding
overlaps the training step; 0, 1 and 2 measured within noise of each other
on the loaded development machine, see docs/benchmarks.md).
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


def epoch(model, loader, opt, mode: str) -> tuple[int, float]:
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
    return seen, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True, help="folder of class folders of JPEGs")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs, after one warm-up")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--modes", default="head,full")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    working = round(args.size * 256 / 224)
    tf = T.Compose([
        T.Resize(working),
        T.CenterCrop(working),
        T.RandomAffine(degrees=20, scale=(0.8, 1.2)),
        T.CenterCrop(args.size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    data = torchvision.datasets.ImageFolder(args.images, transform=tf)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    for mode in args.modes.split(","):
        model = build(args.weights, len(data.classes), mode)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        epoch(model, loader, opt, mode)  # warm-up epoch
        seen, seconds = 0, 0.0
        for _ in range(args.epochs):
            n, s = epoch(model, loader, opt, mode)
            seen, seconds = seen + n, seconds + s
        print(json.dumps({"mode": mode, "images_per_second": seen / seconds}), flush=True)


if __name__ == "__main__":
    main()
