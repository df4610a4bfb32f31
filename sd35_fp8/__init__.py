"""The SD3.5 FP8 node pack as one importable package.

- `sd35_fp8.quant`: the FP8 engine, pure PyTorch + safetensors, never imports comfy (also a CLI:
  `python -m sd35_fp8.quant`);
- `sd35_fp8.nodes`: the ComfyUI nodes (they import comfy, so only ComfyUI imports them).

Importing this package imports neither.
"""
