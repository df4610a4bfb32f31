"""What a quantization run did, layer by layer: the STRING output of every quantizing node."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .decision import ALREADY_FP8, FP8, PROTECTED, REPORTED, STORED_FP8, UNIT_SCALE

GIB = 1 << 30
# The action column of the text report, in the words its readers (and their workflows) know: a pos_embed table in
# FP8 is an fp8 row, a layer that arrived in FP8 is listed as kept.
LISTED = {FP8: "fp8", UNIT_SCALE: "fp8", PROTECTED: "protected", ALREADY_FP8: "kept"}


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.2f} MiB"


@dataclass
class LayerReport:
    """One tensor or Linear layer. `action`: what the run did with it, in the plan's words (quant.decision; a
    unit-scale table that stayed 16-bit is kept). `rel_error` is ||W_fp8 - W|| / ||W|| for rows stored in FP8."""

    name: str
    shape: tuple[int, ...]
    dtype_before: str
    dtype_after: str
    bytes_before: int
    bytes_after: int
    rel_error: float | None
    action: str

    def __post_init__(self) -> None:
        if self.action not in REPORTED:
            raise ValueError(f"action must be one of {REPORTED}, got {self.action!r}")

    @classmethod
    def of(cls, name: str, before: torch.Tensor, stored: torch.Tensor, stored_scale: torch.Tensor | None,
           error: float | None, action: str, scale_before: torch.Tensor | None = None) -> LayerReport:
        """The row of a tensor as it came in (`before`, with its own scale `scale_before` if it arrived in FP8) and
        as stored: the one place a report column is filled."""
        return cls(name, tuple(before.shape), str(before.dtype), str(stored.dtype), nbytes(before, scale_before),
                   nbytes(stored, stored_scale), error, action)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    rule: str = ""
    warnings: list[str] = field(default_factory=list)
    fp8_format: str = ""
    scaling: str = ""
    backend: str = "native"
    budget: dict | None = None  # a memory budget's summary (Plan.fit_budget)

    def add(self, layer: LayerReport) -> None:
        self.layers.append(layer)

    def _of(self, *actions: str) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action in actions]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def n_fp8(self) -> int:
        return len(self._of(*STORED_FP8))

    @property
    def n_already_fp8(self) -> int:
        """Layers that arrived in FP8 (a scaled FP8 file, a host's FP8 layer) and were passed through."""
        return len(self._of(ALREADY_FP8))

    @property
    def n_protected(self) -> int:
        return len(self._of(PROTECTED))

    @property
    def fp8_bytes(self) -> int:
        """Bytes of the FP8 layers after quantization (weights + scales)."""
        return sum(layer.bytes_after for layer in self._of(*STORED_FP8))

    def summary(self) -> str:
        mb = 1024 * 1024
        already = f"{self.n_already_fp8} already fp8, " if self.n_already_fp8 else ""
        return (f"{self.n_fp8} fp8, {already}{self.n_protected} protected; "
                f"{self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB ({self.ratio:.3f}x)")

    def to_text(self, max_layers: int | None = None) -> str:
        errors = [layer.rel_error for layer in self._of(*STORED_FP8) if layer.rel_error is not None]
        mean_error = sum(errors) / len(errors) if errors else 0.0
        lines = [
            f"rule: {self.rule}",
            f"format: {self.fp8_format} {self.scaling} (backend {self.backend})",
            f"layers: {self.summary()}",
            f"bytes: {self.bytes_before} -> {self.bytes_after}",
            f"fp8 layers: {self.fp8_bytes} bytes, relative error mean {mean_error:.4f} "
            f"max {max(errors, default=0.0):.4f}",
        ]
        if self.budget is not None:
            b = self.budget
            lines.append(f"memory budget: {format_bytes(b['budget_bytes'])} -> weights {format_bytes(b['bytes'])}; "
                         f"{len(b['kept_16bit'])} layer(s) kept 16-bit by the budget, {len(b['demoted'])} put in FP8; "
                         f"predicted output error {b['predicted_error']:.4f}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("name | shape | before -> after | bytes | rel_error | action")
        listed = self._of(*LISTED)
        for layer in listed[:max_layers]:
            err = f"{layer.rel_error:.4f}" if layer.rel_error is not None else "-"
            shape = "x".join(str(d) for d in layer.shape)
            lines.append(f"{layer.name} | {shape} | {layer.dtype_before.removeprefix('torch.')} -> "
                         f"{layer.dtype_after.removeprefix('torch.')} | {layer.bytes_before} -> {layer.bytes_after} | "
                         f"{err} | {LISTED[layer.action]}")
        if max_layers is not None and len(listed) > max_layers:
            lines.append(f"... {len(listed) - max_layers} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rule": self.rule, "fp8_format": self.fp8_format, "scaling": self.scaling, "backend": self.backend,
            "warnings": list(self.warnings), "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "ratio": self.ratio, "n_fp8": self.n_fp8, "n_already_fp8": self.n_already_fp8,
            "n_protected": self.n_protected, "fp8_bytes": self.fp8_bytes, "budget": self.budget,
            "layers": [asdict(layer) for layer in self.layers],
        }
