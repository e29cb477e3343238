"""Writes the browser tests' inputs into a directory: shapes.zip, a small
real image dataset (3 classes x 8 rendered 48 px PNGs in class folders),
and probe.png, one more image of the same kind for the predict playground."""

import io
import random
import sys
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw


def image(shape: str, seed: int) -> bytes:
    rng = random.Random(f"{shape}-{seed}")
    img = Image.new("RGB", (48, 48), tuple(rng.randrange(0, 120) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(140, 256) for _ in range(3))
    x, y, r = rng.randrange(14, 34), rng.randrange(14, 34), rng.randrange(8, 14)
    if shape == "disc":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(out / "shapes.zip", "w") as zf:
    for shape in ("disc", "square", "triangle"):
        for i in range(8):
            zf.writestr(f"{shape}/{i}.png", image(shape, i))
(out / "probe.png").write_bytes(image("disc", 100))
