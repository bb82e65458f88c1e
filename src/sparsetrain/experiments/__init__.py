"""Paper experiments, one file each: recipes + calls + a committed table or figure."""

from .snip_table1 import reproduce_snip_table1
from .structured_cost import reproduce_structured_cost

EXPERIMENTS = {"snip-table1": reproduce_snip_table1, "structured-cost": reproduce_structured_cost}

__all__ = ["EXPERIMENTS"]
