// ProCache panel: which steps were computed in full, selectively, or reused.
// Reads the pack's namespaced events (procache.step, procache.run) and its read-only routes; holds
// no caching logic. Graphs without the pack's nodes get nothing drawn; the sidebar tab only says
// that no run happened yet.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = { F: "#3b82f6", S: "#f59e0b", R: "#6b7280" };
const PENDING = "#1f2937";
const LABELS = { F: "full", S: "selective", R: "reused" };
const DIGIT_TO_LETTER = { 1: "F", 2: "S", 0: "R" };
const STRIP_HEIGHT = 14;
const MAX_STEPS = 10000;          // as procache_core.schedule.MAX_STEPS

// ---- state: the runs of the latest prompt that used ProCache -------------------------------
let runs = [];                    // summaries (finished) and at most one live entry, oldest first
let promptStarted = false;        // the next ProCache event begins a new list
let executingNode = null;         // the node ComfyUI runs now (the sampler, during a run)
const panels = new Set();         // sidebar elements showing the panel

function startPromptIfNew() {
  if (promptStarted) { runs = []; promptStarted = false; }
}

function onStep(detail) {
  startPromptIfNew();
  let live = runs[runs.length - 1];
  if (!live?.live || detail.step === 0 || live.steps !== detail.steps) {
    live = { live: true, node: executingNode, seconds_per_step: new Array(detail.steps).fill(null) };
    runs.push(live);
  }
  Object.assign(live, { steps: detail.steps, planned: detail.planned, actual: detail.actual, mode: detail.mode,
                        step: detail.step });
  live.seconds_per_step[detail.step] = detail.seconds;
  refresh();
}

function onRun(summary) {
  startPromptIfNew();
  const last = runs[runs.length - 1];
  const node = last?.live ? last.node : executingNode;
  if (last?.live) runs.pop();
  runs.push({ ...summary, node });
  refresh();
}

// ---- reading a run ---------------------------------------------------------------------------
function countKinds(letters) {
  const counts = { F: 0, S: 0, R: 0 };
  for (const c of letters) if (c in counts) counts[c] += 1;
  return counts;
}

function modeText(mode) {
  if (!mode) return "";
  if (mode.startsWith("branch:")) return `branch-level (${mode.slice(7)})`;
  if (mode === "model-level") return "model-level fallback";
  return mode;
}

function firstStream(run) {
  return Object.values(run.actual || {})[0] || "";
}

// Theoretical: the schedule's step count over its full steps (Schedule.theoretical_speedup()).
// Measured: every step at the mean time of this run's full steps, over the time the steps took.
function speedups(run) {
  const planned = run.planned || "";
  const full = [...planned].filter((c) => c === "1").length;
  const theoretical = full ? planned.length / full : 0;
  const letters = firstStream(run);
  const secs = (run.seconds_per_step || []).map((s) => s || 0);
  const fullTimes = secs.filter((_, i) => letters[i] === "F");
  const perFull = fullTimes.length ? fullTimes.reduce((a, b) => a + b, 0) / fullTimes.length : 0;
  const total = secs.reduce((a, b) => a + b, 0);
  const measured = !run.live && total > 0 && perFull > 0 ? (perFull * secs.length) / total : 0;
  return { theoretical, measured };
}

function meanTimes(run) {
  const letters = firstStream(run);
  const sums = { F: [0, 0], S: [0, 0], R: [0, 0] };
  (run.seconds_per_step || []).forEach((s, i) => {
    if (s != null && letters[i] in sums) { sums[letters[i]][0] += s; sums[letters[i]][1] += 1; }
  });
  return Object.entries(sums).filter(([, [, n]]) => n).map(([k, [t, n]]) => `${LABELS[k]} ${(1000 * t / n).toFixed(1)} ms`);
}

// ---- the sidebar panel -------------------------------------------------------------------------
function element(tag, className, text, style) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text != null) el.textContent = text;
  if (style) el.style.cssText = style;
  return el;
}

// A cached step that still ran part of the block work (selective tokens, a router's computed
// units) gets that share of its cell filled in the full-step colour, from the bottom.
function cellBackground(kind, share) {
  const base = COLORS[kind] || PENDING;
  if (kind === "F" || share == null || share <= 0) return base;
  const pct = Math.min(100, Math.max(1, Math.round(100 * share)));
  return `linear-gradient(to top, ${COLORS.F} ${pct}%, ${base} ${pct}%)`;
}

