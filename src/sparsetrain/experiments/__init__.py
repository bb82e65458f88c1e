"""Paper experiments, one file each: recipes -> recorded runs -> a committed table or figure.

Add one with a file here that registers ``reproduce(options)`` in :data:`EXPERIMENTS` and an
import below; ``sparsetrain reproduce NAME`` then runs it.
"""

from . import snip_memorization, snip_prune_batch, snip_sparsity, snip_table1, snip_table2, snip_table3, snip_visualize, structured_cost  # noqa: F401  (importing the experiments registers them)
from . import spp_transfer, spp_unsupervised  # noqa: F401  (signal-propagation paper, experiments 4 and 5)
from . import spp_init, spp_isometry, spp_sparsity  # noqa: F401  (signal-propagation paper, experiments 1, 2, 3 and 6)
from . import spp_table1  # noqa: F401  (beyond the papers: Table 1 rows with the signal-propagation repairs)
from .common import EXPERIMENTS, ReproduceOptions

__all__ = ["EXPERIMENTS", "ReproduceOptions"]
