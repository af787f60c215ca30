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
  const { seconds: _, ...fields } = detail;
  Object.assign(live, fields);
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
  if (mode.startsWith("branch:")) return `each block's attention and MLP cached separately (${mode.slice(7)} layout)`;
  if (mode === "model-level") return "whole-model output cached (no block layout known for this model)";
  return mode;
}

function firstStream(run) {
  return Object.values(run.actual || {})[0] || "";
}

function streamLabel(run, stream) {
  return run.stream_labels?.[stream] || stream;
}

function seconds(s) {
  return s < 10 ? `${s.toFixed(1)} s` : s < 120 ? `${Math.round(s)} s` : `${(s / 60).toFixed(1)} min`;
}

// Set when the sampler ran another step count than the schedule was made for (it was resampled).
function stepMismatch(run) {
  if (!run.schedule_steps || run.schedule_steps === run.steps) return "";
  return `the sampler ran ${run.steps} steps, but the schedule was made for ${run.schedule_steps}: it was ` +
    `resampled to ${run.steps} steps. Set the sampler to ${run.schedule_steps} steps (or the Loader's steps ` +
    `to ${run.steps}) to run the schedule as made.`;
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

// The share of the block work a step computed, as a person reads it: never "0%" for a step that
// computed something (a selective step on a large image may refresh well under 1%).
function shareText(share) {
  const pct = 100 * share;
  return pct >= 10 ? `${Math.round(pct)}%` : pct >= 0.1 ? `${pct.toFixed(1)}%` : "under 0.1%";
}

// A cached step that still ran part of the block work (selective tokens, a router's computed
// units) gets that share of its cell filled in the full-step colour, from the bottom; at least a
// fifth, so a small share stays visible (its tooltip gives the exact figure).
function cellBackground(kind, share) {
  const base = COLORS[kind] || PENDING;
  if (kind === "F" || share == null || share <= 0) return base;
  const pct = Math.min(100, Math.max(20, Math.round(100 * share)));
  return `linear-gradient(to top, ${COLORS.F} ${pct}%, ${base} ${pct}%)`;
}

function stripTooltip(letters) {
  const c = countKinds(letters);
  const pending = [...letters].filter((k) => !(k in c)).length;
  return `${c.F} full (blue) · ${c.S} selective (amber: only the important tokens recomputed) · ` +
    `${c.R} reused (grey: cached outputs reused)` + (pending ? ` · ${pending} not run (dark)` : "");
}

function stripElement(letters, label, shares) {
  const row = element("div", "procache-strip", null, "display:flex;gap:1px;margin:2px 0 6px 0;");
  row.title = `${label}: ${stripTooltip(letters)}`;
  [...letters].forEach((c, i) => {
    const share = shares ? shares[i] : null;
    const cell = element("div", `procache-cell procache-${LABELS[c] || "pending"}`, null,
      `flex:1 1 0;max-width:14px;min-width:2px;height:14px;background:${cellBackground(c, share)};`);
    cell.dataset.kind = c;
    cell.dataset.share = share == null ? "" : share.toFixed(4);
    const work = !(share > 0) || c === "F" ? "" : `, ${shareText(share)} of the block work computed`;
    cell.title = `step ${i + 1}: ${LABELS[c] || "not run"}${work}`;
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
    bar.title = s == null ? `step ${i + 1}: not run` : `step ${i + 1}: ${(1000 * s).toFixed(1)} ms (${LABELS[letters[i]]})`;
    chart.appendChild(bar);
  });
  return chart;
}

function headlineText(run) {
  if (run.live) return `running: step ${run.step + 1} of ${run.steps}`;
  return run.headline || `${run.steps} steps`;
}

function detailsElement(run) {
  const details = element("details", "procache-details", null, "margin-top:4px;");
  details.appendChild(element("summary", null, "details", "cursor:pointer;opacity:0.8;"));
  const add = (className, text) => details.appendChild(element("div", className, text, "margin-top:3px;"));
  add("procache-mode", `caching: ${modeText(run.mode)}`);
  if (run.plan?.text) add("procache-plan", `cache plan: ${run.plan.text}`);
  add("procache-time-label", `time per step: ${meanTimes(run).join(", ")}`);
  details.appendChild(timeChart(run));
  if (!run.live) {
    const ran = run.steps_run ?? run.steps;
    const speed = element("div", "procache-speed",
      `measured: ${(run.speedup || 1).toFixed(2)}x (sampling ${seconds(run.sampling_seconds || 0)}, about ` +
      `${seconds(run.seconds_without || 0)} without caching); the schedule's step count: ` +
      `${(run.schedule_speedup || 1).toFixed(2)}x fewer full steps; block work (FLOPs): ` +
      `${(run.flops_speedup || 1).toFixed(2)}x less` + (ran < run.steps ? ` (over the ${ran} steps that ran)` : ""),
      "margin-top:3px;");
    speed.dataset.measured = String(run.speedup ?? "");
    speed.dataset.schedule = String(run.schedule_speedup ?? "");
    speed.dataset.flops = String(run.flops_speedup ?? "");
    details.appendChild(speed);
  }
  if (run.error) add("procache-error", `error: ${run.error}`);
  for (const note of run.notes || []) {
    details.appendChild(element("div", "procache-note", note, "opacity:0.7;font-size:11px;margin-top:3px;"));
  }
  return details;
}

function runElement(run, index) {
  const box = element("div", "procache-run", null, "margin:0 0 14px 0;");
  box.dataset.index = index;
  box.dataset.mode = run.mode || "";
  box.dataset.live = run.live ? "1" : "";
  box.dataset.status = run.live ? "running" : run.status || "complete";
  box.appendChild(element("div", "procache-title", [run.model, run.schedule].filter(Boolean).join(" · "),
    "font-weight:bold;margin-bottom:2px;"));
  const unfinished = !run.live && run.status && run.status !== "complete";
  box.appendChild(element("div", "procache-headline", headlineText(run),
    `font-size:13px;margin-bottom:2px;${unfinished ? "color:#f87171;" : ""}`));
  const mismatch = stepMismatch(run);
  if (mismatch) box.appendChild(element("div", "procache-warning", mismatch, "color:#f59e0b;margin:2px 0;"));
  const order = (stream) => ["positive", "negative"].findIndex((role) => streamLabel(run, stream).startsWith(role)) >>> 0;
  const streams = Object.entries(run.actual || {}).sort(([a], [b]) => order(a) - order(b));
  for (const [stream, letters] of streams) {
    const c = countKinds(letters);
    const label = streamLabel(run, stream);
    const row = element("div", "procache-stream", `${label}: ${c.F} full · ${c.S} selective · ${c.R} reused`,
      "margin-top:4px;");
    row.dataset.stream = stream;
    row.dataset.label = label;
    row.dataset.full = c.F; row.dataset.selective = c.S; row.dataset.reused = c.R;
    box.appendChild(row);
    box.appendChild(stripElement(letters, label, run.compute_share));
  }
  box.appendChild(detailsElement(run));
  return box;
}

function renderPanel(el) {
  el.replaceChildren();
  const box = element("div", "procache-panel",
    null, "padding:10px;font:12px sans-serif;color:var(--fg-color,#ddd);overflow:auto;height:100%;box-sizing:border-box;");
  box.appendChild(element("div", "procache-heading", "ProCache: the last run", "font-size:14px;margin-bottom:8px;"));
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
// A canvas widget of its own rows under the node's widgets; never serialized, never sent. `content`
// gives { letters, lines, color }: the strip's F/S/R/- cells and text lines under it (an error in
// full, a warning), wrapped to the node's width.
const LINE_HEIGHT = 13;

function wrapText(text, width) {
  const perLine = Math.max(12, Math.floor((width - 30) / 6));
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    if (line && line.length + 1 + word.length > perLine) { lines.push(line); line = ""; }
    line = line ? `${line} ${word}` : word;
    while (line.length > perLine) { lines.push(line.slice(0, perLine)); line = line.slice(perLine); }
  }
  if (line) lines.push(line);
  return lines;
}

function addStripWidget(node, name, content) {
  const widget = {
    name, type: "procache_strip", value: "", y: 0, serialize: false, options: { serialize: false },
    lines: [],
    draw(ctx, node, width, y) {
      const { letters = "", lines = [], color = "#f87171" } = content.call(node) || {};
      this.value = letters;
      this.text = lines.join(" ");
      this.tooltip = letters ? `${stripTooltip(letters)}${this.text ? `\n${this.text}` : ""}` : this.text;
      const wrapped = lines.flatMap((l) => wrapText(l, width));
      if (wrapped.length !== this.lines.length) {     // room for the text: grow (or shrink) the node
        this.lines = wrapped;
        node.setSize([node.size[0], node.computeSize([node.size[0], node.size[1]])[1]]);
        node.setDirtyCanvas?.(true, true);
      }
      this.lines = wrapped;
      const x0 = 15, w = letters ? Math.max(1, Math.floor((width - 30) / letters.length)) : 0;
      [...letters].forEach((c, i) => {
        ctx.fillStyle = COLORS[c] || PENDING;
        ctx.fillRect(x0 + i * w, y + 2, Math.max(1, w - 1), STRIP_HEIGHT - 4);
      });
      ctx.fillStyle = color;
      ctx.font = "11px sans-serif";
      const top = letters ? y + STRIP_HEIGHT : y;
      wrapped.forEach((line, i) => ctx.fillText(line, x0, top + 10 + i * LINE_HEIGHT));
    },
    computeSize(width) {
      return [width, (this.value ? STRIP_HEIGHT : 0) + this.lines.length * LINE_HEIGHT + (this.lines.length ? 4 : 0)
        || STRIP_HEIGHT];
    },
    mouse() { return false; },
  };
  node.addCustomWidget(widget);
  return widget;
}

// The Loader shows only the widgets its source uses: `pattern` for a typed pattern, `interval` for
// a uniform interval, neither for a library schedule.
function showLoaderWidgets(node, source) {
  const wanted = { pattern: source === "typed pattern", interval: source === "uniform interval" };
  let changed = false;
  for (const w of node.widgets || []) {
    if (!(w.name in wanted) || !!w.hidden === !wanted[w.name]) continue;
    w.hidden = !wanted[w.name];
    if (w.options) w.options.hidden = w.hidden;
    changed = true;
  }
  if (changed) node.setSize([node.size[0], node.computeSize([node.size[0], node.size[1]])[1]]);
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
      const link = linkOf(graph, input.link);
      if (link) todo.push(graph.getNodeById(link.origin_id));
    }
  }
  return false;
}

