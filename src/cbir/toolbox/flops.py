"""FLOPs, MACs and parameter counts per module, measured with PyTorch's ``FlopCounterMode``.

**FLOPs = 2 x MACs**; only matmul-like ops are counted (docs/toolbox.md). A ``k x k`` conv to
``C_out x H x W`` costs ``C_out H W C_in k^2 / groups`` MACs. A module called twice counts
twice; counts are for the given batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopReport", "ModuleCost", "count_flops", "format_table", "parse_shape"]


@dataclass(frozen=True)
class ModuleCost:
    """One row: a module's qualified name (``""`` = the whole model), type, depth and costs."""

    name: str
    type: str
    depth: int
    params: int
    flops: int

    @property
    def macs(self) -> int:
        """Multiply-accumulates: ``flops // 2``."""
        return self.flops // 2


@dataclass
class FlopReport:
    """Per-module costs of one forward pass; ``rows[0]`` is the whole model."""

    input_shapes: list[tuple[int, ...]]
    rows: list[ModuleCost] = field(default_factory=list)

    @property
    def total(self) -> ModuleCost:
        """The whole-model row."""
        return self.rows[0]

    @property
    def flops(self) -> int:
        """Total FLOPs (2 per multiply-accumulate)."""
        return self.total.flops

    @property
    def macs(self) -> int:
        """Total multiply-accumulates."""
        return self.total.macs

    @property
    def params(self) -> int:
        """Total parameter count."""
        return self.total.params

    def table(self, depth: int = 2) -> str:
        """The text table down to ``depth`` levels of nesting (see :func:`format_table`)."""
        return format_table(self, depth)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` (also ``,`` or ``*`` separated) -> ``(1, 3, 224, 224)``."""
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 1x3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {text!r}: expected positive sizes, e.g. 1x3x224x224")
    return shape


def count_flops(model: nn.Module,
                inputs: torch.Tensor | Sequence[torch.Tensor] | tuple[int, ...]) -> FlopReport:
    """Run one forward pass (eval mode, no gradients) under ``FlopCounterMode``. ``inputs``: a
    tensor, a shape (for a random tensor), or tensors passed as one list (the pyramid necks)."""
    if isinstance(inputs, tuple) and all(isinstance(s, int) for s in inputs):
        param = next(model.parameters(), None)
        inputs = torch.randn(inputs, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        model.train(was_training)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # FlopCounterMode names modules "<RootClass>.<qualified.name>" and the whole run "Global".
    root = type(model).__name__
    rows = [ModuleCost("", root, 0, _n_params(model), int(counter.get_total_flops()))]
    for name, module in model.named_modules():
        if name:
            depth, flops = name.count(".") + 1, int(counts.get(f"{root}.{name}", 0))
            rows.append(ModuleCost(name, type(module).__name__, depth, _n_params(module), flops))
    shapes = [tuple(inputs.shape)] if isinstance(inputs, torch.Tensor) else [tuple(t.shape) for t in inputs]
    return FlopReport(shapes, rows)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_table(report: FlopReport, depth: int = 2) -> str:
    """A plain-text table: module, type, params, MACs, FLOPs, share of the total FLOPs.

    Costs in G, or M when the total is under 0.1 GFLOPs. Modules nested deeper than ``depth``
    are folded into their parents (0 = total only); rows without params or FLOPs are left out.
    """
    t = report.total
    total = max(report.flops, 1)
    unit, div = ("G", 1e9) if t.flops >= 1e8 else ("M", 1e6)
    header = ("module", "type", "params", f"{unit}MACs", f"{unit}FLOPs", "%FLOPs")

    def cells(name: str, r: ModuleCost, share: str) -> tuple[str, ...]:
        return (name, r.type, _fmt_int(r.params), f"{r.macs / div:.4f}", f"{r.flops / div:.4f}", share)

    shown = [r for r in report.rows[1:] if r.depth <= depth and (r.params or r.flops)]
    rows = [cells("  " * (r.depth - 1) + r.name, r, f"{100 * r.flops / total:.1f}") for r in shown]
    lines = [header, *rows, cells("total", t, "100.0")]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:  # the two text columns left-aligned, the numbers right
        cols = (c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cols).rstrip()

    rule = "  ".join("-" * w for w in widths)
    shapes = ", ".join("x".join(map(str, s)) for s in report.input_shapes)
    out = [fmt(lines[0]), rule, *(fmt(r) for r in lines[1:-1]), rule, fmt(lines[-1])]
    out.append(f"input {shapes}: {t.flops / div:.3f} {unit}FLOPs = {t.macs / div:.3f} {unit}MACs "
               f"(FLOPs = 2 x multiply-accumulates; conv/linear/matmul only), {_fmt_int(t.params)} params")
    return "\n".join(out)
