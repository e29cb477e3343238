"""Seeds a live finetuned server for the contract run: uploads a small
rendered dataset, trains one model on it, and prints shell assignments of
the ids (FT_DATASET_ID, FT_JOB_ID, FT_MODEL_ID)."""

import io
import json
import random
import sys
import time
import urllib.request
import uuid
import zipfile

from PIL import Image, ImageDraw

BASE = sys.argv[1]


def image(shape: str, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (48, 48), tuple(rng.randrange(0, 120) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(140, 256) for _ in range(3))
    x, y, r = rng.randrange(14, 34), rng.randrange(14, 34), rng.randrange(8, 14)
    if shape == "disc":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def request(method: str, path: str, body: bytes | None = None, content_type: str | None = None):
    req = urllib.request.Request(BASE + path, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=60) as response:
        return json.load(response)


archive = io.BytesIO()
with zipfile.ZipFile(archive, "w") as zf:
    for shape in ("disc", "square"):
        for i in range(6):
            zf.writestr(f"{shape}/{i}.png", image(shape, i))
boundary = uuid.uuid4().hex
form = (
    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"shapes.zip\"\r\n"
    "Content-Type: application/zip\r\n\r\n"
).encode() + archive.getvalue() + f"\r\n--{boundary}--\r\n".encode()
dataset = request("POST", "/datasets", form, f"multipart/form-data; boundary={boundary}")
job = request(
    "POST",
    "/jobs",
    json.dumps({"dataset_id": dataset["id"], "epochs": 1, "image_size": 32}).encode(),
    "application/json",
)
deadline = time.time() + 300
while True:
    job = request("GET", f"/jobs/{job['id']}")
    if job["status"] not in ("queued", "running"):
        break
    if time.time() > deadline:
        sys.exit(f"the seed job is still {job['status']}")
    time.sleep(0.5)
if job["status"] != "succeeded":
    sys.exit(f"the seed job ended {job['status']}: {job.get('error')}")
print(f"FT_DATASET_ID={dataset['id']}")
print(f"FT_JOB_ID={job['id']}")
print(f"FT_MODEL_ID={job['model_id']}")
