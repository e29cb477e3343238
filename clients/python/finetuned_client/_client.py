"""`Client` and `AsyncClient`: the same resources and methods over a sync or
an async httpx transport."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, List, Literal, Optional, TypeVar, Union, overload

import httpx

from . import _core as c
from . import _models as m
from ._core import ImageInput, Op, Req

if sys.version_info >= (3, 11):
    from typing import TypedDict, Unpack
else:
    from typing_extensions import TypedDict, Unpack

T = TypeVar("T")
Id = Union[str, Any]  # an id string, a UUID or a model with an `id`
PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class JobOptions(TypedDict, total=False):
    """Every JobRequest field but `dataset_id` (see openapi.yaml for meanings and defaults)."""

    backbone: str
    epochs: int
    batch_size: int
    image_size: int
    seed: int
    learning_rate: float
    pretrained: bool
    freeze: Literal["head", "last_n", "full", "gradual"]
    trainable_stages: int
    unfreeze_every: int
    frozen_batchnorm: bool
    lr_stage_factor: float
    optimizer: Literal["sgd", "adam", "adamw"]
    momentum: float
    nesterov: bool
    weight_decay: float
    gradient_clip_norm: float
    schedule: Literal["constant", "step", "cosine", "one_cycle"]
    step_size: int
    step_gamma: float
    warmup_epochs: float
    label_smoothing: float
    class_weights: Literal["none", "auto"]
    augmentation: Union[m.Augmentation, dict[str, Any]]
    cache_features: bool
    mixed_precision: bool
    early_stopping_patience: int
    selection_metric: Literal["val_accuracy", "val_loss", "val_macro_f1"]
    priority: int
    max_attempts: int


class _Base:
    def __init__(self, base_url: Optional[str], api_key: Optional[str], max_retries: int,
                 max_predict_images: int, max_predict_bytes: int) -> None:
        self.base_url = (base_url or os.environ.get("FINETUNED_URL") or "http://localhost:8080").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("FINETUNED_API_KEY") or None
        self.max_retries = max_retries
        self.max_predict_images, self.max_predict_bytes = max_predict_images, max_predict_bytes

    def _headers(self) -> dict[str, str]:
        h = {"user-agent": "finetuned-client-python/0.1.0"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _retry(self, req: Req, attempt: int, r: Optional[httpx.Response],
               exc: Optional[Exception]) -> Optional[float]:
        """Seconds to wait before retrying, or None to give up. A connection that failed after the
        request went out is only retried when repeating it is safe (GET, or an Idempotency-Key)."""
        if attempt >= self.max_retries:
            return None
        if r is not None and r.status_code not in c.RETRY_STATUSES:
            return None
        safe = req.method == "GET" or "idempotency-key" in req.headers
        if exc is not None and not (isinstance(exc, httpx.ConnectError) or (
                safe and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)))):
            return None
        return c.backoff(attempt, r)


class JobPage(List[m.Job]):
    """A page of `jobs.list()`: a list of jobs, newest first, with `has_more` (older jobs follow) and
    `auto_paging_iter()`, which yields every job from this page on, fetching the next pages as it goes."""

    def __init__(self, client: Client, jobs: list[m.Job], has_more: bool, limit: Optional[int]) -> None:
        super().__init__(jobs)
        self.has_more, self._client, self._limit = has_more, client, limit

    def auto_paging_iter(self) -> Iterator[m.Job]:
        page: JobPage = self
        while True:
            yield from page
            if not page.has_more or not page:
                return
            page = self._client.jobs.list(limit=self._limit, starting_after=page[-1].id)


class AsyncJobPage(List[m.Job]):
    """A page of `AsyncClient.jobs.list()`; `async for job in page.auto_paging_iter()` walks every job
    from this page on."""

    def __init__(self, client: AsyncClient, jobs: list[m.Job], has_more: bool, limit: Optional[int]) -> None:
        super().__init__(jobs)
        self.has_more, self._client, self._limit = has_more, client, limit

    async def auto_paging_iter(self) -> AsyncIterator[m.Job]:
        page: AsyncJobPage = self
        while True:
            for job in page:
                yield job
            if not page.has_more or not page:
                return
            page = await self._client.jobs.list(limit=self._limit, starting_after=page[-1].id)


def _progress_stream(it: Iterator[bytes], total: int, desc: str) -> Iterator[bytes]:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        for chunk in it:
            bar.update(len(chunk))
            yield chunk
        bar.total = bar.n
        bar.refresh()


# ---------------------------------------------------------------------------- sync

class Client(_Base):
    """Synchronous client. `base_url` and `api_key` default to $FINETUNED_URL and $FINETUNED_API_KEY."""

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: Union[float, httpx.Timeout] = DEFAULT_TIMEOUT, max_retries: int = 3,
                 max_predict_images: int = c.MAX_PREDICT_IMAGES, max_predict_bytes: int = 20 << 20,
                 transport: Optional[httpx.BaseTransport] = None) -> None:
        super().__init__(base_url, api_key, max_retries, max_predict_images, max_predict_bytes)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self._headers(), transport=transport)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.backbones = Backbones(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, req: Req) -> httpx.Response:
        """Sends one request, retrying 429/503 (honouring Retry-After) and dropped connections."""
        attempt = 0
        while True:
            r: Optional[httpx.Response] = None
            try:
                request = self.http.build_request(
                    req.method, req.path, params=req.params, json=req.json, headers=req.headers,
                    files=req.files, content=req.body() if req.body else None)
                r = self.http.send(request, stream=True)
                if req.download_to is not None and r.status_code < 400:
                    with open(req.download_to, "wb") as f:
                        for data in r.iter_bytes():
                            f.write(data)
                else:
                    r.read()
                r.close()
            except httpx.TransportError as e:
                wait = self._retry(req, attempt, None, e)
                if wait is None:
                    raise
            else:
                wait = self._retry(req, attempt, r, None)
                if wait is None:
                    return c.check(r) if req.raise_for_status else r
            time.sleep(wait)
            attempt += 1

    def run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                req = op.send(self.send(req))
        except StopIteration as done:
            result: T = done.value
            return result

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], model: Optional[str] = None,
                top_k: int = 5) -> list[m.Result]:
        """Classifies one or many images (paths, bytes, file objects, PIL images, HxWx3 uint8 arrays):
        one result per image, in input order; an image the server cannot decode gets `error`."""
        return self.run(c.predict(_as_list(images), model, top_k, self.max_predict_images, self.max_predict_bytes))


class Datasets:
    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(self, path: PathLike, *, name: Optional[str] = None, val_fraction: Optional[float] = None,
               test_fraction: Optional[float] = None, seed: Optional[int] = None,
               min_per_class: Optional[int] = None, strict: Optional[bool] = None,
               stored_size: Optional[int] = None, progress: bool = False) -> m.Dataset:
        """Uploads a zip/tar(.gz) archive, or a folder zipped on the fly while it streams."""
        p = Path(path)
        body, ctype, size = c.upload_body(p)
        stream = (lambda: _progress_stream(body(), size, f"upload {p.name}")) if progress else body
        params = dict(name=name or p.name, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                      min_per_class=min_per_class, strict=strict, stored_size=stored_size)
        return self._c.run(c.upload_dataset(stream, ctype, params))

    def list(self) -> list[m.Dataset]:
        return self._c.run(c.get(list[m.Dataset], "/datasets"))

    def get(self, dataset: Id) -> m.Dataset:
        return self._c.run(c.get(m.Dataset, f"/datasets/{c.ident(dataset)}"))

    def delete(self, dataset: Id) -> None:
        self._c.run(c.delete(f"/datasets/{c.ident(dataset)}"))


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, dataset: Id, *, idempotency_key: Optional[str] = None, **options: Unpack[JobOptions]) -> m.Job:
        """Queues a fine-tuning job. An Idempotency-Key is sent (generated unless given), so retries make one job."""
        return self._c.run(c.create_job(dataset, dict(options), idempotency_key))

    def get(self, job: Id) -> m.Job:
        return self._c.run(c.get(m.Job, f"/jobs/{c.ident(job)}"))

    def list(self, *, limit: Optional[int] = None, starting_after: Optional[Id] = None) -> JobPage:
        """A page of jobs, newest first: at most `limit` (server default 50, at most 500), those after job
        `starting_after`. `.auto_paging_iter()` on it walks every job: `for job in client.jobs.list().auto_paging_iter()`."""
        after = None if starting_after is None else c.ident(starting_after)
        jobs, more = self._c.run(c.list_jobs(limit, after))
        return JobPage(self._c, jobs, more, limit)

    def cancel(self, job: Id) -> m.Job:
        return self._c.run(c.post_model(m.Job, f"/jobs/{c.ident(job)}/cancel"))

    @overload
    def metrics(self, job: Id, as_dataframe: Literal[False] = False) -> List[m.EpochMetrics]: ...
    @overload
    def metrics(self, job: Id, as_dataframe: Literal[True]) -> Any: ...
    def metrics(self, job: Id, as_dataframe: bool = False) -> Any:
        """Per-epoch metrics; a pandas DataFrame indexed by epoch with `as_dataframe=True`."""
        rows = self._c.run(c.get(c.JobMetrics, f"/jobs/{c.ident(job)}/metrics")).epochs
        return c.metrics_frame(rows) if as_dataframe else rows

    def wait(self, job: Id, *, progress: bool = False, timeout: Optional[float] = None) -> m.Job:
        """Follows the job's event stream until it ends (reconnecting when the stream drops); returns the final job."""
        current = job if isinstance(job, m.Job) else self.get(job)
        state = c.WaitState(current, progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        try:
            while not state.done:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {state.job_id} still running after {timeout}s")
                parser = c.SSEParser()
                try:
                    with self._c.http.stream("GET", f"/jobs/{state.job_id}/events",
                                             timeout=httpx.Timeout(DEFAULT_TIMEOUT.connect, read=None)) as r:
                        if r.status_code in c.RETRY_STATUSES:
                            r.read()
                            time.sleep(c.backoff(attempt, r))
                            attempt += 1
                            continue
                        if r.status_code >= 400:
                            r.read()
                        c.check(r)
                        attempt = 0
                        for line in r.iter_lines():
                            ev = parser.feed(line)
                            if ev is not None:
                                state.handle(ev)
                except (httpx.TransportError, httpx.StreamError):
                    time.sleep(c.backoff(min(attempt, 4), None))
                    attempt += 1
                if not state.done:  # the stream ended early: is the job over anyway?
                    state.done = self.get(state.job_id).status in c.TERMINAL
            return self.get(state.job_id)
        finally:
            state.close()


class Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[m.Model]:
        return self._c.run(c.get(list[m.Model], "/models"))

    def get(self, model: Id) -> m.Model:
        return self._c.run(c.get(m.Model, f"/models/{c.ident(model)}"))

    def deploy(self, model: Id, alias: str = "default") -> dict[str, Any]:
        """Serves the model under `alias`; returns {alias, model_id, previous_model_id}."""
        return self._c.run(c.post_model(dict[str, Any], f"/models/{c.ident(model)}/deploy", {"alias": alias}))

    def export(self, model: Id, path: PathLike, format: Literal["safetensors", "torchscript"] = "safetensors") -> Path:
        """Downloads the model as a zip (weights or TorchScript, plus model.json) to `path`."""
        out = Path(path)
        self._c.send(Req("GET", f"/models/{c.ident(model)}/export", params={"format": format}, download_to=out))
        return out


class Backbones:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[m.Backbone]:
        return self._c.run(c.get(list[m.Backbone], "/backbones"))


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if hasattr(images, "__array_interface__") and len(getattr(images, "shape", ())) == 4:
        return list(images)  # an NxHxWx3 batch
    return [images]


# --------------------------------------------------------------------------- async

async def _aiter(make: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A sync byte stream (zipping, file reads) consumed off the event loop."""
    end = object()
    while (chunk := await asyncio.to_thread(next, make, end)) is not end:
        yield chunk  # type: ignore[misc]


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same resources and methods, as coroutines."""

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: Union[float, httpx.Timeout] = DEFAULT_TIMEOUT, max_retries: int = 3,
                 max_predict_images: int = c.MAX_PREDICT_IMAGES, max_predict_bytes: int = 20 << 20,
                 transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        super().__init__(base_url, api_key, max_retries, max_predict_images, max_predict_bytes)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=self._headers(),
                                      transport=transport)
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)
        self.backbones = AsyncBackbones(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, req: Req) -> httpx.Response:
        attempt = 0
        while True:
            r: Optional[httpx.Response] = None
            try:
                request = self.http.build_request(
                    req.method, req.path, params=req.params, json=req.json, headers=req.headers,
                    files=req.files, content=_aiter(req.body()) if req.body else None)
                r = await self.http.send(request, stream=True)
                if req.download_to is not None and r.status_code < 400:
                    with open(req.download_to, "wb") as f:
                        async for data in r.aiter_bytes():
                            f.write(data)
                else:
                    await r.aread()
                await r.aclose()
            except httpx.TransportError as e:
                wait = self._retry(req, attempt, None, e)
                if wait is None:
                    raise
            else:
                wait = self._retry(req, attempt, r, None)
                if wait is None:
                    return c.check(r) if req.raise_for_status else r
            await asyncio.sleep(wait)
            attempt += 1

    async def run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                req = op.send(await self.send(req))
        except StopIteration as done:
            result: T = done.value
            return result

    async def predict(self, images: Union[ImageInput, Iterable[ImageInput]], model: Optional[str] = None,
                      top_k: int = 5) -> list[m.Result]:
        return await self.run(c.predict(_as_list(images), model, top_k, self.max_predict_images,
                                        self.max_predict_bytes))


