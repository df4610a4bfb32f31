"""Which Linear layers become FP8: presets, variant detection, user patterns.

Names are ComfyUI key names relative to the diffusion model, without `.weight`
(`joint_blocks.12.x_block.mlp.fc1`). Only 2-D `.weight` tensors are candidates.

The presets' contents live in presets.py.

`pos_embed` (not a Linear: a [1, patches, hidden] sin-cos table, 9% of Medium) has the lowest
error per byte saved of any group, so SD3 models store it in FP8 with a scale of 1.0
(`quantize_unit_scale`); a user pattern matching `pos_embed` keeps it 16-bit.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .config import QuantConfig
from .presets import PRESET_PATTERNS

# Non-Linear tensors of SD3 models stored in FP8 with scale 1.0 unless a user pattern protects them.
UNIT_SCALE_TENSORS = ("pos_embed",)
GENERIC_KEYWORDS = ("embed", "final", "proj_out", "proj_in", "norm_out", "conv_in", "conv_out", "label_emb", "time_")


@dataclass(frozen=True)
class Pattern:
    line: int
    text: str
    match: Callable[[str], bool]


def parse_patterns(patterns: str | Iterable[str]) -> list[Pattern]:
    """One pattern per line: glob (`final_layer.*`) or `re:` regex. Blank lines and `#` comments skipped.

    An invalid pattern raises ValueError naming its line and text.
    """
    lines = patterns.splitlines() if isinstance(patterns, str) else list(patterns)
    parsed = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"protect_patterns line {number}: {text!r}"
        if text.startswith("re:"):
            expr = text[3:].strip()
            if not expr:
                raise ValueError(f"{where} is an empty regex; write e.g. re:joint_blocks\\.(0|1)\\. or remove the line")
            try:
                compiled = re.compile(expr)
            except re.error as err:
                raise ValueError(f"{where} is not a valid regex ({err}); fix it or use a glob like final_layer.*") \
                    from None
            parsed.append(Pattern(number, text, lambda name, c=compiled: c.search(name) is not None))
        else:
            if any(ch.isspace() for ch in text):
                raise ValueError(f"{where} contains whitespace; layer names have none (one pattern per line)")
            if text.count("[") != text.count("]"):
                raise ValueError(f"{where} has an unbalanced '[' in a glob; escape it or use re:")
            parsed.append(Pattern(number, text, lambda name, g=text: _glob_match(name, g)))
    return parsed


def _glob_match(name: str, glob: str) -> bool:
    return fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(f"{name}.weight", glob)


def linear_names(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Candidate layer names: keys ending in .weight with a 2-D shape, in file order."""
    return [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]


@dataclass(frozen=True)
class Variant:
    name: str | None  # sd35_large | sd35_medium | sd35_large_turbo | sd3_medium | None (not an MMDiT)
    depth: int = 0
    hidden: int = 0
    qk_norm: bool = False
    attn2_blocks: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.name is None:
            return "not an SD3 MMDiT"
        attn2 = f"x_block attn2 in blocks {self.attn2_blocks[0]}-{self.attn2_blocks[-1]}" if self.attn2_blocks \
            else "no attn2"
        return f"depth {self.depth}, hidden {self.hidden}, {'qk rms norm' if self.qk_norm else 'no qk norm'}, {attn2}"


def detect_variant(shapes: Mapping[str, tuple[int, ...]], hint: str = "") -> Variant:
    """SD3.5 variant from the weights' names and shapes; `hint` (file name, metadata) tells Turbo apart."""
    if "context_embedder.weight" not in shapes or "joint_blocks.0.x_block.attn.qkv.weight" not in shapes:
        return Variant(None)
    depth = 0
    while f"joint_blocks.{depth}.x_block.attn.qkv.weight" in shapes:
        depth += 1
    hidden = shapes["context_embedder.weight"][0]
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    attn2 = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    if attn2:
        name = "sd35_medium"
    elif qk_norm:
        name = "sd35_large_turbo" if "turbo" in hint.lower() else "sd35_large"
    else:
        name = "sd3_medium"
    return Variant(name, depth, hidden, qk_norm, attn2)


