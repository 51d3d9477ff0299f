"""A tiny dev UI: lists entities and tails one entity's stream over SSE."""

from __future__ import annotations

__all__ = ["INDEX_HTML"]

INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>entities</title>
<style>
body{font:14px system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse}
td,th{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:left}
pre{background:#f6f6f6;padding:1rem;max-height:50vh;overflow:auto}
a{cursor:pointer;color:#0645ad}
</style></head>
<body>
<h1>entities</h1>
<p>Control plane at <code>/_entities</code>; every entity stream at
<code>/v1/stream/{type}/{id}/main</code>.</p>
<table><thead><tr><th>URL</th><th>status</th><th>runs</th><th>last active</th></tr></thead>
<tbody id="rows"></tbody></table>
<h2 id="title"></h2><pre id="log"></pre>
<script>
// With `entities serve --token`, every request but this page needs the bearer token: asked for
// once (on a 401) and kept for this tab only. The tail reads SSE through fetch, which (unlike
// EventSource) can send the Authorization header.
function headers(){
  const t = sessionStorage.getItem('entities-token');
  return t ? {Authorization: 'Bearer ' + t} : {};
}
async function call(path){
  let r = await fetch(path, {headers: headers()});
  if (r.status === 401) {
    const t = prompt('Bearer token for this server');
    if (t) {
      sessionStorage.setItem('entities-token', t);
      r = await fetch(path, {headers: headers()});
    }
  }
  return r;
}
async function load(){
  const r = await call('/_entities/entities');
  if (!r.ok) { document.getElementById('rows').textContent = 'HTTP ' + r.status; return; }
  const items = await r.json();
  const rows = document.getElementById('rows'); rows.textContent = '';
  for (const e of items){
    const tr = document.createElement('tr');
    for (const v of [e.url, e.status, e.runs, e.last_active || '']){
      const td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
    }
    tr.firstChild.onclick = () => tail(e.url); tr.firstChild.style.color = '#0645ad';
    rows.appendChild(tr);
  }
}
let reading = null;
async function tail(url){
  if (reading) reading.abort();
  reading = new AbortController();
  document.getElementById('title').textContent = url;
  const log = document.getElementById('log'); log.textContent = '';
  const r = await fetch('/v1/stream' + url + '/main?offset=-1&live=sse',
                        {headers: headers(), signal: reading.signal});
  if (!r.ok) { log.textContent = 'HTTP ' + r.status; return; }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\\n\\n')) >= 0) {  // one SSE event per blank line
      const lines = buffer.slice(0, end).split('\\n'); buffer = buffer.slice(end + 2);
      const kind = (lines.find(l => l.startsWith('event:')) || '').slice(6).trim();
      const data = lines.filter(l => l.startsWith('data:')).map(l => l.slice(5).replace(/^ /, ''));
      if (kind !== 'data' || !data.length) continue;
      for (const item of JSON.parse(data.join('\\n'))) {
        log.textContent += JSON.stringify(item) + '\\n';
      }
      log.scrollTop = log.scrollHeight;
    }
  }
}
load(); setInterval(load, 3000);
</script></body></html>
"""
