// Small DOM and formatting helpers (no framework): h() builds elements, text is never parsed
// as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') el.className = value;
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name in el && typeof value !== 'string') el[name] = value;
    else el.setAttribute(name, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export function replace(el, ...children) {
  el.textContent = '';
  append(el, children);
  return el;
}

// A link to a console page (handled by the router, see app.js).
export function link(href, text, attrs = {}) {
  return h('a', { href, ...attrs }, text);
}

export function entityLink(url) {
  return link(`/ui${url}`, url, { class: 'entity' });
}

export function badge(status) {
  return h('span', { class: `badge status-${String(status).replace(/[^a-z_]/gi, '')}` }, status);
}

export function json(value, indent = 0) {
  if (value === undefined) return '';
  return JSON.stringify(value, null, indent);
}

// A value as a short line of text: strings as they are, anything else as JSON.
export function short(value, max = 160) {
  const text = typeof value === 'string' ? value : json(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export function duration(ms) {
  if (ms === undefined || ms === null) return '';
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

// "in 1 min 5 s" / "3 s ago" for an epoch time in seconds.
export function relative(epochSeconds) {
  const delta = epochSeconds * 1000 - Date.now();
  const text = duration(Math.abs(Math.round(delta / 1000) * 1000));
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

export function time(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

// A table of rows (objects): one column per key seen, objects shown as JSON.
export function table(rows, columns = null, cell = null) {
  const keys = columns || [...new Set(rows.flatMap((row) => Object.keys(row)))];
  return h(
    'table',
    {},
    h('thead', {}, h('tr', {}, keys.map((k) => h('th', {}, k)))),
    h(
      'tbody',
      {},
      rows.map((row) =>
        h(
          'tr',
          {},
          keys.map((k) => {
            const custom = cell && cell(k, row[k], row);
            if (custom !== undefined && custom !== null) return h('td', {}, custom);
            const value = row[k];
            return h('td', {}, typeof value === 'string' ? value : short(value, 400));
          }),
        ),
      ),
    ),
  );
}

// A section with a heading; `extra` goes on the heading's right.
export function section(title, attrs = {}, ...children) {
  return h('section', { class: 'panel', ...attrs }, h('h2', {}, title), ...children);
}
