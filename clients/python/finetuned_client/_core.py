"""Transport-free request building and response parsing shared by `Client`
and `AsyncClient`: each operation is a generator that yields the requests it
needs (`Req`) and receives their responses, so the sync and async clients only
differ in how they send."""

from __future__ import annotations

import io
import json
import os
import random
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Generator, Iterable, Iterator, Optional, TypeVar, Union

import httpx
from pydantic import BaseModel, TypeAdapter

from . import _models as m
from ._errors import APIError, error_from_response

T = TypeVar("T")
Op = Generator["Req", httpx.Response, T]
ImageInput = Any  # a path (str / PathLike), bytes, a binary file object, a PIL image or an HxWx3 uint8 numpy array

RETRY_STATUSES = frozenset({429, 503})
MAX_PREDICT_IMAGES = 64  # the server's per-request limit


@dataclass
class Req:
    method: str
    path: str
    params: Optional[dict[str, Any]] = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: Optional[list[tuple[str, tuple[str, bytes, str]]]] = None
    body: Optional[Callable[[], Iterator[bytes]]] = None  # a fresh stream per attempt
    download_to: Optional[Path] = None  # stream a 2xx body into this file
    raise_for_status: bool = True


def backoff(attempt: int, response: Optional[httpx.Response], cap: float = 30.0) -> float:
    """Seconds to wait before retry `attempt` (0-based): `Retry-After` when given, else exponential with jitter."""
    if response is not None:
        try:
            return min(cap, max(0.0, float(response.headers["retry-after"])))
        except (KeyError, ValueError):
            pass
    return min(cap, 0.5 * 2.0**attempt) * (0.5 + random.random() / 2)


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def parse(tp: Any, response: httpx.Response) -> Any:
    return TypeAdapter(tp).validate_json(response.content)


def ident(x: Union[str, uuid.UUID, BaseModel]) -> str:
    """An id from an id string, a UUID or a model that has an `id`."""
    if isinstance(x, BaseModel):
        return str(getattr(x, "id"))
    return str(x)


def clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# -- datasets -----------------------------------------------------------------

class _Sink(io.RawIOBase):
    """A write-only, unseekable stream collecting what zipfile writes until drained."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.chunks.append(bytes(b))
        return len(b)

    def drain(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def zip_folder(folder: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Zips `folder` on the fly: yields the archive chunk by chunk (never whole in memory)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            with open(p, "rb") as src, zf.open(p.relative_to(folder).as_posix(), "w") as dst:
                while data := src.read(chunk):
                    dst.write(data)
                    yield sink.drain()
            yield sink.drain()
    yield sink.drain()


def read_file(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


def upload_body(path: Path) -> tuple[Callable[[], Iterator[bytes]], str, int]:
    """The streamed body, its content type and (about) its size for a folder or an archive."""
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]  # + zip headers, descriptors, directory
        size = sum(p.stat().st_size + 110 + 2 * len(p.relative_to(path).as_posix()) for p in files) + 22
        return (lambda: zip_folder(path)), "application/zip", size
    name = path.name.lower()
    ctype = ("application/gzip" if name.endswith((".gz", ".tgz"))
             else "application/x-tar" if name.endswith(".tar") else "application/zip")
    return (lambda: read_file(path)), ctype, path.stat().st_size


def upload_dataset(body: Callable[[], Iterator[bytes]], ctype: str, params: dict[str, Any]) -> Op[m.Dataset]:
    r = yield Req("POST", "/datasets", params=clean(params), body=body, headers={"content-type": ctype})
    return m.Dataset.model_validate_json(r.content)


def get(tp: type[T], path: str, params: Optional[dict[str, Any]] = None) -> Op[T]:
    r = yield Req("GET", path, params=clean(params or {}))
    result: T = parse(tp, r)
    return result


def delete(path: str) -> Op[None]:
    yield Req("DELETE", path)


# -- jobs -----------------------------------------------------------------------

def create_job(dataset: Any, options: dict[str, Any], idempotency_key: Optional[str]) -> Op[m.Job]:
    # Validation is the server's: its 422 names every offending field.
    body = {k: v.model_dump(mode="json", exclude_unset=True) if isinstance(v, BaseModel) else v
            for k, v in {"dataset_id": ident(dataset), **options}.items()}
    key = idempotency_key or str(uuid.uuid4())  # the same key on every retry: one job at most
    r = yield Req("POST", "/jobs", json=body, headers={"idempotency-key": key})
    return m.Job.model_validate_json(r.content)


def list_jobs(limit: Optional[int], starting_after: Optional[str]) -> Op[tuple[list[m.Job], bool]]:
    """One page of `GET /jobs` (newest first) and whether older jobs follow (its `Link: rel="next"`)."""
    r = yield Req("GET", "/jobs", params=clean({"limit": limit, "starting_after": starting_after}))
    return parse(list[m.Job], r), "next" in r.links


def post_model(tp: type[T], path: str, body: Any = None) -> Op[T]:
    r = yield Req("POST", path, json=body)
    result: T = parse(tp, r)
    return result


class JobMetrics(BaseModel):
    job_id: uuid.UUID
    epochs: list[m.EpochMetrics]


def metrics_frame(epochs: list[m.EpochMetrics]) -> Any:
    import importlib

    pd: Any = importlib.import_module("pandas")
    return pd.DataFrame([e.model_dump(exclude={"per_class", "confusion_matrix"}) for e in epochs]).set_index("epoch")


@dataclass
class Event:
    event: str
    data: Any
    id: Optional[str] = None


class SSEParser:
    """Incremental text/event-stream parser: feed it lines, it returns finished events."""

    def __init__(self) -> None:
        self.event, self.data, self.id = "message", [], None  # type: str, list[str], Optional[str]
        self.last_id: Optional[str] = None

    def feed(self, line: str) -> Optional[Event]:
        if not line:
            if not self.data:
                self.event = "message"
                return None
            raw = "\n".join(self.data)
            try:
                data: Any = json.loads(raw)
            except ValueError:
                data = raw
            ev = Event(self.event, data, self.id)
            self.event, self.data = "message", []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = self.last_id = value
        return None


TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class WaitState:
    """Follows a job's events; draws a live tqdm bar (epoch, step, loss, val accuracy, ETA) when asked."""

    def __init__(self, job: m.Job, progress: bool) -> None:
        self.job_id, self.epochs, self.done = str(job.id), job.epochs, job.status in TERMINAL
        self.bar: Any = None
        self.val_acc: Optional[float] = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1, desc=f"job {self.job_id[:8]}", unit="step", dynamic_ncols=True)
        self.epoch_rows: list[m.EpochMetrics] = []

    def handle(self, ev: Event) -> None:
        d = ev.data if isinstance(ev.data, dict) else {}
        if ev.event == "status":
            self.done = d.get("status") in TERMINAL
            self._post(status=d.get("status"))
        elif ev.event == "progress" and self.bar is not None:
            steps = int(d.get("steps") or 1)
            if self.bar.total != steps:
                self.bar.reset(total=steps)
            self.bar.set_description(f"epoch {d.get('epoch')}/{self.epochs}")
            self.bar.n = int(d.get("step") or 0)
            self._post(loss=d.get("loss"), eta=d.get("eta_seconds"))
        elif ev.event == "epoch":
            row = m.EpochMetrics.model_validate(d)
            self.epoch_rows.append(row)
            self.val_acc = row.val_accuracy
            if self.bar is not None:
                self.bar.set_description(f"epoch {row.epoch}/{self.epochs}")
                self.bar.n = self.bar.total
                self._post(loss=row.train_loss)

    def _post(self, **kv: Any) -> None:
        if self.bar is None:
            return
        post = {k: v for k, v in kv.items() if v is not None}
        if isinstance(post.get("loss"), float):
            post["loss"] = f"{post['loss']:.4f}"
        if isinstance(post.get("eta"), (int, float)):
            post["eta"] = f"{post['eta']:.0f}s"
        if self.val_acc is not None:
            post["val_acc"] = f"{self.val_acc:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- predict --------------------------------------------------------------------

