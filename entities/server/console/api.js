// HTTP to the server: the control plane (JSON) and entity streams (Durable Streams, SSE).
//
// With `entities serve --token`, every request but the console's own pages needs
// `Authorization: Bearer <token>`. On the first 401 the console shows one in-page form; the
// token entered is kept in sessionStorage (this tab only) and the request is retried with it.
// If that token is refused too, the form says so and waits for the user: requests never
// re-prompt on their own. SSE is read with fetch() (EventSource cannot send headers).

const TOKEN_KEY = 'entities-token';
export const WRONG_TOKEN =
  '401: this server needs a valid bearer token (entities serve --token)';
const FIRST_ASK = 'This server needs a bearer token (entities serve --token).';

let asking = null; // the pending form, shared by every request that got a 401

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenState();
}

export function showTokenState() {
  const el = document.getElementById('token-state');
  if (!el) return;
  el.textContent = '';
  if (!token()) return;
  el.append('token set · ');
  const forget = document.createElement('button');
  forget.className = 'link';
  forget.textContent = 'forget';
  forget.onclick = () => forgetToken();
  el.append(forget);
}

// Show the token form (once, however many requests wait) and resolve when it is submitted.
function askToken(message) {
  if (asking) return asking;
  const form = document.getElementById('auth');
  const input = document.getElementById('auth-token');
  document.getElementById('auth-message').textContent = message;
  form.hidden = false;
  input.value = '';
  input.focus();
  asking = new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      form.hidden = true;
      form.onsubmit = null;
      asking = null;
      showTokenState();
      resolve();
    };
  });
  return asking;
}

// fetch() with the bearer token; on a 401, ask for a token (see above) and retry with it.
export async function request(path, { method = 'GET', body, signal, headers = {} } = {}) {
  for (;;) {
    const sent = token();
    const all = { ...headers };
    if (sent) all.Authorization = `Bearer ${sent}`;
    let payload;
    if (body !== undefined) {
      all['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const response = await fetch(path, { method, body: payload, headers: all, signal });
    if (response.status !== 401) return response;
    if (token() !== sent) continue; // another request got a new token meanwhile
    if (sent) sessionStorage.removeItem(TOKEN_KEY);
    await askToken(sent ? WRONG_TOKEN : FIRST_ASK);
  }
}

// A control-plane call: {ok, status, data} or {ok: false, status, error: {code, message, details}}.
export async function call(path, options = {}) {
  let response;
  try {
    response = await request(path, options);
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    return { ok: false, status: 0, error: { code: 'NETWORK', message: String(error) } };
  }
  let data = null;
  const text = await response.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (response.ok) return { ok: true, status: response.status, data };
  const error = (data && data.error) || { code: `HTTP_${response.status}`, message: text };
  return { ok: false, status: response.status, error };
}

export function entityPath(url) {
  return `/_entities/entities${url}`;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });

// The position an offset names (offsets are `{segment}_{messages before}`), or null.
export function position(offset) {
  if (offset === '-1') return 0;
  const match = /^\d+_(\d+)$/.exec(offset || '');
  return match ? Number(match[1]) : null;
}

function parseBlock(block) {
  let event = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue; // a comment (keep-alive)
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  return { event, data: data.length ? data.join('\n') : null };
}

// The offset naming position `pos`, written like `template` (an offset the server gave).
export function offsetAt(template, pos) {
  const match = /^(\d+)_(\d+)$/.exec(template || '');
  if (!match || pos <= 0) return '-1';
  return `${match[1]}_${String(pos).padStart(match[2].length, '0')}`;
}

// The offset `count` events before the tail of the stream at `path` ('-1' for a shorter
// stream, null when there is no stream): where a page starts, so that it never reads a long
// stream from its start.
export async function recentOffset(path, count, signal) {
  const response = await request(`/v1/stream${path}`, { method: 'HEAD', signal });
  if (!response.ok) return null;
  const next = response.headers.get('Stream-Next-Offset');
  const pos = position(next);
  return pos === null ? '-1' : offsetAt(next, pos - count);
}

// The events at positions (position(from), to] of a JSON stream, read once (not live):
// [{pos, event}], oldest first.
export async function readRange(path, from, to, signal) {
  const items = [];
  let offset = from;
  for (;;) {
    const response = await request(`/v1/stream${path}?offset=${encodeURIComponent(offset)}`, {
      signal,
    });
    if (!response.ok) throw new Error(`HTTP ${response.status} reading ${path}`);
    const events = await response.json();
    const next = response.headers.get('Stream-Next-Offset');
    const end = position(next);
    if (end === null) break;
    events.forEach((event, i) => {
      const pos = end - events.length + i + 1;
      if (pos <= to) items.push({ pos, event });
    });
    if (!events.length || end >= to || response.headers.get('Stream-Up-To-Date')) break;
    offset = next;
  }
  return items;
}

// Tail a JSON stream from `from` (default: its start) with `live=sse`: onBatch(items, control)
// per data event, each item {pos, event} (pos: the event's 1-based position in the stream).
// Reconnects from the last offset when the server ends the response; returns when the stream
// is closed or `signal` aborts. onStatus(text) reports 'live', 'reconnecting…', 'closed',
// 'no stream'.
export async function tailStream(path, { onBatch, onStatus = () => {}, signal, from = '-1' }) {
  let offset = from;
  let counted = position(from) || 0; // fallback positions when an offset is not a position
  while (!signal.aborted) {
    let response;
    try {
      const query = `offset=${encodeURIComponent(offset)}&live=sse`;
      response = await request(`/v1/stream${path}?${query}`, { signal });
    } catch {
      if (signal.aborted) return;
      onStatus('reconnecting…');
      await sleep(1000, signal);
      continue;
    }
    if (!response.ok) {
      onStatus(response.status === 404 ? 'no stream' : `HTTP ${response.status}`);
      await sleep(2000, signal);
      continue;
    }
    onStatus('live');
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let pending = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const { event, data } = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (data === null) continue;
          if (event === 'data') {
            pending = JSON.parse(data);
          } else if (event === 'control') {
            const control = JSON.parse(data);
            const events = pending || [];
            pending = null;
            const next = position(control.streamNextOffset);
            const first = next === null ? counted : next - events.length;
            counted = first + events.length;
            const items = events.map((e, i) => ({ pos: first + i + 1, event: e }));
            offset = control.streamNextOffset;
            onBatch(items, control);
            if (control.streamClosed) {
              onStatus('closed');
              return;
            }
          }
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      console.debug('stream read ended', error);
    }
    if (signal.aborted) return;
    onStatus('reconnecting…');
    await sleep(250, signal);
  }
}