@dataclass
class ProtectionPolicy:
    rule: str
    protected: frozenset[str]
    warnings: list[str] = field(default_factory=list)
    variant: Variant = Variant(None)
    unit_scale: frozenset[str] = frozenset()  # non-Linear tensors to store in FP8 with scale 1.0
    reasons: dict[str, str] = field(default_factory=dict)  # protected layer -> the preset glob or pattern line
    by_preset: frozenset[str] = frozenset()  # protected by the preset (or generic rule) alone: a budget may demote

    def why_protected(self, name: str) -> str | None:
        """The rule that keeps layer `name` 16-bit, or None if it goes FP8."""
        return self.reasons.get(name, self.rule) if name in self.protected else None


def resolve_policy(config: QuantConfig, shapes: Mapping[str, tuple[int, ...]], hint: str = "") -> ProtectionPolicy:
    """The protection set for one model: preset (or auto-detected) plus the user's patterns.

    `shapes` maps every diffusion-model key (relative names) to its shape; no tensor data is needed,
    so meta-device models and unread files work alike.
    """
    names = linear_names(shapes)
    user = parse_patterns(config.protect_patterns)
    variant = detect_variant(shapes, hint)
    warnings: list[str] = []
    preset = config.protect_preset
    if preset == "auto":
        if variant.name is None:
            generic = {n for n in names if any(k in n for k in GENERIC_KEYWORDS)} | set(names[:1] + names[-1:])
            reasons = dict.fromkeys(generic, "generic rule: embedders, first and last layers")
            rule = (f"auto: generic rule (not an SD3 MMDiT): kept embedders, first and last Linear layers 16-bit "
                    f"({len(reasons)} layers)")
        else:
            chosen = variant.name if variant.name in PRESET_PATTERNS else "sd35_large"
            reasons = _preset_reasons(chosen, names)
            rule = f"auto: detected {variant.name} ({variant.describe()}); preset {chosen}"
    else:
        if preset != "none" and variant.name is None:
            raise ValueError(f"protect_preset: {preset} is for SD3.5 (MMDiT) models and this model is not one; "
                             "use protect_preset=auto (generic rule) or none")
        if preset != "none" and variant.name not in (preset, None) and {preset, variant.name} != \
                {"sd35_large", "sd35_large_turbo"}:
            warnings.append(f"protect_preset {preset} chosen but the weights look like {variant.name}")
        reasons = _preset_reasons(preset, names)
        rule = f"preset {preset}" + (f" ({variant.describe()})" if variant.name else "")
    tables = [n for n in UNIT_SCALE_TENSORS if variant.name is not None and len(shapes.get(n, ())) >= 2]
    by_preset = set(reasons)
    for pattern in user:
        matched = {n for n in names + tables if pattern.match(n)}
        if not matched:
            warnings.append(f"protect_patterns line {pattern.line}: {pattern.text!r} matches no layer")
        reasons.update(dict.fromkeys(matched, f"protect_patterns line {pattern.line}: {pattern.text}"))
        by_preset -= matched
    unit_scale = frozenset(n for n in tables if n not in reasons)
    if unit_scale:
        rule += f"; {', '.join(sorted(unit_scale))} FP8 (scale 1)"
    if user:
        rule += f"; plus {len(user)} user pattern(s)"
    return ProtectionPolicy(rule, frozenset(reasons), warnings, variant, unit_scale, reasons, frozenset(by_preset))


def _preset_reasons(preset: str, names: list[str]) -> dict[str, str]:
    """{layer: "preset <name>: <glob>"} for the preset's layers among `names`."""
    matches = ((n, next((g for g in PRESET_PATTERNS[preset] if _glob_match(n, g)), None)) for n in names)
    return {n: f"preset {preset}: {g}" for n, g in matches if g is not None}
