// Small page behaviours: dialogs, delete confirmation, live output and run state.
"use strict";

document.querySelectorAll("[data-open-dialog]").forEach(function (button) {
  button.addEventListener("click", function () {
    document.getElementById(button.dataset.openDialog).showModal();
  });
});

document.querySelectorAll("[data-close-dialog]").forEach(function (button) {
  button.addEventListener("click", function () { button.closest("dialog").close(); });
});

document.querySelectorAll("form[data-confirm]").forEach(function (form) {
  form.addEventListener("submit", function (event) {
    if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
  });
});

// Polls a JSON endpoint every `ms` milliseconds, waiting for each answer before the next.
function poll(url, ms, onData) {
  function tick() {
    fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) { if (data) { onData(data); } })
      .catch(function () {})
      .finally(function () { setTimeout(tick, ms); });
  }
  setTimeout(tick, ms);
}

// Picking a file in the run dialog selects "upload new image(s)".
document.querySelectorAll("dialog input[type=file][name=image]").forEach(function (input) {
  input.addEventListener("change", function () {
    input.closest("form").querySelector("input[name=images][value=new]").checked = true;
  });
});

var output = document.getElementById("output");
if (output) {
  output.scrollTop = output.scrollHeight;
  poll(output.dataset.url, 1000, function (data) {
    var atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.textContent = data.lines.length ? data.lines.join("\n") : "No output yet.";
    if (atBottom) { output.scrollTop = output.scrollHeight; }
  });
}

// The Overview's alert list of the shown run, redrawn from alerts.json when the count
// that status.json reports changes (text only: alerts are written by the user's script).
var alertList = document.getElementById("alerts");

function showAlerts(data) {
  var rows = alertList.querySelector("tbody");
  rows.textContent = "";
  data.alerts.slice().reverse().forEach(function (alert) {
    var row = rows.insertRow();
    var kind = row.insertCell();
    var name = document.createElement("span");
    name.className = "alert-kind";
    name.textContent = alert.kind.replace(/_/g, " ");
    kind.appendChild(name);
    if (alert.layer !== null && alert.layer !== undefined) {
      var layer = document.createElement("span");
      layer.className = "muted";
      layer.textContent = alert.layer;
      kind.appendChild(document.createElement("br"));
      kind.appendChild(layer);
    }
    var epoch = typeof alert.epoch === "number" ? alert.epoch + 1 : alert.epoch;
    row.insertCell().textContent = epoch + ", " + alert.batch;
    row.insertCell().textContent = alert.message;
    row.insertCell().textContent = alert.advice;
  });
  var problem = document.getElementById("alerts-problem");
  problem.textContent = data.problem;
  problem.hidden = !data.problem;
  document.getElementById("alerts-table").hidden = !data.alerts.length;
  alertList.hidden = !(data.alerts.length || data.problem);
  ["alert-count", "run-alert-count"].forEach(function (id) {
    var count = document.getElementById(id);
    if (count) { count.textContent = data.alerts.length; }
  });
}

function updateAlerts(alertCount) {
  if (!alertList || String(alertCount) === alertList.dataset.count) { return; }
  alertList.dataset.count = String(alertCount);
  fetch(alertList.dataset.alertsUrl, {credentials: "same-origin", cache: "no-store"})
    .then(function (response) { return response.ok ? response.json() : null; })
    .then(function (data) { if (data) { showAlerts(data); } })
    .catch(function () {});
}

var header = document.querySelector("[data-status-url]");
if (header) {
  var badge = document.getElementById("run-badge");
  poll(header.dataset.statusUrl, 2000, function (data) {
    updateAlerts(data.alert_count);
    var state = data.state || "";
    if (state === header.dataset.state) { return; }
    if (header.hasAttribute("data-reload-on-change")) { window.location.reload(); return; }
    header.dataset.state = state;
    badge.className = "badge badge-" + (state || "none");
    badge.textContent = state ? state.charAt(0).toUpperCase() + state.slice(1) : "";
  });
}

// An embedded Bokeh session adds elements beside its <script>; none after a while
// means the Bokeh server is unreachable, which the page then says.
var dashboards = document.querySelectorAll(".dashboard");
if (dashboards.length) {
  setTimeout(function () {
    var missing = Array.prototype.some.call(dashboards, function (dashboard) {
      return !Array.prototype.some.call(dashboard.children, function (child) {
        return child.tagName !== "SCRIPT";
      });
    });
    if (missing) { document.getElementById("dashboard-missing").hidden = false; }
  }, 10000);
}

// A choice that shows something else at once (the compared technique).
document.querySelectorAll("select[data-submit-on-change]").forEach(function (select) {
  select.addEventListener("change", function () { select.form.submit(); });
});