def image_part(index: int, image: ImageInput) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for any accepted image input."""
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        return p.name, p.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image), "application/octet-stream"
    if hasattr(image, "read"):
        f: IO[bytes] = image
        return Path(str(getattr(f, "name", f"image{index}"))).name, f.read(), "application/octet-stream"
    if hasattr(image, "__array_interface__") and not hasattr(image, "save"):
        from PIL import Image

        shape: Any = getattr(image, "shape", ())
        if len(shape) != 3 or shape[2] != 3 or str(getattr(image, "dtype", "")) != "uint8":
            raise TypeError(f"image {index}: numpy arrays must be HxWx3 uint8, got {shape} {getattr(image, 'dtype', '')}")
        image = Image.fromarray(image)
    if hasattr(image, "save"):  # a PIL image: lossless PNG
        out = io.BytesIO()
        image.convert("RGB").save(out, "PNG")
        return f"image{index}.png", out.getvalue(), "image/png"
    raise TypeError(f"image {index}: unsupported type {type(image).__name__}")


def chunks(parts: list[tuple[str, bytes, str]], max_images: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of at most `max_images` images and about `max_bytes` bytes each."""
    start, size = 0, 0
    for i, part in enumerate(parts):
        n = len(part[1]) + 512  # the image plus its multipart headers
        if i > start and (i - start >= max_images or size + n > max_bytes):
            yield start, i
            start, size = i, 0
        size += n
    if start < len(parts):
        yield start, len(parts)


def predict(images: Iterable[ImageInput], model: Optional[str], top_k: int,
            max_images: int, max_bytes: int) -> Op[list[m.Result]]:
    parts = [image_part(i, im) for i, im in enumerate(images)]
    results: list[Optional[m.Result]] = [None] * len(parts)
    todo = list(chunks(parts, max_images, max_bytes))
    params = clean({"model": model, "top_k": top_k})
    while todo:
        a, b = todo.pop(0)
        r = yield Req("POST", "/predict", params=params, raise_for_status=False,
                      files=[("image", p) for p in parts[a:b]])
        if r.status_code == 413 and b - a > 1:  # over the server's byte limit: split
            mid = (a + b) // 2
            todo[:0] = [(a, mid), (mid, b)]
            continue
        if r.status_code == 422 and len(parts) > 1:  # none of this chunk decoded: per-image errors
            err = error_from_response(r)
            for i in range(a, b):
                reason = next((e.reason for e in err.errors if e.path.startswith(f"image[{i - a}]")), err.detail)
                results[i] = m.Result(filename=parts[i][0], error=reason)
            continue
        check(r)
        for i, res in zip(range(a, b), m.PredictResponse.model_validate_json(r.content).results):
            results[i] = res
    return [r if r is not None else m.Result(error="no result") for r in results]


__all__ = ["APIError"]
