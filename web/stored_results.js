// Nodes that compute something expensive (a search, a fit, a training run) send the result back as
// text after a run; this copies it into the node's own text widget, so it is saved with the
// workflow and a shared workflow reproduces the run without computing it again.
import { app } from "../../scripts/app.js";

// node type -> name of the widget (and of the key in the node's UI message) that keeps the result
const STORED_RESULTS = {
  ProCacheForecasterTrainer: "fitted",
  ProCacheScheduleSearch: "searched",
  ProCacheEOCPriorExtractor: "prior",
  ProCacheHarmoniCaRouterTrainer: "router",
};

app.registerExtension({
  name: "procache.stored_results",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const key = STORED_RESULTS[nodeData.name];
    if (!key) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const value = message?.[key]?.[0];
      const widget = this.widgets?.find((w) => w.name === key);
      if (typeof value === "string" && widget && widget.value !== value) {
        widget.value = value;
        this.setDirtyCanvas?.(true, true);
      }
    };
  },
});
