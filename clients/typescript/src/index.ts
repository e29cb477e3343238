/**
 * A client for the finetuned HTTP API, for browsers and Node >= 18.
 *
 * It only uses `fetch`, `Blob`, `FormData`, `ReadableStream` and
 * `TextDecoder`; reading files from disk (a dataset path, an export written
 * to a path) imports `node:fs` on demand and is refused outside Node.
 * The request and response types come from `openapi.yaml` (`schema.d.ts`).
 */
import type { components, operations, paths } from "./schema.js";

export type { components, operations, paths };

type Schemas = components["schemas"];
export type Dataset = Schemas["Dataset"];
export type Job = Schemas["Job"];
export type JobRequest = Schemas["JobRequest"];
export type Augmentation = Schemas["Augmentation"];
export type EpochMetrics = Schemas["EpochMetrics"];
export type Model = Schemas["Model"];
export type Backbone = Schemas["Backbone"];
export type PredictResponse = Schemas["PredictResponse"];
export type PredictResult = PredictResponse["results"][number];
export type Problem = Schemas["Problem"];
type Json200<Op> = Op extends { responses: { 200: { content: { "application/json": infer T } } } } ? T : never;
/** `GET /models/{id}`: a model with its lineage. */
export type ModelDetail = Json200<operations["getModel"]>;
export type JobMetrics = Json200<operations["getJobMetrics"]>;
export type DatasetSamples = Json200<operations["getDatasetSamples"]>;
export type Deployment = Json200<operations["deployModel"]>;

/** The data of a `status` event of `/jobs/{id}/events`. */
export interface JobStatusEvent {
  status: Job["status"];
  attempt: number;
  epoch: number;
  best_epoch: number | null;
  error: string | null;
  model_id: string | null;
}
export type JobProgress = NonNullable<Job["progress"]>;
/** One event of `/jobs/{id}/events`, its JSON data parsed. */
export type JobEvent =
  | { event: "status"; data: JobStatusEvent }
  | { event: "progress"; data: JobProgress }
  | { event: "epoch"; data: EpochMetrics };

/** An image for `predict`: a `File`, `Blob`, `Uint8Array` or Node `Buffer`. */
export type ImageInput = Blob | Uint8Array;

export interface FinetunedOptions {
  /** The server, e.g. `http://localhost:8080`; in Node `FINETUNED_URL` when omitted. */
  baseUrl?: string;
  /** An API key (`finetuned keys create`); in Node `FINETUNED_API_KEY` when omitted. */
  apiKey?: string;
  /** Retries of a 503 or 429 answer (and of a dropped connection on a safe request). Default 3. */
  maxRetries?: number;
  /** Longest wait between two tries, in ms, whatever `Retry-After` says. Default 30 000. */
  maxRetryDelayMs?: number;
  /** Per-request time limit in ms (not for event streams). Default 600 000. */
  timeoutMs?: number;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
  /** Headers sent with every request. */
  headers?: Record<string, string>;
}

/** An error answer of the API (an RFC 9457 problem document), or a refused input. */
export class FinetunedError extends Error {
  /** The HTTP status. */
  readonly status: number;
  readonly title: string;
  readonly detail: string;
  /** The problem type URI. */
  readonly type: string;
  /** The offending inputs, where each is and what is wrong. */
  readonly errors: { path: string; reason: string }[];
  readonly errorsOmitted?: number;
  /** The server's `x-request-id`, to find the request in its log. */
  readonly requestId?: string;
  /** `Retry-After` in seconds, when the server sent one. */
  readonly retryAfter?: number;
  readonly method: string;
  readonly url: string;

  constructor(init: {
    status: number; title: string; detail: string; type?: string;
    errors?: { path: string; reason: string }[]; errorsOmitted?: number;
    requestId?: string; retryAfter?: number; method: string; url: string;
  }) {
    super(`${init.status} ${init.title}: ${init.detail}` +
      (init.errors?.length ? ` (${init.errors.map((e) => `${e.path}: ${e.reason}`).join("; ")})` : ""));
    this.name = "FinetunedError";
    this.status = init.status;
    this.title = init.title;
    this.detail = init.detail;
    this.type = init.type ?? "about:blank";
    this.errors = init.errors ?? [];
    this.errorsOmitted = init.errorsOmitted;
    this.requestId = init.requestId;
    this.retryAfter = init.retryAfter;
    this.method = init.method;
    this.url = init.url;
  }
}

