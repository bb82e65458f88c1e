"""Signal propagation in (sparse) networks: Jacobian singular values, input-output and layer by
layer (:mod:`.jsv`). See docs/signal.md."""

from .jsv import JSVStats, format_jsv_table, input_output_jsv, lanczos_extremes, layerwise_jsv, singular_values

__all__ = [
    "JSVStats",
    "format_jsv_table",
    "input_output_jsv",
    "lanczos_extremes",
    "layerwise_jsv",
    "singular_values",
]
