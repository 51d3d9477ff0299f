// The entity page's side panels: the send box, dead letters, tags, state collections and the
// manifest (children, observed sources, shared state, schedules, context entries, effects).

import { call, entityPath } from './api.js';
import { badge, entityLink, h, json, relative, replace, section, short, table, time } from './dom.js';

// The send box (built once: it keeps what the user typed across refreshes).
export function sendBox(url, entityType, ctx) {
  const schema = entityType ? entityType.inbox_schema : null;
  const mode = schema ? 'json' : 'text';
  const radio = (value, label) =>
    h('label', { class: 'inline' },
      h('input', { type: 'radio', name: 'mode', value, checked: mode === value }), label);
  const payload = h('textarea', {
    name: 'payload',
    rows: 4,
    placeholder: schema ? exampleOf(schema) : 'a message',
  });
  const type = h('input', { name: 'type', placeholder: 'message type (optional)' });
  const out = h('div', { class: 'result', role: 'status' });
  const form = h(
    'form',
    { class: 'send-box' },
    h('div', {}, radio('json', 'JSON'), radio('text', 'text')),
    payload,
    h('div', { class: 'row' }, type, h('button', { type: 'submit' }, 'Send')),
    out,
    schema ? h('details', {}, h('summary', {}, 'inbox schema'), h('pre', {}, json(schema, 2))) : null,
  );
  form.onsubmit = async (event) => {
    event.preventDefault();
    const asJson = form.querySelector('input[name=mode]:checked').value === 'json';
    const body = {};
    if (asJson) {
      try {
        body.payload = JSON.parse(payload.value);
      } catch (error) {
        replace(out, h('span', { class: 'error' }, `not JSON: ${error.message}`));
        return;
      }
    } else {
      body.payload = payload.value;
    }
    if (type.value.trim()) body.type = type.value.trim();
    replace(out, h('span', { class: 'muted' }, 'sending…'));
    const result = await call(`${entityPath(url)}/send`, { method: 'POST', body, signal: ctx.signal });
    if (!result.ok) {
      replace(out, errorBlock(result));
      return;
    }
    replace(out, h('span', { class: 'ok' }, `sent (key ${result.data.key})`));
    payload.value = '';
    ctx.refresh();
  };
  return section('Send a message', { class: 'panel send-panel' }, form);
}

// The server's error, with its details (e.g. which field the inbox schema rejected).
function errorBlock(result) {
  const error = result.error || {};
  const details = Array.isArray(error.details) ? error.details : [];
  return h(
    'div',
    { class: 'error server-error' },
    h('div', {}, `${result.status} ${error.code || ''}: ${error.message || ''}`),
    details.length
      ? h('ul', {}, details.map((d) => h('li', {}, `${(d.loc || []).join('.') || '(body)'}: ${d.msg}`)))
      : null,
  );
}

// A placeholder from a JSON schema: its required properties with example values.
function exampleOf(schema) {
  const props = schema.properties || {};
  const example = {};
  for (const name of schema.required || Object.keys(props)) {
    const kind = (props[name] || {}).type;
    example[name] = kind === 'integer' || kind === 'number' ? 1 : kind === 'boolean' ? true : '';
  }
  return JSON.stringify(example);
}

export function renderPanels(el, data, ctx) {
  const { info, schedules, children, dead, approvals, base } = data;
  const manifest = Object.values(info.manifest || {});
  const of = (kind) => manifest.filter((entry) => entry.kind === kind);
  replace(
    el,
    approvalsPanel(approvals || [], base, ctx),
    deadLetters(dead, ctx),
    tagsPanel(info.tags || {}),
    statePanel(info.state || {}),
    childrenPanel(of('child'), children),
    schedulesPanel(schedules),
    listPanel('Observed sources', of('source'), describeSource),
    listPanel('Shared state', of('shared_state'), describeShared),
    contextPanel(of('context')),
    listPanel('Effects', of('effect'), (e) => [h('b', {}, e.function_ref), ` ${short(e.config, 120)}`]),
    info.args && Object.keys(info.args).length
      ? section('Args', {}, h('pre', {}, json(info.args, 2)))
      : null,
  );
}

// Tool calls waiting for a person: Approve / Deny resume the agent's run (decided ones fold).
function approvalsPanel(approvals, base, ctx) {
  const pending = approvals.filter((a) => a.status === 'pending');
  if (!approvals.length) return null;
  const decide = async (approval, decision) => {
    const path = `${base}/approvals/${encodeURIComponent(approval.id)}`;
    const result = await call(path, { method: 'POST', body: { decision }, signal: ctx.signal });
    ctx.say(result.ok ? `${decision}d ${approval.tool}` : `${result.status}: ${result.error.message}`, !result.ok);
    ctx.refresh();
  };
  const row = (a) => h(
    'div',
    { class: `approval status-${a.status}` },
    h('div', {}, h('b', {}, a.tool), ` ${short(a.arguments, 200)} · ${a.status} · ${time(new Date(a.requested_at * 1000).toISOString())}`),
    a.status === 'pending'
      ? h(
        'div',
        { class: 'row' },
        h('button', { type: 'button', onclick: () => decide(a, 'approve') }, 'Approve'),
        h('button', { type: 'button', class: 'danger', onclick: () => decide(a, 'deny') }, 'Deny'),
      )
      : h('div', { class: 'muted' }, `${a.decided_by || ''}${a.note ? `: ${a.note}` : ''}`),
  );
  return section(
    `Approvals (${pending.length} pending)`,
    { class: 'panel approvals' },
    approvals.map(row),
  );
}

