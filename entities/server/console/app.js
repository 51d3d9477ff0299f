// The console's router: one page (index.html) for every /ui/ path, routed here with the
// history API. Pages: /ui/ (entities), /ui/workers, /ui/{type}/{id} (one entity).

import { showTokenState } from './api.js';
import { h, relative, replace } from './dom.js';
import { entityPage } from './entity.js';
import { listPage, workersPage } from './list.js';

const view = document.getElementById('view');
let current = null; // aborts the current page's requests and streams

function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const path = location.pathname.replace(/\/+$/, '') || '/';
  let page = 'entities';
  const entity = /^\/ui\/([^/]+)\/([^/]+)$/.exec(path);
  if (path === '/ui' || path === '/') {
    listPage(view, signal, navigate);
  } else if (path === '/ui/workers') {
    page = 'workers';
    workersPage(view, signal);
  } else if (entity) {
    page = 'entity';
    const [type, id] = [decodeURIComponent(entity[1]), decodeURIComponent(entity[2])];
    document.title = `/${type}/${id} · entities`;
    entityPage(view, type, id, signal);
  } else {
    replace(view, h('h1', {}, 'Not found'), h('p', {}, 'No console page at ', path, '.'));
  }
  if (page !== 'entity') document.title = `${page} · entities`;
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', a.dataset.nav === page);
  }
}

export function navigate(href) {
  history.pushState(null, '', href);
  route();
  window.scrollTo(0, 0);
}

// Same-origin links to console pages are routed here instead of reloading the page.
document.addEventListener('click', (event) => {
  const a = event.target.closest('a');
  if (!a || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey || a.target) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/ui')) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener('popstate', route);

// Countdowns (schedules' next fire, workers' leases) tick once a second.
setInterval(() => {
  for (const el of document.querySelectorAll('.countdown[data-at]')) {
    el.textContent = relative(Number(el.dataset.at));
  }
}, 1000);

showTokenState();
route();
