// The entity list (/ui/, filters in the query string so a filtered list can be linked) with a
// spawn form, and the workers page (/ui/workers).

import { call, entityPath } from './api.js';
import { badge, entityLink, h, relative, replace, section, short, table, time } from './dom.js';
import { errorText, loadTypes, parseLoose } from './entity.js';

const REFRESH_MS = 2000;

// Call `load` now and again REFRESH_MS after each load ends, until `signal` aborts.
function every(load, signal) {
  const tick = async () => {
    if (signal.aborted) return;
    try {
      await load();
    } catch (error) {
      if (error.name === 'AbortError') return;
      console.error(error);
    }
    if (!signal.aborted) setTimeout(tick, REFRESH_MS);
  };
  tick();
}

const FILTERS = ['type', 'status', 'tag', 'parent', 'q'];

export function listPage(view, signal, navigate) {
  const params = new URLSearchParams(location.search);
  const typeSelect = h('select', { name: 'type' }, h('option', { value: '' }, 'any type'));
  const statusSelect = h(
    'select',
    { name: 'status' },
    ['', 'idle', 'running', 'stopped', 'failed', 'orphaned'].map((s) => h('option', { value: s }, s || 'any status')),
  );
  const tag = h('input', { name: 'tag', placeholder: 'tag: key or key=value' });
  const parent = h('input', { name: 'parent', placeholder: 'parent: /type/id' });
  const search = h('input', { name: 'q', type: 'search', placeholder: 'search url, tags…' });
  const inputs = { type: typeSelect, status: statusSelect, tag, parent, q: search };
  for (const name of FILTERS) inputs[name].value = params.get(name) || '';
  const count = h('span', { class: 'muted' });
  const rows = h('div', { class: 'entity-table' }, h('p', { class: 'muted' }, 'Loading…'));
  const error = h('div', { class: 'error' });
  const filters = h('form', { class: 'filters' }, typeSelect, statusSelect, tag, parent, search, count);
  let lastKey = null;

  const load = async () => {
    const query = new URLSearchParams();
    for (const name of ['type', 'status', 'tag', 'parent']) {
      if (inputs[name].value.trim()) query.set(name, inputs[name].value.trim());
    }
    const result = await call(`/_entities/entities?${query}`, { signal });
    if (signal.aborted) return;
    if (!result.ok) {
      error.textContent = errorText(result);
      return;
    }
    error.textContent = '';
    const needle = search.value.trim().toLowerCase();
    const found = result.data.filter((e) => !needle || matches(e, needle));
    const key = JSON.stringify(found);
    if (key === lastKey) return;
    lastKey = key;
    count.textContent = `${found.length} of ${result.data.length}`;
    replace(rows, found.length ? entityTable(found) : h('p', { class: 'muted' }, 'No entities match.'));
  };

  const changed = () => {
    const query = new URLSearchParams();
    for (const name of FILTERS) if (inputs[name].value.trim()) query.set(name, inputs[name].value.trim());
    const search = query.toString();
    history.replaceState(null, '', `/ui/${search ? `?${search}` : ''}`);
    lastKey = null;
    load();
  };
  filters.addEventListener('input', changed);
  filters.addEventListener('submit', (event) => { event.preventDefault(); changed(); });

  replace(
    view,
    h('h1', {}, 'Entities'),
    error,
    filters,
    rows,
    spawnForm(signal, navigate),
  );
  loadTypes(signal).then((types) => {
    for (const t of types) typeSelect.append(h('option', { value: t.name }, t.name));
    typeSelect.value = params.get('type') || '';
    const spawnType = view.querySelector('select[name=spawn-type]');
    for (const t of types) spawnType.append(h('option', { value: t.name }, t.name));
  });
  every(load, signal);
}

function matches(entity, needle) {
  const text = [entity.url, entity.status, entity.parent || '',
    ...Object.entries(entity.tags || {}).map(([k, v]) => `${k}=${v}`)].join(' ').toLowerCase();
  return text.includes(needle);
}

function entityTable(entities) {
  const columns = ['url', 'status', 'parent', 'tags', 'runs', 'queue', 'dead letters', 'last active'];
  return table(entities, columns, (column, _value, e) => {
    switch (column) {
      case 'url': return entityLink(e.url);
      case 'status': return badge(e.status === 'idle' && e.dead_letters ? 'failed' : e.status);
      case 'parent': return e.parent ? entityLink(e.parent) : '';
      case 'tags': return Object.entries(e.tags || {}).map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`));
      case 'queue': return `${e.queue}${e.pending ? ' (wake pending)' : ''}`;
      case 'dead letters': return e.dead_letters ? h('span', { class: 'error' }, String(e.dead_letters)) : '0';
      case 'last active': return time(e.last_active);
      default: return String(e[column] ?? '');
    }
  });
}

function spawnForm(signal, navigate) {
  const type = h('select', { name: 'spawn-type', required: true });
  const id = h('input', { name: 'spawn-id', placeholder: 'id', required: true });
  const args = h('input', { name: 'spawn-args', placeholder: 'args (JSON, optional)' });
  const message = h('input', { name: 'spawn-message', placeholder: 'initial message (optional)' });
  const tags = h('input', { name: 'spawn-tags', placeholder: 'tags: k=v, k2=v2' });
  const out = h('div', { class: 'result' });
  const form = h('form', { class: 'spawn-form row' }, type, id, args, message, tags, h('button', { type: 'submit' }, 'Spawn'));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const body = { tags: {} };
    try {
      if (args.value.trim()) body.args = JSON.parse(args.value);
    } catch (error) {
      replace(out, h('span', { class: 'error' }, `args are not JSON: ${error.message}`));
      return;
    }
    if (message.value.trim()) body.initial_message = parseLoose(message.value);
    for (const pair of tags.value.split(',')) {
      const [k, ...v] = pair.split('=');
      if (k.trim()) body.tags[k.trim()] = v.join('=').trim();
    }
    const url = `/${type.value}/${id.value.trim()}`;
    const result = await call(entityPath(url), { method: 'PUT', body, signal });
    if (!result.ok) {
      replace(out, h('span', { class: 'error' }, errorText(result)));
      return;
    }
    navigate(`/ui${url}`);
  };
  return section('Spawn an entity', { class: 'panel spawn' }, form, out);
}

export function workersPage(view, signal) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  replace(
    view,
    h('h1', {}, 'Workers'),
    h('p', { class: 'muted' }, 'Workers that hold a lease in this store (from GET /_entities/workers).'),
    body,
  );
  let lastKey = null;
  every(async () => {
    const result = await call('/_entities/workers', { signal });
    if (signal.aborted) return;
    if (!result.ok) {
      replace(body, h('p', { class: 'error' }, errorText(result)));
      return;
    }
    const key = JSON.stringify(result.data);
    if (key === lastKey) return;
    lastKey = key;
    replace(
      body,
      result.data.length
        ? table(result.data, ['id', 'host', 'pid', 'live', 'lease expires'], (column, _v, w) => {
          if (column === 'live') return badge(w.live ? 'live' : 'expired');
          if (column === 'lease expires') {
            return h('span', { class: 'countdown', dataset: { at: String(w.expires) } }, relative(w.expires));
          }
          return short(w[column] ?? '');
        })
        : h('p', { class: 'muted' }, 'No workers (serve with a worker, or start `entities worker`).'),
    );
  }, signal);
}
