"""Cohorts: find the scans, shard them, run the stages with resume, export BIDS derivatives.

Importing this package is cheap; the heavy modules load inside the functions.
"""

from volseg.cohort.inputs import Scan, discover
from volseg.cohort.shard import parse_shard, select_shard

__all__ = ["Scan", "discover", "parse_shard", "select_shard", "run_cohort", "gather"]


def __getattr__(name):  # lazy: run_cohort and gather pull in torch/nibabel when used
    if name == "run_cohort":
        from volseg.cohort.run import run_cohort

        return run_cohort
    if name == "gather":
        from volseg.cohort.tables import gather

        return gather
    raise AttributeError(name)
