// The migration form: when the destination or the storage mode changes, the prediction for that choice
// is fetched (rendered by the server) and replaces the one shown, before anyone presses Start.
(function () {
  "use strict";
  var form = document.querySelector("form[data-predict]");
  if (!form) return;
  var part = form.querySelector('[data-part="prediction"]');
  function update() {
    var q = new URLSearchParams({ to: form.elements.to.value, storage: form.elements.storage.value });
    fetch(form.getAttribute("data-predict") + "?" + q.toString(), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { part.innerHTML = html; })
      .catch(function () { /* the prediction shown stays; the form still works */ });
  }
  form.elements.to.addEventListener("change", update);
  form.elements.storage.addEventListener("change", update);
})();
