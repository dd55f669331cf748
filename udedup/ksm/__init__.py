"""KSM itself: the knob table and the one write order (:mod:`.knobs`), the sysfs controller
(:class:`Ksm`), counters (:mod:`.stats`) and the one accounting model (:mod:`.accounting`), settle
detection (:mod:`.settle`), ksmd's CPU (:mod:`.ksmd`), the experiment lock (:mod:`.lock`), mergeable
memory for the caller (:mod:`.memory`), and the per-process KSM view (:mod:`.process`)."""
from ..host.fs import DEFAULT_PROCFS
from .accounting import RMAP_ITEM_BYTES
from .controller import DEFAULT_ROOT, Ksm
from .knobs import KnobSnapshot, KnobSpec
from .lock import LOCK_PATH, experiment_lock
from .stats import KsmStats

__all__ = ["DEFAULT_PROCFS", "DEFAULT_ROOT", "LOCK_PATH", "RMAP_ITEM_BYTES", "KnobSnapshot",
           "KnobSpec", "Ksm", "KsmStats", "experiment_lock"]

