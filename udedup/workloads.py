"""The A/B workloads at their documented place (``from udedup.workloads import preset``); they live
in :mod:`udedup.ab.workloads` (the workloads) and :mod:`udedup.ab.synthetic` (the built-in mix)."""
from .ab.synthetic import PRESETS, SyntheticSpec, preset  # noqa: F401
from .ab.workloads import CommandWorkload, PidWorkload, SyntheticWorkload  # noqa: F401
from .ab.vms import VmSpec, VmWorkload  # noqa: F401,E402
