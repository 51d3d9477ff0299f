// Rendering of the folded stream (model.js): a wake as a conversation turn and as a timeline
// row, queued messages, raw events.

import { badge, duration, entityLink, h, json, short, time } from './dom.js';
import {
  describeTrigger,
  messageText,
  roundCalls,
  roundReasoning,
  roundText,
  wakeStatus,
} from './model.js';

// A wake as a conversation turn: the messages it took, its agents' rounds (streamed text,
// tool calls) and its replies. null when it has none of these (e.g. a timer tick).
export function renderTurn(model, wake) {
  const parts = [];
  for (const event of model.triggers(wake)) {
    if (event.type !== 'inbox') continue;
    parts.push(userMessage(event.value));
  }
  const answers = new Set();
  const running = wakeStatus(wake) === 'running';
  for (const agent of [...wake.agents.keys()].sort((a, b) => a - b)) {
    const rounds = wake.agents.get(agent);
    for (const index of [...rounds.keys()].sort((a, b) => a - b)) {
      const round = rounds.get(index);
      const thought = roundReasoning(round);
      if (thought.text) {
        const streaming = thought.live && running;
        parts.push(
          h(
            'details',
            { class: `msg reasoning${streaming ? ' streaming' : ''}`, open: streaming ? '' : null },
            h('summary', { class: 'who' }, streaming ? 'reasoning (streaming…)' : 'reasoning'),
            h('div', { class: 'text' }, thought.text),
          ),
        );
      }
      const { text, live } = roundText(round);
      if (text || (live && running)) {
        answers.add(text);
        parts.push(
          h(
            'div',
            { class: `msg assistant${live && running ? ' streaming' : ''}` },
            h('div', { class: 'who' }, live && running ? 'assistant (streaming…)' : 'assistant'),
            h('div', { class: 'text' }, text),
          ),
        );
      }
      for (const tool of roundCalls(round)) parts.push(toolCall(tool, running));
    }
  }
  for (const reply of wake.replies.values()) {
    const text = typeof reply.value === 'string' ? reply.value : json(reply.value);
    if (answers.has(text)) continue;
    parts.push(
      h(
        'div',
        { class: 'msg reply' },
        h('div', { class: 'who' }, 'reply'),
        h('div', { class: 'text' }, text),
      ),
    );
  }
  if (!parts.length) return null;
  const status = wakeStatus(wake);
  if (status !== 'completed') {
    parts.push(
      h(
        'div',
        { class: 'turn-status' },
        badge(status),
        wake.run && wake.run.error ? ` ${wake.run.error}` : '',
      ),
    );
  }
  return h('div', { class: 'turn' }, parts);
}

function userMessage(value) {
  return h(
    'div',
    { class: 'msg user' },
    h('div', { class: 'who' }, value.from || 'user', value.message_type ? ` · ${value.message_type}` : ''),
    h('div', { class: 'text' }, messageText(value.payload)),
    value.attachments && value.attachments.length
      ? h('div', { class: 'attachments' }, value.attachments.map(attachment))
      : null,
  );
}

// An attachment of a message: its name (a link when it has an http(s) URL), type and mime.
function attachment(item) {
  const url = item.url && /^https?:/.test(item.url) ? item.url : null;
  const label = `${item.type}: ${item.name}`;
  return h(
    'span',
    { class: 'attachment', title: item.stream ? `stream ${item.stream}` : item.mime || '' },
    url ? h('a', { href: url, target: '_blank', rel: 'noopener' }, label) : label,
    ' ',
    h('span', { class: 'muted' }, item.mime || ''),
  );
}

function toolCall(tool, running) {
  const outcome = tool.outcome;
  let result;
  if (!outcome) {
    result = h('span', { class: 'muted' }, running ? 'running…' : 'no result recorded');
  } else if (outcome.error) {
    result = h('span', { class: 'error' }, 'error: ', short(outcome.error, 2000));
  } else {
    result = h('span', { class: 'tool-result' }, '→ ', short(outcome.result, 2000));
  }
  return h(
    'div',
    { class: 'tool-call' },
    h('span', { class: 'tool-name' }, tool.name),
    h('code', { class: 'tool-args' }, `(${json(tool.arguments)})`),
    ' ',
    result,
    outcome && outcome.duration_ms !== undefined
      ? h('span', { class: 'muted' }, ` ${duration(outcome.duration_ms)}`)
      : null,
  );
}

export function renderQueued(model) {
  const queued = model.queued();
  if (!queued.length) return null;
  return h(
    'div',
    { class: 'turn pending' },
    queued.map((event) => userMessage(event.value)),
    h('div', { class: 'turn-status muted' }, 'waiting for a wake…'),
  );
}

// A wake as a timeline row: trigger, status, attempts, duration, error (traceback folded),
// runs recorded inside it.
export function renderWakeRow(model, wake) {
  const run = wake.run || {};
  const status = wakeStatus(wake);
  const triggers = model.triggers(wake);
  const described = triggers.slice(0, 3).map(describeTrigger);
  if (triggers.length > 3) described.push(`+${triggers.length - 3} more`);
  const row = h(
    'div',
    { class: `wake-row status-${status}` },
    h(
      'div',
      { class: 'wake-line' },
      badge(status),
      h('span', { class: 'wake-id' }, wake.id),
      h('span', { class: 'trigger' }, described.length ? short(described.join('; '), 240) : '—'),
      h(
        'span',
        { class: 'wake-facts muted' },
        run.attempt ? `attempt ${run.attempt}` : '',
        run.duration_ms !== undefined ? ` · ${duration(run.duration_ms)}` : '',
        run.worker ? ` · ${run.worker}` : '',
        wake.firstSeen ? ` · ${time(wake.firstSeen)}` : '',
      ),
    ),
  );
  if (run.spawns && run.spawns.length) {
    row.append(h('div', { class: 'wake-more' }, 'spawned ', run.spawns.map((u) => [entityLink(u), ' '])));
  }
  if (run.sends && run.sends.length) {
    row.append(
      h('div', { class: 'wake-more' }, 'sent ',
        run.sends.map(([target, , payload]) => [entityLink(target), ` ${short(payload, 80)} `])),
    );
  }
  for (const [key, record] of wake.records) {
    row.append(
      h(
        'div',
        { class: 'wake-more run-record' },
        `run ${key.slice(wake.id.length + 1)}: `,
        badge(record.status),
        record.duration_ms !== undefined ? ` ${duration(record.duration_ms)}` : '',
        record.finish_reason ? ` · ${record.finish_reason}` : '',
      ),
    );
  }
  const errors = [...wake.errors.values()];
  if (run.error && !errors.length) row.append(h('div', { class: 'error' }, run.error));
  for (const error of errors) {
    row.append(
      h(
        'details',
        { class: 'error-details' },
        h(
          'summary',
          { class: 'error' },
          error.attempt ? `attempt ${error.attempt}: ` : 'on_error: ',
          error.error,
          error.final ? ' (final)' : '',
        ),
        h('pre', {}, error.traceback || ''),
      ),
    );
  }
  return row;
}

export function renderRawItem({ pos, event }) {
  const op = (event.headers && event.headers.operation) || '';
  return h(
    'li',
    {},
    h('span', { class: 'muted' }, `#${pos} `),
    h('b', {}, event.type),
    ` ${event.key} `,
    h('span', { class: 'muted' }, op),
    h('pre', {}, json(event.value ?? null, 1)),
  );
}
