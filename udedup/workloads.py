"""The A/B workloads at their documented place (``from udedup.workloads import preset``); they live
in :mod:`udedup.ab.workloads`."""
from .ab.workloads import (PRESETS, CommandWorkload, PidWorkload, SyntheticSpec,  # noqa: F401
                           SyntheticWorkload, preset)