type Query = Record<string, string | number | boolean | undefined | null>;
type BodyFactory = () => BodyInit | Promise<BodyInit>;

interface RequestOptions {
  query?: Query;
  headers?: Record<string, string>;
  /** Called once per try, so a stream can be opened again. */
  body?: BodyFactory;
  /** Whether a dropped connection may be retried (safe or idempotent requests). */
  idempotent?: boolean;
  /** No overall time limit (event streams). */
  noTimeout?: boolean;
  signal?: AbortSignal;
}

const RETRY_STATUSES = new Set([429, 503]);

const nodeProcess = (): { env: Record<string, string | undefined>; versions: { node?: string } } | undefined => {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined>; versions?: { node?: string } } }).process;
  return p?.versions?.node ? { env: p.env ?? {}, versions: p.versions } : undefined;
};

/** `import()` hidden from bundlers and from the DOM-only type check. */
const importNode = (name: string): Promise<any> => {
  if (!nodeProcess()) {
    return Promise.reject(new TypeError(`${name} is only available in Node`));
  }
  return import(/* webpackIgnore: true */ /* @vite-ignore */ name);
};

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => { signal?.removeEventListener("abort", onAbort); resolve(); }, ms);
    const onAbort = () => { clearTimeout(timer); reject(signal!.reason); };
    signal?.addEventListener("abort", onAbort, { once: true });
  });

/** Seconds from a `Retry-After` header (delta-seconds or an HTTP date). */
export function parseRetryAfter(value: string | null): number | undefined {
  if (value == null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, (date - Date.now()) / 1000);
}

async function uuid(): Promise<string> {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  if (nodeProcess()) return (await importNode("node:crypto")).randomUUID();
  const hex = [...Array(32)].map(() => Math.floor(Math.random() * 16).toString(16));
  hex[12] = "4";
  hex[16] = ((parseInt(hex[16]!, 16) & 3) | 8).toString(16);
  const s = hex.join("");
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

function toBlob(image: ImageInput): Blob {
  return image instanceof Blob ? image : new Blob([image as Uint8Array<ArrayBuffer>]);
}

/** Parses a `text/event-stream` body into `{event, data, id}` messages. */
export async function* parseEventStream(
  body: ReadableStream<Uint8Array>,
): AsyncGenerator<{ event: string; data: string; id?: string; retry?: number }> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data: string[] = [];
  let id: string | undefined;
  let retry: number | undefined;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (;;) {
        const match = /\r\n|\r|\n/.exec(buffer);
        // A lone \r at the end may be the first half of \r\n.
        if (!match || (match[0] === "\r" && match.index === buffer.length - 1 && !done)) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n"), id, retry };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value_ = colon < 0 ? "" : line.slice(colon + 1);
        if (value_.startsWith(" ")) value_ = value_.slice(1);
        if (field === "event") event = value_;
        else if (field === "data") data.push(value_);
        else if (field === "id") id = value_;
        else if (field === "retry" && /^\d+$/.test(value_)) retry = Number(value_);
      }
      if (done) return; // an unterminated last event is dropped, as EventSource does
    }
  } finally {
    reader.releaseLock();
    body.cancel().catch(() => {});
  }
}

export interface UploadOptions {
  /** The dataset's name; the file's name without its extension by default. */
  name?: string;
  valFraction?: number;
  testFraction?: number;
  seed?: number;
  minPerClass?: number;
  strict?: boolean;
  storedSize?: number;
  /** Bytes sent so far (and the total), for a progress bar. */
  onProgress?: (sent: number, total: number | undefined) => void;
  signal?: AbortSignal;
}

export interface WatchOptions {
  signal?: AbortSignal;
  /** Reconnects in a row without an event before giving up. Default 10. */
  maxReconnects?: number;
}

export interface PredictOptions {
  /** A model id or deployment alias; the `default` deployment when omitted (or null). */
  model?: string | null;
  /** Labels per image (default 5). */
  topK?: number;
  /** File names of the images, in order (they come back as `filename`). */
  filenames?: string[];
  /** Images per request; more are sent in several requests. Default 64, the server's limit. */
  chunkSize?: number;
  signal?: AbortSignal;
}

