// Clowder console: one script, no framework, no network beyond this balancer's own public APIs
// (REST bridge under /api/v1, the OpenAI API under /v1, /metrics). The admin token lives only in this tab's
// sessionStorage; every DOM update goes through textContent (never innerHTML), so API data cannot inject markup.
'use strict';

const TOKEN_KEY = 'clowder.adminToken';
const POLL_MS = 2000;
// Backoff while the balancer cannot be reached: quick at first, then at most this often.
const RETRY_MAX_MS = 15000;
// Load history kept per deployment for the chart (one sample per poll).
const HISTORY_MS = 5 * 60 * 1000;
// Rates (requests/s, tokens/s, TTFT) are taken over this much of the history, to smooth 2 s readings.
const RATE_WINDOW_MS = 10000;
// One read (not a stream: pulls and chats take as long as they take). A change (scale, undeploy: the controller
// stops replicas before it answers) gets longer, so a slow success is not shown as a lost connection.
const CALL_TIMEOUT_MS = 8000;
const ACTION_TIMEOUT_MS = 60000;
const MODEL_LAYER_MEDIA_TYPE = 'application/vnd.clowder.model.layer.v1+gguf';

const state = {
  token: null,
  page: null,        // the page object on screen
  timer: null,       // the next poll
  failures: 0,       // polls in a row that could not reach the balancer
  lost: false,
  samples: [],       // [{t, replicas: Map(key -> stats), ttft: {sum, count}}] for HISTORY_MS
  pulls: new Map(),  // alias -> {done, total, rate, status, error}
  playgroundKey: '', // optional user API key for /v1 (only in memory)
};

// ---------------------------------------------------------------------------------------------------------------
// DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'text') el.textContent = value;
    else if (value === true) el.setAttribute(name, '');
    else el.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, value);
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// Rows keyed by id, updated in place: a refresh must not rebuild the row whose button has the keyboard focus.
// cells(item) gives the data cells (strings or nodes); actions(item, row), built once per row, the last cell.
function syncRows(tbody, items, key, cells, actions, emptyText) {
  const existing = new Map([...tbody.querySelectorAll('tr[data-key]')].map(tr => [tr.dataset.key, tr]));
  const empty = tbody.querySelector('tr.empty');
  if (empty) empty.remove();
  let previous = null;
  for (const item of items) {
    const k = key(item);
    let tr = existing.get(k);
    const values = cells(item);
    if (!tr) {
      tr = h('tr', {'data-key': k});
      for (let i = 0; i < values.length; i++) tr.append(h('td'));
      if (actions) tr.append(h('td', {class: 'actions'}, actions(item, tr)));
    }
    existing.delete(k);
    values.forEach((value, i) => {
      const td = tr.children[i];
      const cls = typeof value === 'number' ? 'num' : '';
      if (td.className !== cls) td.className = cls;
      if (value instanceof Node) {
        if (td.firstChild === null || td.firstChild.textContent !== value.textContent ||
            td.firstChild.className !== value.className) td.replaceChildren(value);
      } else {
        setText(td, value === null || value === undefined ? '—' : String(value));
      }
    });
    const want = previous ? previous.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    previous = tr;
  }
  for (const tr of existing.values()) tr.remove();
  if (!items.length && emptyText) {
    const columns = tbody.closest('table').querySelectorAll('thead th').length || 1;
    tbody.append(h('tr', {class: 'empty'}, h('td', {colspan: String(columns), class: 'muted', text: emptyText})));
  }
}

function table(caption, headers, tbodyId) {
  return h('table', {'aria-label': caption},
    h('thead', {}, h('tr', {}, headers.map(t => h('th', {scope: 'col', text: t})))),
    h('tbody', {id: tbodyId}));
}

function errorBox(id) {
  return h('div', {id, class: 'error', role: 'alert'});
}

function showError(id, err) {
  const el = document.getElementById(id);
  if (el) setText(el, err ? (err.message || String(err)) : '');
}

// ---------------------------------------------------------------------------------------------------------------
// Formatting

function fmtBytes(n) {
  n = Number(n || 0);
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i && n < 100 ? 1 : 0)} ${units[i]}`;
}

function fmtRate(n, unit) {
  if (n === null || n === undefined || !isFinite(n)) return '—';
  return `${n < 10 ? n.toFixed(1) : Math.round(n)}${unit ? ' ' + unit : ''}`;
}

function fmtAgo(iso) {
  if (!iso) return '—';
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)}h ago`;
  return new Date(iso).toLocaleString();
}

function stateName(s) {
  return (s || 'REPLICA_STATE_UNSPECIFIED').replace('REPLICA_STATE_', '').toLowerCase();
}

function stateBadge(s) {
  const name = stateName(s);
  const cls = name === 'ready' ? 'state-ready' : name === 'failed' ? 'state-failed' : 'state-other';
  return h('span', {class: cls, text: name});
}

// ---------------------------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(response) {
  const text = await response.text().catch(() => '');
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.message || (body.error && body.error.message) || text;
  } catch (_) { /* not JSON: the text as it came */ }
  return `${response.status} ${response.statusText || ''}`.trim() + (message ? `: ${message}` : '');
}

