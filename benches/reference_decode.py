"""Pillow doing what finetuned's ingest does to each image: decode, RGB,
shorter side to 256 and center crop (bilinear), to uint8 channels-first.
Prints images/s over the files given, in one thread."""
import sys
import time

import numpy as np
from PIL import Image, ImageOps

paths = sys.argv[1:]
started = time.perf_counter()
for path in paths:
    with Image.open(path) as im:
        square = ImageOps.fit(im.convert("RGB"), (256, 256), Image.BILINEAR)
        np.asarray(square).transpose(2, 0, 1).copy()
print(len(paths) / (time.perf_counter() - started))
