/* The demo funnel's own script: loads the SDK from the relay, then wires the page. External on
   purpose: the pages run under a strict CSP (no inline script, no inline style). */
(function () {
  'use strict';
  var conf = window.PT_DEMO || {};
  var q = new URLSearchParams(location.search);
  // ?relay= and ?cid= are remembered for the visit, so links between pages need not carry them.
  ['relay', 'cid'].forEach(function (k) {
    if (q.get(k) !== null) sessionStorage.setItem('pt_demo_' + k, q.get(k));
    var saved = sessionStorage.getItem('pt_demo_' + k);
    if (saved !== null) conf[k] = saved;
  });
  var relay = (conf.relay || '').replace(/\/$/, '');
  var cid = conf.cid || 'cmp_demo';

  // The pre-load stub: calls made before the SDK arrives are queued and resolved once processed.
  window.pingtree = window.pingtree || function () {
    var a = arguments;
    return new Promise(function (r) { (window.pingtree.q = window.pingtree.q || []).push([a, r]); });
  };
  var s = document.createElement('script');
  s.async = true;
  s.src = relay + '/sdk/' + cid + '.js';
  document.head.appendChild(s);

  function $(sel) { return document.querySelector(sel); }
  function show(sel, text) { var el = $(sel); if (el) { el.textContent = text; el.hidden = false; } }

  document.addEventListener('DOMContentLoaded', function () {
    var page = document.body.getAttribute('data-page');

    // Multi-step form: "Continue" shows the next step; the SDK fires form_step on the button
    // (data-pt-event) and form_submitted on submit, and fills the hidden attribution inputs.
    var steps = document.querySelectorAll('.step');
    document.querySelectorAll('[data-next]').forEach(function (btn) {
      btn.addEventListener('click', function () {
        var i = +btn.getAttribute('data-next');
        steps.forEach(function (st, j) { st.hidden = j !== i; });
        document.querySelectorAll('.progress li').forEach(function (li, j) { li.classList.toggle('done', j <= i); });
      });
    });
    var form = $('#quote-form');
    if (form) {
      form.addEventListener('submit', function (e) {
        e.preventDefault(); // a real page would post the lead to Pingtree here
        var data = {};
        new FormData(form).forEach(function (v, k) { data[k] = v; });
        sessionStorage.setItem('pt_demo_lead', JSON.stringify(data));
        location.href = 'thanks.html';
      });
    }

    if (page === 'thanks') {
      var amount = 45.00;
      show('#status', 'Recording your sale…');
      window.pingtree('conversion', 'sale_completed', amount).then(function (answer) {
        var id = answer && answer.data && answer.data.conversion_id;
        document.body.setAttribute('data-answer', JSON.stringify(answer));
        show('#status', answer.type === 'error' ? 'Not recorded: ' + answer.message :
          id ? 'Conversion recorded.' : 'Conversion queued; it will reach Pingtree shortly.');
        if (id) show('#conversion-id', id);
      });
    }
    window.pingtree('transactionId').then(function (tid) {
      show('#tid', tid);
      // The recipe of docs/postbacks.md: where Ringba's JS tag reads tags from, so the call's
      // postback carries the lead's transaction id back ([tag:transaction_id]).
      (window._rgba_tags = window._rgba_tags || []).push({ transaction_id: tid });
    });

    var call = $('#simulate-call');
    if (call) call.addEventListener('click', function () { simulateCall(call); });
  });

  // Plays Ringba after a completed call: its macros filled in, one GET to the postback URL.
  function simulateCall(button) {
    var tags = {};
    (window._rgba_tags || []).forEach(function (t) { for (var k in t) tags[k] = t[k]; });
    var macros = {
      'tag:transaction_id': tags.transaction_id || '',
      'Call:ConversionPayout': '30.00',
      'Call:CallLengthInSeconds': '184',
      'Call:InboundCallId': 'RGB' + Math.random().toString(16).slice(2, 12)
    };
    var url = button.getAttribute('data-postback').replace(/\[([^\]]+)\]/g, function (m, name) {
      return name in macros ? encodeURIComponent(macros[name]) : m;
    });
    button.disabled = true;
    show('#call-status', 'Ringba is reporting the call…');
    fetch(relay + url, { credentials: 'omit' }).then(function (r) { return r.json(); }).then(function (answer) {
      document.body.setAttribute('data-call-answer', JSON.stringify(answer));
      var id = answer.data && answer.data.conversion_id;
      show('#call-status', answer.type === 'error' ? 'Call not counted: ' + answer.message :
        id ? 'Call conversion recorded: ' + id : 'Call conversion queued; it will reach Pingtree shortly.');
    }, function () { show('#call-status', 'The relay did not answer.'); }).then(function () {
      button.disabled = false;
    });
  }
})();
