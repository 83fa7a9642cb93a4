// pingtree-relay dashboard: copy buttons and the live feed's refresh. No inline script, no eval:
// rows are built with textContent, so nothing from an event can become markup.
(function () {
  "use strict";

  function copy(button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) return;
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(source.value).then(done, function () { source.select(); });
    } else {
      source.select();
      try { document.execCommand("copy"); done(); } catch (e) { /* selected: the operator can copy */ }
    }
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) td.className = className;
    if (text !== null && text !== undefined) td.textContent = String(text);
    row.appendChild(td);
    return td;
  }

  function render(tbody, events) {
    var rows = document.createDocumentFragment();
    events.forEach(function (ev) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-id", ev.id);
      tr.setAttribute("data-state", ev.state);
      var when = cell(tr, ev.received + " ");
      when.title = ev.id + " -- " + ev.received_iso;
      var age = document.createElement("span");
      age.className = "muted";
      age.textContent = ev.age;
      when.appendChild(age);
      cell(tr, ev.cid);
      var name = cell(tr, ev.event_id);
      if (ev.test) {
        // From a staging origin: never sent to Pingtree (server/staging.py).
        tr.setAttribute("data-test", "1");
        var tag = document.createElement("span");
        tag.className = "test-traffic";
        tag.title = "From a staging origin: not sent to Pingtree";
        tag.textContent = "test";
        name.appendChild(document.createTextNode(" "));
        name.appendChild(tag);
      }
      cell(tr, ev.transaction_id, "mono");
      var state = document.createElement("span");
      state.className = "state " + ev.state;
      state.textContent = ev.state;
      cell(tr, null).appendChild(state);
      cell(tr, ev.attempts, "num");
      var answer = cell(tr, null);
      if (ev.status) {
        var code = document.createElement("span");
        code.className = "code";
        code.textContent = ev.status;
        answer.appendChild(code);
        answer.appendChild(document.createTextNode(" "));
      }
      answer.appendChild(document.createTextNode(ev.message || ""));
      cell(tr, ev.latency_ms === null ? "" : ev.latency_ms + " ms", "num");
      rows.appendChild(tr);
    });
    if (!events.length) {
      var empty = document.createElement("tr");
      empty.className = "empty";
      cell(empty, "No events yet.").colSpan = 8;
      rows.appendChild(empty);
    }
    tbody.replaceChildren(rows);
  }

  function poll(tbody) {
    var status = document.getElementById("feed-status");
    var refresh = function () {
      if (document.hidden) return;
      fetch(tbody.getAttribute("data-source"), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
        .then(function (data) {
          render(tbody, data.events);
          if (status) status.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
        })
        .catch(function (e) { if (status) status.textContent = "Refresh failed (" + e.message + "); retrying."; });
    };
    setInterval(refresh, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button.copy").forEach(function (b) {
      b.addEventListener("click", function () { copy(b); });
    });
    var feed = document.getElementById("feed-rows");
    if (feed) poll(feed);
  });
})();