const stem = (file: string): string => {
  const base = file.split(/[\\/]/).pop() ?? file;
  return base.replace(/(\.tar\.gz|\.tgz|\.tar|\.zip|\.gz)$/i, "");
};

export class Finetuned {
  readonly baseUrl: string;
  readonly datasets: Datasets;
  readonly jobs: Jobs;
  readonly models: Models;
  readonly backbones: Backbones;
  private readonly apiKey?: string;
  private readonly options: FinetunedOptions;
  private readonly fetchImpl: typeof fetch;

  constructor(options: FinetunedOptions = {}) {
    const env = nodeProcess()?.env ?? {};
    this.options = options;
    this.baseUrl = (options.baseUrl ?? env.FINETUNED_URL ?? "http://localhost:8080").replace(/\/+$/, "");
    this.apiKey = options.apiKey ?? env.FINETUNED_API_KEY ?? undefined;
    this.fetchImpl = options.fetch ?? ((...args) => globalThis.fetch(...args));
    this.datasets = new Datasets(this);
    this.jobs = new Jobs(this);
    this.models = new Models(this);
    this.backbones = new Backbones(this);
  }

  /**
   * Classifies images with a trained model. Many images go in requests of
   * at most `chunkSize`; the results come back in input order.
   */
  async predict(images: ImageInput | ImageInput[], options: PredictOptions = {}): Promise<PredictResponse> {
    const list = Array.isArray(images) ? images : [images];
    if (list.length === 0) throw new TypeError("predict needs at least one image");
    const chunk = Math.max(1, options.chunkSize ?? 64);
    const out: PredictResponse = { model_id: "", results: [], elapsed_ms: 0 };
    for (let start = 0; start < list.length; start += chunk) {
      const part = list.slice(start, start + chunk);
      const answer = await this.request<PredictResponse>("POST", "/predict", {
        query: { model: options.model, top_k: options.topK },
        idempotent: true,
        signal: options.signal,
        body: () => {
          const form = new FormData();
          part.forEach((image, i) => {
            const name = options.filenames?.[start + i] ??
              (typeof File !== "undefined" && image instanceof File ? image.name : `image-${start + i}`);
            form.append("image", toBlob(image), name);
          });
          return form;
        },
      });
      out.model_id ||= answer.model_id;
      out.results.push(...answer.results);
      out.elapsed_ms += answer.elapsed_ms;
    }
    return out;
  }

  /** Sends one request (retrying 503/429) and returns its parsed answer. @internal */
  async request<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const response = await this.raw(method, path, options);
    if (response.status === 204) return undefined as T;
    const type = response.headers.get("content-type") ?? "";
    if (type.includes("json")) return (await response.json()) as T;
    return (await response.blob()) as T;
  }

  /** Like `request`, but hands back the `Response` once it is a success. @internal */
  async raw(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const url = new URL(this.baseUrl + path);
    for (const [key, value] of Object.entries(options.query ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
    }
    const headers: Record<string, string> = { accept: "application/json, application/problem+json", ...this.options.headers, ...options.headers };
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    const maxRetries = this.options.maxRetries ?? 3;
    for (let attempt = 0; ; attempt++) {
      const signals = [options.signal, options.noTimeout ? undefined : AbortSignal.timeout(this.options.timeoutMs ?? 600_000)]
        .filter((s): s is AbortSignal => s !== undefined);
      const signal = signals.length > 1 ? anySignal(signals) : signals[0];
      let response: Response;
      try {
        const body = options.body ? await options.body() : undefined;
        const init: RequestInit & { duplex?: "half" } = { method, headers, body, signal };
        if (typeof ReadableStream !== "undefined" && body instanceof ReadableStream) init.duplex = "half";
        response = await this.fetchImpl(url, init);
      } catch (error) {
        if (options.signal?.aborted || !options.idempotent || attempt >= maxRetries) throw error;
        await sleep(this.backoff(attempt), options.signal);
        continue;
      }
      if (response.ok) return response;
      const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
      if (RETRY_STATUSES.has(response.status) && attempt < maxRetries) {
        await response.body?.cancel().catch(() => {});
        const wait = retryAfter !== undefined ? retryAfter * 1000 : this.backoff(attempt);
        await sleep(Math.min(wait, this.options.maxRetryDelayMs ?? 30_000), options.signal);
        continue;
      }
      throw await toError(response, method, url.toString(), retryAfter);
    }
  }

  private backoff(attempt: number): number {
    const base = Math.min(500 * 2 ** attempt, this.options.maxRetryDelayMs ?? 30_000);
    return base / 2 + Math.random() * base / 2;
  }
}

