"""The SDK against a real `finetuned serve`."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import finetuned_client as fc
from conftest import CLASSES, render

HERE = Path(__file__).resolve().parent.parent


def test_upload_folder(client: fc.Client, trained: tuple[fc.Dataset, fc.Job]) -> None:
    dataset, _ = trained
    assert dataset.status == "ready" and dataset.classes == sorted(CLASSES)
    assert dataset.num_train + dataset.num_val == 24 and dataset.num_val == 6
    assert dataset.name == "shapes"
    assert client.datasets.get(dataset.id).id == dataset.id
    assert dataset.id in [d.id for d in client.datasets.list()]


def test_wait_and_metrics(client: fc.Client, trained: tuple[fc.Dataset, fc.Job]) -> None:
    _, job = trained
    assert job.status == "succeeded", job.error
    assert job.model_id is not None and job.epoch == 2
    rows = client.jobs.metrics(job)
    assert [r.epoch for r in rows] == [1, 2]
    assert rows[0].confusion_matrix is not None and len(rows[0].confusion_matrix) == 3
    assert any(r.cached_features for r in client.jobs.get(job).runs or [])
    try:
        import pandas  # noqa: F401
    except ImportError:
        return
    assert list(client.jobs.metrics(job, as_dataframe=True).index) == [1, 2]


def test_predict_matches_raw_post(client: fc.Client, trained: tuple[fc.Dataset, fc.Job], shapes: Path,
                                  url: str, admin_key: str) -> None:
    _, job = trained
    paths = [shapes / c / "7.png" for c in CLASSES]
    arrays = [np.asarray(render(c, 100 + i)) for i, c in enumerate(CLASSES)]
    results = client.predict([*paths, *arrays], model=str(job.model_id), top_k=3)
    assert len(results) == 6 and [r.filename for r in results[:3]] == ["7.png"] * 3

    def png(a: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(a).save(out, "PNG")
        return out.getvalue()

    raw = [p.read_bytes() for p in paths] + [png(a) for a in arrays]
    r = httpx.post(f"{url}/predict", params={"model": str(job.model_id), "top_k": 3},
                   headers={"authorization": f"Bearer {admin_key}"},
                   files=[("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(raw)], timeout=60)
    r.raise_for_status()
    for ours, theirs in zip(results, r.json()["results"]):
        assert ours.error is None and ours.predictions is not None
        assert [p.label for p in ours.predictions] == [p["label"] for p in theirs["predictions"]]
        for p, q in zip(ours.predictions, theirs["predictions"]):
            assert abs((p.score or 0) - q["score"]) <= 1e-6


def test_predict_chunks_and_per_image_errors(client: fc.Client, trained: tuple[fc.Dataset, fc.Job],
                                             shapes: Path) -> None:
    _, job = trained
    small = fc.Client(client.base_url, client.api_key, max_predict_images=2)
    images = [shapes / "disc" / "0.png", b"not an image", render("square", 3), open(shapes / "triangle" / "1.png", "rb")]
    results = small.predict(images, model=str(job.model_id), top_k=1)
    assert [r.error is None for r in results] == [True, False, True, True]
    assert results[1].error and "decode" in results[1].error
    only_bad = small.predict([b"junk", b"junk too"], model=str(job.model_id))  # a 422 chunk, per image
    assert all(r.error for r in only_bad)


def test_idempotent_create(client: fc.Client, trained: tuple[fc.Dataset, fc.Job]) -> None:
    dataset, _ = trained
    key = str(uuid.uuid4())
    a = client.jobs.create(dataset, epochs=1, image_size=32, augmentation={"enabled": False}, idempotency_key=key)
    b = client.jobs.create(dataset, epochs=1, image_size=32, augmentation={"enabled": False}, idempotency_key=key)
    assert a.id == b.id
    assert client.jobs.wait(a).status == "succeeded"


def test_jobs_listed_a_page_at_a_time(client: fc.Client, trained: tuple[fc.Dataset, fc.Job]) -> None:
    _, job = trained
    everything = client.jobs.list(limit=500)
    first = client.jobs.list(limit=1)
    assert len(first) == 1 and first.has_more == (len(everything) > 1)
    walked = [j.id for j in first.auto_paging_iter()]
    assert walked == [j.id for j in everything] and job.id in walked
    with pytest.raises(fc.Unprocessable) as e:
        client.jobs.list(limit=501)
    assert e.value.errors[0].path == "limit"


def test_models_deploy_export_backbones(client: fc.Client, trained: tuple[fc.Dataset, fc.Job],
                                        tmp_path: Path) -> None:
    _, job = trained
    assert job.model_id in [m.id for m in client.models.list()]
    model = client.models.get(job.model_id)
    assert model.labels == sorted(CLASSES)
    deployed = client.models.deploy(model, alias="sdk-test")
    assert deployed["alias"] == "sdk-test" and deployed["model_id"] == str(model.id)
    out = client.models.export(model, tmp_path / "model.zip")
    assert "model.json" in zipfile.ZipFile(out).namelist()
    assert "mobilenet_v2" in [b.name for b in client.backbones.list()]


def test_async_client(url: str, admin_key: str, trained: tuple[fc.Dataset, fc.Job], shapes: Path) -> None:
    import asyncio

    _, job = trained

    async def main() -> None:
        async with fc.AsyncClient(url, admin_key) as ac:
            assert (await ac.jobs.get(job.id)).status == "succeeded"
            assert len(await ac.jobs.metrics(job)) == 2
            res = await ac.predict([shapes / "disc" / "1.png", np.asarray(render("disc", 5))], model=str(job.model_id))
            assert len(res) == 2 and all(r.predictions for r in res)
            with pytest.raises(fc.NotFound):
                await ac.datasets.get(uuid.UUID(int=0))

    asyncio.run(main())


def test_error_statuses(client: fc.Client, trained: tuple[fc.Dataset, fc.Job], url: str) -> None:
    dataset, job = trained
    with pytest.raises(fc.Unauthorized) as e401:
        fc.Client(url, "ft_not_a_key").datasets.list()
    assert e401.value.status == 401 and e401.value.request_id
    with pytest.raises(fc.Forbidden) as e403:
        fc.Client(url, os.environ["FT_PREDICT_KEY"]).jobs.create(dataset, epochs=1)
    assert e403.value.status == 403
    with pytest.raises(fc.NotFound) as e404:
        client.models.get(uuid.UUID(int=0))
    assert e404.value.status == 404 and "00000000" in e404.value.detail
    with pytest.raises(fc.PayloadTooLarge) as e413:  # the server runs with --max-predict-bytes 2000000
        client.predict(b"\x89PNG" + bytes(2_100_000), model=str(job.model_id))
    assert e413.value.status == 413
    with pytest.raises(fc.Unprocessable) as e422:
        client.jobs.create(dataset, epochs=0, learning_rate=100.0)
    paths = {e.path for e in e422.value.errors}
    assert e422.value.status == 422 and {"epochs", "learning_rate"} <= paths, e422.value.errors
    assert isinstance(e422.value, fc.APIError)


def test_cli_train_wait(url: str, admin_key: str, trained: tuple[fc.Dataset, fc.Job], shapes: Path,
                        tmp_path: Path) -> None:
    dataset, _ = trained
    env = {**os.environ, "FINETUNED_URL": url, "FINETUNED_API_KEY": admin_key}
    cli = [sys.executable, "-m", "finetuned_client.cli"]
    run = subprocess.run([*cli, "train", str(dataset.id), "--epochs", "2", "--image-size", "32",
                          "--set", 'augmentation={"enabled": false}', "--wait"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(r"job \S+ succeeded; model ", run.stdout), run.stdout
    assert "per-epoch metrics:" in run.stdout and "confusion matrix" in run.stdout
    table = run.stdout.split("per-epoch metrics:")[1]
    assert re.search(r"^\s+1\s+\d\.\d{4}", table, re.M) and re.search(r"^\s+2\s+\d\.\d{4}", table, re.M)
    assert "epoch 2/2" in run.stderr  # the live bar
    pred = subprocess.run([*cli, "predict", str(shapes / "disc" / "0.png"), "--csv", "--top-k", "2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert pred.returncode == 0, pred.stderr
    assert pred.stdout.splitlines()[0] == "file,rank,label,score,error" and len(pred.stdout.splitlines()) == 3
    models = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, timeout=60)
    assert models.returncode == 0 and "mobilenet_v2" in models.stdout


def test_readme_quickstart(url: str, admin_key: str, trained: tuple[fc.Dataset, fc.Job], shapes: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert blocks
    env = {**os.environ, "FINETUNED_URL": url, "FINETUNED_API_KEY": admin_key}
    run = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=shapes.parent, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stdout and "('epochs', '0 is outside 1..=1000')" in run.stdout, run.stdout
