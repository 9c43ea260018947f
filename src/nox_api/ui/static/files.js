// The Files page: drag and drop (or pick) several files; each goes up with its own progress bar
// (PUT /ui/files/upload/<folder>/<name>, with the session's CSRF token), then the list reloads.
(function () {
  "use strict";
  var zone = document.getElementById("upload");
  if (!zone) return;
  var input = document.getElementById("file-input");
  var rows = document.getElementById("upload-progress");
  var maxBytes = Number(zone.getAttribute("data-max-bytes")) || Infinity;
  var folder = zone.getAttribute("data-folder") || "";

  function target(name) {
    var path = folder ? folder + "/" + name : name;
    return "/ui/files/upload/" + path.split("/").map(encodeURIComponent).join("/");
  }

  function row(file) {
    var li = document.createElement("li");
    var name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name;
    name.title = file.name;
    var bar = document.createElement("progress");
    bar.max = Math.max(file.size, 1);
    bar.value = 0;
    var state = document.createElement("span");
    state.className = "state";
    state.textContent = "waiting";
    li.appendChild(name);
    li.appendChild(bar);
    li.appendChild(state);
    rows.appendChild(li);
    return { li: li, bar: bar, state: state };
  }

  function failed(r, message) {
    r.li.classList.add("failed");
    r.state.textContent = message;
    r.state.title = message;
  }

  function upload(file) {
    var r = row(file);
    return new Promise(function (resolve) {
      if (file.size > maxBytes) {
        failed(r, "too large");
        resolve(false);
        return;
      }
      var xhr = new XMLHttpRequest();
      xhr.open("PUT", target(file.name));
      xhr.setRequestHeader("X-CSRF-Token", window.nox.csrfToken());
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.addEventListener("progress", function (event) {
        if (!event.lengthComputable) return;
        r.bar.max = Math.max(event.total, 1);
        r.bar.value = event.loaded;
        r.state.textContent = Math.floor((100 * event.loaded) / Math.max(event.total, 1)) + " %";
      });
      xhr.addEventListener("load", function () {
        if (xhr.status === 201) {
          r.bar.value = r.bar.max;
          r.li.classList.add("ok");
          r.state.textContent = "uploaded";
          resolve(true);
          return;
        }
        var message = "failed (" + xhr.status + ")";
        try {
          message = JSON.parse(xhr.responseText).error.message || message;
        } catch (ignored) { /* not the JSON envelope */ }
        failed(r, message);
        resolve(false);
      });
      xhr.addEventListener("error", function () { failed(r, "network error"); resolve(false); });
      r.state.textContent = "0 %";
      xhr.send(file);
    });
  }

  function refresh() {
    var url = "/ui/files/list?path=" + encodeURIComponent(folder);
    if (window.htmx) {
      window.htmx.ajax("GET", url, { target: "#file-list", swap: "outerHTML" });
    } else {
      window.location.reload();
    }
  }

  function uploadAll(list) {
    var files = Array.prototype.slice.call(list || []);
    if (!files.length) return;
    Promise.all(files.map(upload)).then(refresh);
  }

  ["dragenter", "dragover"].forEach(function (type) {
    zone.addEventListener(type, function (event) {
      event.preventDefault();
      zone.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    zone.addEventListener(type, function () { zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    uploadAll(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  ["dragover", "drop"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      if (!zone.contains(event.target)) event.preventDefault();
    });
  });
  if (input) {
    input.addEventListener("change", function () {
      uploadAll(input.files);
      input.value = "";
    });
  }
})();
