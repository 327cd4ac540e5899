(function () {
  "use strict";
  var body = document.body, live = document.getElementById("live");
  var every = (parseInt(body.getAttribute("data-refresh"), 10) || 60) * 1000;
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, {cache: "no-cache", headers: {"Accept": "text/html"}})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main"), old = document.getElementById("main");
        if (fresh && old && fresh.innerHTML !== old.innerHTML) {
          old.innerHTML = fresh.innerHTML;
          var summary = document.getElementById("summary");
          if (live && summary) { live.textContent = summary.textContent; }
        }
      })
      .catch(function () { return null; })
      .then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
  }
  if (window.EventSource && body.getAttribute("data-events")) {
    var source = new EventSource(body.getAttribute("data-events"));
    source.addEventListener("change", refresh);
  }
  window.setInterval(refresh, every);
})();
