"""Development tools: the ComfyUI test hosts, the tiny SD3.5 fixtures, workflows, the demo. Run as modules
(`python -m tools.demo`); nothing here ships to users."""
