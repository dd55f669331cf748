"""KSM itself: the knob table and the one write order, the sysfs controller (:class:`Ksm`), counters
and the one accounting model, settle detection, ksmd's CPU, the experiment lock, mergeable memory
for the caller, and the per-process KSM view."""
from .controller import (DEFAULT_PROCFS, DEFAULT_ROOT, LOCK_PATH, RMAP_ITEM_BYTES, KnobSnapshot,
                         KnobSpec, Ksm, KsmStats, experiment_lock)

__all__ = ["DEFAULT_PROCFS", "DEFAULT_ROOT", "LOCK_PATH", "RMAP_ITEM_BYTES", "KnobSnapshot",
           "KnobSpec", "Ksm", "KsmStats", "experiment_lock"]
