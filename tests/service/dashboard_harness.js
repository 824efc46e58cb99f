// Runs the dashboard's scripts in node against a live API, with just enough of a DOM to observe them:
// node dashboard_harness.js BASE_URL PAGE_PATH API_KEY PAGE_FUNCTION SCRIPT...
// Prints what the page shows (status, chart point counts, table rows) as JSON once it has settled.
"use strict";
const fs = require("fs"), vm = require("vm");
const [base, pagePath, key, pageFunction, ...scripts] = process.argv.slice(2);

class Node {}
class Element extends Node {
  constructor(tag) {
    super();
    Object.assign(this, { tagName: tag, children: [], dataset: {}, style: {}, textContent: "", className: "",
                          hidden: false, value: "", href: "", listeners: {} });
  }
  appendChild(child) { this.children.push(child); return child; }
  replaceChildren(...children) { this.children = children; }
  addEventListener(type, fn) { this.listeners[type] = fn; }
  click() {}
  text() { return this.textContent || this.children.map(c => c.text()).join(" "); }
}

const drawCalls = { arc: 0 };
const ctx = new Proxy({}, {
  get: (target, name) => name === "measureText" ? (s => ({ width: s.length * 6 }))
    : name in target ? target[name] : ((...args) => { if (name === "arc") drawCalls.arc++; }),
  set: (target, name, value) => { target[name] = value; return true; },
});
const ids = {};
const document = {
  body: new Element("body"),
  createElement: tag => new Element(tag),
  getElementById(id) {
    if (!ids[id]) {
      ids[id] = new Element(id.endsWith("-chart") ? "canvas" : "div");
      if (id.endsWith("-chart")) Object.assign(ids[id], { width: 560, height: 280, getContext: () => ctx });
    }
    return ids[id];
  },
};
const store = new Map();
const location = { pathname: pagePath, search: "", hash: key ? "#key=" + encodeURIComponent(key) : "" };
const sandbox = {
  document, location, Node, console, TextDecoder, URLSearchParams, URL, setTimeout, Date,
  setInterval: () => 0,
  localStorage: { getItem: k => (store.has(k) ? store.get(k) : null), setItem: (k, v) => store.set(k, String(v)),
                  removeItem: k => store.delete(k) },
  history: { replaceState: (state, title, url) => { location.hash = ""; } },
  fetch: (path, options) => fetch(base + path, options),
  devicePixelRatio: 1,
};
sandbox.window = sandbox;
vm.createContext(sandbox);
for (const script of scripts) vm.runInContext(fs.readFileSync(script, "utf8"), sandbox);
vm.runInContext(`ITRD.${pageFunction}()`, sandbox);

const deadline = Date.now() + 20000;
(function settle() {
  const settled = pageFunction === "jobPage" ? document.body.dataset.loaded === "done"
    : (ids.jobs && ids.jobs.children.length > 0) || (ids.error && !ids.error.hidden);
  if (!settled && Date.now() < deadline) { setTimeout(settle, 100); return; }
  const rows = name => (ids[name] ? ids[name].children.map(r => r.children.map(c => c.text())) : []);
  console.log(JSON.stringify({
    settled, storedKey: store.get("itrd_api_key") || null, hash: location.hash,
    status: ids.status && ids.status.textContent,
    error: ids.error && !ids.error.hidden ? ids.error.textContent : null,
    lossPoints: ids["loss-chart"] && ids["loss-chart"].dataset.points,
    accPoints: ids["acc-chart"] && ids["acc-chart"].dataset.points,
    dots: drawCalls.arc, progress: ids["progress-text"] && ids["progress-text"].textContent,
    spec: ids.spec && ids.spec.textContent, failure: ids.failure && ids.failure.textContent,
    artifacts: rows("artifacts"), jobs: rows("jobs"),
    links: ids.jobs ? ids.jobs.children.map(r => r.children[0].children[0].href) : [],
  }));
  process.exit(0);  // a page that keeps polling would keep node alive
})();
