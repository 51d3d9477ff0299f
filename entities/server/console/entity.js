// The entity page (/ui/{type}/{id}): header and actions, conversation, timeline, raw stream
// (live, from the entity's stream), and side panels from the control plane, refreshed when
// the stream moves and every few seconds.

import { call, entityPath, offsetAt, position, readRange, recentOffset, tailStream } from './api.js';
import { badge, entityLink, h, json, link, replace, section, time } from './dom.js';
import { EntityModel } from './model.js';
import { renderTurn, renderWakeRow, renderQueued, renderRawItem } from './render.js';
import { renderPanels, sendBox } from './panels.js';

const REFRESH_MS = 3000;
// The page reads this many events back from the stream's tail, and as many more per "load
// earlier": never a long stream from its start.
export const RECENT_EVENTS = 2000;

export function entityPage(view, type, id, signal) {
  new EntityPage(view, type, id, signal).start();
}

class EntityPage {
  constructor(view, type, id, signal) {
    this.view = view;
    this.type = type;
    this.url = `/${type}/${id}`;
    this.signal = signal;
    this.model = new EntityModel();
    this.dirty = new Set();
    this.frame = null;
    this.refreshTimer = null;
    this.rendered = {};
    this.missing = false;
    this.loading = false;
    this.again = false;
    this.build();
  }

  build() {
    this.status = h('span', { class: 'head-status' });
    this.meta = h('div', { class: 'meta' });
    this.streamState = h('span', { class: 'muted stream-state' }, 'stream: connecting…');
    this.notice = h('div', { class: 'notice', hidden: true });
    this.actions = h('div', { class: 'actions' }, this.killButton());
    this.first = 0; // the position before the first event the page has read
    this.template = null; // an offset the server gave (to write others like it)
    this.earlier = h(
      'button',
      { class: 'link load-earlier', type: 'button', hidden: true, onclick: () => this.loadEarlier() },
      'Load earlier events',
    );
    this.conversation = h('div', { class: 'conversation' });
    this.queued = h('div', { class: 'queued' });
    this.timeline = h('div', { class: 'timeline' });
    this.raw = h('ol', { class: 'raw' });
    this.rawBox = h(
      'details',
      { class: 'panel raw-view', ontoggle: () => this.renderRaw() },
      h('summary', {}, 'Raw event stream'),
      this.raw,
    );
    this.sendSlot = h('div', { class: 'send-slot' });
    this.panels = h('div', { class: 'panels' });
    this.side = h('div', { class: 'side-col' }, this.sendSlot, this.panels);
    replace(
      this.view,
      h(
        'div',
        { class: 'entity-head' },
        h('h1', {}, this.url, ' ', this.status),
        this.actions,
        this.meta,
        this.streamState,
      ),
      this.notice,
      h(
        'div',
        { class: 'columns' },
        h(
          'div',
          { class: 'main-col' },
          section(
            'Conversation',
            { class: 'panel conversation-panel' },
            this.earlier,
            this.conversation,
            this.queued,
          ),
          section('Timeline', { class: 'panel timeline-panel' }, this.timeline),
          this.rawBox,
        ),
        this.side,
      ),
    );
  }

  killButton() {
    let armed = false;
    const button = h('button', { class: 'danger', type: 'button' }, 'Kill');
    button.onclick = async () => {
      if (!armed) {
        armed = true;
        button.textContent = 'Confirm kill';
        setTimeout(() => {
          armed = false;
          button.textContent = 'Kill';
        }, 5000);
        return;
      }
      button.disabled = true;
      const result = await call(entityPath(this.url), { method: 'DELETE', signal: this.signal });
      button.disabled = false;
      this.say(result.ok ? `${this.url} killed` : errorText(result), !result.ok);
      this.refresh();
    };
    return button;
  }

  say(text, error = false) {
    this.notice.hidden = !text;
    this.notice.className = error ? 'notice error' : 'notice';
    this.notice.textContent = text || '';
  }

  async start() {
    this.refresh();
    let from = '-1';
    try {
      from = (await recentOffset(`${this.url}/main`, RECENT_EVENTS, this.signal)) || '-1';
    } catch (error) {
      if (error.name === 'AbortError') return;
    }
    this.first = position(from) || 0;
    this.template = from === '-1' ? null : from;
    this.earlier.hidden = this.first === 0;
    tailStream(`${this.url}/main`, {
      from,
      signal: this.signal,
      onStatus: (text) => {
        this.streamState.textContent = `stream: ${text}`;
      },
      onBatch: (items) => {
        for (const id of this.model.add(items)) this.dirty.add(id);
        this.dirty.add('');
        if (this.rawBox.open) for (const item of items) this.raw.append(renderRawItem(item));
        this.schedule();
        this.refreshSoon();
      },
    });
  }