// fetch with the admin token (unless auth is false). Network failures mark the connection lost; a 401 on an
// admin call means the token is no longer accepted, which ends the session.
async function request(method, path, {body, auth = true, headers = {}, signal,
                                      timeoutMs = method === 'GET' ? CALL_TIMEOUT_MS : ACTION_TIMEOUT_MS} = {}) {
  const h2 = {...headers};
  // A balancer that accepts connections but never answers (stopped, wedged) counts as lost too.
  if (!signal && timeoutMs) signal = AbortSignal.timeout(timeoutMs);
  if (auth) h2.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) h2['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {method, headers: h2, body: body === undefined ? undefined : JSON.stringify(body),
                                   signal, cache: 'no-store'});
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    connectionLost();
    throw new ApiError(0, `Cannot reach the balancer (${err.message}).`);
  }
  connectionOk();
  if (!response.ok) {
    const message = await errorText(response);
    if (response.status === 401 && auth && state.token) {
      signOut(`The balancer no longer accepts the admin token (${message}). Sign in again.`);
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function api(method, path, body) {
  const response = await request(method, path, {body});
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

// ---------------------------------------------------------------------------------------------------------------
// Connection state: a lost connection is shown, and the poll loop retries with backoff.

function connectionLost() {
  state.failures += 1;
  state.lost = true;
  renderConnection();
}

function connectionOk() {
  if (state.lost) {
    state.lost = false;
    state.failures = 0;
    const banner = document.getElementById('connection');
    banner.className = 'banner';
    banner.textContent = 'Connection to the balancer restored.';
    banner.hidden = false;
    setTimeout(() => { if (!state.lost) banner.hidden = true; }, 3000);
  }
  state.failures = 0;
}

function retryDelay() {
  return state.failures ? Math.min(RETRY_MAX_MS, 1000 * 2 ** Math.min(state.failures, 4)) : POLL_MS;
}

function renderConnection() {
  const banner = document.getElementById('connection');
  if (!state.lost) return;
  banner.className = 'banner lost';
  banner.textContent = `Connection to the balancer lost; retrying every ${Math.round(retryDelay() / 1000)} s…`;
  banner.hidden = false;
}

// ---------------------------------------------------------------------------------------------------------------
// Load sampling: every poll reads each replica's stats (GET /api/v1/runtime-stats) and this balancer's TTFT
// histogram (/metrics), kept for HISTORY_MS so the overview and the deployment chart show rates and history.

function parseTtft(text) {
  let sum = 0, count = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('clowder_balancer_time_to_first_token_seconds_sum')) sum += Number(line.split(' ').pop());
    else if (line.startsWith('clowder_balancer_time_to_first_token_seconds_count')) count += Number(line.split(' ').pop());
  }
  return {sum, count};
}

async function sample() {
  const [stats, metrics] = await Promise.all([
    api('GET', '/api/v1/runtime-stats'),
    request('GET', '/metrics', {auth: false}).then(r => r.text()),
  ]);
  const replicas = new Map();
  for (const r of stats.replicas || []) replicas.set(`${r.deployment}/${r.replica}`, r);
  const now = Date.now();
  state.samples.push({t: now, replicas, ttft: parseTtft(metrics)});
  while (state.samples.length && state.samples[0].t < now - HISTORY_MS) state.samples.shift();
}

// The sample about RATE_WINDOW_MS before `index` (or the oldest there is).
function baseSample(index) {
  const target = state.samples[index].t - RATE_WINDOW_MS;
  let i = index - 1;
  while (i > 0 && state.samples[i - 1].t >= target) i--;
  return i >= 0 && i < index ? state.samples[i] : null;
}

// Per replica: {running, waiting, kv, tps, rps}; counters that went back (a restarted runtime) count as no rate.
function replicaLoad(key, index = state.samples.length - 1) {
  const now = state.samples[index];
  const r = now && now.replicas.get(key);
  if (!r) return null;
  const base = baseSample(index);
  const before = base && base.replicas.get(key);
  let tps = null, rps = null;
  if (before && before.reachable && r.reachable) {
    const dt = (now.t - base.t) / 1000;
    const tokens = Number(r.generationTokensTotal) - Number(before.generationTokensTotal);
    const requests = Number(r.requestsTotal) - Number(before.requestsTotal);
    tps = tokens >= 0 ? tokens / dt : null;
    rps = requests >= 0 ? requests / dt : null;
  }
  return {reachable: r.reachable, running: r.running, waiting: r.waiting, kv: r.kvCacheUsage, slots: r.slots,
          tps, rps, endpoint: r.endpoint};
}

function deploymentLoad(name, index) {
  const now = state.samples[index];
  let inFlight = 0, waiting = 0, tps = 0, rps = 0;
  for (const key of now.replicas.keys()) {
    if (name && !key.startsWith(name + '/')) continue;
    const load = replicaLoad(key, index);
    if (!load || !load.reachable) continue;
    inFlight += load.running || 0;
    waiting += load.waiting || 0;
    tps += load.tps || 0;
    rps += load.rps || 0;
  }
  return {inFlight, waiting, tps, rps};
}

function clusterTtft() {
  const index = state.samples.length - 1;
  if (index < 0) return {value: null, recent: false};
  const now = state.samples[index].ttft;
  const base = baseSample(index);
  if (base && now.count > base.ttft.count) {
    return {value: (now.sum - base.ttft.sum) / (now.count - base.ttft.count), recent: true};
  }
  return {value: now.count ? now.sum / now.count : null, recent: false};
}

// ---------------------------------------------------------------------------------------------------------------
// The chart: the last minutes of one series as an inline SVG polyline.

function chart(title, points, unit, cls) {
  const width = 460, height = 150, left = 40, bottom = 20, top = 10;
  const peak = Math.max(0, ...points.map(p => p.v));
  const max = Math.max(1, peak);  // the scale: an idle chart still has one
  const now = Date.now();
  const x = t => left + (width - left - 5) * (1 - (now - t) / HISTORY_MS);
  const y = v => top + (height - top - bottom) * (1 - v / max);
  const last = points.length ? points[points.length - 1].v : 0;
  const svg = s('svg', {width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
                         'aria-label': `${title}: ${fmtRate(last, unit)} now, at most ${fmtRate(peak, unit)} in the last 5 minutes`});
  for (const v of [0, max / 2, max]) {
    svg.append(s('line', {class: 'grid', x1: left, x2: width - 5, y1: y(v), y2: y(v)}));
    svg.append(s('text', {x: 2, y: y(v) + 4}, fmtRate(v)));
  }
  svg.append(s('text', {x: left, y: height - 4}, '-5 min'));
  svg.append(s('text', {x: width - 30, y: height - 4}, 'now'));
  if (points.length > 1) {
    svg.append(s('polyline', {class: cls, points: points.map(p => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ')}));
  }
  return h('figure', {class: 'chart'}, h('figcaption', {text: `${title} (now ${fmtRate(last, unit)})`}), svg);
}

// ---------------------------------------------------------------------------------------------------------------
// Pages. Each has enter() (builds the skeleton) and refresh() (fills it; called every poll while shown).

function pageHeading(text) {
  return h('h1', {tabindex: '-1', id: 'page-title', text});
}

const overviewPage = {
  name: 'overview',
  enter(main) {
    main.append(
      pageHeading('Overview'),
      errorBox('overview-error'),
      h('section', {'aria-labelledby': 'load-h'},
        h('h2', {id: 'load-h', text: 'Cluster load'}),
        h('div', {class: 'cards'},
          card('Requests/s', 'stat-rps'), card('Tokens/s', 'stat-tps'),
          card('Time to first token', 'stat-ttft'), card('Requests in flight', 'stat-inflight'))),
      h('section', {'aria-labelledby': 'nodes-h'},
        h('h2', {id: 'nodes-h', text: 'Nodes'}),
        table('Nodes', ['Node', 'CPUs', 'GPUs', 'Memory', 'Store free', 'Store used (models)', 'Labels', 'Up since'],
              'nodes-body')),
      h('section', {'aria-labelledby': 'deployments-h'},
        h('h2', {id: 'deployments-h', text: 'Deployments'}),
        table('Deployments', ['Deployment', 'Image', 'Ready', 'Last event'], 'deployments-body')));
  },
  async refresh() {
    const [nodes, deployments, images] = await Promise.all([
      api('GET', '/api/v1/nodes'), api('GET', '/api/v1/deployments'), api('GET', '/api/v1/images')]);
    const sizes = new Map((images.images || []).filter(i => i.digest).map(i => [i.digest, Number(i.sizeBytes)]));
    syncRows(document.getElementById('nodes-body'), nodes.nodes || [], n => n.name, n => {
      const held = (n.blobDigests || []).filter(d => sizes.has(d));
      const used = held.reduce((a, d) => a + sizes.get(d), 0);
      const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
      return [n.name, n.cpus, n.gpus, fmtBytes(n.memoryBytes), fmtBytes(n.storeFreeBytes),
              `${fmtBytes(used)} (${held.length} model${held.length === 1 ? '' : 's'})`, labels || '—',
              fmtAgo(n.startTime)];
    }, null, 'No node has registered.');
    syncRows(document.getElementById('deployments-body'), deployments.deployments || [], d => d.name, d => {
      const last = (d.events || [])[d.events ? d.events.length - 1 : 0];
      return [h('a', {href: `#/deployment/${encodeURIComponent(d.name)}`, text: d.name}), d.image,
              `${d.readyReplicas || 0}/${d.replicas || 0}`,
              last ? `${last.reason}: ${last.message} (${fmtAgo(last.time)})` : '—'];
    }, null, 'No deployment yet: add an image and deploy it.');
    const index = state.samples.length - 1;
    if (index >= 0) {
      const load = deploymentLoad('', index);
      const ttft = clusterTtft();
      setText(document.getElementById('stat-rps'), fmtRate(load.rps));
      setText(document.getElementById('stat-tps'), fmtRate(load.tps));
      setText(document.getElementById('stat-ttft'), ttft.value === null ? '—'
        : `${Math.round(ttft.value * 1000)} ms${ttft.recent ? '' : ' (avg)'}`);
      setText(document.getElementById('stat-inflight'), `${load.inFlight} (+${load.waiting} waiting)`);
    }
  },
};

function card(label, id) {
  return h('div', {class: 'card'}, h('div', {class: 'label', id: `${id}-label`, text: label}),
           h('div', {class: 'value', id, 'aria-labelledby': `${id}-label`, text: '—'}));
}

function deploymentPage(name) {
  let desired = null;
  let busy = false;

  async function scaleTo(replicas) {
    if (busy) return;
    busy = true;
    showError('deployment-error', null);
    try {
      await api('PATCH', `/api/v1/deployments/${encodeURIComponent(name)}?updateMask=replicas`, {replicas});
      announce(`Scaling ${name} to ${replicas} replica${replicas === 1 ? '' : 's'}.`);
      await page.refresh();
    } catch (err) {
      showError('deployment-error', err);
    } finally {
      busy = false;
    }
  }

  const page = {
    name: 'deployment',
    enter(main) {
      const confirm = h('span', {id: 'undeploy-confirm', hidden: true},
        h('span', {text: `Remove ${name} and stop its replicas? `}),
        h('button', {type: 'button', class: 'danger', id: 'undeploy-yes', onclick: async () => {
          try {
            await api('DELETE', `/api/v1/deployments/${encodeURIComponent(name)}`);
            announce(`${name} undeployed.`);
            location.hash = '#/overview';
          } catch (err) { showError('deployment-error', err); }
        }}, 'Undeploy now'), ' ',
        h('button', {type: 'button', class: 'secondary', onclick: () => {
          confirm.hidden = true;
          document.getElementById('undeploy').focus();
        }}, 'Cancel'));
      const replicasInput = h('input', {id: 'replicas-input', type: 'number', min: '0', max: '64', step: '1'});
      main.append(
        h('p', {}, h('a', {href: '#/overview', text: '← Overview'})),
        pageHeading(`Deployment ${name}`),
        errorBox('deployment-error'),
        h('p', {id: 'deployment-summary', class: 'muted'}),
        h('div', {class: 'row'},
          h('button', {type: 'button', id: 'scale-down', 'aria-label': 'Scale down by one replica',
                       onclick: () => desired !== null && desired > 0 && scaleTo(desired - 1)}, '− Scale down'),
          h('button', {type: 'button', id: 'scale-up', 'aria-label': 'Scale up by one replica',
                       onclick: () => desired !== null && scaleTo(desired + 1)}, '+ Scale up'),
          h('form', {class: 'inline', onsubmit: e => {
            e.preventDefault();
            const n = Number(replicasInput.value);
            if (Number.isInteger(n) && n >= 0) scaleTo(n);
            else showError('deployment-error', new Error('Replicas must be a whole number, 0 or more.'));
          }}, h('label', {for: 'replicas-input'}, 'Replicas', replicasInput),
             h('button', {type: 'submit', class: 'secondary'}, 'Set replicas')),
          h('button', {type: 'button', class: 'danger', id: 'undeploy', onclick: () => {
            confirm.hidden = false;
            document.getElementById('undeploy-yes').focus();
          }}, 'Undeploy…'),
          confirm),
        h('h2', {text: 'Replicas'}),
        table('Replicas', ['Replica', 'Node', 'State', 'Restarts', 'Endpoint', 'Running', 'Waiting', 'KV cache',
                           'Tokens/s', 'Message'], 'replicas-body'),
        h('h2', {text: 'Load, last 5 minutes'}),
        h('div', {class: 'charts', id: 'charts'}),
        h('h2', {text: 'Events'}),
        table('Events', ['Time', 'Reason', 'Replica', 'Message'], 'events-body'));
    },
    async refresh() {
      const enc = encodeURIComponent(name);
      let got;
      try {
        got = await Promise.all([api('GET', `/api/v1/deployments/${enc}`),
                                 api('GET', `/api/v1/deployments/${enc}/replicas`)]);
      } catch (err) {
        if (err.status === 404) setText(document.getElementById('deployment-summary'), 'This deployment does not exist (any more).');
        throw err;
      }
      const [{deployment: d}, {replicas}] = got;
      const firstTime = desired === null;
      desired = d.replicas || 0;
      const input = document.getElementById('replicas-input');
      if (firstTime || document.activeElement !== input) input.value = String(desired);
      setText(document.getElementById('deployment-summary'),
        `Image ${d.image} · ${d.readyReplicas || 0} of ${desired} replicas ready` +
        (d.maxReplicas ? ` · autoscaling ${d.minReplicas}–${d.maxReplicas}` : ''));
      syncRows(document.getElementById('replicas-body'), replicas || [], r => r.id, r => {
        const load = replicaLoad(`${name}/${r.id}`);
        const live = load && load.reachable;
        return [r.id, r.node || '—', stateBadge(r.state), r.restarts || 0, r.endpoint || '—',
                live ? load.running : '—', live ? load.waiting : '—',
                live ? `${Math.round((load.kv || 0) * 100)} %` : '—',
                live && load.tps !== null ? fmtRate(load.tps) : '—', r.message || ''];
      }, null, 'No replica.');
      const events = [...(d.events || [])].reverse();
      syncRows(document.getElementById('events-body'), events, e => `${e.time}|${e.reason}|${e.replica}|${e.message}`,
        e => [h('time', {datetime: e.time, title: e.time, text: fmtAgo(e.time)}), e.reason, e.replica || '—', e.message],
        null, 'No event.');
      const inflight = [], tps = [];
      for (let i = 0; i < state.samples.length; i++) {
        const load = deploymentLoad(name, i);
        inflight.push({t: state.samples[i].t, v: load.inFlight + load.waiting});
        tps.push({t: state.samples[i].t, v: load.tps});
      }
      document.getElementById('charts').replaceChildren(
        chart('Requests in flight (running + waiting)', inflight, '', 'line-a'),
        chart('Tokens/s', tps, 'tok/s', 'line-b'));
    },
  };
  return page;
}

const imagesPage = {
  name: 'images',
  enter(main) {
    const alias = h('input', {id: 'image-alias', required: true, autocomplete: 'off', placeholder: 'my-model'});
    const source = h('input', {id: 'image-source', required: true, autocomplete: 'off', size: '50',
                               placeholder: 'file:///models/x.gguf, hf:///org/repo/file.gguf, s3://…'});
    const pullNow = h('input', {id: 'image-pull', type: 'checkbox', checked: true});
    main.append(
      pageHeading('Images'),
      errorBox('images-error'),
      h('h2', {text: 'Add an image'}),
      h('form', {class: 'inline', id: 'image-form', onsubmit: async e => {
        e.preventDefault();
        showError('images-error', null);
        try {
          await api('POST', '/api/v1/images', {alias: alias.value.trim(), sourceUrl: source.value.trim()});
          announce(`Image ${alias.value.trim()} added.`);
          if (pullNow.checked) pull(alias.value.trim());
          alias.value = '';
          source.value = '';
          await imagesPage.refresh();
        } catch (err) { showError('images-error', err); }
      }},
        h('label', {for: 'image-alias'}, 'Alias', alias),
        h('label', {for: 'image-source'}, 'Source URL', source),
        h('label', {class: 'check', for: 'image-pull'}, pullNow, ' Pull now'),
        h('button', {type: 'submit'}, 'Add image')),
      h('h2', {text: 'Pulls'}),
      h('div', {id: 'pulls', class: 'pulls', 'aria-live': 'polite'}),
      h('h2', {text: 'Images'}),
      table('Images', ['Alias', 'Source', 'Layer digest', 'Size', 'Media type', 'Model', 'Actions'], 'images-body'));
    renderPulls();
  },
  async refresh() {
    const {images} = await api('GET', '/api/v1/images');
    syncRows(document.getElementById('images-body'), images || [], i => i.alias, i => {
      const shape = i.modelShape || {};
      return [i.alias, h('span', {class: 'mono', text: i.sourceUrl}),
              i.digest ? h('span', {class: 'mono', title: i.digest, text: i.digest.slice(0, 19) + '…'})
                       : h('span', {class: 'muted', text: 'not pulled'}),
              i.digest ? fmtBytes(i.sizeBytes) : '—', i.digest ? MODEL_LAYER_MEDIA_TYPE : '—',
              shape.layers ? `${shape.layers} layers, ${shape.embeddingLength} wide, ${shape.trainContext} ctx` : '—'];
    }, imageActions, 'No image yet.');
  },
};

function imageActions(image, row) {
  const confirm = h('span', {hidden: true},
    h('button', {type: 'button', class: 'danger', 'aria-label': `Really remove ${image.alias}`, onclick: async () => {
      try {
        await api('DELETE', `/api/v1/images/${encodeURIComponent(image.alias)}`);
        announce(`Image ${image.alias} removed.`);
        await imagesPage.refresh();
      } catch (err) { showError('images-error', err); confirm.hidden = true; }
    }}, 'Remove now'), ' ',
    h('button', {type: 'button', class: 'secondary', onclick: () => { confirm.hidden = true; }}, 'Cancel'));
  const deployName = h('span');
  return [
    h('button', {type: 'button', class: 'secondary', 'aria-label': `Pull ${image.alias}`,
                 onclick: () => pull(image.alias)}, 'Pull'), ' ',
    h('button', {type: 'button', class: 'secondary', 'aria-label': `Deploy ${image.alias}`, onclick: async () => {
      try {
        await api('POST', '/api/v1/deployments', {name: image.alias, image: image.alias, replicas: 1});
        location.hash = `#/deployment/${encodeURIComponent(image.alias)}`;
      } catch (err) { showError('images-error', err); }
    }}, 'Deploy'), ' ',
    h('button', {type: 'button', class: 'danger', 'aria-label': `Remove ${image.alias}`, onclick: () => {
      confirm.hidden = false;
      confirm.querySelector('button').focus();
    }}, 'Remove…'), ' ', confirm, deployName,
  ];
}

// Pulls stream NDJSON ({"result": PullImageResponse} lines, {"error": Status} if it breaks): progress as it comes.
async function pull(alias) {
  const entry = {done: 0, total: 0, rate: 0, status: 'starting', error: null};
  state.pulls.set(alias, entry);
  renderPulls();
  try {
    const response = await request('POST', `/api/v1/images/${encodeURIComponent(alias)}:pull`,
                                   {body: {}, timeoutMs: 0});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    entry.status = 'pulling';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        if (msg.error) throw new ApiError(500, msg.error.message || 'pull failed');
        const result = msg.result || {};
        if (result.progress) {
          entry.done = Number(result.progress.bytesDone || 0);
          entry.total = Number(result.progress.bytesTotal || 0);
          entry.rate = Number(result.progress.bytesPerSecond || 0);
        }
        if (result.node) entry.node = result.node;
        if (result.blob && result.blob.digest) entry.status = 'done';
        renderPulls();
      }
    }
    entry.status = 'done';
    if (entry.total) entry.done = entry.total;
  } catch (err) {
    entry.status = 'failed';
    entry.error = err.message;
  }
  renderPulls();
  if (state.page === imagesPage) imagesPage.refresh().catch(err => showError('images-error', err));
}

function renderPulls() {
  const box = document.getElementById('pulls');
  if (!box) return;
  if (!state.pulls.size) {
    box.replaceChildren(h('p', {class: 'muted', text: 'No pull in this session.'}));
    return;
  }
  box.replaceChildren(...[...state.pulls].map(([alias, p]) => {
    const id = `pull-${alias}`;
    const bar = h('progress', {id, max: String(p.total || 1), value: String(p.total ? p.done : 0)});
    const text = p.status === 'failed' ? `failed: ${p.error}`
      : p.status === 'done' ? `done (${fmtBytes(p.done)}${p.node ? ' on ' + p.node : ''})`
      : `${fmtBytes(p.done)}${p.total ? ' of ' + fmtBytes(p.total) : ''}${p.rate ? ', ' + fmtBytes(p.rate) + '/s' : ''}`;
    return h('div', {class: 'row'}, h('label', {for: id}, `Pull of ${alias}`, bar),
             h('span', {class: p.status === 'failed' ? 'state-failed' : '', text}));
  }));
}

const playgroundPage = {
  name: 'playground',
  messages: [],
  controller: null,
  enter(main) {
    const model = h('select', {id: 'pg-model'});
    const temperature = h('input', {id: 'pg-temperature', type: 'number', min: '0', max: '2', step: '0.1', value: '0.7'});
    const maxTokens = h('input', {id: 'pg-max-tokens', type: 'number', min: '1', max: '8192', step: '1', value: '128'});
    const key = h('input', {id: 'pg-key', type: 'password', autocomplete: 'off', value: state.playgroundKey,
                            oninput: e => { state.playgroundKey = e.target.value.trim(); },
                            // With keys required, the model list itself needs the key.
                            onchange: () => this.loadModels()});
    const prompt = h('textarea', {id: 'pg-prompt', rows: '3', placeholder: 'Ask something… (Ctrl+Enter sends)'});
    const send = h('button', {type: 'submit', id: 'pg-send'}, 'Send');
    const stop = h('button', {type: 'button', id: 'pg-stop', class: 'secondary', disabled: true,
                              onclick: () => this.controller && this.controller.abort()}, 'Stop');
    prompt.addEventListener('keydown', e => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send.click(); }
    });
    main.append(
      pageHeading('Playground'),
      errorBox('pg-error'),
      h('div', {class: 'row'},
        h('label', {for: 'pg-model'}, 'Model', model),
        h('label', {for: 'pg-temperature'}, 'Temperature', temperature),
        h('label', {for: 'pg-max-tokens'}, 'Max tokens', maxTokens),
        h('label', {for: 'pg-key'}, 'API key (if the cluster requires one)', key),
        h('button', {type: 'button', class: 'secondary', onclick: () => {
          this.messages = [];
          this.renderTranscript();
          setText(document.getElementById('pg-stats'), '');
          prompt.focus();
        }}, 'New chat')),
      h('div', {id: 'pg-transcript', class: 'transcript', role: 'log', 'aria-live': 'polite', 'aria-label': 'Conversation'}),
      h('p', {id: 'pg-stats', class: 'muted', 'aria-live': 'polite'}),
      h('form', {id: 'pg-form', onsubmit: e => { e.preventDefault(); this.send(prompt, send, stop); }},
        h('label', {for: 'pg-prompt'}, 'Message', prompt),
        h('div', {class: 'row'}, send, stop)));
    this.renderTranscript();
    this.loadModels();
  },
  async loadModels() {
    const select = document.getElementById('pg-model');
    try {
      const headers = state.playgroundKey ? {Authorization: `Bearer ${state.playgroundKey}`} : {};
      const response = await request('GET', '/v1/models', {auth: false, headers});
      const {data} = await response.json();
      const current = select.value;
      select.replaceChildren(...(data || []).map(m => h('option', {value: m.id, text: m.id})));
      if (!data || !data.length) select.append(h('option', {value: '', text: 'no model deployed'}));
      if (current) select.value = current;
      showError('pg-error', null);
    } catch (err) { showError('pg-error', err); }
  },
  renderTranscript() {
    const box = document.getElementById('pg-transcript');
    if (!box) return;
    box.replaceChildren(...this.messages.map((m, i) => h('div', {class: `msg msg-${m.role}`, id: `pg-msg-${i}`},
      h('span', {class: 'who', text: m.role === 'user' ? 'You' : 'Model'}), h('span', {class: 'text', text: m.content}))));
    if (!this.messages.length) box.append(h('p', {class: 'muted', text: 'Nothing said yet.'}));
    box.scrollTop = box.scrollHeight;
  },
  async send(prompt, send, stop) {
    const text = prompt.value.trim();
    const model = document.getElementById('pg-model').value;
    if (!text) return;
    if (!model) { showError('pg-error', new Error('Pick a model first (none is deployed?).')); return; }
    showError('pg-error', null);
    this.messages.push({role: 'user', content: text});
    const reply = {role: 'assistant', content: ''};
    this.messages.push(reply);
    this.renderTranscript();
    prompt.value = '';
    const out = document.querySelector(`#pg-msg-${this.messages.length - 1} .text`);
    const stats = document.getElementById('pg-stats');
    setText(stats, 'Waiting for the first token…');
    send.disabled = true;
    stop.disabled = false;
    this.controller = new AbortController();
    const started = performance.now();
    let firstAt = null, usage = null, finish = null;
    const body = {
      model, stream: true, stream_options: {include_usage: true},
      messages: this.messages.slice(0, -1).map(m => ({role: m.role, content: m.content})),
      temperature: Number(document.getElementById('pg-temperature').value),
      max_tokens: Number(document.getElementById('pg-max-tokens').value),
    };
    try {
      const headers = state.playgroundKey ? {Authorization: `Bearer ${state.playgroundKey}`} : {};
      const response = await request('POST', '/v1/chat/completions',
                                     {body, auth: false, headers, signal: this.controller.signal});
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      outer: for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split('\n')) {
            if (!line.startsWith('data:')) continue;
            const data = line.slice(5).trim();
            if (data === '[DONE]') break outer;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new ApiError(500, `The stream broke: ${chunk.error.message}`);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const piece = choice.delta && choice.delta.content;
              if (piece) {
                if (firstAt === null) firstAt = performance.now();
                reply.content += piece;
                out.textContent = reply.content;
                out.parentElement.parentElement.scrollTop = out.parentElement.parentElement.scrollHeight;
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
    } catch (err) {
      if (err.name === 'AbortError') finish = 'stopped';
      else showError('pg-error', err);
    } finally {
      send.disabled = false;
      stop.disabled = true;
      this.controller = null;
    }
    const ended = performance.now();
    const parts = [];
    if (firstAt !== null) parts.push(`Time to first token ${Math.round(firstAt - started)} ms`);
    if (usage) {
      parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
      if (firstAt !== null && ended > firstAt && usage.completion_tokens > 1) {
        parts.push(`${fmtRate((usage.completion_tokens - 1) / ((ended - firstAt) / 1000))} tokens/s`);
      }
    }
    if (finish) parts.push(`finish: ${finish}`);
    setText(stats, parts.join(' · '));
    prompt.focus();
  },
  async refresh() { /* nothing to poll: the model list loads on entry */ },
  poll: false,
};

const keysPage = {
  name: 'keys',
  enter(main) {
    const description = h('input', {id: 'key-description', autocomplete: 'off', maxlength: '200'});
    const groups = h('input', {id: 'key-groups', autocomplete: 'off', placeholder: 'team-a, batch'});
    main.append(
      pageHeading('API keys'),
      errorBox('keys-error'),
      h('p', {class: 'muted', text: 'User keys for the OpenAI API (/v1). A key\'s secret is shown once, when it is created.'}),
      h('h2', {text: 'Create a key'}),
      h('form', {class: 'inline', id: 'key-form', onsubmit: async e => {
        e.preventDefault();
        showError('keys-error', null);
        try {
          const created = await api('POST', '/api/v1/apikeys', {
            description: description.value.trim(),
            groups: groups.value.split(',').map(g => g.trim()).filter(Boolean)});
          description.value = '';
          groups.value = '';
          showSecret(created);
          await keysPage.refresh();
        } catch (err) { showError('keys-error', err); }
      }},
        h('label', {for: 'key-description'}, 'Description', description),
        h('label', {for: 'key-groups'}, 'Groups (comma-separated)', groups),
        h('button', {type: 'submit'}, 'Create key')),
      h('div', {id: 'new-key'}),
      h('h2', {text: 'Keys'}),
      table('API keys', ['ID', 'Description', 'Groups', 'Created', 'Actions'], 'keys-body'));
  },
  async refresh() {
    const {apiKeys} = await api('GET', '/api/v1/apikeys');
    syncRows(document.getElementById('keys-body'), apiKeys || [], k => k.id,
      k => [h('code', {text: k.id}), k.description || '—', (k.groups || []).join(', ') || '—',
            h('time', {datetime: k.createTime, title: k.createTime || '', text: fmtAgo(k.createTime)})],
      keyActions, 'No key yet.');
  },
  poll: false,  // keys change only through this page (or the CLI): refreshed on entry and after each action
};

function showSecret(created) {
  const box = document.getElementById('new-key');
  const secret = h('code', {class: 'secret', id: 'new-key-secret', text: created.key});
  const copy = h('button', {type: 'button', class: 'secondary', onclick: async () => {
    try {
      await navigator.clipboard.writeText(created.key);
      setText(copy, 'Copied');
    } catch (_) {
      // No clipboard access (an http:// origin other than localhost): select it for a manual copy.
      const range = document.createRange();
      range.selectNodeContents(secret);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      setText(copy, 'Selected: press Ctrl+C');
    }
  }}, 'Copy');
  box.replaceChildren(h('div', {class: 'notice', role: 'status'},
    h('p', {}, `Key ${created.apiKey.id} created. Copy its secret now: it is not shown again.`), secret,
    h('div', {class: 'row'}, copy, h('button', {type: 'button', class: 'secondary', onclick: () => {
      box.replaceChildren();
      document.getElementById('key-description').focus();
    }}, 'Done'))));
  copy.focus();
}

function keyActions(key) {
  const confirm = h('span', {hidden: true},
    h('button', {type: 'button', class: 'danger', 'aria-label': `Really revoke key ${key.id}`, onclick: async () => {
      try {
        await api('DELETE', `/api/v1/apikeys/${encodeURIComponent(key.id)}`);
        announce(`Key ${key.id} revoked.`);
        await keysPage.refresh();
        document.getElementById('page-title').focus();
      } catch (err) { showError('keys-error', err); confirm.hidden = true; }
    }}, 'Revoke now'), ' ',
    h('button', {type: 'button', class: 'secondary', onclick: () => { confirm.hidden = true; }}, 'Cancel'));
  return [h('button', {type: 'button', class: 'danger', 'aria-label': `Revoke key ${key.id}`, onclick: () => {
    confirm.hidden = false;
    confirm.querySelector('button').focus();
  }}, 'Revoke…'), ' ', confirm];
}

// ---------------------------------------------------------------------------------------------------------------
// Sign-in

function signInPage(message) {
  return {
    name: 'signin',
    poll: false,
    enter(main) {
      const token = h('input', {id: 'token', type: 'password', autocomplete: 'off', required: true,
                                'aria-describedby': 'token-help'});
      const submit = h('button', {type: 'submit', id: 'sign-in'}, 'Sign in');
      main.append(h('div', {class: 'signin'},
        pageHeading('Sign in'),
        errorBox('signin-error'),
        h('form', {id: 'signin-form', onsubmit: async e => {
          e.preventDefault();
          submit.disabled = true;
          try {
            await signIn(token.value.trim());
          } catch (err) {
            showError('signin-error', err);
            token.select();
          } finally { submit.disabled = false; }
        }},
          h('label', {for: 'token'}, 'Admin token', token),
          h('p', {id: 'token-help', class: 'muted'},
            'The cluster\'s admin token: CLOWDER_ADMIN_TOKEN, or the admin-token file in the data directory. ' +
            'It is kept in this tab only.'),
          submit)));
      if (message) showError('signin-error', new Error(message));
      token.focus();
    },
    async refresh() {},
  };
}

// Checks the token with one admin call before keeping it: a wrong token is refused here, not on every page.
async function signIn(token) {
  if (!token) throw new Error('Enter the admin token.');
  let response;
  try {
    response = await fetch('/api/v1/nodes', {headers: {Authorization: `Bearer ${token}`}, cache: 'no-store'});
  } catch (err) {
    throw new Error(`Cannot reach the balancer (${err.message}).`);
  }
  if (response.status === 401 || response.status === 403) {
    throw new Error(`The token was refused (${await errorText(response)}).`);
  }
  if (!response.ok) throw new Error(await errorText(response));
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById('nav').hidden = false;
  document.getElementById('sign-out').hidden = false;
  if (!location.hash || location.hash === '#' || location.hash === '#/signin') location.hash = '#/overview';
  else route();
}

function signOut(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('nav').hidden = true;
  document.getElementById('sign-out').hidden = true;
  show(signInPage(message));
}

// ---------------------------------------------------------------------------------------------------------------
// Routing and the poll loop

function announce(text) {
  const banner = document.getElementById('connection');
  if (state.lost) return;
  banner.className = 'banner';
  banner.textContent = text;
  banner.hidden = false;
  clearTimeout(announce.timer);
  announce.timer = setTimeout(() => { if (!state.lost) banner.hidden = true; }, 4000);
}

function show(page) {
  clearTimeout(state.timer);
  state.page = page;
  const main = document.getElementById('main');
  main.replaceChildren();
  page.enter(main);
  for (const a of document.querySelectorAll('#nav a')) {
    const current = a.dataset.page === page.name || (page.name === 'deployment' && a.dataset.page === 'overview');
    if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const title = document.getElementById('page-title');
  document.title = `${title ? title.textContent : 'Console'} · Clowder`;
  if (title && page.name !== 'signin') title.focus();
  if (state.token) tick(page);
}

// One poll: the load sample, then the page's own refresh; errors go in the page's error box, never blank it.
async function tick(page) {
  if (state.page !== page || !state.token) return;
  try {
    await sample();
  } catch (err) {
    if (err.status !== 0 && state.page === page) showError(`${page.name}-error`, err);
  }
  if (state.page !== page || !state.token) return;
  if (page.poll !== false || !page.loaded) {
    try {
      await page.refresh();
      page.loaded = true;
      showError(`${page.name}-error`, null);
    } catch (err) {
      if (state.page === page) showError(`${page.name}-error`, err);
    }
  }
  if (state.lost) renderConnection();
  if (state.page === page && state.token) state.timer = setTimeout(() => tick(page), retryDelay());
}

function route() {
  if (!state.token) { show(signInPage()); return; }
  const parts = location.hash.replace(/^#\/?/, '').split('/');
  const pages = {overview: overviewPage, images: imagesPage, playground: playgroundPage, keys: keysPage};
  let page;
  if (parts[0] === 'deployment' && parts[1]) page = deploymentPage(decodeURIComponent(parts[1]));
  else page = pages[parts[0]] || overviewPage;
  page.loaded = false;
  show(page);
}

function start() {
  document.getElementById('sign-out').addEventListener('click', () => {
    signOut();
    history.replaceState(null, '', location.pathname + location.search);
  });
  window.addEventListener('hashchange', () => {
    if (location.hash.startsWith('#token=')) { takeFragmentToken(); return; }
    route();
  });
  if (location.hash.startsWith('#token=')) { takeFragmentToken(); return; }
  state.token = sessionStorage.getItem(TOKEN_KEY);
  if (state.token) {
    document.getElementById('nav').hidden = false;
    document.getElementById('sign-out').hidden = false;
  }
  route();
}

// `#token=...` signs a script's browser in once: the token leaves the address bar (and so the history) at once.
function takeFragmentToken() {
  const raw = location.hash.slice('#token='.length);
  history.replaceState(null, '', location.pathname + location.search + '#/overview');
  let token;
  try {
    token = decodeURIComponent(raw);
  } catch (_) {
    signOut('The token in the address is not valid URL encoding.');
    return;
  }
  signIn(token).catch(err => signOut(err.message));
}

document.addEventListener('DOMContentLoaded', start);
