/* The SDK's debug panel: what the tag did on this page, for someone who does not open the console.

   Loaded by the SDK only when the page runs with ?pt_debug=1 (or pingtree('debug')), as a module
   from the relay (GET /sdk/pingtree.debug.js): the SDK itself stays small. It reads what the SDK
   exposes in debug mode, `pingtree.t`: the campaign's script config first, then one entry per
   log() call (see sdk.js.j2), and the queue the SDK keeps in localStorage. Everything it shows is
   text (textContent, never innerHTML): attribution values come from the URL and must not run.
   Styles are set through the CSSOM (element.style), which a strict CSP without 'unsafe-inline'
   allows, so it works on the demo's pages and on any page that lets the SDK run.
   Minified by the build (scripts/build-sdk) into js_templates/compiled/debug_panel.js. */
const api = window.pingtree;
const trail = (api && api.t) || [{}];
const C = trail[0];
const PREFIX = 'pt:' + C.cid + ':';
const RELAY = new URL(import.meta.url).origin; // the panel comes from the relay
const FONT = '12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace';
let logged = 1; // trail entries already written to the console
let shown = '';

function el(tag, text, css) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (css) e.style.cssText = css;
  return e;
}

function stored(key) {
  try { return localStorage.getItem(key); } catch (e) { return null; }
}

function parse(text) {
  try { return JSON.parse(text); } catch (e) { return null; }
}

function cookie(name) {
  const m = document.cookie.match('(?:^|; )' + name + '=([^;]*)');
  try { return m ? decodeURIComponent(m[1]) : ''; } catch (e) { return ''; }
}

// The attribution the SDK keeps (localStorage, else its cookie), or null.
function kept() {
  return parse(stored(C.cookie)) || parse(cookie(C.cookie));
}

function entries(kind) {
  return trail.slice(1).filter(e => e[0] === kind);
}

// --- what the panel shows ---------------------------------------------------------------------------

// Attribution as the SDK holds it now, each value with where it came from.
function attribution() {
  const landing = entries('landing')[0] || ['landing', {}, {}, {}];
  const first = landing[1], url = landing[2], before = landing[3];
  const now = kept() || first;
  // `$` is not a field: the transaction id the SDK made up, kept beside them (see sdk.js.j2).
  return Object.keys(now).filter(k => k !== '$').sort().map(k => {
    const v = now[k];
    let from = 'page code: pingtree(\'set\')';
    if (url[k] === v) from = 'landing URL';
    else if (k === 'transaction_id' && now.$ === v) from = 'made up by the SDK (gives way to Pingtree\'s click-script cookie)';
    else if (before[k] === v) from = 'cookie (an earlier page or visit)';
    else if (first[k] === v && k === 'transaction_id') {
      from = cookie(C.ptCookie) === v ? 'Pingtree click-script cookie (' + C.ptCookie + ')' : 'new (generated)';
    }
    return [k, v, from];
  });
}

// Why a queued event is not being sent, or '' when it is on its way.
function waiting(item) {
  const retry = entries('retry').filter(e => e[1].id === item.id).pop();
  if (item.l > Date.now()) return 'in flight';
  if (C.consent && !stored('pt_consent:' + C.cid)) return 'held: waiting for consent (pingtree(\'consent\'))';
  const attr = kept() || {};
  if (!item.b.transaction_id && !attr.transaction_id) return 'held: no transaction id';
  if (!navigator.onLine) return 'held: offline';
  return retry ? 'will retry (' + retry[2] + ')' : 'due now';
}

function queue() {
  let keys = [];
  try { keys = Object.keys(localStorage).filter(k => k.indexOf(PREFIX) === 0); } catch (e) { /* no storage */ }
  return keys.map(k => parse(stored(k))).filter(Boolean).map(item => [item.b.event_id, waiting(item)]);
}

// The relay's answer in words: accepted, queued, refused (and why), or "later" (retry).
function verdict(ans) {
  const data = ans.data || {};
  const test = data.test ? ' [TEST: staging origin, not sent to Pingtree]' : '';
  const s = ans.status;
  if (s >= 200 && s < 300 && ans.type === 'filtered') return 'not forwarded: ' + ans.message;
  if (s === 200) return 'accepted' + (data.conversion_id ? ', conversion_id ' + data.conversion_id : '') + test;
  if (s === 202) return 'queued by the relay: it delivers to Pingtree shortly' + test;
  const fields = Object.assign({}, ans.missingFields || {}, ans.invalidFields || {});
  const why = Object.keys(fields).map(k => k + ': ' + fields[k]).join('; ');
  return 'refused (' + s + '): ' + (ans.message || '') + (why ? ' (' + why + ')' : '') + test;
}

function events() {
  const answers = {};
  entries('answer').forEach(e => { answers[e[1].id] = e[2]; });
  const retries = {};
  entries('retry').forEach(e => { retries[e[1].id] = e[2]; });
  // Fired on this page, then sent again from the queue (fired on an earlier page).
  const fired = entries('event').map(e => e[1]);
  const resent = entries('answer').concat(entries('retry')).map(e => e[1])
    .filter((it, i, all) => !fired.some(f => f.id === it.id) && all.findIndex(a => a.id === it.id) === i);
  return fired.concat(resent).map(it => {
    const b = it.b;
    const name = b.event_id + (b.amount != null ? ' ($' + b.amount + ')' : '') +
      (fired.indexOf(it) < 0 ? ' (from an earlier page)' : '');
    const queued = parse(stored(PREFIX + it.id));
    const outcome = answers[it.id] ? verdict(answers[it.id])
      : retries[it.id] ? 'no answer yet, will retry: ' + retries[it.id]
        : queued ? waiting(queued) : 'sent';
    return [name, outcome];
  });
}

