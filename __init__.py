"""ComfyUI entry point of the SD3.5 FP8 node pack (V3: `comfy_entrypoint`).

ComfyUI imports this folder as a package; only then are the nodes (and ComfyUI
itself) imported. The FP8 engine in quant/ works without ComfyUI. `web/` holds the
frontend extension (the sampler's presets fill its widgets) and the nodes' help pages.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
