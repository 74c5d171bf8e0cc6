// Shows the text a USV node sends to the UI (USV Report's summary, USV Accelerate's expected
// speedup) on the node itself, in a read-only box below its widgets. The box is never saved with
// the workflow, so the positional widget values of released nodes stay as they are.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = ["USVReport", "USVAccelerate"];
const WIDGET = "usv_text";

app.registerExtension({
  name: "USV.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      const value = Array.isArray(text) ? text.join("\n") : String(text);
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;
        widget.options = { ...(widget.options || {}), serialize: false };
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = value;
      this.setSize?.([Math.max(this.size[0], 360), this.computeSize()[1]]);
      app.graph?.setDirtyCanvas(true, false);
    };
  },
});
