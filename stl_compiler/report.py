"""The conversion report: what was converted, what stayed dense and why, at what cost."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SiteRow", "BoundaryRow", "STLReport", "WIDTH"]

#: the report's line width (a 100-column terminal)
WIDTH = 100
_NAME_WIDTH = 32


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
    stl_flops: int = 0  # what STL costs (or would cost, for a site kept dense by the guard)
    rel_error: float | None = None  # ‖STL − dense‖ / ‖dense‖ on the example inputs
    calls: int = 1  # call sites sharing these parameters
    dense_bytes: int = 0  # bytes model of docs/math.md
    stl_bytes: int = 0
    isolated: bool | None = None  # sequences batched together stay independent (converted)
    preconverted: bool = False  # an STLLinear the model already held (calibrated, trained)
    #: in a causal model, whether this converted site keeps it causal: "kept" (by the basis's
    #: structure), "round-off" (an exact basis) or "not kept"; None otherwise
    causal: str | None = None


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
    row_grouping: str | None = None  # the config's; pre-converted layers keep their own
    row_grouping_auto: bool = False  # row_grouping=None in the config, chosen for the model
    #: why the model counts as causal (passes/detect_causal.py); None: no causal attention found
    causal_model: str | None = None

    @property
    def converted(self) -> list[SiteRow]:
        """Sites that run STL: converted now or already STL in the model."""
        return [s for s in self.sites if s.converted]

    @property
    def skipped(self) -> list[SiteRow]:
        return [s for s in self.sites if not s.converted]

    def flops(self) -> tuple[int, int]:
        """(FLOPs of every matmul site run dense, FLOPs as compiled) on the example inputs;
        pre-converted STL layers count at the dense layer they replace and at their STL cost."""
        dense = sum(s.dense_flops for s in self.sites)
        after = sum(s.stl_flops if s.converted else s.dense_flops for s in self.sites)
        return dense, after

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes all sites move run dense, bytes as compiled), unfused (docs/math.md)."""
        dense = sum(s.dense_bytes for s in self.sites)
        after = sum(s.stl_bytes if s.converted else s.dense_bytes for s in self.sites)
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
        lines: list[str] = []
        if not self.converted:
            lines += _wrap("!!! NOTHING WAS CONVERTED: the model runs fully dense. Reasons below; "
                           "see STLConfig (targets, min_dim, max_cost_ratio, filter_fn, "
                           "overrides). !!!")
        width = min(max([len(s.name) for s in self.sites] + [4]), _NAME_WIDTH)
        header = (f"{'site':<{width}} {'kind':<6} {'shape (x @ w)':<21} {'t/r':<6} "
                  f"{'FLOPs':>6} {'rel.err':>8}  status")
        rule = "-" * min(max(len(header) + 10, 60), WIDTH)
        lines += [header, rule]
        for s in self.sites:
            shape = _abbreviate(f"{_fmt(s.x_shape)}@{_fmt(s.w_shape)}", 21)
            tr = f"{s.tile}/{s.rank}" if s.converted else "-"
            ratio = f"{s.stl_flops / s.dense_flops:.2f}x" if s.stl_flops and s.dense_flops \
                else "-"
            err = f"{s.rel_error:.2e}" if s.rel_error is not None else "-"
            status = ("STL (already)" if s.preconverted else "STL") if s.converted else "dense"
            if s.converted and s.isolated is False:
                status += ", rows mix"
            if s.converted and s.causal == "not kept":
                status += ", acausal"
            if s.calls > 1:
                status += f", {s.calls} calls"
            lines.append(f"{_abbreviate(s.name, width):<{width}} {s.kind:<6} {shape:<21} "
                         f"{tr:<6} {ratio:>6} {err:>8}  {status}")
            if s.reason:
                lines += _wrap(s.reason, indent="    ")
        lines.append(rule)
        acausal = any(s.causal == "not kept" for s in self.converted)
        lines += _wrap("legend: '-' = not applicable (t/r: site left dense; FLOPs: cost not "
                       "computed, the site was excluded before costing; rel.err: not measured). "
                       "FLOPs = STL / dense FLOPs of the site (for a dense site, what STL "
                       "would cost). rel.err = |STL - dense| / |dense| on the example inputs."
                       + (" acausal = in a causal model, a position's output depends on later "
                          "positions of its tile." if acausal else ""))
        lines += self._headline()
        if self.boundaries:
            lines += self._boundary_lines()
        return "\n".join(lines)

    def _headline(self) -> list[str]:
        now = sum(1 for s in self.sites if s.converted and not s.preconverted)
        already = sum(1 for s in self.sites if s.preconverted)
        dense, after = self.flops()
        bytes_dense, bytes_after = self.bytes_moved()
        text = (f"{now + already} of {len(self.sites)} matmul sites converted ({now} now, "
                f"{already} already STL in the model); whole model's matmul FLOPs "
                f"{_si(dense)} -> {_si(after)} ({self.flop_ratio:.3f}x)")
        if bytes_dense:
            text += (f", bytes moved {_si(bytes_dense, 'B')} -> {_si(bytes_after, 'B')} "
                     f"({bytes_after / bytes_dense:.2f}x, unfused)")
        lines = _wrap(text)
        if self.row_grouping is not None:
            lines += _wrap(self._isolation_line())
            lines += _wrap(self._causality_line())
        if self.model_rel_error is not None:
            lines.append(f"model output rel. error added by this conversion on the example "
                         f"inputs: {self.model_rel_error:.3e}")
        return lines

    @property
    def causality(self) -> str:
        """"not a causal model", "kept", "kept up to round-off" or "not kept": whether no
        position's output depends on a later position, over every STL site."""
        if self.causal_model is None:
            return "not a causal model"
        verdicts = {s.causal for s in self.converted}
        if "not kept" in verdicts:
            return "not kept"
        return "kept up to round-off" if "round-off" in verdicts else "kept"

    def _causality_line(self) -> str:
        verdict = self.causality
        if verdict == "not a causal model":
            return ("causal: not a causal model (no causal attention in the graph, no "
                    "decoder / causal-LM modules), so no causality to keep")
        if verdict == "not kept":
            leaking = [s.name for s in self.converted if s.causal == "not kept"]
            shown = ", ".join(leaking[:3]) + (" ..." if len(leaking) > 3 else "")
            return (f"causal: NOT kept: the model is causal ({self.causal_model}) and "
                    f"{len(leaking)} STL site(s) ({shown}) let a position's output depend on "
                    f"later positions of its tile (inexact basis with 'tokens' grouping, "
                    f"allow_non_causal=True)")
        how = ("exact basis: later rows of a tile cancel up to rounding"
               if verdict == "kept up to round-off"
               else "no STL site lets a position see a later one")
        return f"causal: {verdict} (the model is causal: {self.causal_model}; {how})"

    def _isolation_line(self) -> str:
        rows = ("the same position of t different sequences" if self.row_grouping == "batch"
                else "t consecutive positions of one sequence")
        mixing = [s.name for s in self.converted if s.isolated is False]
        if not mixing:
            verdict = "rows isolated: yes, each sequence's output is independent of its batch"
        else:
            verdict = (f"rows isolated: NO, {len(mixing)} STL site(s) mix the sequences of a "
                       f"tile ({', '.join(mixing[:3])}{' ...' if len(mixing) > 3 else ''}: "
                       f"'batch' grouping with ex/d that are not row-separable)")
        auto = (", chosen for this model: row_grouping=None in the config"
                if self.row_grouping_auto else "")
        return (f"row_grouping={self.row_grouping!r} (a tile's rows are {rows}{auto}); "
                f"{verdict}")

    def _boundary_lines(self) -> list[str]:
        edges = []
        for b in self.boundaries:
            shown = ", ".join(b.consumers[:3])
            more = f" (+{len(b.consumers) - 3})" if len(b.consumers) > 3 else ""
            edges.append(_abbreviate(f"{b.producer} -> {shown}{more}", 56))
        width = max(len("boundary (producer -> consumers)"), *map(len, edges))
        lines = ["", f"{'boundary (producer -> consumers)':<{width}} {'fusion':<11} "
                     f"{'bytes saved':>11}  note"]
        for edge, b in zip(edges, self.boundaries):
            row = f"{edge:<{width}} {b.kind:<11} {b.bytes_saved:>11}"
            if b.reason and len(row) + 2 + len(b.reason) <= WIDTH:
                lines.append(f"{row}  {b.reason}")
            else:
                lines.append(row)
                lines += _wrap(b.reason, indent="    ") if b.reason else []
        return lines


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _abbreviate(text: str, width: int) -> str:
    """``text`` cut to ``width`` in the middle ("encoder.lay...query"), ends kept readable."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return f"{text[:head]}...{text[len(text) - (width - 3 - head):]}"


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent or "  ",
                         break_long_words=True, break_on_hyphens=False)


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"
