// ProCache panel: which steps were computed in full, selectively, or reused.
// Reads the pack's namespaced events (procache.step, procache.run) and its read-only routes; holds
// no caching logic. Nothing is drawn on graphs that do not use the pack.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = { F: "#3b82f6", S: "#f59e0b", R: "#4b5563", "-": "#1f2937", 1: "#3b82f6", 2: "#f59e0b", 0: "#4b5563" };
const LABELS = { F: "full", S: "selective", R: "reused" };
let lastRun = null;        // latest summary or step event
const panels = new Set();  // DOM elements showing the panel

function countKinds(letters) {
  const counts = { F: 0, S: 0, R: 0 };
  for (const c of letters) if (c in counts) counts[c] += 1;
  return counts;
}

function stripElement(letters, title) {
  const row = document.createElement("div");
  row.className = "procache-strip";
  row.style.cssText = "display:flex;gap:1px;margin:2px 0;";
  row.title = title;
  [...letters].forEach((c, i) => {
    const cell = document.createElement("div");
    cell.className = `procache-cell procache-${LABELS[c] || "pending"}`;
    cell.dataset.kind = c;
    cell.title = `step ${i}: ${LABELS[c] || "not run yet"}`;
    cell.style.cssText = `width:8px;height:14px;background:${COLORS[c] || COLORS["-"]};`;
    row.appendChild(cell);
  });
  return row;
}

function renderPanel(el) {
  el.innerHTML = "";
  const box = document.createElement("div");
  box.className = "procache-panel";
  box.style.cssText = "padding:8px;font:12px sans-serif;color:var(--fg-color,#ddd)";
  if (!lastRun) {
    box.textContent = "No ProCache run yet. Queue a graph with ProCache Apply.";
    el.appendChild(box);
    return;
  }
  const head = document.createElement("div");
  head.className = "procache-mode";
  head.textContent = `${lastRun.model || ""} — mode ${lastRun.mode}`;
  box.appendChild(head);
  for (const [stream, letters] of Object.entries(lastRun.actual || {})) {
    const c = countKinds(letters);
    const label = document.createElement("div");
    label.className = "procache-stream";
    label.dataset.full = c.F; label.dataset.selective = c.S; label.dataset.reused = c.R;
    label.textContent = `${stream}: ${c.F} full / ${c.S} selective / ${c.R} reused`;
    box.appendChild(label);
    box.appendChild(stripElement(letters, stream));
  }
  if (lastRun.flops_speedup) {
    const speed = document.createElement("div");
    speed.className = "procache-speed";
    const secs = lastRun.seconds_per_step || [];
    const full = secs.filter((_, i) => (Object.values(lastRun.actual)[0] || "")[i] === "F");
    const perFull = full.length ? full.reduce((a, b) => a + b, 0) / full.length : 0;
    const total = secs.reduce((a, b) => a + b, 0);
    const measured = total > 0 && perFull > 0 ? (perFull * secs.length) / total : 0;
    speed.textContent = `speedup: ${measured ? measured.toFixed(2) + "x measured (block time), " : ""}` +
      `${lastRun.flops_speedup.toFixed(2)}x theoretical (block FLOPs)`;
    box.appendChild(speed);
  }
  el.appendChild(box);
}

function refresh() {
  for (const el of panels) renderPanel(el);
  app.graph?.setDirtyCanvas(true, true);
}

function drawStrip(ctx, node, pattern) {
  if (!pattern) return;
  const y = node.size[1] - 12, x0 = 8, w = Math.max(1, (node.size[0] - 16) / pattern.length);
  [...pattern].forEach((c, i) => {
    ctx.fillStyle = COLORS[c] || COLORS["-"];
    ctx.fillRect(x0 + i * w, y, Math.max(1, w - 1), 8);
  });
}

app.registerExtension({
  name: "procache.panel",
  async setup() {
    api.addEventListener("procache.step", (ev) => { lastRun = { ...(lastRun || {}), ...ev.detail }; refresh(); });
    api.addEventListener("procache.run", (ev) => { lastRun = ev.detail; refresh(); });
    try {
      const res = await api.fetchApi("/procache/last_run");
      if (res.ok) lastRun = (await res.json()).latest || null;
    } catch (e) { /* the server may be older than the pack; the panel stays empty */ }
    app.extensionManager?.registerSidebarTab?.({
      id: "procache", icon: "pi pi-bolt", title: "ProCache", tooltip: "ProCache: steps computed, selective, reused",
      type: "custom", render: (el) => { panels.add(el); renderPanel(el); },
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "ProCacheApply") {
      const draw = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        const letters = lastRun && Object.values(lastRun.actual || {})[0];
        drawStrip(ctx, this, letters);
      };
    }
    if (nodeData.name === "ProCacheScheduleLoader") {
      let library = null;
      api.fetchApi("/procache/schedules").then((r) => r.ok ? r.json() : {}).then((j) => { library = j; });
      const draw = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        const w = Object.fromEntries((this.widgets || []).map((x) => [x.name, x.value]));
        let pattern = null;
        if (w.source === "uniform interval" && w.steps > 0) {
          pattern = Array.from({ length: w.steps }, (_, i) => (i % w.interval === 0 ? "1" : "0")).join("");
        } else if (w.source === "typed pattern") {
          pattern = (w.pattern || "").replace(/\[([0-2,\s]*)\]\s*[x*]\s*(\d+)/g, (_, g, n) => Array(+n).fill(g).join(","))
            .replace(/[^012]/g, "");
        } else if (library && library[w.source]) {
          pattern = library[w.source];
        }
        drawStrip(ctx, this, pattern && !pattern.startsWith("error") ? pattern : null);
      };
    }
  },
});
