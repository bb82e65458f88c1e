"""The one report writer: a Markdown file and its JSON twin, written atomically, each carrying the
provenance of the numbers in it (command, machine, date, load average when measuring began).

    >>> import json, tempfile, pathlib
    >>> from sparsetrain.measure import Provenance, write_report
    >>> prov = Provenance.now(["sparsetrain", "bench", "--model", "mlp-tiny"])  # before measuring
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> md, js = write_report(folder / "r.md", "# Result\\n\\n| a |\\n|---|\\n| 1 |\\n", {"a": 1}, provenance=prov)
    >>> md.read_text().splitlines()[-3].startswith("Command: `sparsetrain bench --model mlp-tiny`")
    True
    >>> sorted(json.loads(js.read_text()))
    ['a', 'provenance']

Why atomic: a report is often rewritten in place (``docs/results/``); an interrupted run must
leave the old file or the new one, never half of one. Why the load average: on a shared machine
it is the first thing that explains a surprising ratio, and it must be taken before the
measurement starts (hence :meth:`Provenance.now` is called by the caller, not by the writer).
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..fsio import atomic_write, atomic_write_many
from ..machine import cpu_model, machine_description

__all__ = ["Provenance", "load_average", "publish_report", "write_report"]


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or ``None`` where the system has none."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Provenance:
    """Where and when numbers were measured. Make it with :meth:`now` before measuring."""

    command: str
    machine: str
    cpu: str
    cores: int | None
    threads: int
    torch: str
    python: str
    date: str
    load_average: tuple[float, float, float] | None

    @classmethod
    def now(cls, argv: Sequence[str] | None = None) -> "Provenance":
        """The current machine, time and load; ``argv`` is the command (default ``sys.argv``)."""
        return cls(
            command=shlex.join(str(a) for a in (sys.argv if argv is None else argv)),
            machine=machine_description(),
            cpu=cpu_model(),
            cores=os.cpu_count(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=platform.python_version(),
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            load_average=load_average(),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["load_average"] = list(self.load_average) if self.load_average else None
        return d

    def markdown(self) -> str:
        """The footer lines (two trailing spaces: one line each in rendered Markdown)."""
        load = " ".join(str(x) for x in self.load_average) if self.load_average else "unknown"
        return "\n".join([
            f"Command: `{self.command}`  ",
            f"Machine: {self.machine}; {self.threads} torch thread{'s' if self.threads != 1 else ''}  ",
            f"Date: {self.date}; load average (1, 5, 15 min) at start: {load}",
        ])


def publish_report(out: str | Path | None, markdown: str, data: dict, *, provenance: Provenance) -> None:
    """What a benchmark does with its result: print ``markdown`` and the provenance footer to
    stdout, and, unless ``out`` is None, ``""`` or ``"-"``, write both files with
    :func:`write_report` and say where on stderr."""
    print(markdown + "\n\n" + provenance.markdown())
    if out not in (None, "", "-"):
        md, js = write_report(out, markdown, data, provenance=provenance)
        print(f"written to {md} and {js}", file=sys.stderr)


def write_report(path: str | Path, markdown: str, data: dict, *, provenance: Provenance | None) -> tuple[Path, Path]:
    """Write ``markdown`` to ``path`` and ``data`` as JSON beside it (same name, ``.json``); return
    both paths. Each file is written to a temporary name in the same folder and renamed over the
    target, so a reader sees the old file or the new one, never a partial one.

    ``provenance``: appended to the Markdown as a footer (``Command: / Machine: / Date:``) and
    stored in the JSON under ``"provenance"``; pass ``None`` only where ``markdown`` and ``data``
    already say where they come from. ``data`` must be JSON-serialisable (non-finite floats are
    written as ``null``; other objects by ``str``)."""
    md = Path(path)
    js = md.with_suffix(".json")
    if md.suffix == ".json":
        raise ValueError(f"write_report writes Markdown to {md} and JSON beside it; give a .md path")
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    payload = dict(_finite(data))
    if provenance is not None:
        text += "\n" + provenance.markdown() + "\n"
        payload.setdefault("provenance", provenance.to_dict())
    md.parent.mkdir(parents=True, exist_ok=True)
    js_text = json.dumps(payload, indent=1, default=str, allow_nan=False) + "\n"
    atomic_write_many([(js, lambda tmp: tmp.write_text(js_text)), (md, lambda tmp: tmp.write_text(text))],
                      what="report")
    return md, js


def _finite(x):
    """``x`` with NaN and infinities replaced by ``None`` (strict JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------- figures


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG to ``path`` atomically (site ``report``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()), what="report")
    return path


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png_beside(out: str | Path, suffix: str = "") -> Path:
    """The figure's path beside the table: ``<out stem><suffix>.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}{suffix}.png")
