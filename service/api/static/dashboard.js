// The dashboard's pages: they call the public API like any client, with the API key kept in localStorage.
"use strict";

window.ITRD = (function () {
  const KEY = "itrd_api_key";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const LOSS_COLORS = { ce: "#2457c5", corr: "#d9480f", mi: "#2b8a3e", kd: "#7048e8", crd: "#c2255c" };

  function headers() {
    const key = localStorage.getItem(KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // A link may carry the key in its fragment (#key=...), which browsers never send to the server:
  // it is stored like a typed key, then removed from the address bar.
  function keyFromFragment() {
    const match = location.hash.match(/^#key=(.+)$/);
    if (!match) return;
    localStorage.setItem(KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  function keyField(onChange) {
    keyFromFragment();
    const input = document.getElementById("api-key");
    input.value = localStorage.getItem(KEY) || "";
    input.addEventListener("change", () => {
      if (input.value) localStorage.setItem(KEY, input.value); else localStorage.removeItem(KEY);
      onChange();
    });
  }

  function showError(text) {
    const box = document.getElementById("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  async function api(path) {
    const response = await fetch(path, { headers: headers() });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not problem+json */ }
      if (response.status === 401 || response.status === 403) detail += " (enter a valid API key above)";
      throw new Error(response.status + ": " + detail);
    }
    return response.json();
  }

  function cell(row, content, className) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    if (className) td.className = className;
    row.appendChild(td);
  }

  function badge(status) {
    const span = document.createElement("span");
    span.className = "badge " + status;
    span.textContent = status;
    return span;
  }

  function bar(fraction) {
    const outer = document.createElement("span"), inner = document.createElement("span");
    outer.className = "bar";
    inner.style.width = (100 * fraction).toFixed(1) + "%";
    outer.appendChild(inner);
    return outer;
  }

  function pct(v) { return typeof v === "number" ? v.toFixed(2) + "%" : ""; }

  // ---- jobs page --------------------------------------------------------------------------------------
  function jobsPage() {
    const select = document.getElementById("status");
    async function refresh() {
      const query = new URLSearchParams({ limit: "100" });
      if (select.value) query.set("status", select.value);
      try {
        const page = await api("/v1/jobs?" + query);
        showError("");
        document.getElementById("total").textContent = page.total + " job(s)";
        const body = document.getElementById("jobs");
        body.replaceChildren();
        for (const job of page.items) {
          const row = document.createElement("tr");
          const link = document.createElement("a");
          link.href = "/dashboard/jobs/" + job.id;
          link.textContent = job.id.slice(0, 12);
          cell(row, link, "id");
          cell(row, job.kind);
          cell(row, job.spec.model || "");
          cell(row, (job.spec.method || {}).name || "");
          cell(row, badge(job.status));
          cell(row, bar(job.status === "succeeded" ? 1 : job.progress.fraction));
          cell(row, job.progress.epochs ? job.progress.epoch + "/" + job.progress.epochs : "");
          cell(row, pct((job.latest_metrics || {}).test_top1));
          cell(row, new Date(job.created_at).toLocaleString());
          body.appendChild(row);
        }
      } catch (err) { showError(String(err.message || err)); }
    }
    keyField(refresh);
    select.addEventListener("change", refresh);
    refresh();
    setInterval(refresh, 3000);
  }

  // ---- job page ---------------------------------------------------------------------------------------
  // Server-sent events read with fetch (EventSource cannot send an Authorization header).
  async function follow(path, lastEventId, onEvent) {
    const h = Object.assign({ Accept: "text/event-stream" }, headers());
    if (lastEventId) h["Last-Event-ID"] = lastEventId;
    const response = await fetch(path, { headers: h });
    if (!response.ok) {
      const error = new Error(response.status + ": " + response.statusText +
        (response.status === 401 || response.status === 403 ? " (enter a valid API key above)" : ""));
      error.final = response.status >= 400 && response.status < 500;  // retrying will not help
      throw error;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { event: "message", data: [], id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(text);
          else if (field === "event") event.event = text;
          else if (field === "id") event.id = text;
        }
        if (event.data.length) onEvent(event.event, JSON.parse(event.data.join("\n")), event.id);
      }
    }
  }

  function jobPage() {
    const id = decodeURIComponent(location.pathname.split("/").pop());
    document.getElementById("job-id").textContent = id;
    const epochs = new Map();
    let lastEventId = null, ended = false;

    function redraw() {
      const rows = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
      const terms = [...new Set(rows.flatMap(r => Object.keys(r)))]
        .filter(k => k.startsWith("loss_")).sort();
      ITRDCharts.draw(document.getElementById("loss-chart"), terms.map(k => ({
        name: k.slice(5), color: LOSS_COLORS[k.slice(5)] || "#495057",
        points: rows.filter(r => typeof r[k] === "number").map(r => [r.epoch, r[k]]),
      })));
      const acc = rows.filter(r => typeof r.test_top1 === "number");
      const teacher = rows.map(r => r.teacher_top1).filter(v => typeof v === "number").pop();
      const series = [{ name: "student", color: "#2457c5", points: acc.map(r => [r.epoch, r.test_top1]) }];
      if (teacher !== undefined && acc.length) {
        series.push({ name: "teacher " + teacher.toFixed(2) + "%", color: "#868e96", dashed: true,
                      points: [[acc[0].epoch, teacher], [acc[acc.length - 1].epoch, teacher]] });
      }
      ITRDCharts.draw(document.getElementById("acc-chart"), series);
    }

    function showJob(job) {
      const status = document.getElementById("status");
      status.className = "badge " + job.status;
      status.textContent = job.status;
      document.getElementById("spec").textContent = JSON.stringify(job.spec, null, 2);
      const failure = document.getElementById("failure");
      failure.hidden = !job.failure_reason;
      failure.textContent = job.failure_reason || "";
      showProgress(job.status === "succeeded" ? Object.assign({}, job.progress, { fraction: 1 }) : job.progress);
    }

    function showProgress(p) {
      document.getElementById("progress-bar").style.width = (100 * p.fraction).toFixed(1) + "%";
      document.getElementById("progress-text").textContent =
        (p.epochs ? "epoch " + p.epoch + "/" + p.epochs + " · " : "") + (100 * p.fraction).toFixed(0) + "%";
    }

    async function download(artifact) {
      const response = await fetch(artifact.url, { headers: headers() });
      if (!response.ok) { showError("download failed: " + response.status); return; }
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = artifact.name;
      link.click();
      URL.revokeObjectURL(link.href);
    }

    async function loadArtifacts() {
      const listing = await api("/v1/jobs/" + encodeURIComponent(id) + "/artifacts");
      const body = document.getElementById("artifacts");
      if (!listing.items.length) return;
      body.replaceChildren();
      for (const a of listing.items) {
        const row = document.createElement("tr"), link = document.createElement("a");
        link.href = a.url;
        link.textContent = a.name;
        // With a key, the file comes through fetch so that the Authorization header goes along.
        link.addEventListener("click", ev => { if (localStorage.getItem(KEY)) { ev.preventDefault(); download(a); } });
        cell(row, link);
        cell(row, a.size.toLocaleString() + " B");
        cell(row, a.sha256.slice(0, 16) + "…");
        body.appendChild(row);
      }
    }

    function onEvent(type, data, eventId) {
      if (type === "metrics") {
        epochs.set(data.epoch, data);
        if (eventId) lastEventId = eventId;
        redraw();
      } else if (type === "progress") {
        showProgress(data);
      } else if (type === "state") {
        showJob(data);
        ended = TERMINAL.has(data.status);
        artifactsLoaded = loadArtifacts().catch(() => {});
      }
    }

    let artifactsLoaded = Promise.resolve();

    async function run() {
      redraw();
      while (!ended) {
        try {
          await follow("/v1/jobs/" + encodeURIComponent(id) + "/events", lastEventId, onEvent);
          showError("");
        } catch (err) {
          showError(String(err.message || err));
          if (err.final) break;  // a new key reloads the page
          await new Promise(r => setTimeout(r, 3000));
        }
        if (!ended) await new Promise(r => setTimeout(r, 1000));
      }
      await artifactsLoaded;  // the final listing is on the page before it says it is done
      document.body.dataset.loaded = "done";
    }

    keyField(() => location.reload());
    run();
  }

  return { jobsPage, jobPage };
})();
