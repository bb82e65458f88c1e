"""Steps-to-result studies (Lee, Ajanthan, Torr, Jaggi, ICLR 2021): how many steps K* a workload
needs to reach its goal error, per batch size and sparsity, over a fixed quasi-random plan of
metaparameters. ``workloads`` reads the ``dps-*`` recipes, ``plan`` makes the Sobol points,
``engine`` runs them as Optuna trials in worker processes, ``outcome`` is the record the engine
writes and the analysis reads."""

from sparsetrain.study.outcome import TRIAL_STATUSES, TrialOutcome, TrialStatus, steps_to_result
from sparsetrain.study.plan import plan_points
from sparsetrain.study.workloads import SEARCH_SPACE, Workload, load_workload

__all__ = ["SEARCH_SPACE", "TRIAL_STATUSES", "TrialOutcome", "TrialStatus", "Workload", "load_workload",
           "plan_points", "steps_to_result"]