function notes() {
  return trail.slice(1).filter(e => e[0] === 'ignored' || e[0] === 'dropped' || e[0] === 'bad selector')
    .map(e => e[0] === 'ignored' ? 'pingtree(\'set\'): ' + e[1] + ' is not an attribution field, ignored'
      : e[0] === 'dropped' ? e[1] + ' is set by the relay only: dropped from the event' : 'bad CSS selector: ' + e[1])
    .concat(clickScriptNote());
}

// Pingtree's click script is on the page (its tag, from another origin than the relay's, which
// serves ours at /sdk/{cid}/pingtree.js too), yet the transaction id in use is one the SDK made up:
// the SDK ran before that script set its cookie, and this page's events go with an id Pingtree
// never heard of (docs/js-api.md, Transaction id). Said while it is so: once the cookie is there,
// the next page takes it.
function clickScriptNote() {
  const theirs = [...document.scripts].find(s => /\/pingtree(-consent)?\.js(\?|$)/.test(s.src) &&
    new URL(s.src).origin !== RELAY);
  const now = kept() || {};
  if (!theirs || !now.$ || now.$ !== now.transaction_id) return [];
  return ['The transaction id was made up by the SDK, though Pingtree\'s click script is on this page (' +
    theirs.src + '): it had not set its cookie (' + C.ptCookie + ') when the SDK ran, so this page\'s ' +
    'events go with an id Pingtree does not know. Load Pingtree\'s script with a plain tag (not async), ' +
    'and the SDK with the tag as `pingtree-relay snippet` prints it (defer).'];
}

// --- rendering ----------------------------------------------------------------------------------

const CELL = 'padding:1px 8px 1px 0;vertical-align:top;word-break:break-all';

function section(root, title, rows, empty) {
  root.append(el('div', title, 'margin:8px 0 2px;color:#8ab4f8;font-weight:bold'));
  if (!rows.length) { root.append(el('div', empty, 'color:#999')); return; }
  const table = el('table', null, 'border-collapse:collapse;width:100%');
  table.setAttribute('data-section', title);
  rows.forEach(r => {
    const tr = el('tr');
    r.forEach((c, i) => tr.append(el('td', c, CELL + (i ? '' : ';color:#fdd663;white-space:nowrap'))));
    table.append(tr);
  });
  root.append(table);
}

function render(root) {
  const view = [attribution(), events(), queue(), notes()];
  const text = JSON.stringify(view);
  if (text === shown) return;
  shown = text;
  const body = root.lastChild;
  body.replaceChildren();
  section(body, 'Attribution', view[0], 'none captured');
  section(body, 'Events and the relay\'s answers', view[1], 'no event fired yet');
  section(body, 'Waiting in this browser\'s queue', view[2], 'empty');
  if (view[3].length) section(body, 'Notes', view[3].map(n => [n]), '');
}

// One console line per trail entry, in words where the entry is an event's fate.
function line(e) {
  if (e[0] === 'event') return ['event', e[1].b.event_id, e[1].b];
  if (e[0] === 'answer') return [e[2].status > 299 ? 'rejected' : e[2].status === 202 ? 'queued' : 'sent',
    e[1].b.event_id, e[2]];
  if (e[0] === 'retry') return ['failed: ' + e[2] + ', will retry', e[1].b.event_id];
  return e;
}

function echo() {
  // The console lines the SDK itself no longer writes (bytes): a developer still finds them there.
  for (; logged < trail.length; logged++) console.log('[pingtree]', ...line(trail[logged]));
}

function mount() {
  const root = el('div', null, 'position:fixed;right:12px;bottom:12px;z-index:2147483647;width:440px;' +
    'max-width:calc(100vw - 24px);max-height:60vh;overflow:auto;background:#1e1f22;color:#e8eaed;' +
    'font:' + FONT + ';border-radius:8px;box-shadow:0 4px 24px rgba(0,0,0,.4);padding:10px 12px;text-align:left');
  root.id = 'pingtree-debug';
  root.setAttribute('role', 'region');
  root.setAttribute('aria-label', 'Pingtree debug panel');
  const head = el('div', null, 'display:flex;justify-content:space-between;align-items:center');
  head.append(el('strong', 'Pingtree debug · ' + C.cid));
  const close = el('button', '×', 'background:none;border:0;color:inherit;font-size:16px;cursor:pointer');
  close.title = 'Hide (pingtree(\'debug\', false) turns debug mode off)';
  close.addEventListener('click', () => root.remove());
  head.append(close);
  root.append(head, el('div'));
  document.body.append(root);
  render(root);
  // Polling, not hooks into the SDK: the SDK spends no bytes on the panel beyond its log trail.
  const timer = setInterval(() => {
    echo();
    if (root.isConnected) render(root); else clearInterval(timer);
  }, 400);
}

echo();
if (document.getElementById('pingtree-debug')) { /* loaded twice: the first panel stays */ }
else if (document.body) mount();
else document.addEventListener('DOMContentLoaded', mount);