function stripElement(letters, title, shares) {
  const row = element("div", "procache-strip", null, "display:flex;gap:1px;margin:2px 0 6px 0;");
  row.title = title;
  [...letters].forEach((c, i) => {
    const share = shares ? shares[i] : null;
    const cell = element("div", `procache-cell procache-${LABELS[c] || "pending"}`, null,
      `flex:1 1 0;max-width:14px;min-width:2px;height:14px;background:${cellBackground(c, share)};`);
    cell.dataset.kind = c;
    cell.dataset.share = share == null ? "" : share.toFixed(4);
    const work = share == null || c === "F" ? "" : `, ${Math.round(100 * share)}% of the block work computed`;
    cell.title = `step ${i}: ${LABELS[c] || "not run yet"}${work}`;
    row.appendChild(cell);
  });
  return row;
}

function timeChart(run) {
  const letters = firstStream(run);
  const secs = run.seconds_per_step || [];
  const top = Math.max(...secs.map((s) => s || 0), 1e-9);
  const chart = element("div", "procache-times", null, "display:flex;gap:1px;align-items:flex-end;height:40px;margin:2px 0;");
  secs.forEach((s, i) => {
    const bar = element("div", "procache-time", null,
      `flex:1 1 0;max-width:14px;min-width:2px;height:${s == null ? 0 : Math.max(1, Math.round(40 * s / top))}px;` +
      `background:${COLORS[letters[i]] || PENDING};`);
    bar.dataset.seconds = s == null ? "" : String(s);
    bar.title = s == null ? `step ${i}: not run yet` : `step ${i}: ${(1000 * s).toFixed(1)} ms (${LABELS[letters[i]] || "?"})`;
    chart.appendChild(bar);
  });
  return chart;
}

function runElement(run, index) {
  const box = element("div", "procache-run", null, "margin:0 0 14px 0;");
  box.dataset.index = index;
  box.dataset.mode = run.mode || "";
  box.dataset.live = run.live ? "1" : "";
  const title = run.live ? `running: step ${run.step + 1} of ${run.steps}` : `${run.steps} steps`;
  box.appendChild(element("div", "procache-title", `${run.model || "model"} · ${run.schedule || "schedule"} · ${title}`,
    "font-weight:bold;margin-bottom:2px;"));
  box.appendChild(element("div", "procache-mode", `mode: ${modeText(run.mode)}`));
  for (const [stream, letters] of Object.entries(run.actual || {})) {
    const c = countKinds(letters);
    const label = element("div", "procache-stream", `${stream}: ${c.F} full · ${c.S} selective · ${c.R} reused`,
      "margin-top:4px;");
    label.dataset.stream = stream;
    label.dataset.full = c.F; label.dataset.selective = c.S; label.dataset.reused = c.R;
    box.appendChild(label);
    box.appendChild(stripElement(letters, stream, run.compute_share));
  }
  box.appendChild(element("div", "procache-time-label", `time per step: ${meanTimes(run).join(", ")}`, "margin-top:4px;"));
  box.appendChild(timeChart(run));
  const { theoretical, measured } = speedups(run);
  const speed = element("div", "procache-speed",
    `speedup: ${measured ? measured.toFixed(2) + "× measured (step times)" : "measured when the run ends"}, ` +
    `${theoretical.toFixed(2)}× theoretical (${(run.planned || "").length} steps / ` +
    `${[...(run.planned || "")].filter((c) => c === "1").length} full)`);
  speed.dataset.measured = measured ? measured.toFixed(4) : "";
  speed.dataset.theoretical = theoretical.toFixed(4);
  box.appendChild(speed);
  if (run.flops_speedup) {
    box.appendChild(element("div", "procache-flops", `block FLOPs: ${run.flops_speedup.toFixed(2)}× fewer`));
  }
  for (const note of run.notes || []) box.appendChild(element("div", "procache-note", note, "opacity:0.7;font-size:11px;"));
  return box;
}

function renderPanel(el) {
  el.replaceChildren();
  const box = element("div", "procache-panel",
    null, "padding:10px;font:12px sans-serif;color:var(--fg-color,#ddd);overflow:auto;height:100%;box-sizing:border-box;");
  box.appendChild(element("div", "procache-heading", "ProCache: steps of the last run", "font-size:14px;margin-bottom:8px;"));
  const legend = element("div", "procache-legend", null, "display:flex;gap:10px;margin-bottom:10px;");
  for (const k of ["F", "S", "R"]) {
    const item = element("span", null, null, "display:flex;align-items:center;gap:4px;");
    item.append(element("span", null, null, `display:inline-block;width:10px;height:10px;background:${COLORS[k]};`),
      LABELS[k]);
    legend.appendChild(item);
  }
  box.appendChild(legend);
  if (!runs.length) {
    box.appendChild(element("div", "procache-empty", "No ProCache run yet. Queue a graph with ProCache Apply."));
  }
  runs.forEach((run, i) => box.appendChild(runElement(run, i)));
  el.appendChild(box);
}

