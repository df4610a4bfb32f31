// SD3.5 FP8 frontend extension: picking a preset on the SD3.5 Sampler fills its widgets with the preset's
// values, so what the canvas shows is what runs. The preset table comes with the node's definition
// (input "preset", option "sd35_fp8_presets"), written once in nodes/sampling.py.
import { app } from "../../scripts/app.js";

const SAMPLER = "SD35FP8Sampler";
const PRESETS_KEY = "sd35_fp8_presets";

function applyPreset(node, values) {
  if (!values) return; // custom: the widgets are the settings
  for (const widget of node.widgets ?? []) {
    if (Object.prototype.hasOwnProperty.call(values, widget.name)) {
      widget.value = values[widget.name];
    }
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "sd35_fp8.sampler_presets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAMPLER) return;
    const presets = nodeData.input?.required?.preset?.[1]?.[PRESETS_KEY] ?? {};
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const preset = this.widgets?.find((w) => w.name === "preset");
      if (preset) {
        const callback = preset.callback;
        const node = this;
        preset.callback = function (value, ...rest) {
          applyPreset(node, presets[value]);
          return callback?.call(this, value, ...rest);
        };
      }
      return result;
    };
  },
});
