"""The dense-vs-pruned comparison: one set of rows for the model card, ``hf-vitprune report`` and the recipe.

Every place that shows a pruned model against its dense base builds its rows here and only
chooses the form (Markdown rows for the card, plain text for a terminal), so the numbers, the
ratios and the wording of a speed-up or slow-down are the same wherever they are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ..stats import ModelStats

MISSING = "—"  # a cell with nothing to show (no dense reference, no measurement)
_ASCII = str.maketrans({"×": "x", "—": "-"})  # plain text stays ASCII for any terminal


@dataclass(frozen=True)
class Row:
    """One line of the comparison: what is compared, its dense and pruned values, and pruned against dense."""

    name: str
    dense: str
    pruned: str
    ratio: str


# --------------------------------------------------------------------------- cells


def count(value: int) -> str:
    return f"{value:,}"


def metric(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def metric_change(dense: float | None, pruned: float | None) -> str:
    return MISSING if dense is None or pruned is None else f"{pruned - dense:+.4f}"


def fraction(pruned: float, dense: float) -> str:
    """``pruned / dense`` as a factor, e.g. ``0.833×``."""
    return f"{pruned / dense:.3f}×" if dense else "n/a"


def size_ratio(pruned: float, dense: float) -> str:
    """The factor and the relative change, e.g. ``0.811× (-18.9%)``."""
    return f"{pruned / dense:.3f}× ({(pruned / dense - 1) * 100:+.1f}%)" if dense else "n/a"


def latency_ratio(pruned_ms: float, dense_ms: float) -> str:
    """Pruned latency over dense latency, and how much faster or slower that is.

    ``0.800× (1.25× faster)`` or ``1.030× (1.03× slower)``: a slow-down is never written as
    a speed-up below one.
    """
    if not dense_ms or not pruned_ms:
        return "n/a"
    ratio = pruned_ms / dense_ms
    if ratio <= 1:
        return f"{ratio:.3f}× ({1 / ratio:.2f}× faster)"
    return f"{ratio:.3f}× ({ratio:.2f}× slower)"


def percent_removed(pruned: float, dense: float) -> str:
    return f"{(1 - pruned / dense) * 100:.1f}%" if dense else "n/a"


# --------------------------------------------------------------------------- rows


def metric_rows(dense: Mapping[str, float] | None, pruned: Mapping[str, float] | None) -> list[Row]:
    """One row per metric in either dict (sorted by name); the last cell is the change, pruned - dense."""
    dense, pruned = dense or {}, pruned or {}
    return [
        Row(name, metric(dense.get(name)), metric(pruned.get(name)), metric_change(dense.get(name), pruned.get(name)))
        for name in sorted(set(dense) | set(pruned))
    ]


def size_rows(dense: ModelStats | None, pruned: ModelStats) -> list[Row]:
    """Parameters, FLOPs, attention heads and MLP neurons; without ``dense`` only the pruned column is filled."""
    values = [
        ("Parameters", pruned.params, None if dense is None else dense.params, size_ratio),
        ("FLOPs per image", pruned.flops, None if dense is None else dense.flops, size_ratio),
        ("Attention heads", pruned.heads, None if dense is None else dense.heads, fraction),
        ("MLP neurons", pruned.neurons, None if dense is None else dense.neurons, fraction),
    ]
    if dense is not None and dense.embedding_width and pruned.embedding_width != dense.embedding_width:
        values.append(("Embedding width", pruned.embedding_width, dense.embedding_width, fraction))
    return [
        Row(name, MISSING if before is None else count(before), count(after),
            MISSING if before is None else ratio(after, before))
        for name, after, before, ratio in values
    ]


def speed_rows(speed: Mapping | None) -> list[Row]:
    """Latency and throughput from :func:`hf_vitprune.speed.measure_speed` output (no rows without it)."""
    if not speed:
        return []
    pruned, dense = speed["pruned"], speed.get("dense") or {}
    latency, throughput = dense.get("latency_ms"), dense.get("throughput")
    return [
        Row(
            f"Latency, batch {speed['batch_size_latency']} (ms)",
            MISSING if latency is None else f"{latency:.3f}",
            f"{pruned['latency_ms']:.3f}",
            MISSING if latency is None else latency_ratio(pruned["latency_ms"], latency),
        ),
        Row(
            f"Throughput, batch {speed['batch_size_throughput']} (images/s)",
            MISSING if throughput is None else f"{throughput:.1f}",
            f"{pruned['throughput']:.1f}",
            MISSING if throughput is None else fraction(pruned["throughput"], throughput),
        ),
    ]


def comparison_rows(
    dense: ModelStats | None,
    pruned: ModelStats,
    *,
    metrics_dense: Mapping[str, float] | None = None,
    metrics_pruned: Mapping[str, float] | None = None,
    speed: Mapping | None = None,
) -> list[Row]:
    """The whole comparison, in reading order: metrics (if any), sizes, then measured speed (if any)."""
    return [*metric_rows(metrics_dense, metrics_pruned), *size_rows(dense, pruned), *speed_rows(speed)]




# --------------------------------------------------------------------------- forms


def markdown_rows(rows: Sequence[Row]) -> list[dict]:
    """The rows as the card template reads them (``row.name``, ``row.dense``, ``row.pruned``, ``row.ratio``)."""
    return [asdict(row) for row in rows]


def text_table(
    rows: Sequence[Row],
    header: Sequence[str] = ("", "dense", "pruned", "pruned / dense"),
    *,
    dense: bool = True,
) -> str:
    """The rows as an aligned plain-text (ASCII) table; ``dense=False`` shows only the name and pruned columns.

    ``header`` names the columns shown: four, or two with ``dense=False``.
    """
    cells = [[row.name, row.dense, row.pruned, row.ratio] if dense else [row.name, row.pruned] for row in rows]
    if len(header) != (4 if dense else 2):
        raise ValueError(f"text_table needs {4 if dense else 2} column names with dense={dense}, got {list(header)}.")
    return plain_table([list(header), *cells])


def plain_table(lines: Sequence[Sequence[str]]) -> str:
    """Header line, a rule, then the lines: first column left-aligned, the others right-aligned, in ASCII."""
    lines = [[str(cell).translate(_ASCII) for cell in line] for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: Sequence[str]) -> str:
        aligned = (
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
        )
        return "  ".join(aligned).rstrip()

    return "\n".join([render(lines[0]), "  ".join("-" * width for width in widths), *map(render, lines[1:])])
