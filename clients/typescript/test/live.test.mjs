// The client against a real `finetuned serve` started by
// scripts/sdk-typescript-test: FT_URL (the server), FT_BIN and FT_DATA (for
// `keys create`), FT_INPUTS (shapes.zip: 3 classes of rendered PNGs, and
// probe.png). The tests run in order and share one server: keys come last,
// since the first key turns authentication on.
import assert from "node:assert/strict";
import { execFileSync, execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { Finetuned, FinetunedError } from "../dist/index.js";

const { FT_URL, FT_BIN, FT_DATA, FT_INPUTS } = process.env;
if (!FT_URL || !FT_BIN || !FT_DATA || !FT_INPUTS) {
  throw new Error("run scripts/sdk-typescript-test: it starts the server these tests need");
}
const PKG = join(dirname(fileURLToPath(import.meta.url)), "..");
const ZIP = join(FT_INPUTS, "shapes.zip");
const PROBE = join(FT_INPUTS, "probe.png");
const client = new Finetuned({ baseUrl: FT_URL });
const state = {};

const rejectsWith = (promise, status, check = () => {}) => assert.rejects(promise, (err) => {
  assert.ok(err instanceof FinetunedError, `a FinetunedError, not ${err}`);
  assert.equal(err.status, status, err.message);
  assert.equal(typeof err.title, "string");
  assert.equal(typeof err.detail, "string");
  assert.ok(Array.isArray(err.errors));
  check(err);
  return true;
});

test("backbones.list", async () => {
  const backbones = await client.backbones.list();
  const mobilenet = backbones.find((b) => b.name === "mobilenet_v2");
  assert.ok(mobilenet?.weights, "mobilenet_v2 has its weights");
  assert.equal((await client.backbones.get("mobilenet_v2")).feature_dim, mobilenet.feature_dim);
});

test("datasets.upload from a path (streamed) and from a Blob; list, get, delete", async () => {
  const progress = [];
  const dataset = await client.datasets.upload(ZIP, { valFraction: 0.25, seed: 1, onProgress: (sent, total) => progress.push([sent, total]) });
  assert.equal(dataset.status, "ready");
  assert.equal(dataset.name, "shapes");
  assert.deepEqual(dataset.classes, ["disc", "square", "triangle"]);
  assert.equal(dataset.num_train + dataset.num_val, 24);
  assert.equal(dataset.num_val, 6);
  const size = statSync(ZIP).size;
  assert.deepEqual(progress.at(-1), [size, size], "the progress callback saw every byte");
  state.dataset = dataset;

  const blob = new Blob([readFileSync(ZIP)], { type: "application/zip" });
  const second = await client.datasets.upload(blob, { name: "from-a-blob", testFraction: 0.25 });
  assert.equal(second.name, "from-a-blob");
  assert.ok(second.num_test > 0);
  const listed = (await client.datasets.list()).map((d) => d.id);
  assert.ok(listed.includes(dataset.id) && listed.includes(second.id));
  assert.equal((await client.datasets.get(dataset.id)).id, dataset.id);
  const samples = await client.datasets.samples(dataset.id, { limit: 3 });
  assert.equal(samples.items.length, 3);
  await client.datasets.delete(second.id);
  await rejectsWith(client.datasets.get(second.id), 404);
});

test("jobs.create (idempotent), watch to the end, metrics, list", async () => {
  const request = { dataset_id: state.dataset.id, epochs: 2, image_size: 32, batch_size: 8, freeze: "full" };
  const key = `sdk-ts-${Date.now()}`;
  const job = await client.jobs.create(request, { idempotencyKey: key });
  assert.equal(job.status, "queued");
  assert.equal((await client.jobs.create(request, { idempotencyKey: key })).id, job.id, "the same key gives the same job");

  const events = [];
  const done = await client.jobs.watch(job.id, (event) => events.push(event));
  assert.equal(done.status, "succeeded", done.error ?? "");
  assert.ok(done.model_id);
  const epochs = events.filter((e) => e.event === "epoch");
  assert.ok(epochs.length >= 1, `epoch events: ${JSON.stringify(events)}`);
  assert.deepEqual(epochs.map((e) => e.data.epoch), [1, 2]);
  assert.equal(typeof epochs[0].data.val_accuracy, "number");
  const last = events.at(-1);
  assert.equal(last.event, "status");
  assert.equal(last.data.status, "succeeded");

  // The async iterator over a finished job: its final status, then the end.
  const replay = [];
  for await (const event of client.jobs.events(job.id)) replay.push(event.event);
  assert.equal(replay.at(-1), "status");

  const metrics = await client.jobs.metrics(job.id);
  assert.deepEqual(metrics.epochs.map((m) => m.epoch), [1, 2]);
  assert.ok((await client.jobs.list()).some((j) => j.id === job.id));
  const everything = await client.jobs.list({ limit: 500 });
  const walked = [];
  for await (const j of client.jobs.list({ limit: 1 })) walked.push(j.id);
  assert.deepEqual(walked, everything.map((j) => j.id), "one job a page, every job once, newest first");
  await rejectsWith(client.jobs.list({ limit: 0 }), 422, (err) => assert.equal(err.errors[0].path, "limit"));
  await rejectsWith(client.jobs.cancel(job.id), 409);
  state.job = done;
});

test("predict: the same scores as a raw multipart POST /predict", async () => {
  const model = state.job.model_id;
  const probe = readFileSync(PROBE);
  const form = new FormData();
  form.append("image", new Blob([probe], { type: "image/png" }), "probe.png");
  const raw = await fetch(`${FT_URL}/predict?model=${model}&top_k=3`, { method: "POST", body: form });
  assert.equal(raw.status, 200);
  const expected = await raw.json();

  const one = await client.predict(probe, { model, topK: 3, filenames: ["probe.png"] });
  assert.equal(one.model_id, model);
  assert.deepEqual(one.results, expected.results);

  // Buffer, Uint8Array and Blob in one call, in order; a broken image gets its own error.
  const many = await client.predict([probe, new Uint8Array(probe), new Blob([probe]), new Uint8Array([1, 2, 3])],
    { model, topK: 3, chunkSize: 2 });
  assert.equal(many.results.length, 4);
  // Images in one request share a forward pass: the same scores up to float rounding.
  for (const result of many.results.slice(0, 3)) {
    assert.deepEqual(result.predictions.map((p) => p.label), expected.results[0].predictions.map((p) => p.label));
    result.predictions.forEach((p, i) => assert.ok(Math.abs(p.score - expected.results[0].predictions[i].score) < 1e-6,
      `${p.label}: ${p.score} vs ${expected.results[0].predictions[i].score}`));
  }
  assert.ok(many.results[3].error, "the undecodable image has an error");
  assert.equal(many.results[0].predictions.length, 3);
});

test("models.list, get, deploy, export", async () => {
  const id = state.job.model_id;
  assert.ok((await client.models.list()).some((m) => m.id === id));
  const model = await client.models.get(id);
  assert.deepEqual(model.labels, ["disc", "square", "triangle"]);
  assert.equal(model.lineage?.job?.id, state.job.id);
  const deployed = await client.models.deploy(id, { alias: "sdk-ts" });
  assert.deepEqual([deployed.alias, deployed.model_id], ["sdk-ts", id]);
  const viaAlias = await client.predict(readFileSync(PROBE), { model: "sdk-ts", topK: 1 });
  assert.equal(viaAlias.model_id, id);
  const zip = await client.models.export(id);
  assert.deepEqual([...new Uint8Array(await zip.slice(0, 2).arrayBuffer())], [0x50, 0x4b], "a zip");
  const dir = mkdtempSync(join(tmpdir(), "finetuned-export-"));
  try {
    const path = await client.models.export(id, { path: join(dir, "model.zip") });
    assert.equal(statSync(path).size, zip.size);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the README quick start runs as written", async () => {
  const readme = readFileSync(join(PKG, "README.md"), "utf8");
  const block = /## Quick start[\s\S]*?```js\n([\s\S]*?)```/.exec(readme)?.[1];
  assert.ok(block, "the README has a ```js quick start");
  // Inside the package, so that `@finetuned/client` resolves to it (self-reference).
  const script = join(PKG, ".quickstart.mjs");
  writeFileSync(script, block);
  try {
    const { stdout } = await promisify(execFile)(process.execPath, [script], {
      cwd: FT_INPUTS, env: { ...process.env, FINETUNED_URL: FT_URL }, timeout: 120_000,
    });
    assert.match(stdout, /^dataset [0-9a-f-]{36}: disc, square, triangle$/m);
    assert.match(stdout, /^epoch 1: val accuracy [0-9.]+$/m);
    assert.match(stdout, /^job succeeded, model [0-9a-f-]{36}$/m);
    assert.equal(stdout.trim().split("\n").filter((l) => /^(disc|square|triangle)\t[01]\.\d{3}$/.test(l)).length, 3, stdout);
  } finally {
    if (existsSync(script)) rmSync(script);
  }
});

test("errors: 404 and 422 as FinetunedError with the problem's fields", async () => {
  await rejectsWith(client.jobs.get("00000000-0000-4000-8000-000000000000"), 404, (err) => {
    assert.match(err.detail, /00000000-0000-4000-8000-000000000000/);
    assert.ok(err.requestId);
  });
  await rejectsWith(client.jobs.create({ dataset_id: state.dataset.id, epochs: 0, freeze: "sideways" }), 422, (err) => {
    const paths = err.errors.map((e) => e.path);
    assert.ok(paths.includes("epochs") && paths.includes("freeze"), JSON.stringify(err.errors));
    assert.ok(err.errors.every((e) => typeof e.reason === "string" && e.reason.length > 0));
  });
  await rejectsWith(client.predict(new Uint8Array([1, 2, 3]), { model: state.job.model_id }), 422);
});

test("errors: 401 without a key, 403 with a predict key", async () => {
  const createKey = (scope) => {
    const out = execFileSync(FT_BIN, ["keys", "create", "--scope", scope, "--name", `sdk-ts-${scope}`, "--data-dir", FT_DATA],
      { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    const token = /ft_[A-Za-z0-9_-]+/.exec(out);
    assert.ok(token, `no key in: ${out}`);
    return token[0];
  };
  const admin = new Finetuned({ baseUrl: FT_URL, apiKey: createKey("admin") });
  const predict = new Finetuned({ baseUrl: FT_URL, apiKey: createKey("predict") });
  for (let i = 0; ; i++) { // the server caches "no keys" for a moment
    const answer = await client.datasets.list().then(() => 200, (err) => err.status);
    if (answer === 401) break;
    assert.ok(i < 100, "the API still answers without a key");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await rejectsWith(client.models.list(), 401);
  await rejectsWith(new Finetuned({ baseUrl: FT_URL, apiKey: "ft_not_a_key" }).models.list(), 401);
  await rejectsWith(predict.datasets.list(), 403);
  await rejectsWith(predict.jobs.create({ dataset_id: state.dataset.id }), 403);
  assert.ok((await predict.models.list()).length >= 1, "a predict key reads models");
  const answer = await predict.predict(readFileSync(PROBE), { model: state.job.model_id, topK: 1 });
  assert.equal(answer.results[0].predictions.length, 1);
  assert.ok((await admin.datasets.list()).length >= 1, "an admin key reads everything");
});
