"""A grid of recorded runs, the shape of most of the SNIP paper's experiments: named cells (a
recipe and what changes in it), each trained for every seed, recorded in the store under the
experiment's group, then summarised by the experiment's own table and figure.

A cell is selected by ``--rows`` under its name or any of its tags (a network, a method), so
``--rows lenet-300-100`` picks every cell of that network. The grid does what every experiment
must: the shortened check before anything trains, the runs side by side with progress, the
finished records per cell, and the figure written atomically beside the table.

    >>> cells = [Cell("a-snip", "snip-table1-lenet300-95", tags=("snip",)),
    ...          Cell("a-random", "snip-table1-lenet300-95", {"prune": {"method": "random"}}, tags=("random",))]
    >>> [c.name for c in select(cells, ["random"])]
    ['a-random']
    >>> [c.prune.method for c in configs_of(cells, seeds=[0], iterations=None)]
    ['snip', 'random']
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import RunConfig
from ..errors import SparsetrainError
from ..measure import Provenance
from ..recipes import recipe_path
from ..store import RunRecord, RunStore
from .common import ReproduceOptions, check_out, run_rows, shorten, shortened_reasons


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: its name (the run name in the store), the recipe it starts from, the
    changes to it (:meth:`RunConfig.replace` keyword arguments: ``prune`` and ``train`` take dicts
    of their own fields), the names that also select it, and what the table says of it."""

    name: str
    recipe: str
    changes: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    length: int | None = None

    def config(self) -> RunConfig:
        """The recipe with the changes, and, where the experiment fits a recipe to this machine
        (``length``), its length with the schedule compressed (:func:`shorten`): the experiment's
        own stated recipe, not a shortened reproduction."""
        base = RunConfig.from_toml(recipe_path(self.recipe))
        changes = dict(self.changes)
        for section in ("data_args", "model_args"):  # merged into the recipe's own, not replacing them
            if section in changes:
                changes[section] = {**getattr(base, section), **changes[section]}
        return shorten(base.replace(**changes, name=self.name), self.length)


def recipe_iterations(recipe: str) -> int:
    """The training length a bundled recipe states (what a fitted :class:`Cell` shortens)."""
    return RunConfig.from_toml(recipe_path(recipe)).train.iterations


def select(cells: list[Cell], rows: Iterable[str] | None) -> list[Cell]:
    """The cells named (or tagged) by ``rows``, in the grid's order; None: every cell. An unknown
    name raises :class:`SparsetrainError` listing the names and tags."""
    if rows is None:
        return list(cells)
    rows = list(rows)
    known = {c.name for c in cells} | {t for c in cells for t in c.tags}
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SparsetrainError(f"unknown row(s) {', '.join(unknown)}; rows are cell names "
                               f"({', '.join(c.name for c in cells)}) or tags ({', '.join(sorted(known - {c.name for c in cells}))})")
    wanted = set(rows)
    return [c for c in cells if c.name in wanted or wanted & set(c.tags)]


def configs_of(cells: list[Cell], seeds: Iterable[int], iterations: int | None) -> list[RunConfig]:
    """The run configs of ``cells`` for every seed, shortened to ``iterations`` (None: as the
    recipes) with :func:`shorten`."""
    seeds = list(seeds)
    return [shorten(c.config(), iterations).replace(seed=s) for c in cells for s in seeds]


@dataclass
class GridResult:
    """What a grid gave: per cell, its configs and finished records (seed order), why it is
    shortened (empty: full), the wall time, the provenance, and the failures."""

    cells: list[Cell]
    configs: dict[str, list[RunConfig]]
    records: dict[str, list[RunRecord]]
    shortened: list[str]
    seconds: float
    provenance: Provenance
    failures: list[str]

    def results(self, cell: str, key: str) -> list[float]:
        """``key`` of every finished run of ``cell`` (missing values left out)."""
        return [r.results[key] for r in self.records.get(cell, []) if (r.results or {}).get(key) is not None]

    def publish(self, out, lines: list[str], data: dict, iterations: str | None = None) -> str:
        """Write the experiment's table: ``lines`` (Markdown) with the grid's footer (iterations per
        run, or the experiment's own ``iterations`` text, and this invocation's wall time) and
        ``data`` (JSON, marked ``shortened`` when the grid is), with the provenance; returns the
        Markdown as written. The one way every grid experiment ends."""
        from ..measure import write_report

        if iterations is None:
            counts = sorted({c.train.iterations for cs in self.configs.values() for c in cs})
            iterations = f"Iterations per run: {', '.join(f'{n:,}' for n in counts)}"
        lines = [*lines, "", f"{iterations}. Wall time of this invocation {self.seconds / 60:.1f} min (runs already "
                             "in the store are not repeated)."]
        if self.shortened:
            data = {**data, "shortened": self.shortened}
        md, _ = write_report(out, "\n".join(lines), data, provenance=self.provenance)
        return md.read_text()


def run_grid(cells: list[Cell], options: ReproduceOptions, group: tuple[str, str]) -> GridResult:
    """Select ``options.rows`` of ``cells``, refuse a shortened table over a full one before
    anything trains, run every (cell, seed) recorded under ``group`` and return the finished
    records per cell."""
    chosen = select(cells, options.rows)
    configs = {c.name: configs_of([c], options.seeds, options.iterations) for c in chosen}
    full_lengths = [c.config().train.iterations for c in chosen]
    reasons = shortened_reasons(seeds=options.seeds, rows=[], default_rows=[],
                                iterations=options.iterations, recipe_iterations=full_lengths)
    if len(chosen) < len(cells):  # named as the user selected them (names or tags)
        reasons.append(f"rows {' '.join(options.rows)} ({len(chosen)} of {len(cells)} cells)")
    check_out(options, reasons)
    provenance = Provenance.now(options.command)
    started = time.time()
    flat = [c for cs in configs.values() for c in cs]
    finished, failures = run_rows(flat, options, group)
    records = {name: [finished[c.key()] for c in cs if c.key() in finished] for name, cs in configs.items()}
    return GridResult(chosen, configs, records, reasons, time.time() - started, provenance, failures)


def curves_of(store: str | Path, record: RunRecord) -> dict[str, list[tuple[int, float]]]:
    """The logged curves of a finished run (metric -> [(iteration, value)])."""
    return RunStore(store).metrics(record.key)


def raise_failures(failures: list[str]) -> None:
    """After the table is written: fail the command if any run failed (the others are recorded)."""
    if failures:
        raise SparsetrainError(f"{len(failures)} run(s) failed (the others are recorded): " + "; ".join(failures))