function refresh() {
  for (const el of [...panels]) {
    if (el.isConnected) renderPanel(el);
    else panels.delete(el);
  }
  app.graph?.setDirtyCanvas(true, true);
}

// ---- strips on nodes -------------------------------------------------------------------------
// A canvas widget of its own row under the node's widgets; never serialized, never sent.
function addStripWidget(node, name, letters) {
  const widget = {
    name, type: "procache_strip", value: "", y: 0, serialize: false, options: { serialize: false },
    draw(ctx, node, width, y) {
      const text = letters.call(node);
      this.value = text || "";
      if (!text) return;
      if (text.startsWith("error:")) {
        ctx.fillStyle = "#f87171";
        ctx.font = "11px sans-serif";
        ctx.fillText(text.slice(0, 60), 15, y + 11);
        return;
      }
      const x0 = 15, w = Math.max(1, Math.floor((width - 30) / text.length));
      [...text].forEach((c, i) => {
        ctx.fillStyle = COLORS[c] || PENDING;
        ctx.fillRect(x0 + i * w, y + 2, Math.max(1, w - 1), STRIP_HEIGHT - 4);
      });
    },
    computeSize(width) { return [width, STRIP_HEIGHT]; },
    mouse() { return false; },
  };
  node.addCustomWidget(widget);
  return widget;
}

// The Loader's schedule, as procache_core builds it (schedule_loader.build_schedule), as F/S/R
// letters; "error: ..." when the widgets do not make a schedule.
function roundHalfEven(x) {
  const f = Math.floor(x), d = x - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : (f % 2 === 0 ? f : f + 1);
}

function parseTyped(text) {
  text = (text || "").trim();
  if (!text) throw new Error("the pattern is empty");
  if (text.startsWith("{")) {
    const doc = JSON.parse(text);
    if (!Array.isArray(doc.pattern)) throw new Error("'pattern' must be a list of integers 0, 1, 2");
    return doc.pattern.map(Number);
  }
  const expanded = text.replace(/\[([0-2,\s]*)\]\s*[x*]\s*(\d+)/g,
    (_, group, times) => Array(Math.min(+times, MAX_STEPS)).fill(group.replace(/^[\s,]+|[\s,]+$/g, "")).join(","))
    .replace(/\+/g, ",");
  if (/[^012\s,[\]]/.test(expanded)) throw new Error("the pattern may only contain 0, 1, 2, commas and [group]xN");
  return [...expanded.replace(/[^012]/g, "")].map(Number);
}

function injectSelective(kinds) {
  let run = 0;
  return kinds.map((k) => {
    if (k === 1) { run = 0; return 1; }
    run += 1;
    return run % 2 === 0 ? 2 : 0;
  });
}

function resampled(kinds, steps) {
  if (steps === kinds.length) return kinds;
  const starts = kinds.flatMap((k, i) => (k === 1 ? [i] : []));
  const segments = starts.map((s, i) => (i + 1 < starts.length ? starts[i + 1] : kinds.length) - s);
  const budget = Math.min(steps, Math.max(1, roundHalfEven(segments.length * steps / kinds.length)));
  const weights = Array.from({ length: budget },
    (_, i) => segments[Math.min(segments.length - 1, Math.floor((i + 0.5) * segments.length / budget))]);
  const total = weights.reduce((a, b) => a + b, 0);
  const exact = weights.map((w) => w * steps / total);
  const lengths = exact.map((e) => Math.max(1, Math.floor(e)));
  const sum = () => lengths.reduce((a, b) => a + b, 0);
  while (sum() > steps) {
    let at = 0;
    lengths.forEach((l, i) => { if (l >= lengths[at]) at = i; });
    lengths[at] -= 1;
  }
  const order = [...lengths.keys()].sort((a, b) => (Math.floor(exact[a]) - exact[a]) - (Math.floor(exact[b]) - exact[b]) || a - b);
  for (let i = 0, n = steps - sum(); i < n; i++) lengths[order[i % budget]] += 1;
  lengths.sort((a, b) => b - a);
  let pattern = lengths.flatMap((l) => [1, ...Array(l - 1).fill(0)]);
  if (kinds.includes(2)) pattern = injectSelective(pattern);
  return pattern;
}

