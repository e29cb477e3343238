"""Behaviour checked without the server: retries, reconnection, streaming zip, typing, no drift."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

import finetuned_client as fc
from finetuned_client import _core, _models

HERE = Path(__file__).resolve().parent.parent
JOB = {"id": "6f1c1b1e-0000-4000-8000-000000000001", "dataset_id": "6f1c1b1e-0000-4000-8000-000000000002",
       "status": "queued", "config": {}, "attempts": 0, "max_attempts": 3, "epoch": 0, "epochs": 2,
       "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}


def test_503_retried_honouring_retry_after_with_one_idempotency_key(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(503, headers={"retry-after": "2", "content-type": "application/problem+json"},
                                  json={"type": "about:blank", "title": "Service Unavailable", "status": 503,
                                        "detail": "busy"})
        return httpx.Response(202, json=JOB)

    waits: list[float] = []
    monkeypatch.setattr("finetuned_client._client.time.sleep", waits.append)
    client = fc.Client("http://test", "k", transport=httpx.MockTransport(handler))
    job = client.jobs.create(JOB["dataset_id"], epochs=2)
    assert str(job.id) == JOB["id"] and waits == [2.0] and len(seen) == 2
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(keys) == 1 and keys != {""}
    assert seen[0].headers["authorization"] == "Bearer k"


def test_503_gives_up_with_service_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("finetuned_client._client.time.sleep", lambda s: None)
    transport = httpx.MockTransport(lambda r: httpx.Response(
        503, json={"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": "queue full"}))
    with pytest.raises(fc.ServiceUnavailable) as e:
        fc.Client("http://test", max_retries=2, transport=transport).predict(b"x")
    assert e.value.detail == "queue full" and isinstance(e.value, fc.ServerError)


def test_async_429_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, headers={"retry-after": "0"}) if len(calls) == 1 else httpx.Response(200, json=[])

    async def main() -> None:
        async with fc.AsyncClient("http://test", transport=httpx.MockTransport(handler)) as ac:
            assert await ac.models.list() == []

    asyncio.run(main())
    assert len(calls) == 2


def _paged_jobs(total: int) -> tuple[list[dict[str, Any]], Any]:
    """`total` jobs and a handler serving GET /jobs a page at a time, as the server does."""
    jobs = [dict(JOB, id=f"6f1c1b1e-0000-4000-8000-{i:012d}") for i in range(total, 0, -1)]

    def handler(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params.get("limit", "50"))
        after = request.url.params.get("starting_after")
        start = 0 if after is None else [j["id"] for j in jobs].index(after) + 1
        page = jobs[start:start + limit]
        more = start + limit < len(jobs)
        headers = {"link": f'</jobs?limit={limit}&starting_after={page[-1]["id"]}>; rel="next"'} if more else {}
        return httpx.Response(200, json=page, headers=headers)

    return jobs, handler


def test_jobs_list_pages_and_auto_paging_iter_walks_every_job() -> None:
    jobs, handler = _paged_jobs(7)
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: seen.append(r) or handler(r))
    client = fc.Client("http://test", transport=transport)
    first = client.jobs.list(limit=3)
    assert isinstance(first, list) and len(first) == 3 and first.has_more
    assert [str(j.id) for j in first.auto_paging_iter()] == [j["id"] for j in jobs]
    assert len(seen) == 3 and seen[-1].url.params["starting_after"] == jobs[5]["id"]
    last = client.jobs.list(limit=3, starting_after=jobs[5]["id"])
    assert [str(j.id) for j in last] == [jobs[6]["id"]] and not last.has_more

    async def main() -> None:
        async with fc.AsyncClient("http://test", transport=httpx.MockTransport(handler)) as ac:
            page = await ac.jobs.list(limit=2)
            assert page.has_more and len(page) == 2
            assert [str(j.id) async for j in page.auto_paging_iter()] == [j["id"] for j in jobs]

    asyncio.run(main())


def test_wait_reconnects_after_a_dropped_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("finetuned_client._client.time.sleep", lambda s: None)
    streams = []

    def events(n: int) -> Any:
        if n == 1:
            yield b'event: status\ndata: {"status": "running", "epoch": 0}\n\n'
            yield b'event: progress\ndata: {"epoch": 1, "step": 1, "steps": 4, "loss": 0.9, "eta_seconds": 3}\n\n'
            raise httpx.ReadError("connection reset")
        yield b'event: epoch\ndata: {"epoch": 1, "val_accuracy": 0.5, "train_loss": 0.7}\n\n'
        yield b'event: status\ndata: {"status": "succeeded", "epoch": 2}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            streams.append(request)
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(events(len(streams))))
        status = "succeeded" if len(streams) >= 2 else "running"
        return httpx.Response(200, json={**JOB, "status": status})

    client = fc.Client("http://test", transport=httpx.MockTransport(handler))
    job = client.jobs.wait(JOB["id"], progress=True)
    assert job.status == "succeeded" and len(streams) == 2


class _Stream(httpx.SyncByteStream):
    def __init__(self, it: Any) -> None:
        self.it = it

    def __iter__(self) -> Any:
        return self.it


def test_sse_parser() -> None:
    p = _core.SSEParser()
    lines = [": comment", "event: epoch", "data: {\"epoch\":", "data: 1}", "id: 7", "", ""]
    events = [e for e in map(p.feed, lines) if e]
    assert len(events) == 1 and events[0].event == "epoch" and events[0].data == {"epoch": 1} and p.last_id == "7"


def test_folder_zip_streams_in_chunks(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "a" / "b").mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / "b" / f"{i}.bin").write_bytes(bytes([i]) * 300_000)
    chunks = list(_core.zip_folder(tmp_path / "a", chunk=65536))
    assert max(map(len, chunks)) < 70_000  # never the whole archive at once
    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert sorted(zf.namelist()) == ["b/0.bin", "b/1.bin", "b/2.bin"]
    assert zf.read("b/2.bin") == bytes([2]) * 300_000


def test_error_mapping() -> None:
    r = httpx.Response(422, headers={"x-request-id": "rid"}, json={
        "type": "about:blank", "title": "Unprocessable Entity", "status": 422, "detail": "bad",
        "errors": [{"path": "epochs", "reason": "too many"}]})
    e = fc._errors.error_from_response(r)
    assert isinstance(e, fc.Unprocessable) and e.errors == [fc.ErrorDetail("epochs", "too many")]
    assert e.request_id == "rid" and "epochs: too many" in str(e)
    assert type(fc._errors.error_from_response(httpx.Response(507, text="x"))) is fc.InsufficientStorage


def test_job_options_cover_the_spec() -> None:
    assert set(fc.JobOptions.__annotations__) == set(_models.JobRequest.model_fields) - {"dataset_id"}


def test_mypy_strict() -> None:
    run = subprocess.run(["mypy", "--strict", "finetuned_client"], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_models_do_not_drift() -> None:
    if not shutil.which("datamodel-codegen"):
        pytest.skip("datamodel-codegen is not installed")
    run = subprocess.run([str(HERE / "scripts" / "check-models")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
