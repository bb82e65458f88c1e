"""Paper experiments, one file each: recipes + calls + a committed table or figure."""

from .snip_table1 import reproduce_snip_table1

EXPERIMENTS = {"snip-table1": reproduce_snip_table1}

__all__ = ["EXPERIMENTS"]
