// The web console in a real browser: Debian's headless Chromium, driven by
// playwright-core, against a live `finetuned serve` that scripts/console-test
// starts. Plain node + node:assert; every step prints how long it took.
//
// Environment (set by scripts/console-test):
//   FT_URL      the server, e.g. http://127.0.0.1:PORT (no keys yet)
//   FT_BIN      the finetuned binary (for `keys create`)
//   FT_DATA     the server's data directory
//   FT_INPUTS   a directory with shapes.zip and probe.png (make_dataset.py)
//   FT_OUT      where the screenshots go
//   PLAYWRIGHT_DIR  the folder whose node_modules holds playwright-core

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run scripts/console-test)`);
  return value;
};
const URL_ = env('FT_URL');
const BIN = env('FT_BIN');
const DATA = env('FT_DATA');
const INPUTS = env('FT_INPUTS');
const OUT = env('FT_OUT');
const { chromium } = createRequire(path.join(env('PLAYWRIGHT_DIR'), 'package.json'))('playwright-core');

const ZIP = path.join(INPUTS, 'shapes.zip');
const PROBE = path.join(INPUTS, 'probe.png');
const LONG = 120_000; // the training job, on a loaded 2-core machine
mkdirSync(OUT, { recursive: true });

const began = Date.now();
let stepStart = began;
function step(name) {
  const now = Date.now();
  console.log(`console-test: ${name} (${((now - stepStart) / 1000).toFixed(1)} s)`);
  stepStart = now;
}

async function api(method, route, { body, headers } = {}) {
  const response = await fetch(URL_ + route, { method, body, headers: { Accept: 'application/json', ...headers } });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

// ------------------------------------------------------------------ browser

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  // playwright's launch() gives every run a fresh, temporary user-data-dir.
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

/** Console errors and uncaught exceptions of every page; `allowed` matches the expected ones. */
const errors = [];
const pages = [];
async function newPage(allowed = null) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  pages.push(page);
  page.setDefaultTimeout(20_000);
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    if (allowed && allowed.test(msg.text())) return;
    errors.push(`console error on ${page.url()}: ${msg.text()}`);
  });
  page.on('pageerror', (err) => errors.push(`uncaught on ${page.url()}: ${err.stack || err}`));
  return { context, page };
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(OUT, `${name}.png`), fullPage: true });
}

let failed = null;
try {
  // ------------------------------------------------------------- load time

  const { context, page } = await newPage();
  const timing = () => page.evaluate(() => {
    const [n] = performance.getEntriesByType('navigation');
    return { load: n.loadEventEnd - n.startTime, dcl: n.domContentLoadedEventEnd - n.startTime };
  });
  await page.goto(`${URL_}/ui/datasets`, { waitUntil: 'load' });
  const cold = await timing();
  const warm = [];
  for (let i = 0; i < 5; i++) {
    await page.reload({ waitUntil: 'load' });
    warm.push((await timing()).load);
  }
  warm.sort((a, b) => a - b);
  const median = warm[Math.floor(warm.length / 2)];
  console.log(`console-test: page load (navigation start to load event, loopback): first ${cold.load.toFixed(0)} ms ` +
    `(DOMContentLoaded ${cold.dcl.toFixed(0)} ms), then median ${median.toFixed(0)} ms of ${warm.length} reloads`);
  assert.ok(cold.load < 1000, `the first load took ${cold.load} ms`);
  step('page load measured');

  // --------------------------------------------------------------- dataset

  await page.getByRole('heading', { name: 'All datasets' }).waitFor();
  await shot(page, '01-datasets-empty');
  await page.locator('input[type=file]').setInputFiles(ZIP);
  await page.waitForURL(/\/ui\/datasets\/[0-9a-f-]{36}$/, { timeout: 60_000 });
  const datasetId = page.url().split('/').pop();
  await page.getByRole('heading', { name: 'Classes (3)' }).waitFor({ timeout: 60_000 });
  const classRows = await page.locator('section.panel table tbody tr').evaluateAll((rows) =>
    rows.map((r) => [...r.cells].map((c) => c.textContent)));
  assert.deepEqual(classRows.map((r) => r[0]).sort(), ['disc', 'square', 'triangle']);
  assert.equal(classRows.reduce((sum, r) => sum + Number(r[r.length - 1]), 0), 24, 'the report counts 24 images');
  await page.getByText(/^Skipped files: 0$/).waitFor();
  await page.getByText(/^Leakage \(duplicates across splits\): 0$/).waitFor();
  // Thumbnails: one grid per class, each image decoded by the browser.
  await page.getByRole('heading', { name: 'Samples' }).waitFor();
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll('.thumbs img')];
    return imgs.length >= 3 && imgs.every((img) => img.complete && img.naturalWidth > 0);
  });
  const grids = await page.locator('.thumbs').count();
  assert.equal(grids, 3, 'a thumbnail grid per class');
  const dataset = (await api('GET', `/datasets/${datasetId}`)).body;
  assert.equal(dataset.status, 'ready');
  await shot(page, '02-dataset');
  step(`dataset ${datasetId} uploaded through the page: report and ${await page.locator('.thumbs img').count()} thumbnails`);

  // ------------------------------------------------------------------- job

  await page.goto(`${URL_}/ui/jobs/new?dataset=${datasetId}`);
  await page.locator(`#f-dataset_id option[value="${datasetId}"]`).waitFor({ state: 'attached' });
  await page.locator('#f-backbone option[value="mobilenet_v2"]').waitFor({ state: 'attached' });
  assert.equal(await page.locator('#f-dataset_id').inputValue(), datasetId);
  await page.locator('#f-backbone').selectOption('mobilenet_v2');
  await page.getByText('weights installed').waitFor();
  await page.locator('#f-epochs').fill('2');
  await page.locator('#f-image_size').fill('64');
  await page.locator('#f-batch_size').fill('4');
  // The whole network trains (no cached features): epochs long enough to
  // watch, a few seconds in all.
  await page.locator('#f-freeze').selectOption('full');
  await shot(page, '03-new-job');
  // What the job page shows, in the order it shows it (one observer keeps
  // its records in order): each value the loss chart's point count takes and
  // each status the page displays. The points must come one by one, the
  // first while the page says the job runs, through the page's live stream
  // (no reload happens from here on).
  await page.evaluate(() => {
    window.__shown = [];
    const t0 = performance.now();
    const log = (entry) => {
      const last = window.__shown.filter((e) => Object.keys(e)[0] === Object.keys(entry)[0]).pop();
      if (!last || Object.values(last)[0] !== Object.values(entry)[0]) {
        window.__shown.push(Object.assign(entry, { ms: Math.round(performance.now() - t0) }));
      }
    };
    new MutationObserver((records) => {
      records.forEach((r, i) => {
        if (r.type === 'attributes' && r.target.id === 'chart-loss') {
          // A record holds the value before it: the value it set is the next
          // such record's old value, or the current one.
          const next = records.slice(i + 1).find((x) => x.type === 'attributes' && x.target.id === 'chart-loss');
          log({ points: Number(next ? next.oldValue : r.target.dataset.points) });
        } else if (r.type === 'childList') {
          for (const node of r.addedNodes) {
            const badge = node.querySelector && node.querySelector('#job-status .badge');
            if (badge) log({ status: badge.textContent });
          }
        }
      });
    }).observe(document.body, { subtree: true, childList: true, attributeOldValue: true, attributeFilter: ['data-points'] });
  });
  await page.getByRole('button', { name: 'Start training' }).click();
  await page.waitForURL(/\/ui\/jobs\/[0-9a-f-]{36}$/);
  const jobId = page.url().split('/').pop();
  await page.waitForFunction(() => Number((document.getElementById('chart-loss') || {}).dataset?.points) >= 2,
    null, { timeout: LONG, polling: 100 });
  await page.locator('#job-status .badge', { hasText: 'succeeded' }).waitFor({ timeout: LONG });
  const shownLog = await page.evaluate(() => window.__shown);
  let status = null;
  const points = [];
  for (const e of shownLog) {
    if ('status' in e) status = e.status;
    else if (e.points > 0) points.push({ points: e.points, status, ms: e.ms });
  }
  assert.deepEqual(points.map((p) => p.points), [1, 2], `the loss chart grew one point at a time: ${JSON.stringify(shownLog)}`);
  assert.ok(points.every((p) => p.status === 'running'), `both loss points came while the job ran: ${JSON.stringify(shownLog)}`);
  step(`job ${jobId}: the page showed ${JSON.stringify(shownLog)}`);
  const lossData = await page.locator('#chart-loss').getAttribute('data-points');
  assert.equal(lossData, '2', 'two epochs on the loss chart');
  // The confusion matrix (counts): its cells add up to the validation split.
  await page.locator('#confusion').waitFor();
  const cells = await page.locator('#confusion tbody td').allTextContents();
  assert.equal(cells.length, 9, '3 x 3 cells');
  const sum = cells.reduce((a, c) => a + Number(c), 0);
  assert.equal(sum, dataset.num_val, `confusion cells sum to ${sum}, the validation split has ${dataset.num_val}`);
  assert.equal(await page.locator('#confusion').getAttribute('data-total'), String(dataset.num_val));
  assert.equal(await page.locator('#chart-loss canvas').count(), 1, 'uPlot drew the loss chart');
  const job = (await api('GET', `/jobs/${jobId}`)).body;
  assert.equal(job.status, 'succeeded');
  assert.ok(job.model_id, 'the job made a model');
  await shot(page, '04-job');
  await page.setViewportSize({ width: 390, height: 844 }); // a phone
  await page.waitForFunction(() => document.querySelector('#chart-loss canvas').getBoundingClientRect().width <= 390);
  await shot(page, '04-job-phone');
  await page.setViewportSize({ width: 1280, height: 900 });
  step(`job succeeded; confusion matrix sums to ${sum} = validation images`);

  await page.goto(`${URL_}/ui/jobs`);
  await page.locator(`a[href="/ui/jobs/${jobId}"]`).waitFor();
  await shot(page, '05-jobs');
  // More jobs than a page holds (queued and cancelled at once): the trained
  // one, the oldest, is behind "Load more".
  for (let i = 0; i < 50; i++) {
    const queued = await api('POST', '/jobs', {
      body: JSON.stringify({ dataset_id: datasetId, epochs: 1 }), headers: { 'Content-Type': 'application/json' },
    });
    assert.equal(queued.status, 202, JSON.stringify(queued.body));
    assert.equal((await api('POST', `/jobs/${queued.body.id}/cancel`)).status, 202);
  }
  await page.reload();
  await page.locator('#jobs-more').waitFor();
  assert.equal(await page.locator('tbody tr').count(), 50);
  assert.equal(await page.locator(`a[href="/ui/jobs/${jobId}"]`).count(), 0);
  await page.locator('#jobs-more').click();
  await page.locator(`a[href="/ui/jobs/${jobId}"]`).waitFor();
  assert.equal(await page.locator('tbody tr').count(), 51);
  assert.equal(await page.locator('#jobs-more').count(), 0, 'no more to load');
  await page.goto(`${URL_}/ui/models?model=${job.model_id}`);
  await page.locator(`#model-${job.model_id}`).waitFor();
  await shot(page, '06-models');
  step('jobs and models pages');

  // --------------------------------------------------------------- predict

  await page.goto(`${URL_}/ui/predict?model=${job.model_id}`);
  await page.locator(`#p-model option[value="${job.model_id}"]`).waitFor({ state: 'attached' });
  assert.equal(await page.locator('#p-model').inputValue(), job.model_id);
  await page.locator('input[type=file]').setInputFiles(PROBE);
  const first = page.locator('#predictions .prediction .bar').first();
  await first.waitFor({ timeout: 60_000 });
  const shown = { label: await first.locator('.label').textContent(), score: await first.locator('.score').textContent() };
  const form = new FormData();
  form.append('image', new Blob([readFileSync(PROBE)], { type: 'image/png' }), 'probe.png');
  const answer = await api('POST', `/predict?model=${job.model_id}&top_k=5`, { body: form });
  assert.equal(answer.status, 200, JSON.stringify(answer.body));
  const top = answer.body.results[0].predictions[0];
  assert.equal(shown.label, top.label, 'the playground shows the API top label');
  assert.equal(shown.score, top.score.toFixed(3), 'the playground shows the API top score');
  const barWidth = (await first.locator('.fill').boundingBox()).width;
  const trackWidth = (await first.locator('.track').boundingBox()).width;
  assert.ok(trackWidth > 30, `the score bars have room: ${trackWidth} px`);
  assert.ok(Math.abs(barWidth / trackWidth - top.score) < 0.05, `the top bar is ${barWidth} of ${trackWidth} px for ${top.score}`);
  await shot(page, '07-predict');
  step(`predict: the page and POST /predict agree: ${top.label} ${top.score.toFixed(3)}`);
  await context.close();

  // ------------------------------------------------------------------ keys

  const createKey = (scope) => {
    const out = execFileSync(BIN, ['keys', 'create', '--scope', scope, '--name', `console-test-${scope}`,
      '--data-dir', DATA], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    const token = /ft_[A-Za-z0-9_-]+/.exec(out);
    assert.ok(token, `no token in: ${out}`);
    return token[0];
  };
  const adminKey = createKey('admin');
  const predictKey = createKey('predict');
  for (let i = 0; ; i++) { // the server caches "no keys" for a moment
    if ((await api('GET', '/datasets')).status === 401) break;
    assert.ok(i < 100, 'the API still answers without a key');
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal((await api('GET', `/datasets/${datasetId}`, { headers: { Authorization: `Bearer ${predictKey}` } })).status, 403);
  step('admin and predict keys created beside the running server');

  // The browser reports each 401/403 answer as a console error; those are expected here.
  const keyed = await newPage(/Failed to load resource: the server responded with a status of 40[13]/);
  const kp = keyed.page;
  await kp.goto(`${URL_}/ui/datasets`);
  await kp.locator('#keystate', { hasText: 'a key is required' }).waitFor();
  await kp.locator('#apikey').fill(predictKey);
  await kp.getByRole('button', { name: 'Use key' }).click();
  await kp.locator('#keystate', { hasText: 'predict key' }).waitFor();
  assert.ok(await kp.locator('nav a[href="/ui/datasets"]').isHidden(), 'the admin pages leave the menu');

  for (const [route, apiRoute, name] of [
    [`/ui/datasets/${datasetId}`, `/datasets/${datasetId}`, '08-dataset-predict-key'],
    [`/ui/jobs/${jobId}`, `/jobs/${jobId}`, '09-job-predict-key'],
  ]) {
    const refused = kp.waitForResponse((r) => new URL(r.url()).pathname === apiRoute && r.request().method() === 'GET');
    await kp.goto(URL_ + route);
    assert.equal((await refused).status(), 403, `GET ${apiRoute} with a predict key`);
    const notice = kp.locator('.notice[role=alert]').first();
    await notice.waitFor();
    const text = await notice.textContent();
    assert.match(text, /^403 /, `the page says 403: ${text}`);
    assert.match(text, /A predict key sees only models and predictions\./);
    assert.equal(await kp.locator('.thumbs img, #confusion, #chart-loss canvas').count(), 0, `no data on ${route}`);
    await shot(kp, name);
  }
  await kp.goto(`${URL_}/ui/models`);
  await kp.locator(`#model-${job.model_id}`).waitFor();
  assert.equal(await kp.getByRole('button', { name: 'Make default' }).count(), 0, 'no deploy with a predict key');
  step('predict key: dataset and job pages refused (403, said on the page), models listed');

  // The admin key sees everything again.
  await kp.locator('#apikey').fill(adminKey);
  await kp.getByRole('button', { name: 'Use key' }).click();
  await kp.locator('#keystate', { hasText: 'admin key' }).waitFor();
  await kp.goto(`${URL_}/ui/datasets/${datasetId}`);
  await kp.getByRole('heading', { name: 'Classes (3)' }).waitFor();
  await kp.goto(`${URL_}/ui/jobs/${jobId}`);
  await kp.locator('#confusion').waitFor();
  step('admin key: dataset and job pages shown');
  await keyed.context.close();

  assert.deepEqual(errors, [], 'no console errors');
} catch (err) {
  failed = err;
  for (const [i, page] of pages.entries()) {
    if (!page.isClosed()) await shot(page, `failed-${i}`).catch(() => {});
  }
} finally {
  await browser.close();
}
if (failed) {
  if (errors.length) console.error(`console-test: console errors:\n  ${errors.join('\n  ')}`);
  console.error(failed);
  console.error(`console-test: FAILED after ${((Date.now() - began) / 1000).toFixed(1)} s; screenshots so far in ${OUT}`);
  process.exit(1);
}
console.log(`console-test: passed in ${((Date.now() - began) / 1000).toFixed(1)} s; screenshots in ${OUT}`);