function anySignal(signals: AbortSignal[]): AbortSignal {
  const any = (AbortSignal as { any?: (s: AbortSignal[]) => AbortSignal }).any;
  if (any) return any(signals);
  const controller = new AbortController();
  for (const s of signals) {
    if (s.aborted) { controller.abort(s.reason); break; }
    s.addEventListener("abort", () => controller.abort(s.reason), { once: true });
  }
  return controller.signal;
}

async function toError(response: Response, method: string, url: string, retryAfter?: number): Promise<FinetunedError> {
  const text = await response.text().catch(() => "");
  let problem: Partial<Problem> = {};
  try {
    const parsed = JSON.parse(text);
    if (parsed && typeof parsed === "object") problem = parsed;
  } catch {
    // not a problem document: the text is the detail
  }
  return new FinetunedError({
    status: typeof problem.status === "number" ? problem.status : response.status,
    title: problem.title ?? (response.statusText || "Error"),
    detail: problem.detail ?? text.slice(0, 1000),
    type: problem.type,
    errors: Array.isArray(problem.errors) ? problem.errors : [],
    errorsOmitted: problem.errors_omitted,
    requestId: response.headers.get("x-request-id") ?? undefined,
    retryAfter,
    method,
    url,
  });
}

class Resource {
  constructor(protected readonly client: Finetuned) {}
}

/** One page of a list endpoint, and whether more items follow it. */
interface PageOf<T> {
  items: T[];
  hasMore: boolean;
}

/**
 * A list the server answers a page at a time (`limit`, `starting_after`,
 * `Link: <…>; rel="next"`). Awaited, it is the first page (an array);
 * iterated with `for await`, it is every item, the next pages fetched as
 * they are reached.
 */
export class PagedList<T extends { id: string }> implements PromiseLike<T[]>, AsyncIterable<T> {
  private first?: Promise<PageOf<T>>;

  /** @internal */
  constructor(private readonly fetchPage: (startingAfter: string | undefined) => Promise<PageOf<T>>,
    private readonly startingAfter?: string) {}

  private firstPage(): Promise<PageOf<T>> {
    return (this.first ??= this.fetchPage(this.startingAfter));
  }

  then<A = T[], B = never>(onfulfilled?: ((value: T[]) => A | PromiseLike<A>) | null,
    onrejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    return this.firstPage().then((page) => page.items).then(onfulfilled, onrejected);
  }

