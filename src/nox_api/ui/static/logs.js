// The live server log: new lines arrive as Server-Sent Events; Pause holds them (counted) until
// Resume. Lines are added as text, never as HTML.
(function () {
  "use strict";
  var list = document.getElementById("log-lines");
  if (!list || !window.EventSource) return;
  var wrap = document.getElementById("log-wrap");
  var button = document.getElementById("log-pause");
  var state = document.getElementById("log-state");
  var MAX_LINES = 2000;
  var paused = false;
  var waiting = [];

  function part(tag, text, className) {
    var el = document.createElement(tag);
    el.textContent = text;
    if (className) el.className = className;
    return el;
  }

  function add(line) {
    var record;
    try { record = JSON.parse(line); } catch (ignored) { record = null; }
    if (!record || typeof record !== "object") record = { event: String(line) };
    var li = document.createElement("li");
    li.className = "lvl-" + String(record.level || "").toLowerCase();
    li.appendChild(part("time", String(record.time || "")));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(part("b", String(record.level || ""), "lvl"));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(part("i", String(record.logger || "")));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(part("span", String(record.event || ""), "msg"));
    list.appendChild(li);
  }

  function note(text) {
    list.appendChild(part("li", text, "note"));
  }

  function show(work) {
    var atBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
    work();
    while (list.children.length > MAX_LINES) list.removeChild(list.firstChild);
    if (atBottom) wrap.scrollTop = wrap.scrollHeight;
  }

  function say() {
    if (paused) {
      state.textContent = "Paused" + (waiting.length ? " · " + waiting.length + " new" : "");
    } else {
      state.textContent = "Live";
    }
  }

  var source = new EventSource(list.getAttribute("data-stream"));
  source.addEventListener("open", function () { say(); });
  source.addEventListener("error", function () { state.textContent = "Reconnecting…"; });
  source.addEventListener("message", function (event) {
    if (paused) {
      waiting.push(event.data);
      if (waiting.length > MAX_LINES) waiting.shift();
      say();
      return;
    }
    show(function () { add(event.data); });
  });
  source.addEventListener("dropped", function (event) {
    var count = "some";
    try { count = JSON.parse(event.data).dropped; } catch (ignored) { /* keep "some" */ }
    show(function () { note(count + " lines were dropped: the page read too slowly"); });
  });
  window.addEventListener("pagehide", function () { source.close(); });

  button.addEventListener("click", function () {
    paused = !paused;
    button.textContent = paused ? "Resume" : "Pause";
    button.setAttribute("aria-pressed", paused ? "true" : "false");
    if (!paused && waiting.length) {
      var held = waiting;
      waiting = [];
      show(function () { held.forEach(add); });
    }
    say();
  });
  wrap.scrollTop = wrap.scrollHeight;
})();
