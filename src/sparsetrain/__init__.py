"""sparsetrain: sparse neural networks from the start.

Find a sparse network at initialization with SNIP, train it, record and resume runs::

    import sparsetrain as st
    loaders = st.create_loaders("mnist", batch_size=100)
    model = st.create_model("lenet-300-100")
    mask = st.prune_at_init(model, "snip", sparsity=0.95, batches=next(iter(loaders.train)))
    st.apply_mask_(model, mask)
    result = st.train(model, loaders, st.TrainConfig(iterations=5000), hooks=[st.GradientMask(model, mask)])

A recorded run (``st.run(config)``, ``sparsetrain run``) comes back with ``st.load_run(key)``: its
trained model, mask and record.
"""

from .config import PruneConfig, RunConfig, TrainConfig
from .data import create_loaders, list_datasets
from .errors import SparsetrainError
from .init import initialize_, list_inits
from .inspect_run import LoadedRun, load_run
from .masks import GradientMask, Mask, apply_mask_, format_sparsity_table, load_mask, mask_summary, overall_sparsity, save_mask
from .models import create_model, list_models
from .pruning import ScoreContext, connection_sensitivity, list_methods, prune_at_init, register_method
from .run import RunOutcome, run
from .sparse import format_sparse_report, load_sparse, save_sparse, sparse_report, to_sparse
from .store import RunGroup, RunStatus, RunStore
from .train.loop import Callback, StopAtGoal, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "GradientMask",
    "LoadedRun",
    "Mask",
    "RunGroup",
    "RunStatus",
    "ScoreContext",
    "StopAtGoal",
    "register_method",
    "PruneConfig",
    "RunConfig",
    "RunOutcome",
    "RunStore",
    "SparsetrainError",
    "TrainConfig",
    "TrainResult",
    "apply_mask_",
    "connection_sensitivity",
    "create_loaders",
    "create_model",
    "evaluate",
    "format_sparsity_table",
    "initialize_",
    "list_datasets",
    "list_inits",
    "list_methods",
    "list_models",
    "load_mask",
    "load_run",
    "mask_summary",
    "overall_sparsity",
    "prune_at_init",
    "run",
    "save_mask",
    "format_sparse_report",
    "load_sparse",
    "save_sparse",
    "sparse_report",
    "to_sparse",
    "train",
]