  catch<B = never>(onrejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<T[] | B> {
    return this.then(undefined, onrejected);
  }

  /** Every page from this one on. */
  async *pages(): AsyncGenerator<T[]> {
    let page = await this.firstPage();
    for (;;) {
      yield page.items;
      const last = page.items[page.items.length - 1];
      if (!page.hasMore || !last) return;
      page = await this.fetchPage(last.id);
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for await (const items of this.pages()) yield* items;
  }
}

/**
 * Whether a page has a successor: its `Link: rel="next"`, or, where a
 * browser hides the header (cross-origin, not exposed), a full page.
 */
function hasNext(response: Response, count: number, limit: number): boolean {
  const link = response.headers.get("link");
  if (link !== null) return /;\s*rel="?next"?/.test(link);
  return count >= limit;
}

export interface ListJobsOptions {
  /** Jobs per page: 1 to 500, 50 by default. */
  limit?: number;
  /** The id of the job the list starts after (the last one of a previous page). */
  startingAfter?: string;
  signal?: AbortSignal;
}

export class Datasets extends Resource {
  /**
   * Uploads an archive (zip, tar or tar.gz of class folders): a `File` or
   * `Blob`, or in Node a path, streamed from disk. Resolves once the dataset
   * is stored, with its report.
   */
  async upload(source: Blob | string, options: UploadOptions = {}): Promise<Dataset> {
    let name = options.name;
    let body: BodyFactory;
    if (typeof source === "string") {
      if (!nodeProcess()) throw new TypeError("uploading a path needs Node; pass a File or Blob in a browser");
      const fs = await importNode("node:fs");
      const { Readable } = await importNode("node:stream");
      const total: number = (await fs.promises.stat(source)).size;
      name ??= stem(source);
      body = () => {
        const stream: ReadableStream<Uint8Array> = Readable.toWeb(fs.createReadStream(source));
        return options.onProgress ? counted(stream, total, options.onProgress) : stream;
      };
    } else {
      if (typeof File !== "undefined" && source instanceof File) name ??= stem(source.name);
      options.onProgress?.(0, source.size);
      body = () => source;
    }
    const dataset = await this.client.request<Dataset>("POST", "/datasets", {
      query: {
        name,
        val_fraction: options.valFraction,
        test_fraction: options.testFraction,
        seed: options.seed,
        min_per_class: options.minPerClass,
        strict: options.strict,
        stored_size: options.storedSize,
      },
      headers: { "content-type": "application/octet-stream" },
      body,
      signal: options.signal,
    });
    if (typeof source !== "string") options.onProgress?.(source.size, source.size);
    return dataset;
  }

  list(): Promise<Dataset[]> {
    return this.client.request("GET", "/datasets", { idempotent: true });
  }

  get(id: string): Promise<Dataset> {
    return this.client.request("GET", `/datasets/${encodeURIComponent(id)}`, { idempotent: true });
  }

  samples(id: string, query: { class?: string; split?: "train" | "val" | "test"; limit?: number } = {}): Promise<DatasetSamples> {
    return this.client.request("GET", `/datasets/${encodeURIComponent(id)}/samples`, { query, idempotent: true });
  }

  async delete(id: string): Promise<void> {
    await this.client.request("DELETE", `/datasets/${encodeURIComponent(id)}`, { idempotent: true });
  }
}

function counted(stream: ReadableStream<Uint8Array>, total: number, onProgress: (sent: number, total: number) => void) {
  let sent = 0;
  onProgress(0, total);
  return stream.pipeThrough(new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, controller) {
      sent += chunk.byteLength;
      onProgress(sent, total);
      controller.enqueue(chunk);
    },
  }));
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export class Jobs extends Resource {
  /**
   * Queues a fine-tuning job. An `Idempotency-Key` goes with it (a fresh
   * one unless given), so a retried request never makes two jobs.
   */
  async create(request: JobRequest, options: { idempotencyKey?: string; signal?: AbortSignal } = {}): Promise<Job> {
    const key = options.idempotencyKey ?? (await uuid());
    return this.client.request("POST", "/jobs", {
      headers: { "content-type": "application/json", "idempotency-key": key },
      body: () => JSON.stringify(request),
      idempotent: true,
      signal: options.signal,
    });
  }

  /**
   * Jobs, newest first. `await jobs.list()` is one page (50 unless
   * `limit`); `for await (const job of jobs.list())` is every job, page
   * after page.
   */
  list(options: ListJobsOptions = {}): PagedList<Job> {
    return new PagedList<Job>(async (startingAfter) => {
      const response = await this.client.raw("GET", "/jobs", {
        query: { limit: options.limit, starting_after: startingAfter },
        idempotent: true,
        signal: options.signal,
      });
      const items = (await response.json()) as Job[];
      return { items, hasMore: hasNext(response, items.length, options.limit ?? 50) };
    }, options.startingAfter);
  }

  get(id: string): Promise<Job> {
    return this.client.request("GET", `/jobs/${encodeURIComponent(id)}`, { idempotent: true });
  }

  cancel(id: string): Promise<Job> {
    return this.client.request("POST", `/jobs/${encodeURIComponent(id)}/cancel`, { idempotent: true });
  }

  metrics(id: string): Promise<JobMetrics> {
    return this.client.request("GET", `/jobs/${encodeURIComponent(id)}/metrics`, { idempotent: true });
  }

  /**
   * The job's events (`status`, `progress`, `epoch`) as they happen, ending
   * after its final status. A dropped stream is reopened; what the server
   * sends again (epochs already seen, an unchanged status) is skipped.
   */
  async *events(id: string, options: WatchOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
    const maxReconnects = options.maxReconnects ?? 10;
    let lastEpoch = 0;
    let lastStatus = "";
    let lastProgress = "";
    let failures = 0;
    for (;;) {
      let finished = false;
      let lastError: unknown;
      try {
        const response = await this.client.raw("GET", `/jobs/${encodeURIComponent(id)}/events`, {
          headers: { accept: "text/event-stream" },
          idempotent: true,
          noTimeout: true,
          signal: options.signal,
        });
        if (!response.body) throw new TypeError("the event stream has no body");
        for await (const message of parseEventStream(response.body)) {
          if (message.event === "error") throw new Error(`the event stream failed: ${message.data}`);
          if (message.event !== "status" && message.event !== "progress" && message.event !== "epoch") continue;
          failures = 0;
          const data = JSON.parse(message.data);
          if (message.event === "epoch") {
            if (typeof data.epoch === "number" && data.epoch <= lastEpoch) continue;
            lastEpoch = data.epoch ?? lastEpoch;
          } else if (message.event === "status") {
            const key = `${data.status}/${data.attempt}`;
            if (key === lastStatus) continue;
            lastStatus = key;
            finished = TERMINAL.has(data.status);
          } else {
            if (message.data === lastProgress) continue;
            lastProgress = message.data;
          }
          yield { event: message.event, data } as JobEvent;
          if (finished) return;
        }
      } catch (error) {
        if (error instanceof FinetunedError || options.signal?.aborted) throw error;
        lastError = error;
      }
      if (finished) return;
      // The stream ended before the job did (a dropped connection, a server restart).
      if (++failures > maxReconnects) throw lastError ?? new Error(`the event stream of job ${id} kept dropping`);
      await sleep(Math.min(250 * 2 ** failures, 5000), options.signal);
    }
  }

  /**
   * Follows the job to its end, calling `onEvent` for each event, and
   * resolves with the finished job.
   */
  async watch(id: string, onEvent?: (event: JobEvent) => void, options: WatchOptions = {}): Promise<Job> {
    for await (const event of this.events(id, options)) onEvent?.(event);
    return this.get(id);
  }
}

