"""Writes a small zip of class folders (rendered shapes, JPEG) and one probe
photo-sized JPEG, for scripts/bench-predict."""
import io
import random
import sys
import zipfile

from PIL import Image, ImageDraw


def image(kind: str, rng: random.Random, size=(640, 480)) -> bytes:
    im = Image.new("RGB", size, tuple(rng.randint(0, 110) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    colour = tuple(rng.randint(150, 255) for _ in range(3))
    w, h = size
    x, y, r = rng.randint(w // 3, 2 * w // 3), rng.randint(h // 3, 2 * h // 3), rng.randint(h // 8, h // 4)
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        for sx in range(0, w, 40):
            draw.rectangle([sx, 0, sx + 18, h], fill=colour)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def main(zip_path: str, probe_path: str) -> None:
    rng = random.Random(0)
    with zipfile.ZipFile(zip_path, "w") as archive:
        for kind in ["circle", "square", "stripes"]:
            for i in range(8):
                archive.writestr(f"{kind}/{i}.jpg", image(kind, rng))
    with open(probe_path, "wb") as probe:
        probe.write(image("circle", rng))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
