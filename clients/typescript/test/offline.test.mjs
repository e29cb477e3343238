// The client against tiny local HTTP servers: retries honouring
// Retry-After, the Idempotency-Key on a retried create, problem documents,
// and an event stream that drops and is reopened.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { test } from "node:test";

import { Finetuned, FinetunedError, parseEventStream } from "../dist/index.js";

/** Serves `handler(req, res, hit)` on a free port for the body of `fn(url, hits)`. */
async function withServer(handler, fn) {
  const hits = [];
  const server = createServer((req, res) => {
    hits.push({ method: req.method, url: req.url, headers: req.headers, at: Date.now() });
    handler(req, res, hits.length);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    return await fn(`http://127.0.0.1:${server.address().port}`, hits);
  } finally {
    server.closeAllConnections?.();
    await new Promise((resolve) => server.close(resolve));
  }
}

const problem = (res, status, extra = {}, headers = {}) => {
  res.writeHead(status, { "content-type": "application/problem+json", "x-request-id": "req-1", ...headers });
  res.end(JSON.stringify({ type: "about:blank", title: "Service Unavailable", status, detail: "busy", ...extra }));
};
const json = (res, body, status = 200) => {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
};

test("a 503 with Retry-After is retried after the time it asks for", async () => {
  await withServer((req, res, n) => (n === 1 ? problem(res, 503, {}, { "retry-after": "1" }) : json(res, [{ name: "mobilenet_v2" }])),
    async (url, hits) => {
      const client = new Finetuned({ baseUrl: url });
      const backbones = await client.backbones.list();
      assert.deepEqual(backbones, [{ name: "mobilenet_v2" }]);
      assert.equal(hits.length, 2);
      const waited = hits[1].at - hits[0].at;
      assert.ok(waited >= 900 && waited < 5000, `waited ${waited} ms for Retry-After: 1`);
    });
});

test("a 429 is retried too, and a 503 that persists becomes a FinetunedError", async () => {
  await withServer((req, res, n) => (n === 1 ? problem(res, 429, { title: "Too Many Requests" }, { "retry-after": "0" }) : json(res, [])),
    async (url, hits) => {
      assert.deepEqual(await new Finetuned({ baseUrl: url }).models.list(), []);
      assert.equal(hits.length, 2);
    });
  await withServer((req, res) => problem(res, 503, {}, { "retry-after": "0" }), async (url, hits) => {
    const client = new Finetuned({ baseUrl: url, maxRetries: 2 });
    await assert.rejects(client.jobs.list(), (err) => {
      assert.ok(err instanceof FinetunedError);
      assert.equal(err.status, 503);
      assert.equal(err.title, "Service Unavailable");
      assert.equal(err.detail, "busy");
      assert.equal(err.retryAfter, 0);
      assert.equal(err.requestId, "req-1");
      return true;
    });
    assert.equal(hits.length, 3);
  });
});

/** Serves GET /jobs over `jobs` a page at a time, as the server does (`exposeLink`: the Link header). */
const pagedJobs = (jobs, exposeLink = true) => (req, res) => {
  const url = new URL(req.url, "http://x");
  const limit = Number(url.searchParams.get("limit") ?? 50);
  const after = url.searchParams.get("starting_after");
  const start = after === null ? 0 : jobs.findIndex((j) => j.id === after) + 1;
  const page = jobs.slice(start, start + limit);
  const headers = { "content-type": "application/json" };
  if (exposeLink && start + limit < jobs.length) {
    headers.link = `</jobs?limit=${limit}&starting_after=${page.at(-1).id}>; rel="next"`;
  }
  res.writeHead(200, headers);
  res.end(JSON.stringify(page));
};

test("jobs.list: awaited a page, iterated every job, following the pages", async () => {
  const jobs = Array.from({ length: 7 }, (_, i) => ({ id: `job-${7 - i}` }));
  await withServer(pagedJobs(jobs), async (url, hits) => {
    const client = new Finetuned({ baseUrl: url });
    assert.deepEqual(await client.jobs.list({ limit: 3 }), jobs.slice(0, 3));
    assert.deepEqual(await client.jobs.list({ limit: 3, startingAfter: "job-2" }), jobs.slice(6));
    hits.length = 0;
    const all = [];
    for await (const job of client.jobs.list({ limit: 3 })) all.push(job.id);
    assert.deepEqual(all, jobs.map((j) => j.id));
    assert.deepEqual(hits.map((h) => h.url), ["/jobs?limit=3", "/jobs?limit=3&starting_after=job-5", "/jobs?limit=3&starting_after=job-2"]);
  });
  // Without the Link header (a browser hiding it cross-origin): a full page means "maybe more".
  await withServer(pagedJobs(jobs.slice(0, 6), false), async (url, hits) => {
    const all = [];
    for await (const job of new Finetuned({ baseUrl: url }).jobs.list({ limit: 3 })) all.push(job.id);
    assert.equal(all.length, 6);
    assert.equal(hits.length, 3, "the third page came back empty");
  });
});

test("a retried POST /jobs sends the same Idempotency-Key, and the API key", async () => {
  await withServer((req, res, n) => (n === 1 ? problem(res, 503, {}, { "retry-after": "0" }) : json(res, { id: "j1", status: "queued" }, 202)),
    async (url, hits) => {
      const client = new Finetuned({ baseUrl: url, apiKey: "ft_secret" });
      const job = await client.jobs.create({ dataset_id: "00000000-0000-0000-0000-000000000000", epochs: 1 });
      assert.equal(job.id, "j1");
      assert.equal(hits.length, 2);
      const [a, b] = hits.map((h) => h.headers["idempotency-key"]);
      assert.ok(a && a.length >= 8, `an Idempotency-Key was sent: ${a}`);
      assert.equal(a, b);
      assert.equal(hits[0].headers.authorization, "Bearer ft_secret");
    });
});

test("problem documents keep their errors; other bodies become the detail", async () => {
  await withServer((req, res, n) => (n === 1
    ? problem(res, 422, { title: "Unprocessable Entity", detail: "invalid job", errors: [{ path: "epochs", reason: "must be >= 1" }] })
    : (res.writeHead(502, { "content-type": "text/plain" }), res.end("bad gateway"))),
  async (url) => {
    const client = new Finetuned({ baseUrl: url });
    const err = await client.jobs.create({ dataset_id: "x", epochs: 0 }).catch((e) => e);
    assert.ok(err instanceof FinetunedError);
    assert.deepEqual([err.status, err.title, err.errors], [422, "Unprocessable Entity", [{ path: "epochs", reason: "must be >= 1" }]]);
    assert.match(err.message, /epochs: must be >= 1/);
    const other = await client.jobs.get("x").catch((e) => e);
    assert.deepEqual([other.status, other.detail], [502, "bad gateway"]);
  });
});

test("the event parser handles CRLF, comments, multi-line data and split chunks", async () => {
  const text = ": keep-alive\r\nevent: status\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nevent: epoch\ndata: {\"epoch\":1}\n\ndata: tail-without-blank-line";
  const bytes = new TextEncoder().encode(text);
  const stream = new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += 3) controller.enqueue(bytes.slice(i, i + 3));
      controller.close();
    },
  });
  const events = [];
  for await (const e of parseEventStream(stream)) events.push([e.event, e.data]);
  assert.deepEqual(events, [["status", "{\"a\":\n1}"], ["epoch", "{\"epoch\":1}"]]);
});

