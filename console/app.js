// finetuned web console: a single script, no framework, no build step.
// It calls the public HTTP API only (the one openapi.yaml documents), with
// the API key the user entered, kept in sessionStorage.
'use strict';

(() => {
  const KEY = 'finetuned.key';
  const main = document.getElementById('main');

  // ---------------------------------------------------------------- helpers

  /** Builds an element: h('a', {href: '/x', class: 'y'}, 'text', child). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') el.className = value;
      else if (name === 'style') Object.assign(el.style, value);
      else if (name === 'dataset') Object.assign(el.dataset, value);
      else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
      else if (['value', 'checked', 'disabled', 'selected', 'hidden', 'multiple', 'textContent'].includes(name)) el[name] = value;
      else el.setAttribute(name, value === true ? '' : value);
    }
    append(el, children);
    return el;
  }

  /** Replaces an element's children (arrays flattened, null skipped). */
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const short = (id) => (id ? String(id).slice(0, 8) : '');
  const pct = (x) => (x === null || x === undefined ? '–' : (100 * x).toFixed(1) + '%');
  const fixed = (x, n = 3) => (x === null || x === undefined || Number.isNaN(x) ? '–' : Number(x).toFixed(n));
  const when = (t) => (t ? new Date(t).toLocaleString() : '–');

  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + ' ' + units[i];
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '–';
    seconds = Math.max(0, Math.round(seconds));
    const hh = Math.floor(seconds / 3600), mm = Math.floor((seconds % 3600) / 60), ss = seconds % 60;
    return hh ? `${hh}h ${mm}m` : mm ? `${mm}m ${ss}s` : `${ss}s`;
  }

  const badge = (status) => h('span', { class: `badge status-${status}` }, status);
  const link = (href, text) => h('a', { href }, text);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // -------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({ Accept: 'application/json' }, extra);
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = 'Bearer ' + key;
    return headers;
  }

  /** Calls the API; JSON bodies for plain objects; throws ApiError. */
  async function api(method, path, body, signal) {
    const headers = authHeaders();
    let payload = body;
    if (body && !(body instanceof FormData) && !(body instanceof Blob)) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const response = await fetch(path, { method, headers, body: payload, signal, cache: 'no-store' });
    if (response.status === 204) return null;
    const type = response.headers.get('content-type') || '';
    const data = type.includes('json') ? await response.json().catch(() => null) : await response.blob();
    if (!response.ok) {
      const err = new ApiError(response.status, type.includes('json') ? data : null);
      if (response.status === 403 && /`predict` key/.test(err.message)) setScope('predict');
      if (response.status === 401) setScope('unauthorized');
      throw err;
    }
    return data;
  }

  /** Renders an API error (problem+json) as a notice; 403 says what the key may do. */
  function problem(err) {
    if (!(err instanceof ApiError)) {
      if (err && err.name === 'AbortError') return null;
      return h('div', { class: 'notice', role: 'alert' }, String((err && err.message) || err));
    }
    const errors = err.problem.errors || [];
    let hint = null;
    if (err.status === 401) hint = 'Enter an API key above (finetuned keys create).';
    if (err.status === 403 && scope === 'predict') hint = 'A predict key sees only models and predictions.';
    return h('div', { class: 'notice', role: 'alert' },
      h('strong', {}, `${err.status} ${err.problem.title || ''}`), ' ', err.message,
      hint && h('div', { class: 'muted' }, hint),
      errors.length > 0 && h('ul', {}, errors.map((e) => h('li', {}, h('code', {}, e.path), ': ', e.reason))),
      err.problem.errors_omitted ? h('div', { class: 'muted' }, `and ${err.problem.errors_omitted} more`) : null);
  }

  /** Reads an SSE stream with fetch (EventSource cannot send the key). */
  async function readEvents(path, onEvent, signal) {
    const response = await fetch(path, {
      headers: authHeaders({ Accept: 'text/event-stream' }), signal, cache: 'no-store',
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const err = new ApiError(response.status, body);
      err.retryAfter = Number(response.headers.get('retry-after')) || 0;
      throw err;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (!line || line.startsWith(':')) continue;
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? '' : line.slice(colon + 1);
          if (text.startsWith(' ')) text = text.slice(1);
          if (field === 'event') event = text;
          else if (field === 'data') data.push(text);
        }
        if (data.length) onEvent(event, data.join('\n'));
      }
    }
  }

  // ------------------------------------------------------------ key, scope

  // 'admin' (or no keys configured), 'predict', 'unauthorized', or null (unknown).
  let scope = null;

  function setScope(next) {
    if (scope === next) return;
    scope = next;
    for (const a of document.querySelectorAll('nav a[data-scope="admin"]')) a.hidden = scope === 'predict';
    const state = document.getElementById('keystate');
    const key = sessionStorage.getItem(KEY);
    state.textContent = {
      admin: key ? 'admin key' : 'open (no key needed)',
      predict: 'predict key: models and predict only',
      unauthorized: key ? 'key refused' : 'a key is required',
    }[scope] || '';
    state.className = scope === 'unauthorized' ? 'error' : '';
  }

  /** Finds out what the current key may do (HEAD /datasets needs admin). */
  async function probeScope() {
    try {
      const r = await fetch('/datasets', { method: 'HEAD', headers: authHeaders(), cache: 'no-store' });
      if (r.ok) setScope('admin');
      else if (r.status === 403) setScope('predict');
      else if (r.status === 401) setScope('unauthorized');
    } catch (_) { /* offline: leave it unknown */ }
  }

  function setupKeyForm() {
    const form = document.getElementById('keyform');
    const input = document.getElementById('apikey');
    input.value = sessionStorage.getItem(KEY) || '';
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
      scope = null;
      await probeScope();
      render();
    });
    document.getElementById('forget').addEventListener('click', async () => {
      sessionStorage.removeItem(KEY);
      input.value = '';
      scope = null;
      await probeScope();
      render();
    });
  }

  // ----------------------------------------------------------------- router

  const routes = [
    [/^\/(ui\/?)?$/, () => (scope === 'predict' ? modelsPage() : datasetsPage())],
    [/^\/ui\/datasets\/?$/, () => datasetsPage()],
    [/^\/ui\/datasets\/([^/]+)$/, (id) => datasetPage(id)],
    [/^\/ui\/jobs\/?$/, () => jobsPage()],
    [/^\/ui\/jobs\/new\/?$/, () => newJobPage()],
    [/^\/ui\/jobs\/([^/]+)$/, (id) => jobPage(id)],
    [/^\/ui\/models\/?$/, () => modelsPage()],
    [/^\/ui\/predict\/?$/, () => predictPage()],
  ];

  let leave = null; // the current page's cleanup

  function navigate(href, replace) {
    if (replace) history.replaceState(null, '', href); else history.pushState(null, '', href);
    render();
  }

  function render() {
    if (leave) { try { leave(); } catch (_) { /* page already gone */ } }
    leave = null;
    fill(main);
    const path = location.pathname;
    for (const a of document.querySelectorAll('nav a')) {
      const href = a.getAttribute('href');
      const current = path === href || (href !== '/ui/jobs' && path.startsWith(href + '/')) ||
        (href === '/ui/jobs' && /^\/ui\/jobs\/(?!new)/.test(path));
      if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    for (const [pattern, page] of routes) {
      const match = pattern.exec(path);
      if (match) {
        leave = page(...match.slice(1).map(decodeURIComponent)) || null;
        return;
      }
    }
    main.append(h('h1', {}, 'Not found'), h('p', {}, 'No console page here. ', link('/ui/datasets', 'Datasets')));
  }

  document.addEventListener('click', (event) => {
    const a = event.target.closest('a[href]');
    if (!a || a.hasAttribute('download') || a.target || event.defaultPrevented || event.button !== 0 ||
        event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || !url.pathname.startsWith('/ui')) return;
    event.preventDefault();
    navigate(url.pathname + url.search);
    main.focus();
  });
  window.addEventListener('popstate', render);

  /** A page body with its title; returns the container. */
  function page(title, ...children) {
    document.title = `${title} · finetuned`;
    return append(main, [h('h1', {}, title), ...children]);
  }

  /** Runs `fn` now and every `ms` until `stop()`; skips while hidden. */
  function poller(fn, ms) {
    let timer = null, stopped = false;
    const tick = async () => {
      if (stopped) return;
      if (!document.hidden) await fn();
      if (!stopped) timer = setTimeout(tick, ms());
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }

  /** A drop zone with a file picker; `onFiles(FileList)`. */
  function dropZone(text, accept, multiple, onFiles) {
    const input = h('input', { type: 'file', class: 'visually-hidden', accept, multiple,
      onchange: () => { if (input.files.length) onFiles(input.files); input.value = ''; } });
    const zone = h('label', { class: 'drop' }, input, h('span', {}, text));
    zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', (e) => {
      e.preventDefault();
      zone.classList.remove('over');
      if (e.dataTransfer.files.length) onFiles(e.dataTransfer.files);
    });
    return zone;
  }

  // --------------------------------------------------------------- datasets

  function datasetsPage() {
    const status = h('div', { role: 'status' });
    const bar = h('progress', { max: 1, value: 0, hidden: true, 'aria-label': 'Upload progress' });
    const name = h('input', { type: 'text', id: 'ds-name', placeholder: 'from the file name' });
    const val = h('input', { type: 'number', id: 'ds-val', min: 0.05, max: 0.5, step: 'any', value: 0.2 });
    const test = h('input', { type: 'number', id: 'ds-test', min: 0, max: 0.5, step: 'any', value: 0 });
    const list = h('div', { class: 'table-wrap' }, h('p', { class: 'muted' }, 'Loading…'));
    let uploading = false, ingesting = false, gone = false;

    const refresh = async () => {
      try {
        const datasets = await api('GET', '/datasets');
        ingesting = datasets.some((d) => d.status === 'ingesting');
        fill(list, datasetsTable(datasets));
      } catch (err) {
        fill(list, problem(err));
      }
    };
    const stopPolling = poller(refresh, () => (uploading || ingesting ? 1000 : 10000));

    const upload = (files) => {
      const file = files[0];
      if (uploading || !file) return;
      uploading = true;
      const form = new FormData();
      form.append('file', file);
      if (name.value.trim()) form.append('name', name.value.trim());
      if (val.value !== '') form.append('val_fraction', val.value);
      if (test.value !== '') form.append('test_fraction', test.value);
      const xhr = new XMLHttpRequest();
      xhr.open('POST', '/datasets');
      for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
      xhr.responseType = 'json';
      bar.hidden = false;
      bar.value = 0;
      fill(status, `Uploading ${file.name} (${bytes(file.size)})…`);
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        bar.value = e.loaded / e.total;
        fill(status, `Uploading ${file.name}: ${bytes(e.loaded)} of ${bytes(e.total)}`);
      };
      xhr.upload.onload = () => {
        bar.removeAttribute('value'); // indeterminate while the server ingests
        fill(status, `Uploaded ${bytes(file.size)}; the server is ingesting it (progress in the list below)…`);
        refresh();
      };
      xhr.onloadend = () => {
        uploading = false;
        bar.hidden = true;
        if (gone) return;
        if (xhr.status === 201 && xhr.response) {
          navigate(`/ui/datasets/${xhr.response.id}`);
        } else if (xhr.status === 0) {
          fill(status, h('div', { class: 'notice', role: 'alert' }, 'The upload failed: the connection was lost.'));
        } else {
          fill(status, problem(new ApiError(xhr.status, xhr.response)));
          refresh();
        }
      };
      xhr.send(form);
    };

    page('Datasets',
      h('section', { class: 'panel', hidden: scope === 'predict' },
        h('h2', {}, 'Upload a dataset'),
        h('p', { class: 'muted' }, 'A zip, tar or tar.gz of class folders (daisy/*.jpg, rose/*.jpg …), of train/ val/ [test/] folders, or with a labels.csv.'),
        h('div', { class: 'row' },
          h('label', { for: 'ds-name' }, 'Name'), name,
          h('label', { for: 'ds-val' }, 'Validation fraction'), val,
          h('label', { for: 'ds-test' }, 'Test fraction'), test),
        h('p', {}),
        dropZone('Drop an archive here, or press to choose one', '.zip,.tar,.gz,.tgz,application/zip,application/x-tar,application/gzip', false, upload),
        h('p', {}), bar, status),
      h('h2', {}, 'All datasets'), list);
    return () => { gone = true; stopPolling(); };
  }

  function datasetsTable(datasets) {
    if (!datasets.length) return h('p', { class: 'muted' }, 'No datasets yet: upload one above.');
    return h('table', {},
      h('thead', {}, h('tr', {}, ['Name', 'Status', 'Classes', 'Train', 'Val', 'Test', 'Size', 'Created', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, datasets.map((d) => h('tr', {},
        h('td', {}, link(`/ui/datasets/${d.id}`, d.name || short(d.id))),
        h('td', {}, badge(d.status), d.progress ? ingestProgress(d.progress) : null),
        h('td', { class: 'num' }, d.classes.length),
        h('td', { class: 'num' }, d.num_train), h('td', { class: 'num' }, d.num_val), h('td', { class: 'num' }, d.num_test),
        h('td', { class: 'num' }, bytes(d.bytes)),
        h('td', {}, when(d.created_at)),
        h('td', {}, d.status === 'ready' ? link(`/ui/jobs/new?dataset=${d.id}`, 'Train') : null)))));
  }

  function ingestProgress(p) {
    const label = `${p.stage} ${p.done}/${p.total || '?'}`;
    return h('div', { class: 'progress-line' },
      h('progress', { max: p.total || 1, value: p.total ? p.done : null, 'aria-label': label }),
      h('span', { class: 'muted' }, label));
  }

  function datasetPage(id) {
    const head = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
    const report = h('div', {});
    const samples = h('div', {});
    let stop = null, gone = false, shown = false;

    const load = async () => {
      let d;
      try {
        d = await api('GET', `/datasets/${encodeURIComponent(id)}`);
      } catch (err) {
        fill(head, problem(err));
        if (stop) { stop(); stop = null; }
        return;
      }
      document.title = `${d.name} · finetuned`;
      main.querySelector('h1').textContent = `Dataset ${d.name}`;
      fill(head, datasetHeader(d));
      if (d.status === 'ingesting') return;
      if (stop) { stop(); stop = null; }
      if (shown) return;
      shown = true;
      fill(report, datasetReport(d));
      if (d.status === 'ready') loadSamples(d);
    };

    const loadSamples = async (d) => {
      const perClass = Math.max(1, Math.min(8, Math.floor(100 / Math.max(1, d.classes.length))));
      const limit = Math.min(100, perClass * d.classes.length);
      fill(samples, h('p', { class: 'muted' }, 'Loading samples…'));
      try {
        const { items } = await api('GET', `/datasets/${d.id}/samples?limit=${limit}`);
        if (gone) return;
        const byClass = new Map(d.classes.map((c) => [c, []]));
        for (const item of items) {
          if (!byClass.has(item.class)) byClass.set(item.class, []);
          byClass.get(item.class).push(item);
        }
        fill(samples, h('h2', {}, 'Samples'), [...byClass].filter(([, list]) => list.length).map(([cls, list]) => [
          h('h3', {}, cls),
          h('div', { class: 'thumbs' }, list.map((s) => h('figure', {},
            h('img', { src: s.thumbnail, alt: `${cls}: ${s.path}`, title: `${s.split}: ${s.path}`, width: 96, height: 96, loading: 'lazy' }),
            h('figcaption', {}, `${s.split} · ${s.path.split('/').pop()}`)))),
        ]));
      } catch (err) {
        fill(samples, problem(err));
      }
    };

    const remove = async (button) => {
      if (!confirm('Delete this dataset and its files?')) return;
      button.disabled = true;
      try {
        await api('DELETE', `/datasets/${encodeURIComponent(id)}`);
        navigate('/ui/datasets');
      } catch (err) {
        button.disabled = false;
        head.append(problem(err));
      }
    };

    const actions = h('div', { class: 'row' },
      link(`/ui/jobs/new?dataset=${encodeURIComponent(id)}`, 'Train a model on it'),
      h('button', { type: 'button', class: 'danger', onclick: (e) => remove(e.currentTarget) }, 'Delete'));
    page('Dataset', h('section', { class: 'panel' }, head, actions), report, samples);
    stop = poller(load, () => 1000);
    return () => { gone = true; if (stop) stop(); };
  }

  function datasetHeader(d) {
    return h('div', {},
      h('dl', { class: 'kv' },
        h('dt', {}, 'Status'), h('dd', {}, badge(d.status), d.progress ? ingestProgress(d.progress) : null),
        h('dt', {}, 'Id'), h('dd', { class: 'mono' }, d.id),
        h('dt', {}, 'Images'), h('dd', {}, `${d.num_train} train, ${d.num_val} val, ${d.num_test} test`),
        h('dt', {}, 'Stored at'), h('dd', {}, `${d.stored_size} px`),
        h('dt', {}, 'Archive'), h('dd', {}, bytes(d.bytes)),
        h('dt', {}, 'Created'), h('dd', {}, when(d.created_at))),
      h('p', {}));
  }

  function datasetReport(d) {
    const splits = ['train', 'val', 'test'].filter((s) => s !== 'test' || d.num_test > 0);
    const count = (split, cls) => ((d.counts[split] || {})[cls] || 0);
    const r = d.report || {};
    const skipped = r.skipped || [], duplicates = r.duplicates || [], leakage = r.leakage || [];
    const more = (n) => (n ? h('p', { class: 'muted' }, `and ${n} more`) : null);
    return h('div', {},
      h('section', { class: 'panel' },
        h('h2', {}, `Classes (${d.classes.length})`),
        h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, h('th', {}, 'Class'), splits.map((s) => h('th', { class: 'num' }, s)), h('th', { class: 'num' }, 'total'))),
          h('tbody', {}, d.classes.map((c) => h('tr', {},
            h('td', {}, c),
            splits.map((s) => h('td', { class: 'num' }, count(s, c))),
            h('td', { class: 'num' }, splits.reduce((sum, s) => sum + count(s, c), 0)))))))),
      h('section', { class: 'panel' },
        h('h2', {}, 'Report'),
        h('details', { open: skipped.length > 0 && skipped.length <= 20 },
          h('summary', {}, `Skipped files: ${skipped.length + (r.skipped_omitted || 0)}`),
          h('div', { class: 'table-wrap' }, h('table', {},
            h('tbody', {}, skipped.map((s) => h('tr', {}, h('td', { class: 'mono' }, s.path), h('td', {}, s.reason)))))),
          more(r.skipped_omitted)),
        h('details', {},
          h('summary', {}, `Duplicate groups (identical bytes): ${duplicates.length + (r.duplicates_omitted || 0)}`),
          h('ul', {}, duplicates.map((g) => h('li', { class: 'mono' }, g.join(' = ')))), more(r.duplicates_omitted)),
        h('details', { open: leakage.length > 0 },
          h('summary', { class: leakage.length ? 'warn' : '' },
            `Leakage (duplicates across splits): ${leakage.length + (r.leakage_omitted || 0)}`),
          leakage.length ? h('p', { class: 'warn' }, 'These images are in more than one split: the validation score flatters the model.') : null,
          h('ul', {}, leakage.map((g) => h('li', { class: 'mono' }, g.join(' = ')))), more(r.leakage_omitted))));
  }

  // ---------------------------------------------------------------- new job

  // [path, label, kind, default, extra]; paths are the API's field names.
  const JOB_FIELDS = [
    ['Basics', [
      ['epochs', 'Epochs', 'int', 5, { min: 1, max: 1000 }],
      ['batch_size', 'Batch size', 'int', 32, { min: 1, max: 4096 }],
      ['image_size', 'Input size (px)', 'int', null, { min: 32, max: 1024, hint: "blank: the backbone's" }],
      ['learning_rate', 'Learning rate', 'num', 0.001, { min: 1e-8, max: 10 }],
      ['seed', 'Seed', 'int', 0, { min: 0 }],
      ['pretrained', 'Start from ImageNet weights', 'bool', true],
    ]],
    ['Freezing', [
      ['freeze', 'Freeze', 'select', 'head', { options: ['head', 'last_n', 'full', 'gradual'] }],
      ['trainable_stages', 'Trainable stages (last_n)', 'int', 2, { min: 1 }],
      ['unfreeze_every', 'Unfreeze every N epochs (gradual)', 'int', 1, { min: 1 }],
      ['frozen_batchnorm', 'Frozen stages keep BatchNorm statistics', 'bool', true],
    ]],
    ['Optimizer and schedule', [
      ['optimizer', 'Optimizer', 'select', 'adam', { options: ['adam', 'adamw', 'sgd'] }],
      ['momentum', 'Momentum (sgd)', 'num', 0.9, { min: 0, max: 0.999 }],
      ['weight_decay', 'Weight decay', 'num', 0, { min: 0, max: 1 }],
      ['schedule', 'Schedule', 'select', 'constant', { options: ['constant', 'step', 'cosine', 'one_cycle'] }],
      ['warmup_epochs', 'Warmup epochs', 'num', 0, { min: 0 }],
      ['label_smoothing', 'Label smoothing', 'num', 0, { min: 0, max: 0.5 }],
      ['class_weights', 'Class weights', 'select', 'none', { options: ['none', 'auto'] }],
    ]],
    ['Augmentation', [
      ['augmentation.enabled', 'Augment training batches', 'bool', true],
      ['augmentation.horizontal_flip', 'Horizontal flip', 'bool', true],
      ['augmentation.vertical_flip', 'Vertical flip', 'bool', false],
      ['augmentation.rotation_degrees', 'Rotation (±degrees)', 'num', 20, { min: 0, max: 180 }],
      ['augmentation.zoom', 'Zoom', 'num', 0.2, { min: 0, max: 0.9 }],
      ['augmentation.brightness', 'Brightness jitter', 'num', 0, { min: 0, max: 0.9 }],
      ['augmentation.contrast', 'Contrast jitter', 'num', 0, { min: 0, max: 0.9 }],
    ]],
    ['Selection', [
      ['selection_metric', 'Selection metric', 'select', 'val_accuracy', { options: ['val_accuracy', 'val_loss', 'val_macro_f1'] }],
      ['early_stopping_patience', 'Early stopping patience (epochs)', 'int', null, { min: 1, hint: 'blank: off' }],
    ]],
  ];

  function fieldId(path) { return 'f-' + path.replace(/\./g, '-'); }

  function jobField([path, label, kind, def, extra = {}]) {
    const id = fieldId(path);
    const error = h('div', { class: 'field-error', id: id + '-error', dataset: { for: path } });
    let input;
    if (kind === 'bool') {
      input = h('input', { type: 'checkbox', id, checked: def, 'aria-describedby': error.id });
      return h('div', { class: 'field check', dataset: { field: path } }, h('label', { for: id }, input, label), error);
    }
    if (kind === 'select') {
      input = h('select', { id, 'aria-describedby': error.id },
        extra.options.map((o) => h('option', { value: o, selected: o === def }, o + (o === def ? ' (default)' : ''))));
    } else {
      input = h('input', { type: 'number', id, value: def === null ? '' : def, min: extra.min, max: extra.max,
        step: kind === 'int' ? 1 : 'any', placeholder: extra.hint || '', 'aria-describedby': error.id });
    }
    return h('div', { class: 'field', dataset: { field: path } },
      h('label', { for: id }, label), input,
      def !== null && kind !== 'select' ? h('div', { class: 'hint' }, `default ${def}`) : null, error);
  }

  /** The request: dataset and backbone, and every field that differs from its default. */
  function jobRequest(form) {
    const body = {
      dataset_id: form.querySelector('#f-dataset_id').value,
      backbone: form.querySelector('#f-backbone').value,
    };
    for (const [, fields] of JOB_FIELDS) {
      for (const [path, , kind, def] of fields) {
        const input = form.querySelector('#' + fieldId(path));
        let value;
        if (kind === 'bool') value = input.checked;
        else if (kind === 'select') value = input.value;
        else if (input.value.trim() === '') continue;
        else value = Number(input.value);
        if (value === def) continue;
        const parts = path.split('.');
        let target = body;
        for (const part of parts.slice(0, -1)) target = target[part] = target[part] || {};
        target[parts[parts.length - 1]] = value;
      }
    }
    return body;
  }

  function newJobPage() {
    const params = new URLSearchParams(location.search);
    const general = h('div', {});
    const datasetSelect = h('select', { id: 'f-dataset_id', required: true, 'aria-describedby': 'f-dataset_id-error' });
    const backboneSelect = h('select', { id: 'f-backbone', 'aria-describedby': 'f-backbone-error' });
    const backboneInfo = h('div', { class: 'hint' });
    const imageSize = () => document.getElementById('f-image_size');
    let backbones = [];

    const showBackbone = () => {
      const b = backbones.find((x) => x.name === backboneSelect.value);
      if (!b) { fill(backboneInfo); return; }
      fill(backboneInfo, 
        `${b.family}, ${(b.parameters / 1e6).toFixed(1)} M parameters, input ${b.default_image_size} px, ${b.stages.length} stages; `,
        b.weights ? h('span', { class: 'ok' }, 'weights installed') : h('span', { class: 'error' }, 'weights missing'),
        b.imagenet_top1 ? `; ImageNet top-1 ${b.imagenet_top1}%` : '');
      const size = imageSize();
      if (size) size.placeholder = `${b.default_image_size} (the backbone's)`;
    };
    backboneSelect.addEventListener('change', showBackbone);

    const submit = h('button', { type: 'submit', class: 'primary' }, 'Start training');
    const form = h('form', { class: 'job', novalidate: true },
      h('fieldset', {}, h('legend', {}, 'Data and model'),
        h('div', { class: 'fields' },
          h('div', { class: 'field', dataset: { field: 'dataset_id' } },
            h('label', { for: 'f-dataset_id' }, 'Dataset'), datasetSelect,
            h('div', { class: 'field-error', id: 'f-dataset_id-error', dataset: { for: 'dataset_id' } })),
          h('div', { class: 'field', dataset: { field: 'backbone' } },
            h('label', { for: 'f-backbone' }, 'Backbone'), backboneSelect, backboneInfo,
            h('div', { class: 'field-error', id: 'f-backbone-error', dataset: { for: 'backbone' } })))),
      JOB_FIELDS.map(([legend, fields]) => h('fieldset', {}, h('legend', {}, legend),
        h('div', { class: 'fields' }, fields.map(jobField)))),
      general,
      h('div', { class: 'row' }, submit, h('span', { class: 'muted' }, 'Only fields that differ from the defaults are sent.')));

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
      for (const el of form.querySelectorAll('.field.invalid')) el.classList.remove('invalid');
      fill(general);
      submit.disabled = true;
      try {
        const job = await api('POST', '/jobs', jobRequest(form));
        navigate(`/ui/jobs/${job.id}`);
      } catch (err) {
        submit.disabled = false;
        const unplaced = [];
        let first = null;
        for (const e of (err.problem && err.problem.errors) || []) {
          const slot = form.querySelector(`.field-error[data-for="${CSS.escape(e.path)}"]`);
          if (!slot) { unplaced.push(e); continue; }
          slot.textContent = (slot.textContent ? slot.textContent + '; ' : '') + e.reason;
          slot.closest('.field').classList.add('invalid');
          first = first || slot.closest('.field').querySelector('input, select');
        }
        if (first) first.focus();
        if (!(err instanceof ApiError) || unplaced.length || !first) {
          const shown = err instanceof ApiError ? new ApiError(err.status, Object.assign({}, err.problem, { errors: unplaced })) : err;
          fill(general, problem(shown));
        }
      }
    });

    page('New training job', form);
    (async () => {
      try {
        const [datasets, list] = await Promise.all([api('GET', '/datasets'), api('GET', '/backbones')]);
        const ready = datasets.filter((d) => d.status === 'ready');
        fill(datasetSelect, 
          ready.length ? null : h('option', { value: '' }, 'no ready dataset: upload one first'),
          ready.map((d) => h('option', { value: d.id, selected: d.id === params.get('dataset') },
            `${d.name} (${d.classes.length} classes, ${d.num_train} train)`)));
        backbones = list;
        fill(backboneSelect, list.map((b) => h('option', {
          value: b.name, selected: b.name === 'mobilenet_v2', disabled: !b.weights,
        }, `${b.name}: ${b.default_image_size} px${b.weights ? '' : ' (weights missing)'}`)));
        showBackbone();
      } catch (err) {
        fill(general, problem(err));
      }
    })();
    return null;
  }

  // ------------------------------------------------------------------- jobs

  /** GET /jobs page after page (newest first) until `count` jobs; `more`: older ones exist. */
  async function listJobs(count) {
    const jobs = [];
    for (;;) {
      const limit = Math.min(500, count + 1 - jobs.length); // one extra says whether more follow
      const after = jobs.length ? `&starting_after=${jobs[jobs.length - 1].id}` : '';
      const page = await api('GET', `/jobs?limit=${limit}${after}`);
      jobs.push(...page);
      if (page.length < limit || jobs.length > count) break;
    }
    return { jobs: jobs.slice(0, count), more: jobs.length > count };
  }

  const JOBS_PAGE = 50;

  function jobsPage() {
    const list = h('div', { class: 'table-wrap' }, h('p', { class: 'muted' }, 'Loading…'));
    let active = false;
    let wanted = JOBS_PAGE; // grows by a page with every "Load more"
    let latest = 0; // a refresh overtaken by a later one draws nothing
    const refresh = async () => {
      const mine = ++latest;
      try {
        const { jobs, more } = await listJobs(wanted);
        if (mine !== latest) return;
        active = jobs.some((j) => j.status === 'queued' || j.status === 'running');
        const loadMore = (e) => {
          e.currentTarget.disabled = true;
          wanted += JOBS_PAGE;
          refresh();
        };
        fill(list, jobs.length ? [h('table', {},
          h('thead', {}, h('tr', {}, ['Job', 'Status', 'Backbone', 'Epoch', 'Best val acc.', 'Created', 'Model'].map((t) => h('th', {}, t)))),
          h('tbody', {}, jobs.map((j) => h('tr', {},
            h('td', { class: 'mono' }, link(`/ui/jobs/${j.id}`, short(j.id))),
            h('td', {}, badge(j.status)),
            h('td', {}, j.config && j.config.backbone),
            h('td', { class: 'num' }, `${j.epoch}/${j.epochs}`),
            h('td', { class: 'num' }, pct(j.best_val_accuracy)),
            h('td', {}, when(j.created_at)),
            h('td', { class: 'mono' }, j.model_id ? link(`/ui/models?model=${j.model_id}`, short(j.model_id)) : '–'))))),
          more ? h('p', {}, h('button', { type: 'button', id: 'jobs-more', onclick: loadMore }, 'Load more')) : null]
          : h('p', { class: 'muted' }, 'No jobs yet. ', link('/ui/jobs/new', 'Start one.')));
      } catch (err) {
        if (mine === latest) fill(list, problem(err));
      }
    };
    const stop = poller(refresh, () => (active ? 3000 : 15000));
    page('Jobs', h('p', {}, link('/ui/jobs/new', 'New job')), list);
    return stop;
  }

  const TERMINAL = ['succeeded', 'failed', 'cancelled'];

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  /** A uPlot line chart over epochs, with the best epoch marked. */
  function lineChart(container, title, series, best) {
    const fg = cssVar('--fg'), grid = cssVar('--line');
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const marker = {
      hooks: {
        draw: [(u) => {
          const epoch = best();
          if (!epoch) return;
          const x = u.valToPos(epoch, 'x', true);
          if (!Number.isFinite(x)) return;
          const { ctx } = u;
          ctx.save();
          ctx.strokeStyle = fg;
          ctx.fillStyle = fg;
          ctx.setLineDash([4, 4]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
          ctx.fillText(`best ${epoch}`, x + 4 * devicePixelRatio, u.bbox.top + 14 * devicePixelRatio);
          ctx.restore();
        }],
      },
    };
    const opts = {
      title,
      width: Math.max(280, container.clientWidth || 480),
      height: 220,
      scales: { x: { time: false } },
      // Whole epochs on x; y labels with the digits a learning rate needs
      // (uPlot's default keeps 3 decimals: 1e-4 would read 0).
      axes: [Object.assign({ label: 'epoch', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, axis),
        Object.assign({ size: 60, values: (u, splits) => splits.map((v) => (v === null ? '' : String(+v.toPrecision(4)))) }, axis)],
      series: [{ label: 'epoch' }, ...series.map((s) => ({
        label: s.label, stroke: cssVar(s.color), width: s.dash ? 1 : 2, dash: s.dash, spanGaps: true,
        points: { show: !s.dash, size: 6 },
      }))],
      plugins: [marker],
    };
    const data = [[], ...series.map(() => [])];
    const chart = new uPlot(opts, data, container);
    const resize = new ResizeObserver(() => {
      const width = Math.max(280, container.clientWidth);
      if (Math.abs(width - chart.width) > 2) chart.setSize({ width, height: 220 });
    });
    resize.observe(container);
    return {
      set(rows, pick) {
        const next = [rows.map((r) => r.epoch), ...pick.map((f) => rows.map(f))];
        chart.setData(next);
        container.dataset.points = String(rows.length);
      },
      // Points at any x (fractional epochs within one), `null` where a
      // series has none; `epochs` finished epochs among them.
      setXY(xs, pick, epochs) {
        chart.setData([xs, ...pick.map((f) => xs.map(f))]);
        container.dataset.points = String(epochs);
      },
      redraw() { chart.redraw(false, false); },
      destroy() { resize.disconnect(); chart.destroy(); },
    };
  }

  function jobPage(id) {
    const controller = new AbortController();
    const state = { job: null, epochs: [], progress: null, live: [], selected: null, normalise: false };
    const head = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
    const progressBox = h('div', {});
    const streamNote = h('div', { class: 'muted', role: 'status' });
    const lossBox = h('div', { class: 'chart', id: 'chart-loss' });
    const accBox = h('div', { class: 'chart', id: 'chart-accuracy' });
    const lrBox = h('div', { class: 'chart', id: 'chart-lr' });
    const details = h('div', {});
    const testBox = h('div', {});
    let charts = null;

    const bestEpoch = () => (state.job && state.job.best_epoch) || null;

    const renderHead = () => {
      const j = state.job;
      const running = !TERMINAL.includes(j.status);
      const cancel = running && h('button', {
        type: 'button', class: 'danger',
        onclick: async (e) => {
          e.currentTarget.disabled = true;
          try { Object.assign(state.job, await api('POST', `/jobs/${j.id}/cancel`)); renderHead(); } catch (err) { head.append(problem(err)); }
        },
      }, j.cancel_requested ? 'Cancelling…' : 'Cancel');
      if (cancel && j.cancel_requested) cancel.disabled = true;
      const config = j.config || {};
      fill(head, 
        h('dl', { class: 'kv' },
          h('dt', {}, 'Status'), h('dd', { id: 'job-status' }, badge(j.status), j.attempts > 1 ? ` attempt ${j.attempts}/${j.max_attempts}` : ''),
          h('dt', {}, 'Backbone'), h('dd', {}, `${config.backbone || '–'} at ${config.image_size || '–'} px, freeze ${config.freeze || '–'}, ${config.optimizer || '–'} lr ${config.learning_rate}, ${config.schedule || '–'}`),
          h('dt', {}, 'Dataset'), h('dd', { class: 'mono' }, link(`/ui/datasets/${j.dataset_id}`, short(j.dataset_id))),
          h('dt', {}, 'Best'), h('dd', {}, j.best_epoch ? `epoch ${j.best_epoch}, val accuracy ${pct(j.best_val_accuracy)} (selected by ${config.selection_metric || 'val_accuracy'})` : '–'),
          h('dt', {}, 'Model'), h('dd', { class: 'mono' }, j.model_id ? link(`/ui/models?model=${j.model_id}`, short(j.model_id)) : '–'),
          h('dt', {}, 'Created'), h('dd', {}, when(j.created_at)),
          j.finished_at ? [h('dt', {}, 'Finished'), h('dd', {}, when(j.finished_at))] : null),
        j.error ? h('div', { class: 'notice', role: 'alert' }, j.error) : null,
        h('p', { class: 'row' }, cancel));
      renderProgress();
    };

    const renderProgress = () => {
      const j = state.job, p = state.progress;
      const running = j.status === 'running';
      let fraction = j.epochs ? j.epoch / j.epochs : 0;
      let text = `epoch ${j.epoch} of ${j.epochs}`;
      if (running && p && p.steps) {
        fraction = Math.min(1, (p.epoch - 1 + p.step / p.steps) / j.epochs);
        text = `epoch ${p.epoch} of ${j.epochs}, step ${p.step}/${p.steps}, ${Math.round(p.images_per_second)} images/s, ETA ${duration(p.eta_seconds)}`;
      }
      if (j.status === 'succeeded') fraction = 1;
      fill(progressBox, h('div', { class: 'progress-line' },
        h('progress', { max: 1, value: fraction, id: 'job-progress', 'aria-label': 'Training progress' }),
        h('span', {}, `${Math.round(fraction * 100)}%`)),
      h('div', { class: 'muted' }, j.status === 'queued' ? 'queued, waiting for a worker' : text));
    };

    const renderCharts = () => {
      if (!charts) {
        charts = {
          loss: lineChart(lossBox, 'Loss', [{ label: 'train', color: '--train' }, { label: 'val', color: '--val' },
            { label: 'train (within the epoch)', color: '--train', dash: [3, 3] }], bestEpoch),
          acc: lineChart(accBox, 'Accuracy', [{ label: 'train', color: '--train' }, { label: 'val', color: '--val' }, { label: 'val macro-F1', color: '--lr' }], bestEpoch),
          lr: lineChart(lrBox, 'Learning rate', [{ label: 'head lr', color: '--lr' }], bestEpoch),
        };
      }
      const rows = state.epochs;
      // Finished epochs at whole x; the running mean loss within an epoch
      // at fractional x (epoch − 1 + step / steps), as it moves.
      const byEpoch = new Map(rows.map((r) => [r.epoch, r]));
      const live = new Map(state.live.map((p) => [p.x, p.loss]));
      const xs = [...new Set([...byEpoch.keys(), ...live.keys()])].sort((a, b) => a - b);
      const at = (x, f) => (byEpoch.has(x) ? f(byEpoch.get(x)) : null);
      charts.loss.setXY(xs, [(x) => at(x, (r) => r.train_loss), (x) => at(x, (r) => r.val_loss),
        (x) => (live.has(x) ? live.get(x) : null)], rows.length);
      charts.acc.set(rows, [(r) => r.train_accuracy, (r) => r.val_accuracy, (r) => r.val_macro_f1]);
      charts.lr.set(rows, [(r) => r.learning_rate]);
    };

    const renderDetails = () => {
      const rows = state.epochs;
      if (!rows.length) { fill(details); return; }
      const chosen = rows.find((r) => r.epoch === state.selected) || rows.find((r) => r.epoch === bestEpoch()) || rows[rows.length - 1];
      const select = h('select', { id: 'epoch-select', onchange: () => { state.selected = Number(select.value); renderDetails(); } },
        rows.map((r) => h('option', { value: r.epoch, selected: r.epoch === chosen.epoch },
          `epoch ${r.epoch}${r.epoch === bestEpoch() ? ' (best)' : ''}`)));
      const normalise = h('input', { type: 'checkbox', id: 'cm-normalise', checked: state.normalise,
        onchange: () => { state.normalise = normalise.checked; renderDetails(); } });
      fill(details, h('section', { class: 'panel' },
        h('div', { class: 'row' }, h('label', { for: 'epoch-select' }, 'Validation metrics of'), select,
          h('span', { class: 'muted' }, `loss ${fixed(chosen.val_loss)}, accuracy ${pct(chosen.val_accuracy)}, macro-F1 ${fixed(chosen.val_macro_f1)}, top-${chosen.top_k} ${pct(chosen.val_top_k_accuracy)}`)),
        h('h2', {}, 'Per class'),
        perClassTable(chosen.per_class || []),
        h('h2', {}, 'Confusion matrix'),
        h('div', { class: 'row' }, h('label', { for: 'cm-normalise' }, normalise, ' row-normalised'),
          h('span', { class: 'muted' }, 'rows: true class, columns: predicted')),
        confusion(chosen.confusion_matrix || [], (chosen.per_class || []).map((c) => c.label), state.normalise)));
    };

    const renderTest = () => {
      const t = state.job && state.job.test_metrics;
      fill(testBox, t ? h('section', { class: 'panel' },
        h('h2', {}, 'Test split (best checkpoint, measured once)'),
        h('p', {}, `epoch ${t.epoch}, ${t.images} images: accuracy ${pct(t.accuracy)}, macro-F1 ${fixed(t.macro_f1)}, loss ${fixed(t.loss)}`),
        t.per_class ? perClassTable(t.per_class) : null) : null);
    };

    const addEpoch = (m) => {
      if (state.epochs.some((r) => r.epoch === m.epoch)) return;
      state.epochs.push(m);
      state.epochs.sort((a, b) => a.epoch - b.epoch);
    };

    const refresh = async () => {
      const [job, metrics] = await Promise.all([
        api('GET', `/jobs/${encodeURIComponent(id)}`, null, controller.signal),
        api('GET', `/jobs/${encodeURIComponent(id)}/metrics`, null, controller.signal),
      ]);
      state.job = job;
      state.progress = job.progress || null;
      for (const m of metrics.epochs) addEpoch(m);
      renderHead();
      renderCharts();
      renderDetails();
      renderTest();
    };

    const follow = async () => {
      let delay = 1000;
      while (!controller.signal.aborted && !TERMINAL.includes(state.job.status)) {
        try {
          streamNote.textContent = 'live';
          await readEvents(`/jobs/${encodeURIComponent(id)}/events`, (event, data) => {
            const value = JSON.parse(data);
            if (event === 'epoch') {
              addEpoch(value);
              state.progress = null;
              state.job.epoch = Math.max(state.job.epoch, value.epoch);
              renderCharts();
              renderDetails();
              renderProgress();
            } else if (event === 'progress') {
              state.progress = value;
              if (Number.isFinite(value.loss) && value.steps) {
                state.live.push({ x: value.epoch - 1 + value.step / value.steps, loss: value.loss });
                if (charts) renderCharts();
              }
              renderProgress();
            } else if (event === 'status') {
              Object.assign(state.job, {
                status: value.status, attempts: value.attempt, epoch: value.epoch,
                best_epoch: value.best_epoch, error: value.error, model_id: value.model_id,
              });
              renderHead();
              if (charts) { charts.loss.redraw(); charts.acc.redraw(); charts.lr.redraw(); }
            } else if (event === 'error') {
              streamNote.textContent = value;
            }
            delay = 1000;
          }, controller.signal);
        } catch (err) {
          if (controller.signal.aborted) return;
          if (err instanceof ApiError && err.status !== 503) {
            fill(streamNote, problem(err));
            return;
          }
          const wait = err.retryAfter ? err.retryAfter * 1000 : delay;
          streamNote.textContent = `stream interrupted; reconnecting in ${Math.round(wait / 1000)} s`;
          await sleep(wait);
          delay = Math.min(delay * 2, 15000);
          continue;
        }
        // The stream ended: the job has finished (or the server is restarting).
        try { await refresh(); } catch (err) { if (!controller.signal.aborted) await sleep(delay); }
      }
      if (!controller.signal.aborted) streamNote.textContent = '';
    };

    page(`Job ${short(id)}`,
      h('section', { class: 'panel' }, head, progressBox, streamNote),
      h('section', { class: 'panel' }, h('div', { class: 'charts' }, lossBox, accBox, lrBox)),
      details, testBox);
    (async () => {
      try {
        await refresh();
      } catch (err) {
        if (!controller.signal.aborted) fill(head, problem(err));
        return;
      }
      follow();
    })();
    return () => {
      controller.abort();
      if (charts) { charts.loss.destroy(); charts.acc.destroy(); charts.lr.destroy(); }
    };
  }

  function perClassTable(perClass) {
    return h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Class'), ['Precision', 'Recall', 'F1', 'Support'].map((t) => h('th', { class: 'num' }, t)))),
      h('tbody', {}, perClass.map((c) => h('tr', {},
        h('td', {}, c.label),
        h('td', { class: 'num' }, fixed(c.precision)), h('td', { class: 'num' }, fixed(c.recall)),
        h('td', { class: 'num' }, fixed(c.f1)), h('td', { class: 'num' }, c.support))))));
  }

  /** A heatmap table: counts, or fractions of each true class's row. */
  function confusion(matrix, labels, normalise) {
    const heat = cssVar('--heat');
    let total = 0, max = 0;
    for (const row of matrix) for (const v of row) { total += v; max = Math.max(max, v); }
    const table = h('table', { class: 'confusion', id: 'confusion', dataset: { total: String(total) } },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'true \\ pred'), labels.map((l) => h('th', { scope: 'col', title: l }, l)))),
      h('tbody', {}, matrix.map((row, i) => {
        const sum = row.reduce((a, b) => a + b, 0);
        return h('tr', {}, h('th', { scope: 'row', title: labels[i] }, labels[i] || i), row.map((v, j) => {
          const share = normalise ? (sum ? v / sum : 0) : (max ? v / max : 0);
          const cell = h('td', {
            class: (i === j ? 'diag ' : '') + (share > 0.55 ? 'hot' : ''),
            title: `true ${labels[i]}, predicted ${labels[j]}: ${v} of ${sum}`,
            style: { background: `rgba(${heat}, ${(0.08 + 0.92 * share).toFixed(3)})` },
          }, normalise ? (sum ? (100 * v / sum).toFixed(0) + '%' : '–') : v);
          if (v === 0) cell.style.background = '';
          return cell;
        }));
      })));
    return h('div', { class: 'table-wrap' }, table);
  }

  // ----------------------------------------------------------------- models

  async function download(href, button) {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = 'preparing…';
    try {
      const response = await fetch(href, { headers: authHeaders({ Accept: 'application/zip' }) });
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      const disposition = response.headers.get('content-disposition') || '';
      const name = (/filename="?([^";]+)"?/.exec(disposition) || [])[1] || 'model.zip';
      const url = URL.createObjectURL(await response.blob());
      const a = h('a', { href: url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      button.after(problem(err) || '');
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  function modelsPage() {
    const highlight = new URLSearchParams(location.search).get('model');
    const list = h('div', { class: 'table-wrap' }, h('p', { class: 'muted' }, 'Loading…'));
    let gone = false;

    const load = async () => {
      let models, names = new Map();
      try {
        models = await api('GET', '/models');
      } catch (err) {
        fill(list, problem(err));
        return;
      }
      const admin = scope !== 'predict';
      if (admin) {
        try {
          for (const d of await api('GET', '/datasets')) names.set(d.id, d.name);
        } catch (_) { /* names are a nicety */ }
      }
      if (gone) return;
      if (!models.length) {
        fill(list, h('p', { class: 'muted' }, 'No models yet: a succeeded job makes one.'));
        return;
      }
      fill(list, h('table', {},
        h('thead', {}, h('tr', {}, ['Model', 'Aliases', 'Backbone', 'Dataset', 'Job', 'Epoch', 'Val acc.', 'Macro-F1', 'Classes', 'Created', admin ? 'Deploy' : null, admin ? 'Export' : null, '']
          .filter((t) => t !== null).map((t) => h('th', {}, t)))),
        h('tbody', {}, models.map((m) => modelRow(m, names, admin, highlight === m.id, load)))));
      if (highlight) {
        const row = document.getElementById(`model-${highlight}`);
        if (row) row.scrollIntoView({ block: 'center' });
      }
    };

    page('Models', list);
    load();
    return () => { gone = true; };
  }

  function modelRow(m, names, admin, highlighted, reload) {
    const metrics = m.metrics || {};
    const note = h('div', {});
    const deploy = async (alias, button) => {
      button.disabled = true;
      fill(note, h('span', { class: 'muted' }, 'loading and warming up…'));
      try {
        await api('POST', `/models/${m.id}/deploy`, alias ? { alias } : {});
        reload();
      } catch (err) {
        button.disabled = false;
        fill(note, problem(err));
      }
    };
    const alias = h('input', { type: 'text', placeholder: 'alias', size: 10, 'aria-label': `alias for model ${short(m.id)}`, pattern: '[A-Za-z0-9._-]{1,64}' });
    return h('tr', { id: `model-${m.id}`, class: highlighted ? 'highlight' : '' },
      h('td', { class: 'mono', title: m.id }, highlighted ? h('strong', {}, short(m.id)) : short(m.id)),
      h('td', {}, (m.aliases || []).map((a) => h('span', { class: 'chip' }, a))),
      h('td', {}, `${m.backbone} (${m.image_size} px)`),
      h('td', {}, admin ? link(`/ui/datasets/${m.dataset_id}`, names.get(m.dataset_id) || short(m.dataset_id)) : short(m.dataset_id)),
      h('td', { class: 'mono' }, admin ? link(`/ui/jobs/${m.job_id}`, short(m.job_id)) : short(m.job_id)),
      h('td', { class: 'num' }, m.epoch),
      h('td', { class: 'num' }, pct(metrics.val_accuracy)),
      h('td', { class: 'num' }, fixed(metrics.val_macro_f1)),
      h('td', { class: 'num', title: (m.labels || []).join(', ') }, (m.labels || []).length),
      h('td', {}, when(m.created_at)),
      admin ? h('td', {},
        h('div', { class: 'row' },
          h('button', { type: 'button', onclick: (e) => deploy(null, e.currentTarget) }, 'Make default'),
          alias,
          h('button', { type: 'button', onclick: (e) => { if (alias.reportValidity() && alias.value) deploy(alias.value, e.currentTarget); } }, 'Deploy as')),
        note) : null,
      admin ? h('td', {}, h('div', { class: 'row' },
        h('button', { type: 'button', onclick: (e) => download(`/models/${m.id}/export`, e.currentTarget) }, 'safetensors'),
        h('button', { type: 'button', onclick: (e) => download(`/models/${m.id}/export?format=torchscript`, e.currentTarget) }, 'TorchScript'))) : null,
      h('td', {}, link(`/ui/predict?model=${m.id}`, 'Predict')));
  }

  // ---------------------------------------------------------------- predict

  function predictPage() {
    const wanted = new URLSearchParams(location.search).get('model');
    const model = h('select', { id: 'p-model' }, h('option', { value: '' }, 'default deployment'));
    const topK = h('input', { type: 'number', id: 'p-topk', min: 1, max: 100, value: 5 });
    const results = h('div', { class: 'predictions', id: 'predictions' });
    const status = h('div', { role: 'status' });
    const urls = [];

    const run = async (files) => {
      const images = [...files].filter((f) => f.type.startsWith('image/') || !f.type);
      if (!images.length) return;
      fill(status, h('span', { class: 'muted' }, `Classifying ${images.length} image${images.length > 1 ? 's' : ''}…`));
      const cards = images.map((file) => {
        const url = URL.createObjectURL(file);
        urls.push(url);
        const body = h('div', {}, h('span', { class: 'muted' }, '…'));
        const card = h('figure', { class: 'prediction' }, h('img', { src: url, alt: file.name || 'pasted image' }),
          h('figcaption', {}, h('div', { class: 'mono' }, file.name || 'pasted image'), body));
        results.prepend(card);
        return body;
      });
      const query = new URLSearchParams({ top_k: topK.value || '5' });
      if (model.value) query.set('model', model.value);
      for (let start = 0; start < images.length; start += 16) {
        const batch = images.slice(start, start + 16);
        const form = new FormData();
        for (const file of batch) form.append('image', file, file.name || 'pasted.png');
        const began = performance.now();
        try {
          const answer = await api('POST', `/predict?${query}`, form);
          const roundTrip = performance.now() - began;
          answer.results.forEach((r, i) => {
            fill(cards[start + i], r.error ? h('div', { class: 'error' }, r.error) : predictionBars(r.predictions),
              h('div', { class: 'muted' }, `model ${short(answer.model_id)} · server ${answer.elapsed_ms.toFixed(1)} ms · round trip ${roundTrip.toFixed(0)} ms`));
          });
          fill(status);
        } catch (err) {
          for (const body of cards.slice(start, start + batch.length)) fill(body, h('span', { class: 'error' }, 'failed'));
          fill(status, problem(err));
        }
      }
    };

    const paste = (event) => {
      const files = [...(event.clipboardData ? event.clipboardData.files : [])];
      if (files.length) { event.preventDefault(); run(files); }
    };
    document.addEventListener('paste', paste);

    page('Predict',
      h('section', { class: 'panel' },
        h('div', { class: 'row' }, h('label', { for: 'p-model' }, 'Model'), model,
          h('label', { for: 'p-topk' }, 'Top'), topK),
        h('p', {}),
        dropZone('Drop images here, press to choose, or paste from the clipboard', 'image/*', true, run),
        h('p', {}), status),
      results);

    (async () => {
      try {
        const models = await api('GET', '/models');
        const aliases = [];
        for (const m of models) for (const a of m.aliases || []) if (a !== 'default') aliases.push([a, m]);
        model.append(
          aliases.length ? h('optgroup', { label: 'Aliases' }, aliases.map(([a, m]) => h('option', { value: a, selected: a === wanted }, `${a} → ${m.backbone} ${short(m.id)}`))) : '',
          models.length ? h('optgroup', { label: 'Models' }, models.map((m) => h('option', { value: m.id, selected: m.id === wanted },
            `${short(m.id)} ${m.backbone}, ${pct((m.metrics || {}).val_accuracy)}${(m.aliases || []).length ? ' [' + m.aliases.join(', ') + ']' : ''}`))) : '');
        if (!models.length) fill(status, h('p', { class: 'muted' }, 'No model yet: train one first.'));
      } catch (err) {
        fill(status, problem(err));
      }
    })();

    return () => {
      document.removeEventListener('paste', paste);
      for (const url of urls) URL.revokeObjectURL(url);
    };
  }

  function predictionBars(predictions) {
    return h('div', { class: 'bars' }, predictions.map((p) => h('div', { class: 'bar', title: `${p.label}: ${p.score}` },
      h('span', { class: 'label' }, p.label),
      h('span', { class: 'track' }, h('span', { class: 'fill', style: { width: `${(100 * p.score).toFixed(1)}%`, display: 'block' } })),
      h('span', { class: 'score', dataset: { score: String(p.score) } }, p.score.toFixed(3)))));
  }

  // ------------------------------------------------------------------ start

  setupKeyForm();
  probeScope().finally(render);
})();
