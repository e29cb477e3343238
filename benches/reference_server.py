"""The server a user would write instead of finetuned: FastAPI + uvicorn +
PyTorch eager, torchvision preprocessing, one forward pass per request.

Serves a model exported by finetuned (`GET /models/{id}/export`) at
`POST /predict` with a raw image body, and with a JSON body
`{"images": [base64, …]}` the whole batch in one forward pass (as finetuned
accepts it). Run by `scripts/bench-predict`.
"""
import argparse
import base64
import io
import json
import zipfile

import torch
import torchvision
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image
from safetensors.torch import load
from torchvision import transforms as T


def build(export_zip: str):
    archive = zipfile.ZipFile(export_zip)
    card = json.loads(archive.read("model.json"))
    state = load(archive.read("weights.safetensors"))
    model = torchvision.models.mobilenet_v2()
    model.classifier[1] = torch.nn.Linear(1280, len(card["labels"]))
    renamed = {("classifier.1." + k[len("head."):] if k.startswith("head.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    model.eval()
    norm = card["preprocessing"]["normalization"]
    size = card["image_size"]
    transform = T.Compose([
        T.Resize(256),
        T.CenterCrop(224),
        T.Resize(size),
        T.ToTensor(),
        T.Normalize(norm["mean"], norm["std"]),
    ])
    return model, transform, card["labels"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="zip from GET /models/{id}/export")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, transform, labels = build(args.model)
    app = FastAPI()

    def answer(probs, top_k):
        top = probs.topk(min(top_k, len(labels)))
        return {"predictions": [{"label": labels[i], "score": float(s)} for s, i in zip(top.values, top.indices)]}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 5):
        if request.headers.get("content-type", "").startswith("application/json"):
            encoded = (await request.json())["images"]
            images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in encoded]
            with torch.no_grad():
                probs = model(torch.stack([transform(i) for i in images])).softmax(-1)
            return {"results": [answer(p, top_k) for p in probs]}
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        with torch.no_grad():
            probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
        return answer(probs, top_k)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