  // Read the RECENT_EVENTS events before the first one shown and fold the page again.
  async loadEarlier() {
    if (this.first === 0 || !this.template) return;
    const low = Math.max(0, this.first - RECENT_EVENTS);
    this.earlier.disabled = true;
    let items;
    try {
      items = await readRange(`${this.url}/main`, offsetAt(this.template, low), this.first, this.signal);
    } catch (error) {
      this.earlier.disabled = false;
      if (error.name !== 'AbortError') this.say(String(error), true);
      return;
    }
    const seen = this.model.events;
    this.model = new EntityModel();
    this.model.add([...items, ...seen]);
    this.first = low;
    this.earlier.disabled = false;
    this.earlier.hidden = low === 0;
    replace(this.conversation);
    replace(this.timeline);
    for (const id of this.model.wakes.keys()) this.dirty.add(id);
    this.dirty.add('');
    this.renderRaw();
    this.schedule();
  }

  schedule() {
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.renderDirty();
    });
  }

  renderDirty() {
    const dirty = this.dirty;
    this.dirty = new Set();
    for (const id of dirty) {
      if (id === '') continue;
      const wake = this.model.wakes.get(id);
      if (!wake) continue;
      place(this.conversation, id, renderTurn(this.model, wake), wake.from, false);
      place(this.timeline, id, renderWakeRow(this.model, wake), wake.from, true);
    }
    replace(this.queued, renderQueued(this.model));
  }

  renderRaw() {
    if (!this.rawBox.open) return;
    replace(this.raw, this.model.events.map(renderRawItem));
  }

  refreshSoon() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refresh(), 300);
  }

  // One load at a time: a refresh asked for while one runs makes it run once more after.
  async refresh() {
    clearTimeout(this.refreshTimer);
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = true;
    do {
      this.again = false;
      if (this.signal.aborted) break;
      try {
        await this.load();
      } catch (error) {
        if (error.name !== 'AbortError') this.say(String(error), true);
      }
    } while (this.again);
    this.loading = false;
    clearTimeout(this.refreshTimer);
    if (!this.signal.aborted) this.refreshTimer = setTimeout(() => this.refresh(), REFRESH_MS);
  }

  async load() {
    const signal = this.signal;
    const base = entityPath(this.url);
    const [info, schedules, children, dead, approvals, types] = await Promise.all([
      call(base, { signal }),
      call(`${base}/schedules`, { signal }),
      call(`/_entities/entities?parent=${encodeURIComponent(this.url)}`, { signal }),
      call(`/_entities/dead-letters?url=${encodeURIComponent(this.url)}`, { signal }),
      call(`${base}/approvals`, { signal }),
      loadTypes(signal),
    ]);
    if (signal.aborted) return;
    if (!info.ok) {
      this.showMissing(info, types);
      return;
    }
    if (this.missing) {
      this.missing = false;
      this.say('');
      replace(this.sendSlot);
    }
    const entityType = (types || []).find((t) => t.name === info.data.type) || null;
    this.renderHead(info.data, entityType);
    if (!this.sendSlot.childElementCount) {
      replace(this.sendSlot, sendBox(this.url, entityType, this.context()));
    }
    const data = {
      info: info.data,
      schedules: schedules.ok ? schedules.data : [],
      children: children.ok ? children.data : [],
      dead: dead.ok ? dead.data : [],
      approvals: approvals.ok ? approvals.data : [],
      base,
    };
    const key = json(data);
    if (this.rendered.side === key) return;
    this.rendered.side = key;
    renderPanels(this.panels, data, this.context());
  }

  context() {
    return {
      url: this.url,
      signal: this.signal,
      say: (text, error) => this.say(text, error),
      refresh: () => this.refresh(),
    };
  }

  renderHead(info, entityType) {
    const status = info.status === 'idle' && info.dead_letters ? 'failed' : info.status;
    replace(this.status, badge(status));
    replace(
      this.meta,
      h('span', {}, 'type ', h('b', {}, info.type)),
      entityType && entityType.description ? h('span', {}, ` — ${entityType.description}`) : null,
      info.parent ? h('span', {}, ' · parent ', entityLink(info.parent)) : null,
      h('span', {}, ` · created ${time(info.created_at)}`),
      info.last_active ? h('span', {}, ` · last active ${time(info.last_active)}`) : null,
      h('span', {}, ` · ${info.runs} runs`),
      info.pending ? h('span', {}, ' · wake pending') : null,
      info.queue ? h('span', {}, ` · ${info.queue} queued`) : null,
      info.status === 'orphaned'
        ? h('span', {}, ` · no code of type ${info.type} runs here: its wakes wait for it`)
        : null,
    );
    this.actions.hidden = info.status === 'stopped';
    // a stopped entity takes no messages; nor does an orphan (the server's code lacks its
    // type: its data is kept and its wakes wait until the type returns)
    this.sendSlot.hidden = info.status === 'stopped' || info.status === 'orphaned';
  }

  showMissing(info, types) {
    if (info.status !== 404) {
      this.say(errorText(info), true);
      return;
    }
    if (this.missing) return;
    this.missing = true;
    this.say(`No entity at ${this.url}. Spawn it here, or go back to the `, false);
    this.notice.append(link('/ui/', 'list'), '.');
    replace(this.status, badge('missing'));
    this.actions.hidden = true;
    replace(this.panels);
    this.rendered.side = null;
    replace(this.sendSlot, spawnHere(this.url, this.type, types, this.signal, () => this.refresh()));
  }
}