function linkOf(graph, id) {
  return graph.links?.get ? graph.links.get(id) : graph.links?.[id];
}

// The run that this Apply node fed (the newest); a graph with one Apply node shows the newest run in
// any case (samplers inside subgraphs have ids the top graph does not know).
function runFedBy(node) {
  const applies = (node.graph?._nodes || []).filter((n) => n.type === "ProCacheApply");
  const run = [...runs].reverse().find((r) => r.node != null && feedsFrom(node.graph, r.node, node.id));
  return run || (applies.length === 1 ? runs[runs.length - 1] : null);
}

// The step count of the schedule connected to this Apply node: the Loader's preview, else what the
// node reported when it last ran.
function scheduleSteps(node) {
  const input = (node.inputs || []).find((i) => i.name === "schedule");
  const link = input?.link != null ? linkOf(node.graph, input.link) : null;
  const loader = link ? node.graph.getNodeById(link.origin_id) : null;
  if (loader?.type === "ProCacheScheduleLoader") {
    const letters = loaderPreview(Object.fromEntries((loader.widgets || []).map((w) => [w.name, w.value])));
    return letters && !letters.startsWith("error:") ? letters.length : 0;
  }
  return node.procacheScheduleSteps || 0;
}

// The `steps` widgets of the samplers (or schedulers) this node's model reaches, following the
// model through nodes in between (model patches, guiders).
function samplerSteps(node) {
  const found = [], seen = new Set([node.id]);
  const todo = [...(node.outputs?.[0]?.links || [])];
  while (todo.length) {
    const link = linkOf(node.graph, todo.pop());
    const target = link ? node.graph.getNodeById(link.target_id) : null;
    if (!target || seen.has(target.id)) continue;
    seen.add(target.id);
    const steps = target.widgets?.find((w) => w.name === "steps");
    if (steps && typeof steps.value === "number") found.push(steps.value);
    else for (const output of target.outputs || []) todo.push(...(output.links || []));
  }
  return found;
}

