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
async function load(){
  const r = await fetch('/_entities/entities'); const items = await r.json();
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
let source = null;
function tail(url){
  if (source) source.close();
  document.getElementById('title').textContent = url;
  const log = document.getElementById('log'); log.textContent = '';
  source = new EventSource('/v1/stream' + url + '/main?offset=-1&live=sse');
  source.addEventListener('data', ev => {
    for (const item of JSON.parse(ev.data)) {
      log.textContent += JSON.stringify(item) + '\\n';
    }
    log.scrollTop = log.scrollHeight;
  });
}
load(); setInterval(load, 3000);
</script></body></html>
"""