test("jobs.watch reopens a dropped event stream and skips what it already saw", async () => {
  const status = (s) => `event: status\ndata: ${JSON.stringify({ status: s, attempt: 1, epoch: 0, best_epoch: null, error: null, model_id: null })}\n\n`;
  const epoch = (n) => `event: epoch\ndata: ${JSON.stringify({ epoch: n, val_accuracy: 0.5 })}\n\n`;
  await withServer((req, res, n) => {
    if (req.url.endsWith("/events")) {
      res.writeHead(200, { "content-type": "text/event-stream" });
      if (n === 1) {
        res.write(status("running") + ":\n\n" + epoch(1));
        setTimeout(() => res.socket.destroy(), 50); // the connection drops mid-job
      } else {
        res.end(status("running") + epoch(1) + epoch(2) + status("succeeded"));
      }
    } else {
      json(res, { id: "j1", status: "succeeded", epoch: 2 });
    }
  }, async (url, hits) => {
    const client = new Finetuned({ baseUrl: url });
    const seen = [];
    const job = await client.jobs.watch("j1", (e) => seen.push(`${e.event}:${e.data.status ?? e.data.epoch}`));
    assert.deepEqual(seen, ["status:running", "epoch:1", "epoch:2", "status:succeeded"]);
    assert.equal(job.status, "succeeded");
    assert.equal(hits.filter((h) => h.url.endsWith("/events")).length, 2);
  });
});

test("the build imports nothing from Node at load time (it must load in a browser)", async () => {
  const { readFile } = await import("node:fs/promises");
  const code = await readFile(new URL("../dist/index.js", import.meta.url), "utf8");
  assert.doesNotMatch(code, /^\s*import\s[^(]/m, "no static imports");
  assert.doesNotMatch(code, /\brequire\(/);
  assert.doesNotMatch(code, /\bBuffer\b/);
});
