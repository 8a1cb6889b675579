// OneStep SR: seeds of this pack's nodes start as "fixed", not "randomize".
// The frontend gives every seed widget a control that defaults to "randomize" (no schema option sets the
// default in ComfyUI 0.3.x / frontend 1.2x), so every Queue would re-run the upscale although the seed
// rarely changes its result. Saved workflows keep their stored value: it is restored after nodeCreated.
import { app } from "../../scripts/app.js";

const PACK_PREFIX = "OneStepSR_";
const CONTROL_WIDGET = "control_after_generate";

app.registerExtension({
  name: "OneStepSR.FixedSeeds",
  nodeCreated(node) {
    const nodeType = node.comfyClass || node.type || "";
    if (!nodeType.startsWith(PACK_PREFIX)) return;
    for (const widget of node.widgets || []) {
      if (widget.name === CONTROL_WIDGET) widget.value = "fixed";
    }
  },
});
