// The live console: an EventSource on /v1/events:stream (the browser reconnects it by itself and
// resumes with Last-Event-ID) and a poll of /v1/stats. No framework; event data reaches the page
// only through textContent, never as HTML.
'use strict';
(() => {
  const MAX_ROWS = 200; // rows kept in the live tail
  const TAIL = 50; // events shown on load and after a filter change
  const POLL_MS = 2000; // how often /v1/stats is read
  const WINDOW_MS = 5 * 60 * 1000; // the ingest rate chart's span
  const RETRY_MS = 3000; // wait before reopening a stream the browser gave up on
  const HIGHLIGHT_LIMIT = 256 * 1024; // larger bodies are shown as sent, without colours

  const $ = (id) => document.getElementById(id);
  const number = new Intl.NumberFormat('en-US');
  const token = new URLSearchParams(location.search).get('token');
  const inputs = { type: $('f-type'), chat: $('f-chat'), actor: $('f-actor') };

  const view = {
    source: null, // the open EventSource
    retryTimer: 0,
    lastSequence: 0, // newest sequence received for the current filters
    counts: new Map(), // event type -> events received for the current filters
    rows: new Map(), // sequence -> {data, raw} of each row on the page
    pending: [], // received, not drawn yet (next frame, or on resume)
    pausedNew: 0, // events received while paused
    paused: false,
    selected: null, // the {data, raw} shown in the detail pane
    frame: 0,
    samples: [], // {t, stored} from /v1/stats, the last WINDOW_MS
  };

  // ---- filters and URLs ---------------------------------------------------------------------

  const splitList = (text) => text.split(/[\s,]+/).filter(Boolean);

  function readFilters() {
    const filters = {};
    for (const [key, input] of Object.entries(inputs)) filters[key] = splitList(input.value);
    return filters;
  }

  function query(filters, extra) {
    const params = new URLSearchParams();
    for (const [key, values] of Object.entries(filters)) {
      if (values.length) params.set(key, values.join(','));
    }
    for (const [key, value] of Object.entries(extra)) params.set(key, value);
    if (token) params.set('token', token);
    return params.toString();
  }

  function apply() {
    const filters = readFilters();
    const bad = filters.chat.find((v) => !/^-?\d+$/.test(v));
    showError('filter-error', bad ? `Chat ids are integers; “${bad}” is not.` : '');
    if (bad) return;
    const q = query(filters, {});
    history.replaceState(null, '', q ? '?' + q : location.pathname);
    connect(true);
  }

  // ---- the event stream ---------------------------------------------------------------------

  function connect(reset) {
    clearTimeout(view.retryTimer);
    if (view.source) view.source.close();
    if (reset) resetView();
    const start = view.lastSequence > 0 ? { after: String(view.lastSequence) } : { tail: String(TAIL) };
    const url = '/v1/events:stream?' + query(readFilters(), start);
    const source = new EventSource(url);
    view.source = source;
    setConnection('connecting');
    source.onopen = () => {
      setConnection('connected');
      showError('stream-error', '');
    };
    source.onmessage = (message) => receive(message.data);
    // Both a failed connection and the server's own `event: error` (which ends a stream).
    source.addEventListener('error', (event) => {
      if (source !== view.source) return;
      if (typeof event.data === 'string' && event.data) {
        showError('stream-error', 'The stream ended: ' + event.data);
      }
      if (source.readyState === EventSource.CLOSED) {
        setConnection('disconnected');
        diagnose(url);
      } else {
        setConnection('reconnecting');
      }
    });
  }

  // The browser gives up on a stream answered with an error status; find out why and decide
  // whether to try again.
  async function diagnose(url) {
    let status = 0;
    let reason = 'the gateway cannot be reached';
    const abort = new AbortController();
    try {
      const response = await fetch(url, { signal: abort.signal, cache: 'no-store' });
      status = response.status;
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        reason = body.error || response.statusText;
      }
    } catch (_) {
      // unreachable: retry below
    } finally {
      abort.abort();
    }
    if (status === 401 || status === 403) reason += ' (open the console with ?token=…)';
    if (status !== 200) showError('stream-error', `Stream unavailable (${status || 'no answer'}): ${reason}`);
    if (status === 400 || status === 401 || status === 403) return; // retrying will not help
    view.retryTimer = setTimeout(() => connect(status === 410), RETRY_MS);
  }

  // Chat ids are int64: keep the exact digits when they do not fit a JS number (where supported).
  const exactIds = (key, value, context) =>
    key === 'chat_id' && typeof value === 'number' && !Number.isSafeInteger(value) && context
      ? context.source
      : value;

  function receive(text) {
    let data;
    try {
      data = JSON.parse(text, exactIds);
    } catch (_) {
      return;
    }
    if (!(data.sequence > view.lastSequence)) return; // already shown
    view.lastSequence = data.sequence;
    // The webhook body exactly as the gateway sent it (the last field), so int64 ids stay exact.
    const at = text.indexOf(',"event":');
    const raw = at >= 0 && text.endsWith('}') ? text.slice(at + 9, -1) : JSON.stringify(data.event);
    view.counts.set(data.type, (view.counts.get(data.type) || 0) + 1);
    view.pending.push({ data, raw });
    if (view.pending.length > MAX_ROWS) view.pending.splice(0, view.pending.length - MAX_ROWS);
    if (view.paused) view.pausedNew += 1;
    if (!view.frame) view.frame = requestAnimationFrame(draw);
  }

  function resetView() {
    view.lastSequence = 0;
    view.counts.clear();
    view.rows.clear();
    view.pending = [];
    view.pausedNew = 0;
    $('events').textContent = '';
    draw();
  }

  // ---- drawing the tail ---------------------------------------------------------------------

  function draw() {
    view.frame = 0;
    drawCounts();
    $('pause').textContent = view.paused ? `Resume (${number.format(view.pausedNew)} new)` : 'Pause';
    const body = $('events');
    if (!view.paused && view.pending.length) {
      const fresh = view.pending.length <= 10;
      const fragment = document.createDocumentFragment();
      for (let i = view.pending.length - 1; i >= 0; i--) fragment.appendChild(row(view.pending[i], fresh));
      view.pending = [];
      body.insertBefore(fragment, body.firstChild);
      while (body.rows.length > MAX_ROWS) {
        view.rows.delete(Number(body.lastElementChild.dataset.sequence));
        body.lastElementChild.remove();
      }
    }
    $('events-empty').hidden = body.rows.length > 0;
  }

  function row(item, fresh) {
    const { data } = item;
    view.rows.set(data.sequence, item);
    const tr = document.createElement('tr');
    tr.dataset.sequence = data.sequence;
    tr.dataset.type = data.type;
    tr.tabIndex = 0;
    if (fresh) tr.className = 'fresh';
    if (view.selected && view.selected.data.sequence === data.sequence) tr.setAttribute('aria-selected', 'true');
    cell(tr, 'num seq', String(data.sequence));
    cell(tr, 'time', clock(data.received_at_ms)).title = new Date(data.received_at_ms).toISOString();
    const type = cell(tr, 'type', '');
    type.appendChild(badge(data.type));
    if (data.deviations && data.deviations.length) {
      const mark = document.createElement('span');
      mark.className = 'deviation-mark';
      mark.textContent = `⚠ ${data.deviations.length}`;
      mark.title = `${data.deviations.length} field(s) did not fit the proto: ` +
        data.deviations.map((d) => d.path).join(', ');
      type.appendChild(mark);
    }
    cell(tr, 'num chat', data.chat_id == null ? '—' : String(data.chat_id));
    cell(tr, 'actor', data.actor || '—');
    return tr;
  }

  function cell(tr, className, text) {
    const td = tr.insertCell();
    td.className = className;
    td.textContent = text;
    return td;
  }

  function hue(text) {
    let h = 0;
    for (const c of text) h = (h * 31 + c.codePointAt(0)) % 360;
    return h;
  }

  function badge(type) {
    const span = document.createElement('span');
    const h = hue(type || '');
    span.className = 'badge';
    span.textContent = type || '(none)';
    span.style.background = `hsl(${h} 75% 95%)`;
    span.style.borderColor = `hsl(${h} 55% 84%)`;
    span.style.color = `hsl(${h} 60% 30%)`;
    return span;
  }

  const pad = (n, width) => String(n).padStart(width, '0');
  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
  }

  function drawCounts() {
    const list = $('type-counts');
    const entries = [...view.counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const max = entries.length ? entries[0][1] : 1;
    let total = 0;
    list.textContent = '';
    for (const [type, count] of entries) {
      total += count;
      const li = document.createElement('li');
      li.dataset.type = type;
      li.title = `Show only ${type || 'events without a type'}`;
      const label = document.createElement('span');
      label.className = 'label';
      label.textContent = type || '(none)';
      const value = document.createElement('span');
      value.className = 'count';
      value.textContent = number.format(count);
      const track = document.createElement('span');
      track.className = 'track';
      const fill = document.createElement('span');
      fill.className = 'fill';
      fill.style.width = `${Math.max(2, (100 * count) / max)}%`;
      fill.style.background = `hsl(${hue(type)} 60% 55%)`;
      track.appendChild(fill);
      li.append(label, value, track);
      list.appendChild(li);
    }
    $('types-empty').hidden = entries.length > 0;
    $('types-note').textContent = total ? `${number.format(total)} in this view` : 'in this view';
  }

  // ---- the detail pane ----------------------------------------------------------------------

  function select(sequence) {
    const item = view.rows.get(sequence);
    if (!item) return;
    for (const tr of $('events').querySelectorAll('tr[aria-selected]')) tr.removeAttribute('aria-selected');
    const tr = $('events').querySelector(`tr[data-sequence="${sequence}"]`);
    if (tr) tr.setAttribute('aria-selected', 'true');
    view.selected = item;
    const { data } = item;
    $('detail-title').textContent = `Event #${data.sequence} · ${data.type || '(none)'}`;
    const parts = [`received ${new Date(data.received_at_ms).toISOString()}`];
    if (data.chat_id != null) parts.push(`chat ${data.chat_id}`);
    if (data.actor) parts.push(`actor ${data.actor}`);
    $('detail-meta').textContent = parts.join(' · ');
    const deviations = data.deviations || [];
    $('detail-deviations').hidden = deviations.length === 0;
    const list = $('deviation-list');
    list.textContent = '';
    for (const d of deviations) {
      const li = document.createElement('li');
      const path = document.createElement('code');
      path.textContent = d.path;
      li.appendChild(path);
      li.appendChild(document.createTextNode(` ${d.outcome}: expected ${d.expected}, found ${d.found}`));
      list.appendChild(li);
    }
    showJson($('detail-json'), item.raw);
    $('copy').hidden = false;
  }

  // Indents and colours JSON text without parsing its values, so numbers stay as sent.
  function showJson(pre, raw) {
    pre.textContent = '';
    if (raw.length > HIGHLIGHT_LIMIT) {
      pre.textContent = raw;
      return;
    }
    const tokens = raw.match(/"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null|[{}[\],:]/g) || [];
    const fragment = document.createDocumentFragment();
    const put = (className, text) => {
      const span = document.createElement('span');
      span.className = className;
      span.textContent = text;
      fragment.appendChild(span);
    };
    const text = (t) => fragment.appendChild(document.createTextNode(t));
    const newline = (depth) => text('\n' + '  '.repeat(depth));
    let depth = 0;
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      if (t === '{' || t === '[') {
        const close = t === '{' ? '}' : ']';
        if (tokens[i + 1] === close) {
          put('p', t + close);
          i += 1;
        } else {
          put('p', t);
          newline(++depth);
        }
      } else if (t === '}' || t === ']') {
        newline(--depth);
        put('p', t);
      } else if (t === ',') {
        put('p', ',');
        newline(depth);
      } else if (t === ':') {
        put('p', ': ');
      } else if (t[0] === '"') {
        put(tokens[i + 1] === ':' ? 'k' : 's', t);
      } else if (t === 'true' || t === 'false' || t === 'null') {
        put('l', t);
      } else {
        put('n', t);
      }
    }
    pre.appendChild(fragment);
  }

  // ---- stats: rate, totals, subscribers -----------------------------------------------------

  async function poll() {
    try {
      const response = await fetch('/v1/stats' + (token ? '?' + query({}, {}) : ''), { cache: 'no-store' });
      if (!response.ok) {
        const hint = response.status === 401 ? ' (open the console with ?token=…)' : '';
        throw new Error(`HTTP ${response.status}${hint}`);
      }
      drawStats(await response.json());
      showError('stats-error', '');
    } catch (error) {
      showError('stats-error', 'Stats unavailable: ' + error.message);
      $('ready').dataset.state = 'unknown';
      $('ready').textContent = 'store: ?';
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function drawStats(stats) {
    const ready = $('ready');
    ready.dataset.state = stats.ready ? 'ready' : 'not-ready';
    ready.textContent = stats.ready ? 'store: ready' : 'store: not ready';
    $('stored').textContent = number.format(stats.stored);
    $('duplicates').textContent = number.format(stats.duplicates);
    $('range').textContent = stats.last_sequence
      ? `${number.format(stats.first_sequence)}–${number.format(stats.last_sequence)}`
      : '—';
    drawRate(stats.stored);
    drawSubscribers(stats.subscribers || []);
  }

  function drawRate(stored) {
    const now = Date.now();
    const samples = view.samples;
    const last = samples[samples.length - 1];
    if (last && stored < last.stored) samples.length = 0; // the gateway restarted
    samples.push({ t: now, stored });
    while (samples.length > 2 && samples[1].t < now - WINDOW_MS) samples.shift();
    const rates = [];
    for (let i = 1; i < samples.length; i++) {
      const seconds = (samples[i].t - samples[i - 1].t) / 1000;
      if (seconds > 0) rates.push({ t: samples[i].t, rate: (samples[i].stored - samples[i - 1].stored) / seconds });
    }
    const current = rates.length ? rates[rates.length - 1].rate : 0;
    const peak = rates.reduce((m, r) => Math.max(m, r.rate), 0);
    $('rate-now').textContent = rates.length ? rateText(current) : '–';
    $('rate-peak').textContent = `peak ${rateText(peak)}/s`;
    const top = niceCeiling(peak);
    $('rate-scale').textContent = `${number.format(top)}/s`;
    // The chart spans the history there is, up to WINDOW_MS, so it fills from the first poll on.
    const span = Math.min(WINDOW_MS, Math.max(10_000, now - samples[0].t));
    $('rate-span').textContent = span >= 60_000 ? `−${Math.round(span / 60_000)} min` : `−${Math.round(span / 1000)} s`;
    const x = (t) => (320 * (1 - (now - t) / span)).toFixed(1);
    const y = (rate) => (78 - (72 * rate) / top).toFixed(1);
    if (rates.length < 2) {
      $('rate-line').setAttribute('d', '');
      $('rate-area').setAttribute('d', '');
      return;
    }
    const line = rates.map((r, i) => `${i ? 'L' : 'M'}${x(r.t)},${y(r.rate)}`).join(' ');
    $('rate-line').setAttribute('d', line);
    $('rate-area').setAttribute('d', `${line} L${x(rates[rates.length - 1].t)},78 L${x(rates[0].t)},78 Z`);
  }

  const rateText = (rate) => (rate >= 100 ? number.format(Math.round(rate)) : rate.toFixed(1));

  function niceCeiling(value) {
    if (value <= 1) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 5, 10]) if (value <= m * step) return m * step;
    return 10 * step;
  }

  function drawSubscribers(list) {
    const body = $('subs');
    body.textContent = '';
    const shown = list.slice(0, 50);
    const maxLag = shown.reduce((m, s) => Math.max(m, s.lag), 1);
    for (const s of shown) {
      const tr = body.insertRow();
      tr.dataset.subscriber = s.id;
      cell(tr, '', `#${s.id}`);
      cell(tr, 'num', number.format(s.position));
      const lag = cell(tr, '', '');
      const box = document.createElement('div');
      box.className = 'lag';
      box.dataset.level = s.lag === 0 ? 'ok' : s.lag < 1000 ? 'behind' : 'far';
      const track = document.createElement('span');
      track.className = 'track';
      const fill = document.createElement('span');
      fill.className = 'fill';
      fill.style.width = s.lag ? `${Math.max(3, (100 * s.lag) / maxLag)}%` : '0';
      track.appendChild(fill);
      const value = document.createElement('span');
      value.className = 'value';
      value.textContent = s.lag ? number.format(s.lag) : 'caught up';
      box.append(track, value);
      lag.appendChild(box);
    }
    if (list.length > shown.length) {
      const tr = body.insertRow();
      const td = cell(tr, '', `and ${number.format(list.length - shown.length)} more`);
      td.colSpan = 3;
    }
    $('subs-count').textContent = list.length ? `${number.format(list.length)} open, this console included` : '';
    $('subs-empty').hidden = list.length > 0;
  }

  // ---- small helpers and wiring -------------------------------------------------------------

  function setConnection(state) {
    const text = { connecting: 'connecting…', connected: 'live', reconnecting: 'reconnecting…', disconnected: 'disconnected' };
    $('conn').dataset.state = state;
    $('conn-text').textContent = text[state];
  }

  function showError(id, message) {
    $(id).textContent = message;
    $(id).hidden = !message;
  }

  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    apply();
  });
  $('f-clear').addEventListener('click', () => {
    for (const input of Object.values(inputs)) input.value = '';
    apply();
  });
  $('pause').addEventListener('click', () => {
    view.paused = !view.paused;
    view.pausedNew = 0;
    $('pause').setAttribute('aria-pressed', String(view.paused));
    draw();
  });
  $('events').addEventListener('click', (event) => {
    const tr = event.target.closest('tr[data-sequence]');
    if (tr) select(Number(tr.dataset.sequence));
  });
  $('events').addEventListener('keydown', (event) => {
    const tr = event.target.closest('tr[data-sequence]');
    if (tr && (event.key === 'Enter' || event.key === ' ')) {
      event.preventDefault();
      select(Number(tr.dataset.sequence));
    }
  });
  $('type-counts').addEventListener('click', (event) => {
    const li = event.target.closest('li[data-type]');
    if (!li) return;
    inputs.type.value = li.dataset.type;
    apply();
  });
  $('copy').addEventListener('click', () => {
    if (view.selected && navigator.clipboard) navigator.clipboard.writeText(view.selected.raw).catch(() => {});
  });

  const initial = new URLSearchParams(location.search);
  for (const [key, input] of Object.entries(inputs)) input.value = initial.getAll(key).join(',');
  connect(true);
  poll();
})();
