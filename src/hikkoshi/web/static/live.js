// The overview pages, live: the server pushes the hosts, VMs and migrations tables (HTML rendered by the
// same templates as the page) when they change; each replaces its part. No page reload.
(function () {
  "use strict";
  if (!document.body.hasAttribute("data-live-overview")) return;
  var said = document.getElementById("live-state");
  var events = new EventSource("/events");
  events.addEventListener("overview", function (e) {
    var parts = JSON.parse(e.data);
    Object.keys(parts).forEach(function (name) {
      var el = document.querySelector('[data-live="' + name + '"]');
      if (el) el.innerHTML = parts[name];
    });
    if (said) said.textContent = "live";
  });
  events.addEventListener("problem", function (e) {
    if (said) said.textContent = JSON.parse(e.data).detail;
  });
  events.onerror = function () {
    if (said) said.textContent = "reconnecting…";
    if (events.readyState === EventSource.CLOSED) window.location.href = "/login";
  };
})();
