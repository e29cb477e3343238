"""Fixtures for the tests against a live server started by scripts/sdk-python-test
(FINETUNED_URL, FT_ADMIN_KEY, FT_PREDICT_KEY)."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

import finetuned_client as fc

CLASSES = ("disc", "square", "triangle")


def render(shape: str, seed: int, side: int = 40) -> Image.Image:
    rng = random.Random(zlib.crc32(f"{shape}{seed}".encode()))
    img = Image.new("RGB", (side, side), tuple(rng.randrange(0, 110) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(150, 256) for _ in range(3))
    x, y, r = rng.randrange(13, side - 13), rng.randrange(13, side - 13), rng.randrange(7, 12)
    if shape == "disc":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], fill=colour)
    return img


@pytest.fixture(scope="session")
def url() -> str:
    return os.environ["FINETUNED_URL"]


@pytest.fixture(scope="session")
def admin_key() -> str:
    return os.environ["FT_ADMIN_KEY"]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    for shape in CLASSES:
        (root / shape).mkdir(parents=True)
        for i in range(8):
            render(shape, i).save(root / shape / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def client(url: str, admin_key: str) -> Any:
    with fc.Client(url, admin_key) as c:
        yield c


@pytest.fixture(scope="session")
def trained(client: fc.Client, shapes: Path) -> tuple[fc.Dataset, fc.Job]:
    dataset = client.datasets.upload(shapes, val_fraction=0.25, seed=1, progress=True)
    job = client.jobs.create(dataset, epochs=2, image_size=32, freeze="head",
                             augmentation={"enabled": False}, cache_features=True)
    return dataset, client.jobs.wait(job, progress=True, timeout=120)