function applyContent() {
  const node = this;
  const run = runFedBy(node);
  const letters = !run ? "" : run.live ? firstStream(run).padEnd(run.steps, "-") : firstStream(run);
  const planned = scheduleSteps(node);
  const other = samplerSteps(node).find((s) => s !== planned);
  let warning = "";
  if (planned && other != null) {
    warning = `warning: the sampler is set to ${other} steps, this schedule has ${planned}: it will be resampled ` +
      `to ${other} steps. Set the sampler to ${planned} steps, or the Loader's steps to ${other}.`;
  } else if (run && !run.live && !planned && stepMismatch(run)) {
    warning = `warning: ${stepMismatch(run)}`;
  }
  return { letters, lines: warning ? [warning] : [], color: "#f59e0b" };
}

// The node's report on the node itself, in a read-only text box (as ComfyUI's Preview as Text does).
function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === "procache_report");
  if (!widget) {
    const widgets = window.comfyAPI?.widgets?.ComfyWidgets;
    widget = widgets?.STRING(node, "procache_report", ["STRING", { multiline: true }], app).widget;
    if (!widget) return;
    widget.serialize = false;
    widget.options = { ...widget.options, serialize: false, read_only: true };
    if (widget.element) { widget.element.readOnly = true; widget.element.style.opacity = "0.85"; }
    node.setSize([Math.max(node.size[0], 340), Math.max(node.size[1], node.computeSize()[1] + 60)]);
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

function loaderContent() {
  const values = Object.fromEntries((this.widgets || []).map((w) => [w.name, w.value]));
  showLoaderWidgets(this, values.source);
  const preview = loaderPreview(values);
  return preview.startsWith("error:") ? { lines: [preview] } : { letters: preview };
}

function extendPrototype(nodeType, method, extra) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function () {
    const r = original?.apply(this, arguments);
    extra.apply(this, arguments);
    return r;
  };
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
      extendPrototype(nodeType, "onNodeCreated", function () { addStripWidget(this, "procache_last_run", applyContent); });
      extendPrototype(nodeType, "onExecuted", function (message) {
        if (message?.schedule_steps?.[0]) this.procacheScheduleSteps = message.schedule_steps[0];
        if (typeof message?.text?.[0] === "string") showReport(this, message.text[0]);
      });
    }
    if (nodeData.name === "ProCacheScheduleLoader") {
      loadLibrary();
      extendPrototype(nodeType, "onNodeCreated", function () { addStripWidget(this, "procache_preview", loaderContent); });
    }
  },
});
