"""ComfyUI entry point of the SD3.5 FP8 node pack.

ComfyUI imports this folder as a package; only then are the nodes (and ComfyUI
itself) imported. The FP8 engine in quant/ works without ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
