"""Results of one run: samples per scenario and client, goals, the table, JSON and the chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OBJFS_FAMILY = "objfs"


@dataclass
class Goal:
    """``client``'s value compared with a reference, or with an absolute threshold.

    ref: "peers" (the best peer of this scenario), a client name, or None (absolute).
    For ratios, ``factor`` is the speed-up wanted (direction-aware); for absolutes, ``value``
    of ``metric`` (the primary metric or an extra) must satisfy ``op`` (">=" or "<=").
    An extra ``metric`` with a client as ``ref``: the ratio of the two clients' extras must
    satisfy ``op`` ``value``.
    """

    text: str
    client: str
    ref: str | None = "peers"
    factor: float = 1.0
    metric: str | None = None
    op: str = ">="
    value: float = 0.0
    outcome: str = "n/a"  # PASS / MISS / n/a
    detail: str = ""


@dataclass
class Scenario:
    sid: str
    title: str
    metric: str  # e.g. "MB/s"
    higher_is_better: bool
    samples: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # clients that count as peers

    def add(self, client: str, value: float, **extra: Any) -> None:
        self.samples.setdefault(client, []).append(value)
        for k, v in extra.items():
            self.extras.setdefault(client, {}).setdefault(k, []).append(v)

    def median(self, client: str) -> float | None:
        values = self.samples.get(client)
        return statistics.median(values) if values else None

    def extra_median(self, client: str, key: str) -> float | None:
        values = [v for v in self.extras.get(client, {}).get(key, []) if isinstance(v, int | float)]
        return statistics.median(values) if values else None

    def speedup(self, a: float, b: float) -> float:
        """How many times better ``a`` is than ``b`` in this scenario's direction."""
        if self.higher_is_better:
            return a / b if b else float("inf")
        return b / a if a else float("inf")

    def best_peer(self) -> tuple[str, float] | None:
        found = [(c, m) for c in self.peers if (m := self.median(c)) is not None]
        if not found:
            return None
        return (max if self.higher_is_better else min)(found, key=lambda cm: cm[1])

    def evaluate(self) -> None:
        for goal in self.goals:
            self._evaluate(goal)

    def _evaluate(self, goal: Goal) -> None:
        if goal.ref is None:
            value = self.median(goal.client) if goal.metric is None else self.extra_median(goal.client, goal.metric)
            if value is None:
                goal.outcome, goal.detail = "n/a", "not measured"
                return
            ok = value >= goal.value if goal.op == ">=" else value <= goal.value
            goal.outcome, goal.detail = ("PASS" if ok else "MISS"), f"{value:.3g} {goal.op} {goal.value:g}"
            return
        if goal.metric is not None:  # an extra of two clients: their ratio against ``value``
            a, b = self.extra_median(goal.client, goal.metric), self.extra_median(goal.ref, goal.metric)
            if a is None or not b:
                goal.outcome, goal.detail = "n/a", "not measured"
                return
            ok = a / b >= goal.value if goal.op == ">=" else a / b <= goal.value
            goal.outcome = "PASS" if ok else "MISS"
            goal.detail = f"{goal.metric} {a:.3g} vs {goal.ref} {b:.3g}: {a / b:.2f}x (want {goal.op} {goal.value:g}x)"
            return
        mine = self.median(goal.client)
        if goal.ref == "peers":
            best = self.best_peer()
            ref_name, ref_value = best if best else ("peers", None)
        else:
            ref_name, ref_value = goal.ref, self.median(goal.ref)
        if mine is None or ref_value is None:
            goal.outcome, goal.detail = "n/a", "not measured"
            return
        ratio = self.speedup(mine, ref_value)
        goal.outcome = "PASS" if ratio >= goal.factor else "MISS"
        goal.detail = f"{ratio:.2f}x {ref_name} (want >= {goal.factor:g}x)"