// Put `el` (for wake `id`) in `parent`, replacing its old element, ordered by `from`.
function place(parent, id, el, from, newestFirst) {
  const old = parent.querySelector(`:scope > [data-wake="${CSS.escape(id)}"]`);
  if (!el) {
    if (old) old.remove();
    return;
  }
  el.dataset.wake = id;
  el.dataset.from = String(from);
  if (old) {
    old.replaceWith(el);
    return;
  }
  // Wakes mostly come in order: look at the end they usually go to first.
  const edge = newestFirst ? parent.firstElementChild : parent.lastElementChild;
  if (!edge || Number(edge.dataset.from) <= from) {
    if (newestFirst) parent.prepend(el);
    else parent.append(el);
    return;
  }
  const after = [...parent.children].find((child) =>
    newestFirst ? Number(child.dataset.from) < from : Number(child.dataset.from) > from,
  );
  parent.insertBefore(el, after || null);
}

let typesCache = null;

export async function loadTypes(signal) {
  if (typesCache) return typesCache;
  const result = await call('/_entities/types', { signal });
  if (result.ok) typesCache = result.data;
  return result.ok ? result.data : [];
}

export function errorText(result) {
  const error = result.error || {};
  const details = Array.isArray(error.details)
    ? error.details.map((d) => `${(d.loc || []).join('.') || '(body)'}: ${d.msg}`).join('; ')
    : '';
  return `${result.status} ${error.code || ''}: ${error.message || ''}${details ? ` (${details})` : ''}`;
}

function spawnHere(url, type, types, signal, done) {
  const known = (types || []).find((t) => t.name === type);
  const args = h('textarea', { name: 'args', rows: 3, placeholder: '{} (JSON)' });
  const message = h('textarea', { name: 'initial_message', rows: 2, placeholder: 'optional' });
  const out = h('div', { class: 'result' });
  const form = h(
    'form',
    { class: 'spawn-here' },
    h('label', {}, 'args (JSON)', args),
    h('label', {}, 'initial message (text or JSON)', message),
    h('button', { type: 'submit' }, `Spawn ${url}`),
    out,
  );
  form.onsubmit = async (event) => {
    event.preventDefault();
    const body = {};
    try {
      if (args.value.trim()) body.args = JSON.parse(args.value);
    } catch (error) {
      replace(out, h('span', { class: 'error' }, `args are not JSON: ${error.message}`));
      return;
    }
    if (message.value.trim()) body.initial_message = parseLoose(message.value);
    const result = await call(entityPath(url), { method: 'PUT', body, signal });
    if (!result.ok) {
      replace(out, h('span', { class: 'error' }, errorText(result)));
      return;
    }
    done();
  };
  return section(
    `Spawn ${url}`,
    { class: 'panel spawn-here' },
    known ? null : h('p', { class: 'error' }, `No type named ${type} is registered.`),
    form,
  );
}

// Text as JSON when it parses as JSON, else as the text itself.
export function parseLoose(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}