class AsyncDatasets:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(self, path: PathLike, *, name: Optional[str] = None, val_fraction: Optional[float] = None,
                     test_fraction: Optional[float] = None, seed: Optional[int] = None,
                     min_per_class: Optional[int] = None, strict: Optional[bool] = None,
                     stored_size: Optional[int] = None, progress: bool = False) -> m.Dataset:
        p = Path(path)
        body, ctype, size = c.upload_body(p)
        stream = (lambda: _progress_stream(body(), size, f"upload {p.name}")) if progress else body
        params = dict(name=name or p.name, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                      min_per_class=min_per_class, strict=strict, stored_size=stored_size)
        return await self._c.run(c.upload_dataset(stream, ctype, params))

    async def list(self) -> list[m.Dataset]:
        return await self._c.run(c.get(list[m.Dataset], "/datasets"))

    async def get(self, dataset: Id) -> m.Dataset:
        return await self._c.run(c.get(m.Dataset, f"/datasets/{c.ident(dataset)}"))

    async def delete(self, dataset: Id) -> None:
        await self._c.run(c.delete(f"/datasets/{c.ident(dataset)}"))


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, dataset: Id, *, idempotency_key: Optional[str] = None,
                     **options: Unpack[JobOptions]) -> m.Job:
        return await self._c.run(c.create_job(dataset, dict(options), idempotency_key))

    async def get(self, job: Id) -> m.Job:
        return await self._c.run(c.get(m.Job, f"/jobs/{c.ident(job)}"))

    async def list(self, *, limit: Optional[int] = None, starting_after: Optional[Id] = None) -> AsyncJobPage:
        after = None if starting_after is None else c.ident(starting_after)
        jobs, more = await self._c.run(c.list_jobs(limit, after))
        return AsyncJobPage(self._c, jobs, more, limit)

    async def cancel(self, job: Id) -> m.Job:
        return await self._c.run(c.post_model(m.Job, f"/jobs/{c.ident(job)}/cancel"))

    async def metrics(self, job: Id, as_dataframe: bool = False) -> Any:
        rows = (await self._c.run(c.get(c.JobMetrics, f"/jobs/{c.ident(job)}/metrics"))).epochs
        return c.metrics_frame(rows) if as_dataframe else rows

    async def wait(self, job: Id, *, progress: bool = False, timeout: Optional[float] = None) -> m.Job:
        current = job if isinstance(job, m.Job) else await self.get(job)
        state = c.WaitState(current, progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        try:
            while not state.done:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {state.job_id} still running after {timeout}s")
                parser = c.SSEParser()
                try:
                    async with self._c.http.stream("GET", f"/jobs/{state.job_id}/events",
                                                   timeout=httpx.Timeout(DEFAULT_TIMEOUT.connect, read=None)) as r:
                        if r.status_code in c.RETRY_STATUSES:
                            await r.aread()
                            await asyncio.sleep(c.backoff(attempt, r))
                            attempt += 1
                            continue
                        if r.status_code >= 400:
                            await r.aread()
                        c.check(r)
                        attempt = 0
                        async for line in r.aiter_lines():
                            ev = parser.feed(line)
                            if ev is not None:
                                state.handle(ev)
                except (httpx.TransportError, httpx.StreamError):
                    await asyncio.sleep(c.backoff(min(attempt, 4), None))
                    attempt += 1
                if not state.done:
                    state.done = (await self.get(state.job_id)).status in c.TERMINAL
            return await self.get(state.job_id)
        finally:
            state.close()


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[m.Model]:
        return await self._c.run(c.get(list[m.Model], "/models"))

    async def get(self, model: Id) -> m.Model:
        return await self._c.run(c.get(m.Model, f"/models/{c.ident(model)}"))

    async def deploy(self, model: Id, alias: str = "default") -> dict[str, Any]:
        return await self._c.run(c.post_model(dict[str, Any], f"/models/{c.ident(model)}/deploy", {"alias": alias}))

    async def export(self, model: Id, path: PathLike,
                     format: Literal["safetensors", "torchscript"] = "safetensors") -> Path:
        out = Path(path)
        await self._c.send(Req("GET", f"/models/{c.ident(model)}/export", params={"format": format}, download_to=out))
        return out


class AsyncBackbones:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[m.Backbone]:
        return await self._c.run(c.get(list[m.Backbone], "/backbones"))