@dataclass
class Run:
    started: str
    command: str
    size: str
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def scenario(self, sid: str, title: str, metric: str, higher_is_better: bool, peers: list[str]) -> Scenario:
        sc = Scenario(sid, title, metric, higher_is_better, peers=peers)
        self.scenarios[sid] = sc
        return sc

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for sid, sc in self.scenarios.items():
            out["scenarios"][sid]["medians"] = {c: sc.median(c) for c in sc.samples}
            best = sc.best_peer()
            out["scenarios"][sid]["best_peer"] = best[0] if best else None
        return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _extras_text(sc: Scenario, client: str) -> str:
    parts = []
    for key in sorted(sc.extras.get(client, {})):
        m = sc.extra_median(client, key)
        if m is not None:
            parts.append(f"{key}={_fmt(m)}")
    return " ".join(parts)


def table_rows(sc: Scenario) -> list[list[str]]:
    best = sc.best_peer()
    rows = []
    for client, values in sc.samples.items():
        m = sc.median(client)
        ratio = "-" if not best or m is None else f"{sc.speedup(m, best[1]):.2f}x"
        spread = f"{_fmt(min(values))}-{_fmt(max(values))}" if len(values) > 1 else ""
        rows.append([client, _fmt(m), spread, str(len(values)), ratio, _extras_text(sc, client)])
    return rows


def print_report(run: Run) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for sc in run.scenarios.values():
        best = sc.best_peer()
        arrow = "higher is better" if sc.higher_is_better else "lower is better"
        table = Table(title=f"{sc.sid}. {sc.title} — {sc.metric}, {arrow}; ratio vs best peer "
                            f"({best[0] if best else 'none'})", title_justify="left")
        for col in ("client", f"median {sc.metric}", "min-max", "n", "vs best peer", "extras"):
            table.add_column(col)
        for row in table_rows(sc):
            table.add_row(*row, style="bold" if row[0].startswith(OBJFS_FAMILY) else None)
        console.print(table)
        for goal in sc.goals:
            colour = {"PASS": "green", "MISS": "red"}.get(goal.outcome, "yellow")
            console.print(f"  [{colour}]{goal.outcome}[/{colour}] {goal.text}: {goal.detail}")
        for note in sc.notes:
            console.print(f"  note: {note}")
    for note in run.notes:
        console.print(f"note: {note}")
    for failure in run.failures:
        console.print(f"[red]FAILED[/red] {failure}")


def write_json(run: Run, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run.to_json(), indent=1, default=str))


#: the axis ends at this multiple of the largest median: one outlier (a cold store's first answer,
#: seconds against milliseconds) would otherwise squash every bar to nothing
AXIS_MEDIANS = 1.6


def _label_and_clip(ax: Any, medians: list[float], tops: list[float]) -> None:
    """Write each median beside its bar; end the axis near the medians, naming any range cut off."""
    limit = AXIS_MEDIANS * max(medians, default=0.0)
    if limit <= 0:
        return
    ax.set_xlim(0, limit)
    for y, (median, top) in enumerate(zip(medians, tops, strict=True)):
        note = _fmt(median) + (f"  (max {_fmt(top)}, off the axis)" if top > limit else "")
        ax.text(min(top, limit) + limit * 0.01, y, note, va="center", fontsize=7)  # past the whisker


def draw_chart(run: Run, path: Path) -> None:
    """One horizontal bar chart per scenario (median, with the min-max range); objfs in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [sc for sc in run.scenarios.values() if sc.samples]
    if not scenarios:
        return
    cols = 3
    rows = (len(scenarios) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, sc in zip(axes.flat, scenarios, strict=False):
        clients = list(sc.samples)
        medians = [sc.median(c) or 0.0 for c in clients]
        lows = [m - min(sc.samples[c]) for c, m in zip(clients, medians, strict=True)]
        tops = [max(sc.samples[c]) for c in clients]
        highs = [t - m for t, m in zip(tops, medians, strict=True)]
        colours = ["tab:orange" if c.startswith(OBJFS_FAMILY) else "tab:gray" for c in clients]
        ax.barh(clients, medians, xerr=[lows, highs], color=colours)
        _label_and_clip(ax, medians, tops)
        ax.invert_yaxis()
        arrow = "→ better" if sc.higher_is_better else "← better"
        ax.set_title(f"{sc.sid}. {sc.title}", fontsize=9)
        ax.set_xlabel(f"{sc.metric} ({arrow})", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.axis("off")
    fig.suptitle(f"objfs benchmarks — {run.size} — {run.started}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
