"""`finetuned-client`: upload, train (with live progress), predict, list, deploy and export
from the shell. Reads $FINETUNED_URL and $FINETUNED_API_KEY."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Optional, Sequence

from ._client import Client
from ._errors import APIError
from ._models import EpochMetrics, Job


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _epochs_report(job: Job, epochs: Sequence[EpochMetrics], labels: Sequence[str]) -> str:
    cols = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds"]
    out = ["per-epoch metrics:", _table(cols, [[getattr(e, k) for k in cols] for e in epochs])]
    best = next((e for e in epochs if e.epoch == job.best_epoch), epochs[-1] if epochs else None)
    if best is not None and best.confusion_matrix:
        names = list(labels) or [str(i) for i in range(len(best.confusion_matrix))]
        out += [f"\nconfusion matrix (epoch {best.epoch}; rows true, columns predicted):",
                _table(["true \\ pred", *names], [[n, *row] for n, row in zip(names, best.confusion_matrix)])]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="finetuned-client", description=__doc__)
    ap.add_argument("--url", help="server URL (default $FINETUNED_URL or http://localhost:8080)")
    ap.add_argument("--api-key", help="API key (default $FINETUNED_API_KEY)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("upload", help="upload a folder (zipped on the fly) or an archive as a dataset")
    up.add_argument("path")
    up.add_argument("--name")
    up.add_argument("--val-fraction", type=float)
    up.add_argument("--test-fraction", type=float)
    up.add_argument("--seed", type=int)
    up.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="queue a fine-tuning job")
    tr.add_argument("dataset")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--backbone")
    tr.add_argument("--image-size", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--freeze", choices=["head", "last_n", "full", "gradual"])
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="any other JobRequest field, e.g. --set 'augmentation={\"enabled\": false}'")
    tr.add_argument("--wait", action="store_true", help="follow the job with a live progress bar, then report")
    tr.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("predict", help="classify images")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--model")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--csv", action="store_true", help="CSV rows: file,rank,label,score,error")

    sub.add_parser("models", help="list models")
    dp = sub.add_parser("deploy", help="serve a model under an alias")
    dp.add_argument("model")
    dp.add_argument("--alias", default="default")
    ex = sub.add_parser("export", help="download a model as a zip")
    ex.add_argument("model")
    ex.add_argument("path")
    ex.add_argument("--format", choices=["safetensors", "torchscript"], default="safetensors")

    a = ap.parse_args(argv)
    try:
        with Client(a.url, a.api_key) as client:
            return _run(client, a)
    except APIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(client: Client, a: argparse.Namespace) -> int:
    if a.cmd == "upload":
        ds = client.datasets.upload(a.path, name=a.name, val_fraction=a.val_fraction,
                                    test_fraction=a.test_fraction, seed=a.seed, progress=not a.no_progress)
        print(f"dataset {ds.id} {ds.status}: {len(ds.classes)} classes, "
              f"{ds.num_train} train / {ds.num_val} val / {ds.num_test} test images")
        if ds.report.skipped:
            print(f"skipped {len(ds.report.skipped)} files")
    elif a.cmd == "train":
        options: dict[str, Any] = {k: v for k, v in dict(
            epochs=a.epochs, backbone=a.backbone, image_size=a.image_size, batch_size=a.batch_size,
            learning_rate=a.learning_rate, freeze=a.freeze).items() if v is not None}
        for kv in a.set:
            key, _, value = kv.partition("=")
            options[key] = json.loads(value)
        job = client.jobs.create(a.dataset, **options)
        print(f"job {job.id} {job.status}")
        if not a.wait:
            return 0
        job = client.jobs.wait(job, progress=not a.no_progress)
        print(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else "")
              + (f"; model {job.model_id}" if job.model_id else ""))
        labels = client.datasets.get(job.dataset_id).classes
        print(_epochs_report(job, client.jobs.metrics(job), labels))
        return 0 if job.status == "succeeded" else 1
    elif a.cmd == "predict":
        results = client.predict(a.images, model=a.model, top_k=a.top_k)
        if a.csv:
            w = csv.writer(sys.stdout)
            w.writerow(["file", "rank", "label", "score", "error"])
            for path, r in zip(a.images, results):
                for rank, p in enumerate(r.predictions or [], 1):
                    w.writerow([path, rank, p.label, p.score, ""])
                if r.error:
                    w.writerow([path, "", "", "", r.error])
        else:
            for path, r in zip(a.images, results):
                top = ", ".join(f"{p.label} {p.score:.3f}" for p in r.predictions or [])
                print(f"{path}: {top or 'error: ' + str(r.error)}")
    elif a.cmd == "models":
        rows = [[str(md.id), md.backbone, md.epoch, md.metrics.val_accuracy if md.metrics else None,
                 ",".join(md.aliases or []), ",".join(md.labels or [])] for md in client.models.list()]
        print(_table(["id", "backbone", "epoch", "val_accuracy", "aliases", "labels"], rows))
    elif a.cmd == "deploy":
        d = client.models.deploy(a.model, a.alias)
        print(f"{d.get('alias')} -> {d.get('model_id')} (was {d.get('previous_model_id')})")
    elif a.cmd == "export":
        print(client.models.export(a.model, a.path, a.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
