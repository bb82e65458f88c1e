"""Steps-to-result studies (Lee, Ajanthan, Torr, Jaggi, ICLR 2021): how many steps K* a workload
needs to reach its goal error, per batch size and sparsity, over a fixed quasi-random plan of
metaparameters. ``outcome`` is the record the engine writes and the analysis reads."""

from sparsetrain.study.outcome import TRIAL_STATUSES, TrialOutcome, TrialStatus, steps_to_result

__all__ = ["TRIAL_STATUSES", "TrialOutcome", "TrialStatus", "steps_to_result"]
