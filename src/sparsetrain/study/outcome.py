"""What one trial of a steps-to-result study came to: the plain record the analysis reads.

The engine (plan, workers, Optuna) and the analysis (K* against B, fits, plots) meet here and only
here: the engine turns each finished trial into a :class:`TrialOutcome`, the analysis takes a list
of them. Records are plain values (no tensors, no Optuna objects) so they serialise to JSON and can
as well come from Shallue et al.'s published measurements.

A trial's status is one of :data:`TRIAL_STATUSES`:

- ``complete``: a validation check reached the goal error; ``steps_to_result`` is that check's step.
- ``incomplete``: the step budget was spent without reaching the goal.
- ``infeasible``: training diverged (NaN or inf loss or error).
- ``stopped``: stopped early because it had passed the best K* already known for its point, so it
  could no longer lower K*; it did not reach the goal before it stopped.

Only ``complete`` trials count towards K*. Each status is stored on the trial's run in the run store
as one :class:`sparsetrain.store.RunStatus` (:data:`RUN_STATUS_OF`), the one run vocabulary.

>>> o = TrialOutcome("mnist-simple-cnn-sgd", 128, 0.9, 0, {"learning_rate": 0.1}, "complete", 300,
...                  [(100, 0.5), (200, 0.1), (300, 0.02)])
>>> o.reached_goal, steps_to_result([o, o._replace_status("incomplete")])
(True, 300)
"""

from __future__ import annotations

import dataclasses
import enum
import math

from sparsetrain.errors import SparsetrainError
from sparsetrain.store import RunStatus


class TrialStatus(enum.StrEnum):
    """How a trial ended, as the study sees it (see the module docstring)."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    INFEASIBLE = "infeasible"
    STOPPED = "stopped"


TRIAL_STATUSES: tuple[str, ...] = tuple(status.value for status in TrialStatus)

RUN_STATUS_OF: dict[str, str] = {
    TrialStatus.COMPLETE.value: RunStatus.STOPPED.value,  # stopped on purpose at the goal
    TrialStatus.INCOMPLETE.value: RunStatus.FINISHED.value,  # trained to the end of its budget
    TrialStatus.INFEASIBLE.value: RunStatus.INFEASIBLE.value,
    TrialStatus.STOPPED.value: RunStatus.STOPPED.value,  # stopped on purpose past the best K*
}
"""The run-store status each trial status is recorded under (both complete and early-stopped
trials end on purpose before their budget; the trial status itself is kept in the run's summary)."""


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """One trial: its point (workload, batch size, sparsity), its place in the plan, its
    metaparameters, how it ended, and its whole validation curve as ``(step, error)`` pairs."""

    workload: str
    batch_size: int
    sparsity: float
    plan_index: int
    params: dict
    status: str
    steps_to_result: int | None
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in TRIAL_STATUSES:
            raise SparsetrainError(
                f"trial status {self.status!r} is not one of {', '.join(TRIAL_STATUSES)}; "
                "use sparsetrain.study.outcome.TrialStatus"
            )
        if (self.status == TrialStatus.COMPLETE) != (self.steps_to_result is not None):
            raise SparsetrainError(
                f"a {self.status} trial must {'' if self.status == TrialStatus.COMPLETE else 'not '}"
                f"have steps_to_result (got {self.steps_to_result!r}); only complete trials reach the goal"
            )

    @property
    def reached_goal(self) -> bool:
        return self.status == TrialStatus.COMPLETE

    @property
    def point(self) -> tuple[str, int, float]:
        """The (workload, batch size, sparsity) this trial measures K* for."""
        return (self.workload, self.batch_size, self.sparsity)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the curve as lists); :meth:`from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["curve"] = [[int(s), _json_float(e)] for s, e in self.curve]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrialOutcome:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise SparsetrainError(f"trial outcome has unknown fields {unknown}; expected {sorted(fields)}")
        data = dict(data)
        data["curve"] = [(int(s), float("nan") if e is None else float(e)) for s, e in data.get("curve", [])]
        return cls(**data)

    def _replace_status(self, status: str) -> TrialOutcome:
        """A copy with another status (steps_to_result kept only for ``complete``); for tests and docs."""
        return dataclasses.replace(
            self, status=status, steps_to_result=self.steps_to_result if status == TrialStatus.COMPLETE else None
        )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def steps_to_result(outcomes: list[TrialOutcome]) -> int | None:
    """K* of one point: the fewest steps over its complete trials, or None if none completed."""
    steps = [o.steps_to_result for o in outcomes if o.reached_goal]
    return min(steps) if steps else None