let library = null;               // library name -> pattern digits, from /procache/schedules
let libraryAsked = 0;
function loadLibrary(force) {
  if ((library && !force) || Date.now() - libraryAsked < 5000) return;
  libraryAsked = Date.now();
  api.fetchApi("/procache/schedules").then((r) => (r.ok ? r.json() : null)).then((j) => {
    if (j) { library = j; app.graph?.setDirtyCanvas(true, false); }
  }).catch(() => {});
}

function loaderPreview(values) {
  const { source, pattern, interval, steps, selective } = values;
  let kinds;
  try {
    if (source === "typed pattern") kinds = parseTyped(pattern);
    else if (source === "uniform interval") {
      if (!(steps >= 1)) throw new Error("a uniform schedule needs steps >= 1");
      kinds = Array.from({ length: steps }, (_, i) => (i % interval === 0 ? 1 : 0));
    } else if (library && typeof library[source] === "string") {
      if (library[source].startsWith("error")) throw new Error(library[source].slice(7));
      kinds = [...library[source]].map(Number);
    } else {
      loadLibrary(library != null);
      return "";
    }
    if (!kinds.length || kinds.length > MAX_STEPS) throw new Error("a schedule has 1 to 10000 steps");
    if (kinds[0] !== 1) throw new Error("step 0 must be full (1)");
    if (selective && !kinds.includes(2)) kinds = injectSelective(kinds);
    if (steps && steps !== kinds.length) kinds = resampled(kinds, steps);
  } catch (e) {
    return `error: ${e.message}`;
  }
  return kinds.map((k) => DIGIT_TO_LETTER[k]).join("");
}

// Runs whose sampler takes its model from this Apply node (followed upstream through the graph).
function feedsFrom(graph, samplerId, applyId) {
  const seen = new Set();
  const todo = [graph?.getNodeById?.(Number(samplerId))];
  while (todo.length) {
    const node = todo.pop();
    if (!node || seen.has(node.id)) continue;
    seen.add(node.id);
    if (node.id === applyId) return true;
    for (const input of node.inputs || []) {
      if (input.link == null) continue;
      const link = graph.links?.get ? graph.links.get(input.link) : graph.links?.[input.link];
      if (link) todo.push(graph.getNodeById(link.origin_id));
    }
  }
  return false;
}

function applyLetters() {
  const node = this;
  const applies = (node.graph?._nodes || []).filter((n) => n.type === "ProCacheApply");
  // the newest run fed by this node; a graph with one Apply node shows the newest run in any case
  // (samplers inside subgraphs have ids the top graph does not know)
  let run = [...runs].reverse().find((r) => r.node != null && feedsFrom(node.graph, r.node, node.id));
  if (!run && applies.length === 1) run = runs[runs.length - 1];
  if (!run) return "";
  const letters = firstStream(run);
  return run.live ? letters.padEnd(run.steps, "-") : letters;
}

app.registerExtension({
  name: "procache.panel",
  async setup() {
    api.addEventListener("procache.step", (ev) => onStep(ev.detail));
    api.addEventListener("procache.run", (ev) => onRun(ev.detail));
    api.addEventListener("execution_start", () => { promptStarted = true; });
    api.addEventListener("executing", (ev) => {
      const id = ev.detail?.node ?? ev.detail;
      if (id != null) executingNode = id;
    });
    try {
      const res = await api.fetchApi("/procache/last_run");
      const latest = res.ok ? (await res.json()).latest : null;
      if (latest && !runs.length) runs = [latest];
    } catch (e) { /* a server without the pack's routes: the panel stays empty */ }
    app.extensionManager?.registerSidebarTab?.({
      id: "procache", icon: "pi pi-bolt", title: "ProCache", tooltip: "ProCache: steps computed, selective, reused",
      type: "custom",
      render: (el) => { panels.add(el); renderPanel(el); },
      destroy: () => { for (const el of [...panels]) if (!el.isConnected) panels.delete(el); },
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "ProCacheApply") {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        addStripWidget(this, "procache_last_run", applyLetters);
        return r;
      };
    }
    if (nodeData.name === "ProCacheScheduleLoader") {
      loadLibrary();
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        addStripWidget(this, "procache_preview", function () {
          const values = Object.fromEntries((this.widgets || []).map((w) => [w.name, w.value]));
          return loaderPreview(values);
        });
        return r;
      };
    }
  },
});
