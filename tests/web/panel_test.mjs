// Drives the ComfyUI page in headless Chromium for tests/test_web_panel.py and reports what the page
// shows as JSON (the Python test makes the assertions). Input: a JSON file named by argv[2] with
// url, chromium, user_data_dir, screenshots, plain_prompt, cached_prompt, preview_cases.
import { readFileSync, writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const report = { console: [], page_errors: [], failed_requests: [], steps: [] };
const started = Date.now();
const note = (what) => report.steps.push(`${what} at ${((Date.now() - started) / 1000).toFixed(1)} s`);
let page = null;

const browser = await chromium.launchPersistentContext(input.user_data_dir, {
  executablePath: input.chromium,
  headless: true,
  viewport: { width: 1400, height: 820 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  page = browser.pages()[0] || (await browser.newPage());
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") {
      report.console.push({ type: m.type(), text: m.text(), url: m.location()?.url || "" });
    }
  });
  page.on("pageerror", (e) => report.page_errors.push(`${e.message}\n${e.stack || ""}`));
  page.on("requestfailed", (r) => report.failed_requests.push({ url: r.url(), error: r.failure()?.errorText || "" }));
  page.on("response", (r) => { if (r.status() >= 400) report.failed_requests.push({ url: r.url(), error: String(r.status()) }); });

  await page.goto(input.url);
  await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager && window.app?.api, null, { timeout: 60000 });
  await page.locator(".procache-tab-button").waitFor({ timeout: 30000 });
  note("page loaded");

  // Page-side helpers: an event log, a prompt runner, reading a strip's pixels off the canvas (again
  // after a reload).
  const installHelpers = () => page.evaluate(() => {
    const app = window.app, api = app.api;
    const log = (window.__procache = { events: [], done: [] });
    for (const type of ["procache.step", "procache.run"]) {
      api.addEventListener(type, (ev) => log.events.push({ type, detail: ev.detail }));
    }
    log.titles = [];
    api.addEventListener("procache.step", () => setTimeout(() => {
      const run = document.querySelector(".procache-run[data-live='1']");
      if (run) log.titles.push(`${run.querySelector(".procache-title").textContent} | ${run.querySelector(".procache-headline").textContent}`);
    }, 0));
    api.addEventListener("execution_success", (ev) => log.done.push({ ok: true, id: ev.detail?.prompt_id }));
    api.addEventListener("execution_error", (ev) => log.done.push({ ok: false, id: ev.detail?.prompt_id, error: ev.detail }));
    api.addEventListener("execution_interrupted", (ev) => log.done.push({ ok: false, id: ev.detail?.prompt_id, interrupted: true }));
    window.__procacheRun = async (prompt, name) => {
      const before = log.done.length;
      await app.loadApiJson(JSON.parse(JSON.stringify(prompt)), name);
      await app.queuePrompt(0, 1);
      const t0 = Date.now();
      while (log.done.length === before && Date.now() - t0 < 60000) await new Promise((r) => setTimeout(r, 100));
      return log.done[log.done.length - 1] || { ok: false, error: "no result within 60 s" };
    };
    // What the panel shows of each run (the text a user reads, and the figures behind it).
    window.__procachePanel = () => [...document.querySelectorAll(".procache-run")].map((run) => ({
      mode: run.dataset.mode, status: run.dataset.status,
      text: run.innerText,
      title: run.querySelector(".procache-title").textContent,
      headline: run.querySelector(".procache-headline").textContent,
      warning: run.querySelector(".procache-warning")?.textContent ?? null,
      details_open: run.querySelector(".procache-details").open,
      details: run.querySelector(".procache-details").textContent,
      streams: [...run.querySelectorAll(".procache-stream")].map((s) => ({
        name: s.dataset.stream, label: s.dataset.label, full: +s.dataset.full, selective: +s.dataset.selective,
        reused: +s.dataset.reused, tooltip: s.nextElementSibling.title,
        cells: [...s.nextElementSibling.querySelectorAll(".procache-cell")].map((c) => c.dataset.kind).join(""),
        shares: [...s.nextElementSibling.querySelectorAll(".procache-cell")].map((c) => c.dataset.share),
        cell_titles: [...s.nextElementSibling.querySelectorAll(".procache-cell")].map((c) => c.title),
      })),
      seconds: [...run.querySelectorAll(".procache-time")].map((b) => b.dataset.seconds),
      bar_titles: [...run.querySelectorAll(".procache-time")].map((b) => b.title),
      measured: run.querySelector(".procache-speed")?.dataset.measured,
      schedule: run.querySelector(".procache-speed")?.dataset.schedule,
    }));
    window.__procacheWidgets = () => app.graph._nodes.flatMap((n) => (n.widgets || [])
      .filter((w) => w.type === "procache_strip")
      .map((w) => ({ node: n.type, name: w.name, value: w.value, text: w.text || "", tooltip: w.tooltip || "" })));
    // The kinds drawn in a node's strip widget, read back from the canvas pixels (F/S/R per cell).
    window.__procacheStripPixels = (nodeType) => {
      const node = app.graph._nodes.find((n) => n.type === nodeType);
      const widget = node.widgets.find((w) => w.type === "procache_strip");
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [200 - node.pos[0], 200 - node.pos[1]];
      app.canvas.draw(true, true);
      const y = widget.y ?? widget.last_y;
      const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + y + 7]);
      const ratio = app.canvas.canvas.width / app.canvas.canvas.clientWidth;
      const width = Math.round(node.size[0] * ratio);
      const data = app.canvas.canvas.getContext("2d")
        .getImageData(Math.round(cx * ratio), Math.round(cy * ratio), width, 1).data;
      const colors = { F: [0x3b, 0x82, 0xf6], S: [0xf5, 0x9e, 0x0b], R: [0x6b, 0x72, 0x80] };
      let letters = "", current = null, length = 0;
      const close = () => { if (current && length >= 2) letters += current; current = null; length = 0; };
      for (let x = 0; x < width; x++) {
        const p = [data[4 * x], data[4 * x + 1], data[4 * x + 2]];
        const kind = Object.keys(colors).find((k) => colors[k].every((c, i) => Math.abs(c - p[i]) <= 24)) || null;
        if (kind !== current) close();
        if (kind) { current = kind; length += 1; }
      }
      close();
      return { letters, y };
    };
  });
  await installHelpers();
  // The canvas at `scale`, its origin `offset` pixels from the canvas' corner, saved to each of `paths`.
  const screenshots = async (paths, scale, offset) => {
    await page.evaluate(([scale, offset]) => {
      const canvas = window.app.canvas;
      canvas.ds.scale = scale;
      canvas.ds.offset = offset.map((o) => o / scale);
      canvas.setDirty(true, true);
      canvas.draw(true, true);
    }, [scale, offset]);
    await page.waitForTimeout(300);
    for (const path of paths) await page.screenshot({ path });
  };

  // 1. The default graph: nothing of ours on it.
  report.default_graph = await page.evaluate(() => ({
    nodes: window.app.graph._nodes.length,
    strips: window.__procacheWidgets().length,
    panel_elements: document.querySelectorAll(".procache-panel").length,
  }));

  // 2. A graph without the pack's nodes runs, and nothing of ours appears.
  report.plain_result = await page.evaluate((p) => window.__procacheRun(p, "plain.json"), input.plain_prompt);
  report.plain_graph = await page.evaluate(() => ({
    strips: window.__procacheWidgets().length, events: window.__procache.events.length,
    panel_elements: document.querySelectorAll(".procache-panel").length,
  }));
  note("plain graph ran");

  // 3. The pack's graph, loaded but not run: the Loader's preview strip.
  await page.evaluate((p) => window.app.loadApiJson(JSON.parse(JSON.stringify(p)), "procache.json"), input.cached_prompt);
  await page.waitForTimeout(300);
  // (the strip widget's value is what it drew last; reading the pixels draws the node on screen)
  report.preview = await page.evaluate(() => {
    const pixels = window.__procacheStripPixels("ProCacheScheduleLoader");
    return { pixels, widgets: window.__procacheWidgets() };
  });
  // the preview for other widget settings (compared with procache_core by the test)
  report.preview_cases = await page.evaluate(async (cases) => {
    const app = window.app;
    const node = app.graph._nodes.find((n) => n.type === "ProCacheScheduleLoader");
    const saved = node.widgets.map((w) => w.value);
    const out = [];
    for (const values of cases) {
      for (const w of node.widgets) if (w.name in values) w.value = values[w.name];
      for (let i = 0; i < 50; i++) {          // a library pattern may still be on its way
        app.canvas.draw(true, true);
        const w = node.widgets.find((x) => x.type === "procache_strip");
        if (w.value) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const strip = node.widgets.find((x) => x.type === "procache_strip");
      out.push({ value: strip.value, text: strip.text,
                 hidden: node.widgets.filter((w) => w.hidden).map((w) => w.name).sort() });
    }
    node.widgets.forEach((w, i) => { w.value = saved[i]; });
    app.canvas.draw(true, true);
    return out;
  }, input.preview_cases);

  // 4. The sidebar tab before the run, then the run.
  await page.locator(".procache-tab-button").click();
  await page.locator(".procache-panel").waitFor({ timeout: 10000 });
  report.panel_before = await page.locator(".procache-panel").innerText();
  report.cached_result = await page.evaluate((p) => window.__procacheRun(p, "procache.json"), input.cached_prompt);
  await page.locator(".procache-run:not([data-live='1'])").first().waitFor({ timeout: 10000 });
  note("procache graph ran");

  report.panel = await page.evaluate(() => window.__procachePanel());
  report.last_run = await page.evaluate(async () => (await (await window.app.api.fetchApi("/procache/last_run")).json()).latest);
  report.events = await page.evaluate(() => window.__procache.events.map((e) => ({ type: e.type, step: e.detail.step })));
  report.live_titles = await page.evaluate(() => window.__procache.titles);
  // the Apply node's own report, on the node, against what the server sent for it
  report.node_report = await page.evaluate(async () => {
    const node = window.app.graph._nodes.find((n) => n.type === "ProCacheApply");
    const widget = node.widgets.find((w) => w.name === "procache_report");
    const history = await (await window.app.api.fetchApi("/history?max_items=1")).json();
    const outputs = Object.values(history)[0]?.outputs || {};
    return { shown: widget?.value ?? null, sent: outputs[String(node.id)]?.text?.[0] ?? null,
             serialized: !!widget && widget.serialize !== false };
  });
  report.apply_strip = await page.evaluate(() => {
    const pixels = window.__procacheStripPixels("ProCacheApply");
    return { pixels, widgets: window.__procacheWidgets() };
  });

  // The HarmoniCa trainer as the frontend builds it: its tiny beta default survives the widget
  // (no rounding to the step), and it has the text widget its trained router is copied into.
  report.router_trainer = await page.evaluate(() => {
    const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
    if (!LG) return { error: "no LiteGraph" };
    const node = LG.createNode("ProCacheHarmoniCaRouterTrainer");
    if (!node) return { error: "node type not registered" };
    const beta = node.widgets?.find((w) => w.name === "beta");
    return { beta: beta?.value, round: beta?.options?.round ?? null,
             router_widget: !!node.widgets?.find((w) => w.name === "router") };
  });

  // 5. The screenshot: the graph with its strips and the panel open.
  await page.evaluate(() => {
    const app = window.app;
    const place = { ProCacheScheduleLoader: [0, 160], ProCacheTestTinyPixArt: [0, 0], ProCacheApply: [400, 0],
                    EmptyLatentImage: [400, 470], KSampler: [780, 0], ProCacheTestLatentSink: [780, 330] };
    let conditioning = 0;
    for (const node of app.graph._nodes) {
      if (node.type === "ProCacheTestTinyConditioning") node.pos = [0, 470 + 130 * conditioning++];
      else if (place[node.type]) node.pos = [...place[node.type]];
    }
  });
  await screenshots(input.screenshots, 0.8, [400, 130]);
  note("screenshots saved");

  // 6. The sampler set to another step count than the schedule's: a warning on the Apply node before
  // the run, and in the panel after it.
  const setSteps = (steps, loaderSteps) => page.evaluate(([steps, loaderSteps]) => {
    const widget = (type) => window.app.graph._nodes.find((n) => n.type === type).widgets.find((w) => w.name === "steps");
    widget("KSampler").value = steps;
    widget("ProCacheScheduleLoader").value = loaderSteps;
    window.app.canvas.draw(true, true);
    return window.__procacheWidgets().find((w) => w.node === "ProCacheApply");
  }, [steps, loaderSteps]);
  report.mismatch_before = await setSteps(input.mismatch_steps, 0);
  report.mismatch_result = await page.evaluate(async () => {
    const log = window.__procache, before = log.done.length;
    await window.app.queuePrompt(0, 1);
    while (log.done.length === before) await new Promise((r) => setTimeout(r, 100));
    return log.done[log.done.length - 1];
  });
  await page.waitForTimeout(300);
  report.mismatch_panel = await page.evaluate(() => window.__procachePanel());
  report.matched_after = await setSteps(input.cancel_steps, input.cancel_steps);

  // 7. A run cancelled part way: marked, its figures over the steps that ran, also after a reload.
  report.cancel_result = await page.evaluate(async (at) => {
    const app = window.app, log = window.__procache, before = log.done.length;
    const stop = (ev) => { if (ev.detail.step === at) app.api.interrupt(); };
    app.api.addEventListener("procache.step", stop);
    await app.queuePrompt(0, 1);
    const t0 = Date.now();
    while (log.done.length === before && Date.now() - t0 < 60000) await new Promise((r) => setTimeout(r, 100));
    app.api.removeEventListener("procache.step", stop);
    return log.done[log.done.length - 1] || { ok: false, error: "no result within 60 s" };
  }, input.cancel_at_step);
  await page.locator(".procache-run[data-status='cancelled']").waitFor({ timeout: 20000 });
  report.cancel_panel = await page.evaluate(() => window.__procachePanel());
  report.cancelled_run = await page.evaluate(async () => (await (await window.app.api.fetchApi("/procache/last_run")).json()).latest);
  await page.locator(".procache-run[data-status='cancelled'] .procache-details summary").click();
  for (const path of input.cancel_screenshots) await page.screenshot({ path, clip: { x: 0, y: 0, width: 372, height: 420 } });
  await page.reload();
  await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager, null, { timeout: 60000 });
  await page.locator(".procache-tab-button").click();
  await page.locator(".procache-run").first().waitFor({ timeout: 10000 });
  await installHelpers();
  report.reload_panel = await page.evaluate(() => [...document.querySelectorAll(".procache-run")].map((run) => ({
    status: run.dataset.status, headline: run.querySelector(".procache-headline").textContent })));
  note("mismatch and cancel checked");

  // 8. Every shipped template as the frontend opens it: no alert (the workflow schema's toast or a
  // dialog), and the missing-models dialog names every model file the template lists.
  report.templates = [];
  const alerts = [];
  page.on("dialog", (d) => { alerts.push(d.message()); d.dismiss().catch(() => {}); });
  for (const template of input.templates) {
    alerts.length = 0;
    await page.evaluate(() => document.querySelectorAll(".p-toast-message").forEach((t) => t.remove()));
    await page.evaluate(([doc, name]) => window.app.loadGraphData(doc, true, true, name), [template.doc, template.name]);
    await page.waitForTimeout(700);
    const seen = await page.evaluate(() => ({
      toasts: [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText),
      missing: [...document.querySelectorAll(".comfy-missing-models li, .comfy-missing-models [role=option]")]
        .map((li) => li.innerText),
    }));
    report.templates.push({ name: template.name, alerts: [...alerts], ...seen });
    await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
  note("templates loaded");

  // 9. The README's picture: a 20-step run with the paper's PixArt schedule (on the tiny model), shown
  // over the PixArt-Sigma template, the graph a user opens.
  report.docs_result = await page.evaluate((p) => window.__procacheRun(p, "docs.json"), input.docs_prompt);
  const template = input.templates.find((t) => t.name === input.docs_template);
  await page.evaluate(([doc, name]) => window.app.loadGraphData(doc, true, true, name), [template.doc, template.name]);
  await page.waitForTimeout(700);
  await page.keyboard.press("Escape");
  await screenshots(input.docs_screenshots, 0.66, [390, 90]);
  note("docs picture taken");

  // 10. A run summary with a cache plan (procache_core.stats adds one when the plan is known): one
  // line in the run's details.
  report.plan_panel = await page.evaluate((summary) => {
    window.app.api.dispatchEvent(new CustomEvent("procache.run", { detail: summary }));
    return window.__procachePanel().at(-1);
  }, { ...report.cancelled_run, plan: { text: input.plan_text } });
} catch (e) {
  report.script_error = `${e.message}\n${e.stack || ""}`;
  if (page && input.failure_screenshot) await page.screenshot({ path: input.failure_screenshot }).catch(() => {});
} finally {
  await browser.close();
}
writeFileSync(input.report, JSON.stringify(report, null, 1));
