"""The conversion report: what was converted, what stayed dense and why, at what cost."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SiteRow", "BoundaryRow", "STLReport"]


@dataclass
class SiteRow:
    """One matmul site of the model."""

    name: str
    kind: str  # "linear" | "matmul"
    op: str  # the aten op found in the graph
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    converted: bool
    reason: str = ""  # why it stayed dense; empty when converted
    tile: int | None = None
    rank: int | None = None
    basis: str | None = None
    dense_flops: int = 0
    stl_flops: int = 0
    rel_error: float | None = None  # ‖STL − dense‖ / ‖dense‖ on the example inputs
    calls: int = 1  # call sites sharing these parameters


@dataclass
class BoundaryRow:
    """One decode → encode boundary between STL sites (filled by the fusion pass)."""

    producer: str
    consumers: list[str]
    kind: str  # "algebraic" | "elementwise" | "row-strip" | "not fused"
    reason: str = ""
    bytes_saved: int = 0


@dataclass
class STLReport:
    """Per-site conversion report, attached to compiled modules as ``module.stl_report``."""

    sites: list[SiteRow] = field(default_factory=list)
    boundaries: list[BoundaryRow] = field(default_factory=list)
    model_rel_error: float | None = None
    pass_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def converted(self) -> list[SiteRow]:
        return [s for s in self.sites if s.converted]

    @property
    def skipped(self) -> list[SiteRow]:
        return [s for s in self.sites if not s.converted]

    def flops(self) -> tuple[int, int]:
        """(dense FLOPs of all sites, FLOPs after conversion) on the example inputs."""
        dense = sum(s.dense_flops for s in self.sites)
        after = sum(s.stl_flops if s.converted else s.dense_flops for s in self.sites)
        return dense, after

    @property
    def flop_ratio(self) -> float:
        """FLOPs of the matmul sites after conversion over before (1.0 when none converted)."""
        dense, after = self.flops()
        return after / dense if dense else 1.0

    def to_json(self, **kwargs: Any) -> str:
        data = asdict(self)
        data["flop_ratio"] = self.flop_ratio
        return json.dumps(data, **kwargs)

    def __str__(self) -> str:
        lines = []
        if not self.converted:
            lines.append("!!! NOTHING WAS CONVERTED: the model runs fully dense. Reasons below; "
                         "see STLConfig (targets, min_dim, filter_fn, overrides). !!!")
        width = max([len(s.name) for s in self.sites] + [4])
        header = f"{'site':<{width}} {'kind':<6} {'shape (x @ w)':<26} {'t/r':<6} " \
                 f"{'FLOPs':>8} {'rel.err':>8}  status"
        lines += [header, "-" * len(header)]
        for s in self.sites:
            shape = f"{_fmt(s.x_shape)}@{_fmt(s.w_shape)}"
            tr = f"{s.tile}/{s.rank}" if s.converted else "-"
            ratio = f"{s.stl_flops / s.dense_flops:.2f}x" if s.converted and s.dense_flops else "-"
            err = f"{s.rel_error:.2e}" if s.rel_error is not None else "-"
            status = "STL" if s.converted else f"dense: {s.reason}"
            if s.calls > 1:
                status += f" (shared by {s.calls} calls)"
            lines.append(f"{s.name:<{width}} {s.kind:<6} {shape[:26]:<26} {tr:<6} {ratio:>8} "
                         f"{err:>8}  {status}")
        dense, after = self.flops()
        lines.append("-" * len(header))
        lines.append(f"{len(self.converted)} of {len(self.sites)} sites converted; matmul FLOPs "
                     f"{dense / 1e6:.2f}M -> {after / 1e6:.2f}M ({self.flop_ratio:.3f}x)")
        if self.model_rel_error is not None:
            lines.append(f"model output rel. error added by this conversion on the example "
                         f"inputs: {self.model_rel_error:.3e}")
        if self.boundaries:
            edges = []
            for b in self.boundaries:
                shown = ", ".join(b.consumers[:3])
                more = f" (+{len(b.consumers) - 3})" if len(b.consumers) > 3 else ""
                edges.append(f"{b.producer} -> {shown}{more}")
            width = max(len("boundary (producer -> consumers)"), *map(len, edges))
            lines.append("")
            lines.append(f"{'boundary (producer -> consumers)':<{width}} {'fusion':<12} "
                         f"{'bytes saved':>12}  note")
            for edge, b in zip(edges, self.boundaries):
                lines.append(f"{edge:<{width}} {b.kind:<12} {b.bytes_saved:>12}  {b.reason}")
        return "\n".join(lines)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)