function deadLetters(letters, ctx) {
  if (!letters.length) return null;
  const act = async (letter, method, path, verb) => {
    const result = await call(path, { method, signal: ctx.signal });
    ctx.say(result.ok ? `${verb} ${letter.id}` : `${result.status}: ${result.error.message}`, !result.ok);
    ctx.refresh();
  };
  return section(
    `Dead letters (${letters.length})`,
    { class: 'panel dead-letters' },
    letters.map((letter) => {
      const path = `/_entities/dead-letters/${encodeURIComponent(letter.id)}`;
      return h(
        'div',
        { class: 'dead-letter' },
        h('div', {}, h('b', {}, letter.wake_id), ` · ${letter.attempts} attempts · ${letter.messages} messages · ${time(letter.time)}`),
        h('div', { class: 'error' }, letter.error),
        h(
          'div',
          { class: 'row' },
          h('button', { type: 'button', onclick: () => act(letter, 'POST', `${path}/retry`, 'retried') }, 'Retry'),
          h('button', { type: 'button', class: 'danger', onclick: () => act(letter, 'DELETE', path, 'discarded') }, 'Discard'),
        ),
      );
    }),
  );
}

function tagsPanel(tags) {
  const keys = Object.keys(tags);
  return section(
    'Tags',
    { class: 'panel tags' },
    keys.length
      ? h('div', { class: 'chips' }, keys.map((k) => h('span', { class: 'chip' }, `${k}=${tags[k]}`)))
      : h('p', { class: 'muted' }, 'none'),
  );
}

function statePanel(state) {
  const names = Object.keys(state);
  return section(
    'State',
    { class: 'panel state' },
    names.length
      ? names.map((name) => {
        const rows = Object.values(state[name] || {});
        return h(
          'div',
          { class: 'collection' },
          h('h3', {}, `${name} (${rows.length})`),
          rows.length ? table(rows.map(asRow)) : h('p', { class: 'muted' }, 'empty'),
        );
      })
      : h('p', { class: 'muted' }, 'no state collections'),
  );
}

function asRow(value) {
  return value && typeof value === 'object' && !Array.isArray(value) ? value : { value };
}

function childrenPanel(entries, listed) {
  if (!entries.length && !listed.length) return null;
  const status = new Map(listed.map((c) => [c.url, c.status === 'idle' && c.dead_letters ? 'failed' : c.status]));
  const urls = [...new Set([...entries.map((e) => e.entity_url), ...listed.map((c) => c.url)])];
  return section(
    `Children (${urls.length})`,
    { class: 'panel children' },
    h('ul', { class: 'plain' }, urls.map((url) => h('li', {}, entityLink(url), ' ', status.has(url) ? badge(status.get(url)) : badge('unknown')))),
  );
}

function schedulesPanel(schedules) {
  if (!schedules.length) return null;
  return section(
    'Schedules',
    { class: 'panel schedules' },
    table(schedules, ['id', 'when', 'status', 'next fire'], (column, _value, row) => {
      if (column === 'id') return row.id.replace(/^cron:/, '');
      if (column === 'when') {
        return row.schedule_type === 'cron'
          ? `cron ${row.expression} (${row.timezone || 'UTC'})`
          : [`send at ${new Date(row.fire_at * 1000).toLocaleString()} to `,
            row.target_url ? entityLink(row.target_url) : '', ` ${short(row.payload, 60)}`];
      }
      if (column === 'status') return badge(row.status);
      if (column === 'next fire') {
        if (!row.next_fire_at) return h('span', { class: 'muted' }, '—');
        return h('span', { class: 'countdown', dataset: { at: String(row.next_fire_at) } }, relative(row.next_fire_at));
      }
      return null;
    }),
  );
}

function contextPanel(entries) {
  if (!entries.length) return null;
  return section(
    'Context',
    { class: 'panel context' },
    entries.map((entry) =>
      h('details', {}, h('summary', {}, h('b', {}, entry.name), ` ${short(entry.content, 80)}`),
        h('pre', {}, entry.content), Object.keys(entry.attrs || {}).length ? h('pre', {}, json(entry.attrs, 2)) : null)),
  );
}

function listPanel(title, entries, describe) {
  if (!entries.length) return null;
  return section(title, { class: `panel ${title.toLowerCase().replace(/ /g, '-')}` },
    h('ul', { class: 'plain' }, entries.map((entry) => h('li', {}, describe(entry)))));
}

function describeSource(entry) {
  const ref = entry.source_type === 'entity' ? entityLink(entry.source_ref) : h('b', {}, entry.source_ref);
  return [`${entry.source_type} `, ref, entry.wake ? ` · wakes on ${short(compact(entry.wake), 120)}` : ''];
}

function describeShared(entry) {
  const name = entry.id.replace(/^shared:/, '');
  const collections = Object.keys(entry.collections || {});
  return [h('b', {}, name), ` (${entry.mode === 'create' ? 'created here' : 'connected'})`,
    collections.length ? ` · collections: ${collections.join(', ')}` : ''];
}

// A wake condition without its unset fields.
function compact(value) {
  if (!value || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== null && v !== undefined));
}
