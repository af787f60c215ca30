// ProCache Forecaster Trainer: after a run, copy the fitted coefficients into the node's own
// `fitted` text widget, so they are saved with the workflow and a shared workflow reproduces the
// run without calibrating again.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "procache.forecaster",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ProCacheForecasterTrainer") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const fitted = message?.fitted?.[0];
      const widget = this.widgets?.find((w) => w.name === "fitted");
      if (typeof fitted === "string" && widget && widget.value !== fitted) {
        widget.value = fitted;
        this.setDirtyCanvas?.(true, true);
      }
    };
  },
});
