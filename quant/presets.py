"""The protection presets: the layers each keeps 16-bit. Adding a preset is a line here; the config's choices, the
nodes' option lists and the CLI follow.

Preset contents come from the per-module sensitivity table (`make bench`, bench/README.md, section 6 "Sensitivity"):
the embedders and `final_layer` carry the largest error per byte saved and together are ~1% of Large's weights, so
all SD3.5 presets keep them 16-bit.
"""

from __future__ import annotations

# Kept 16-bit in every SD3.5 preset (x_embedder.proj is a Conv2d: listed so user-facing reports and the
# sensitivity table name it, it never becomes FP8 anyway).
SD35_BASE_PROTECTED = ("x_embedder.*", "t_embedder.*", "y_embedder.*", "context_embedder", "final_layer.*")
PRESET_PATTERNS: dict[str, tuple[str, ...]] = {
    "sd35_large": SD35_BASE_PROTECTED,
    "sd35_medium": SD35_BASE_PROTECTED,
    "sd35_large_turbo": SD35_BASE_PROTECTED,
    "none": (),
}
PRESETS: tuple[str, ...] = ("auto", *PRESET_PATTERNS)  # auto: detect the variant (policy.resolve_policy)
