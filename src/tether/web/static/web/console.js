// Live parts of the pages: a command's output, a deployment's log and a run's grid follow the
// API's Server-Sent Events streams (the session cookie authenticates them). Everything
// received is written with textContent: output is text, never HTML.
(function () {
  "use strict";

  var FINAL = ["succeeded", "failed", "timed_out", "cancelled", "lost", "skipped", "expired"];

  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }

  function setBadge(badge, status) {
    badge.textContent = status;
    badge.className = "badge status-" + status;
  }

  function seconds(start, end) {
    if (!start || !end) return "";
    return ((Date.parse(end) - Date.parse(start)) / 1000).toFixed(1) + " s";
  }

  // The streams start from the beginning on every connection, and EventSource reconnects by
  // itself (network drop, server restart): a reconnect clears what the page shows, so nothing
  // appears twice. The source is kept on its element and closed when htmx removes it.
  function follow(root) {
    var source = new EventSource(root.dataset.stream);
    var opened = false;
    source.addEventListener("open", function () {
      if (opened) {
        var shown = field(root, "output") || field(root, "log");
        if (shown) shown.textContent = "";
      }
      opened = true;
    });
    root.eventSource = source;
    return source;
  }

  document.addEventListener("htmx:beforeCleanupElement", function (event) {
    var source = event.target.eventSource;
    if (source) source.close();
  });

  function followCommand(root) {
    if (root.dataset.started || root.hasAttribute("data-final")) return;
    root.dataset.started = "1";
    var output = field(root, "output");
    var cancel = root.querySelector("[data-cancel]");
    var source = follow(root);
    source.addEventListener("output", function (message) {
      var chunk = JSON.parse(message.data);
      var span = document.createElement("span");
      span.className = chunk.stream;
      span.textContent = chunk.data;
      output.appendChild(span);
      output.scrollTop = output.scrollHeight;
    });
    source.addEventListener("status", function (message) {
      setBadge(field(root, "status"), JSON.parse(message.data).status);
    });
    source.addEventListener("end", function (message) {
      source.close();
      var end = JSON.parse(message.data);
      setBadge(field(root, "status"), end.status);
      field(root, "exit").textContent = end.exit_code === null ? "" : "exit " + end.exit_code;
      field(root, "error").textContent = end.error || "";
      if (cancel) cancel.hidden = true;
      root.setAttribute("data-final", "");
      fetch(root.dataset.detail, { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (command) {
          if (command) {
            field(root, "duration").textContent =
              seconds(command.started_at || command.created_at, command.finished_at);
          }
        });
      document.body.dispatchEvent(new CustomEvent("command-ended"));
    });
  }

  function followDeployment(root) {
    if (root.dataset.started) return;
    var badge = field(root, "status");
    if (FINAL.indexOf(badge.textContent.trim()) >= 0) return;
    root.dataset.started = "1";
    var log = field(root, "log");
    var source = follow(root);
    source.addEventListener("log", function (message) {
      var part = JSON.parse(message.data);
      if (part.offset === 0) log.textContent = "";
      log.appendChild(document.createTextNode(part.data));
      log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("status", function (message) {
      setBadge(badge, JSON.parse(message.data).status);
    });
    source.addEventListener("end", function (message) {
      source.close();
      setBadge(badge, JSON.parse(message.data).status);
    });
  }

  // A run: the counts at the top follow `counts`, each row of the grid shown on this page
  // follows its target's `status` (rows of other pages are not on it: their events pass by).
  function followRun(root) {
    if (root.dataset.started || root.hasAttribute("data-final")) return;
    root.dataset.started = "1";
    var source = follow(root);
    source.addEventListener("status", function (message) {
      var target = JSON.parse(message.data);
      var row = document.querySelector('.run-grid tr[data-command="' + target.command + '"]');
      if (row && row.dataset.status !== target.status) showTarget(row, target);
    });
    source.addEventListener("counts", function (message) {
      var update = JSON.parse(message.data);
      showCounts(root, update.counts);
      setBadge(field(root, "status"), update.status);
    });
    source.addEventListener("end", function (message) {
      source.close();
      var end = JSON.parse(message.data);
      showCounts(root, end.counts);
      setBadge(field(root, "status"), end.status);
      var reason = field(root, "reason");
      reason.textContent = end.reason || "";
      reason.hidden = !end.reason;
      var cancel = root.querySelector("[data-cancel]");
      if (cancel) cancel.hidden = true;
      root.setAttribute("data-final", "");
    });
  }

  function showCounts(root, counts) {
    root.querySelectorAll("[data-count]").forEach(function (counter) {
      var count = counts[counter.dataset.count];
      if (count !== undefined) counter.textContent = count;
    });
  }

  function showTarget(row, target) {
    row.dataset.status = target.status;
    setBadge(field(row, "status"), target.status);
    field(row, "exit").textContent = target.exit_code === null ? "" : String(target.exit_code);
    if (FINAL.indexOf(target.status) < 0) return;
    fetch(row.dataset.detail, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (command) {
        if (command && command.started_at) {
          field(row, "duration").textContent = seconds(command.started_at, command.finished_at);
        }
      });
  }

  // A row of the grid opens its target's console below it, one at a time: a console that is
  // still running holds a connection of its own, and browsers allow few per server.
  function toggleOutput(row) {
    var next = row.nextElementSibling;
    var wasOpen = next && next.classList.contains("target-output");
    row.parentNode.querySelectorAll("tr.target-output").forEach(function (detail) {
      detail.querySelectorAll(".console").forEach(function (box) {
        if (box.eventSource) box.eventSource.close();
      });
      var opener = detail.previousElementSibling.querySelector("[data-output]");
      opener.setAttribute("aria-expanded", "false");
      detail.remove();
    });
    if (wasOpen) return;
    var detail = document.createElement("tr");
    detail.className = "target-output";
    var cell = document.createElement("td");
    cell.colSpan = row.children.length;
    detail.appendChild(cell);
    row.after(detail);
    row.querySelector("[data-output]").setAttribute("aria-expanded", "true");
    htmx.ajax("GET", row.dataset.console, { target: cell, swap: "innerHTML" });
  }

  function csrfToken() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function checkStatus(button) {
    var out = button.closest(".card").querySelector(".status-check");
    out.hidden = false;
    out.textContent = "checking…";
    fetch(button.dataset.checkStatus, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken() },
    })
      .then(function (response) { return response.json(); })
      .then(function (answer) {
        var error = answer.error;
        if (error && typeof error === "object") error = error.message;
        out.textContent = answer.reachable
          ? "reachable, version " + answer.version + ", " + answer.running.length +
            " running, " + answer.latency_ms + " ms"
          : "not reachable: " + (error || "unknown error");
      })
      .catch(function (error) { out.textContent = "check failed: " + error; });
  }

  // "5 min ago" as the server's `ago` filter writes it. The fleet's rows are redrawn only when
  // what they show changes, so the ages of agents not heard from move on here, counted from
  // the server's clock at render time (`data-server-now`, in seconds), not the browser's.
  function agoText(seconds) {
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) return Math.floor(seconds / units[i][1]) + " " + units[i][0] + " ago";
    }
    return Math.max(0, Math.floor(seconds)) + " s ago";
  }

  function tickAges() {
    document.querySelectorAll("[data-server-now]").forEach(function (block) {
      if (!block.renderedAt) block.renderedAt = Date.now();
      var now = Number(block.dataset.serverNow) * 1000 + (Date.now() - block.renderedAt);
      block.querySelectorAll("time[data-ago]").forEach(function (time) {
        time.textContent = agoText((now - Date.parse(time.getAttribute("datetime"))) / 1000);
      });
    });
  }

  setInterval(tickAges, 5000);

  function start(scope) {
    scope.querySelectorAll("[data-server-now]").forEach(function (block) {
      block.renderedAt = Date.now();
    });
    scope.querySelectorAll(".console[data-stream]").forEach(followCommand);
    scope.querySelectorAll(".deployment[data-stream]").forEach(followDeployment);
    scope.querySelectorAll(".run-summary[data-stream]").forEach(followRun);
  }

  document.addEventListener("DOMContentLoaded", function () { start(document); });
  document.addEventListener("htmx:afterSettle", function (event) { start(event.target); });
  document.addEventListener("submit", function (event) {
    var message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  }, true);
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-check-status]");
    if (button) checkStatus(button);
    var row = event.target.closest(".run-grid tr[data-console]");
    if (row && !event.target.closest("a, form")) toggleOutput(row);
    var copy = event.target.closest("[data-copy]");
    if (copy && navigator.clipboard) {
      navigator.clipboard.writeText(document.getElementById(copy.dataset.copy).value);
      copy.textContent = "Copied";
    }
  });
  document.addEventListener("change", function (event) {
    var all = event.target.closest("[data-check-all]");
    if (!all) return;
    all.closest("table").querySelectorAll('input[name="agents"]').forEach(function (box) {
      box.checked = all.checked;
    });
  });
})();
