"""Figures that fault tests measure (faults injected, bytes verified), for the lead to quote.

``report`` prints a ``FAULTS injected=N verified_bytes=M ...`` line (``pytest -s`` shows it as it
happens); conftest's ``pytest_terminal_summary`` prints every line again at the end of any run,
with their total, and writes them to ``build/faults-summary.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent.parent / "build" / "faults-summary.txt"


@dataclass
class FaultFigures:
    test: str
    injected: int
    verified_bytes: int
    kinds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        kinds = ",".join(f"{k}:{n}" for k, n in sorted(self.kinds.items()))
        return f"FAULTS injected={self.injected} verified_bytes={self.verified_bytes} test={self.test} kinds={kinds}"


RECORDED: list[FaultFigures] = []
#: other figures, one line each (``FUZZ inputs=N ...``, ``SOAK ...``), shown with the fault lines
NOTES: list[str] = []


def note(line: str) -> None:
    NOTES.append(line)
    print(line, flush=True)


def report(test: str, faults: dict[str, int], verified_bytes: int) -> FaultFigures:
    figures = FaultFigures(test, sum(faults.values()), verified_bytes, dict(faults))
    RECORDED.append(figures)
    print(figures.line(), flush=True)
    return figures


def summary_lines() -> list[str]:
    if not RECORDED:
        return list(NOTES)
    total = FaultFigures("TOTAL", sum(f.injected for f in RECORDED), sum(f.verified_bytes for f in RECORDED))
    for f in RECORDED:
        for kind, n in f.kinds.items():
            total.kinds[kind] = total.kinds.get(kind, 0) + n
    return [f.line() for f in RECORDED] + [total.line()] + NOTES


def write_summary() -> None:
    lines = summary_lines()
    if lines:
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text("\n".join(lines) + "\n")