export class Models extends Resource {
  list(): Promise<Model[]> {
    return this.client.request("GET", "/models", { idempotent: true });
  }

  get(id: string): Promise<ModelDetail> {
    return this.client.request("GET", `/models/${encodeURIComponent(id)}`, { idempotent: true });
  }

  /** Serves the model under an alias (`default` unless named). */
  deploy(id: string, options: { alias?: string } = {}): Promise<Deployment> {
    return this.client.request("POST", `/models/${encodeURIComponent(id)}/deploy`, {
      headers: { "content-type": "application/json" },
      body: () => JSON.stringify(options.alias ? { alias: options.alias } : {}),
      idempotent: true,
    });
  }

  /**
   * Downloads the model as a zip (`weights.safetensors` or TorchScript
   * `model.pt`, + `model.json`): a `Blob`, or in Node written to `path`.
   */
  export(id: string, options?: { format?: "safetensors" | "torchscript" }): Promise<Blob>;
  export(id: string, options: { format?: "safetensors" | "torchscript"; path: string }): Promise<string>;
  async export(id: string, options: { format?: "safetensors" | "torchscript"; path?: string } = {}): Promise<Blob | string> {
    const response = await this.client.raw("GET", `/models/${encodeURIComponent(id)}/export`, {
      query: { format: options.format },
      idempotent: true,
    });
    if (options.path === undefined) return response.blob();
    const fs = await importNode("node:fs");
    const { Readable } = await importNode("node:stream");
    const { pipeline } = await importNode("node:stream/promises");
    await pipeline(Readable.fromWeb(response.body), fs.createWriteStream(options.path));
    return options.path;
  }
}

export class Backbones extends Resource {
  list(): Promise<Backbone[]> {
    return this.client.request("GET", "/backbones", { idempotent: true });
  }

  get(name: string): Promise<Backbone> {
    return this.client.request("GET", `/backbones/${encodeURIComponent(name)}`, { idempotent: true });
  }
}

export default Finetuned;
