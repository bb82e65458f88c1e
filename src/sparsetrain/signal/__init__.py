"""Signal propagation in (sparse) networks: Jacobian singular values, input-output and layer by
layer (:mod:`.jsv`). See docs/signal.md."""

from .jsv import JSVStats, format_jsv_table, input_output_jsv, lanczos_extremes, layerwise_jsv, singular_values
from .isometry import IsometryReport, approximate_isometry_, isometry_penalty  # noqa: F401  (approximate isometry)

__all__ = [
    "JSVStats",
    "format_jsv_table",
    "input_output_jsv",
    "lanczos_extremes",
    "layerwise_jsv",
    "singular_values",
]
