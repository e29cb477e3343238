"""Writes a zip of phone-sized JPEGs (4032x3024, two classes) of about the
requested size, for scripts/bench-ingest-memory. A few distinct photos are
repeated under new names (stored, not deflated, like camera output), so the
archive is quick to make while every entry is decoded at ingest.

usage: make_big_archive.py OUT.zip MIB"""
import io
import sys
import zipfile

import numpy as np
from PIL import Image


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 3024, 4032
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(0.002, 0.01, 2)
    base = np.sin(x * a) * np.cos(y * b) * 90 + 128
    noise = rng.normal(0, 18, (h, w, 3))
    rgb = np.clip(base[..., None] + noise + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=85)
    return out.getvalue()


def main(path: str, mib: int) -> None:
    photos = [photo(seed) for seed in range(8)]
    target = mib * 1024 * 1024
    written, i = 0, 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        while written < target:
            data = photos[i % len(photos)]
            archive.writestr(f"class{i % 2}/{i:05d}.jpg", data)
            written += len(data)
            i += 1
    print(i)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
