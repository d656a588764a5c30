// One migration, live: its state, progress bar (never backwards), phases, figures and report come as
// server-rendered parts; its samples come as chart rows, drawn with uPlot (vendored). The switchover
// (the guest stopped) is a red band on every chart, phase changes are grey lines.
(function () {
  "use strict";
  var id = document.body.getAttribute("data-migration");
  if (!id) return;
  // Columns of a row, as the server sends them (hikkoshi.web.timeline.COLUMNS).
  var COL = { t: 0, memory: 1, dirty: 2, cache: 3, demand: 4, background: 5, latSrc: 6, latDst: 7 };
  var data = [[], [], [], [], [], [], [], []];
  var marks = { phases: [], downtime: null };
  var shown = 0; // the highest percentage shown: the bar never goes back
  var parts = {}; // the HTML of each part as last received
  var charts = [];

  function markers(u) {
    var ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
    ctx.save();
    if (marks.downtime) {
      var x0 = u.valToPos(marks.downtime.start, "x", true);
      var x1 = Math.max(u.valToPos(marks.downtime.end, "x", true), x0 + 2);
      ctx.fillStyle = "rgba(220, 38, 38, 0.25)";
      ctx.fillRect(x0, top, x1 - x0, height);
    }
    ctx.strokeStyle = "rgba(100, 100, 100, 0.35)";
    ctx.lineWidth = 1;
    marks.phases.forEach(function (p) {
      var x = u.valToPos(p.start, "x", true);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    });
    ctx.restore();
  }

  function chart(el, series, axes) {
    var width = Math.max(el.clientWidth, 280);
    var opts = {
      width: width, height: 200,
      scales: { x: { time: false } },
      series: [{ label: "s" }].concat(series),
      axes: [{ label: "s" }].concat(axes),
      hooks: { draw: [markers] },
      legend: { live: false },
    };
    var cols = [COL.t].concat(series.map(function (s) { return s.col; }));
    var u = new uPlot(opts, cols.map(function (c) { return data[c]; }), el);
    charts.push({ u: u, cols: cols, el: el });
  }

  function line(label, col, stroke, scale) {
    return { label: label, col: col, stroke: stroke, width: 2, spanGaps: true, scale: scale || "y",
             points: { show: false } };
  }

  function setup() {
    chart(document.getElementById("chart-memory"),
      [line("memory sent (MiB)", COL.memory, "#2563eb"), line("dirty rate (MiB/s)", COL.dirty, "#ea580c", "rate")],
      [{ scale: "y", label: "MiB" }, { scale: "rate", side: 1, label: "MiB/s", grid: { show: false } }]);
    chart(document.getElementById("chart-disk"),
      [line("complete (%)", COL.cache, "#16a34a", "pct"), line("on demand (MiB)", COL.demand, "#9333ea"),
       line("background (MiB)", COL.background, "#0891b2")],
      [{ scale: "pct", label: "%" }, { scale: "y", side: 1, label: "MiB", grid: { show: false } }]);
    chart(document.getElementById("chart-io"),
      [line("at the source (ms)", COL.latSrc, "#db2777"), line("at the destination (ms)", COL.latDst, "#65a30d")],
      [{ scale: "y", label: "ms" }]);
  }

  function redraw() {
    charts.forEach(function (c) { c.u.setData(c.cols.map(function (col) { return data[col]; })); });
  }

  function setText(elId, text) {
    var el = document.getElementById(elId);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function seconds(s) {
    return s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  }

  function progress(pct) {
    shown = Math.max(shown, pct);
    var bar = document.getElementById("progress");
    bar.setAttribute("aria-valuenow", String(shown));
    bar.querySelector(".fill").style.width = shown + "%";
    bar.querySelector(".pct").textContent = shown.toFixed(1) + " %";
  }

  function eta(value) {
    setText("eta", value === null || value === undefined ? "" : "about " + seconds(value) + " left in this phase");
  }

  function status(s) {
    var state = document.getElementById("state");
    if (state.textContent !== s.state) {
      state.textContent = s.state;
      state.className = "state state-" + s.state.replace(/ /g, "-");
    }
    setText("phase", s.phase);
    eta(s.eta);
    progress(s.percent);
    Object.keys(s.html).forEach(function (name) {
      var el = document.querySelector('[data-part="' + name + '"]');
      if (el && parts[name] !== s.html[name]) el.innerHTML = s.html[name];
      parts[name] = s.html[name];
    });
    marks.phases = s.timeline.phases;
    marks.downtime = s.timeline.downtime;
    charts.forEach(function (c) { c.u.redraw(false); });
  }

  function start() {
    setup();
    shown = Number(document.getElementById("progress").getAttribute("aria-valuenow")) || 0;
    var said = document.getElementById("live-state");
    var events = new EventSource("/migrations/" + id + "/events");
    events.addEventListener("samples", function (e) {
      // After a reconnect the stream starts again from the first sample: rows already here are skipped.
      var msg = JSON.parse(e.data);
      msg.rows.forEach(function (row, k) {
        if (msg.offset + k < data[0].length) return;
        row.forEach(function (v, i) { data[i].push(v); });
      });
      redraw();
    });
    events.addEventListener("status", function (e) { status(JSON.parse(e.data)); });
    events.addEventListener("eta", function (e) { eta(JSON.parse(e.data).eta); });
    events.addEventListener("problem", function (e) { if (said) said.textContent = JSON.parse(e.data).detail; });
    events.addEventListener("end", function () {
      events.close();
      if (said) said.textContent = "ended";
    });
    events.onopen = function () { if (said) said.textContent = "live"; };
    events.onerror = function () {
      if (said) said.textContent = "reconnecting…";
      if (events.readyState === EventSource.CLOSED) window.location.href = "/login";
    };
    window.addEventListener("resize", function () {
      charts.forEach(function (c) { c.u.setSize({ width: Math.max(c.el.clientWidth, 280), height: 200 }); });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
