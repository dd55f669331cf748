"""KSM itself: the knob table and the one write order (:mod:`.knobs`), the sysfs controller
(:class:`Ksm`), counters (:mod:`.stats`) and the one accounting model (:mod:`.accounting`), settle
detection (:mod:`.settle`), ksmd's CPU (:mod:`.ksmd`), the experiment lock (:mod:`.lock`), mergeable
memory for the caller (:mod:`.memory`), the per-process KSM view (:mod:`.process`), and the
trust-domain audit (:mod:`.audit`; ``AuditReader`` and ``AuditReport`` load on first use, they need
numpy; the function is ``udedup.ksm.audit.audit`` or ``udedup.audit``: here ``audit`` names the
module)."""
from ..host.fs import DEFAULT_PROCFS
from .accounting import RMAP_ITEM_BYTES
from .controller import DEFAULT_ROOT, Ksm
from .knobs import KnobSnapshot, KnobSpec
from .lock import LOCK_PATH, experiment_lock
from .stats import KsmStats

__all__ = ["DEFAULT_PROCFS", "DEFAULT_ROOT", "LOCK_PATH", "RMAP_ITEM_BYTES", "AuditReader",
           "AuditReport", "KnobSnapshot", "KnobSpec", "Ksm", "KsmStats", "experiment_lock"]

_AUDIT = ("AuditReader", "AuditReport")


def __getattr__(name: str):
    if name in _AUDIT:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.audit"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

