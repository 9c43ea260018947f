// The Run page: Ctrl+Enter (or Cmd+Enter) runs the editor's code; the placeholder follows the
// language.
(function () {
  "use strict";
  var form = document.getElementById("run-form");
  if (!form) return;
  var code = document.getElementById("code");
  var kind = document.getElementById("kind");
  var placeholders = { python: "print('hello from the sandbox')", shell: "echo hello from the sandbox; uname -a" };

  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  if (kind && code) {
    var follow = function () { code.placeholder = placeholders[kind.value] || ""; };
    kind.addEventListener("change", follow);
    follow();
  }
  // The result panel arrived: show it.
  document.body.addEventListener("htmx:afterSwap", function (event) {
    if (event.target && event.target.id === "result") {
      event.target.scrollIntoView({ block: "nearest" });
    }
  });
})();
