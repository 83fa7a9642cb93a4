/* A small stand-in for webflow.js (what a published Webflow site loads), enough to test the SDK
   against Webflow's own behaviour: its forms module listens for submit on the document (delegated,
   bubbling, as Webflow does through jQuery), prevents the browser's submit, serializes every field
   but submit and file buttons by data-name (hidden inputs included), posts them to Webflow, then
   hides the form and shows .w-form-done. Here the post is kept in window.__webflowSubmissions.
   It also re-runs its "IX2" ready hooks, as the real script does, without touching the SDK. */
(function () {
  'use strict';
  var submissions = window.__webflowSubmissions = [];

  function findFields(form) {
    var result = {};
    var fields = form.querySelectorAll('input, textarea, select');
    Array.prototype.forEach.call(fields, function (field, i) {
      var type = field.getAttribute('type');
      if (type === 'submit' || type === 'file') return;
      var name = field.getAttribute('data-name') || field.getAttribute('name') || 'Field ' + (i + 1);
      if (type === 'checkbox') result[name] = field.checked;
      else if (type === 'radio') { if (field.checked) result[name] = field.value; }
      else result[name] = field.value;
    });
    return result;
  }

  document.addEventListener('submit', function (evt) {
    var form = evt.target;
    var wrap = form.closest && form.closest('.w-form');
    if (!wrap) return;
    evt.preventDefault(); // Webflow posts the form itself (XHR), the page does not navigate
    var button = form.querySelector('input[type="submit"], button[type="submit"]');
    var wait = button && button.getAttribute('data-wait');
    if (wait) { button.setAttribute('data-value', button.value); button.value = wait; }
    submissions.push({ name: form.getAttribute('data-name'), fields: findFields(form) });
    // The "server" answered: Webflow shows the success message in place of the form.
    setTimeout(function () {
      form.style.display = 'none';
      wrap.querySelector('.w-form-done').style.display = 'block';
    }, 0);
  });

  window.Webflow = window.Webflow || [];
  var ready = window.Webflow.slice ? window.Webflow.slice() : [];
  window.Webflow.push = function (fn) { fn(); };
  document.addEventListener('DOMContentLoaded', function () {
    ready.forEach(function (fn) { fn(); });
    document.documentElement.className += ' w-mod-js w-mod-ix';
  });
})();
