"""Pillow doing what finetuned's ingest does: read each image out of the
zip, decode, RGB, shorter side to 256 and center crop (bilinear), to uint8
channels-first, stacked and saved as one array file.

usage: reference_ingest.py ARCHIVE OUT.npy PROCESSES
Prints images/s. With PROCESSES > 1 the decoding is spread over a
multiprocessing pool (each worker opens the zip itself)."""
import io
import sys
import time
import zipfile
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageOps

_zip = None


def canonical(name):
    global _zip
    if _zip is None:
        _zip = zipfile.ZipFile(sys.argv[1])
    with Image.open(io.BytesIO(_zip.read(name))) as im:
        square = ImageOps.fit(im.convert("RGB"), (256, 256), Image.BILINEAR)
        return np.asarray(square).transpose(2, 0, 1).copy()


def main():
    archive, out, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    started = time.perf_counter()
    names = [n for n in zipfile.ZipFile(archive).namelist() if n.endswith(".jpg")]
    if processes > 1:
        with Pool(processes) as pool:
            images = pool.map(canonical, names, chunksize=8)
    else:
        images = [canonical(n) for n in names]
    np.save(out, np.stack(images))
    print(len(names) / (time.perf_counter() - started))


if __name__ == "__main__":
    main()
