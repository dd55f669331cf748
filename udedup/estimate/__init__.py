"""The estimator: predict what KSM would save before it runs, and why memory does not merge.

The data flow, one module each: :mod:`.passes` (every read of /proc and of memory: the scope,
then the pages, pass after pass) fills a :mod:`.scope`; :mod:`.group` forms candidate groups by
hash64, :mod:`.confirm` confirms them byte by byte, :mod:`.summary` counts them into the
:mod:`.model` result with the saving :mod:`.ranges`; :mod:`.kernel` reads the KSM knobs the
prediction is for; :mod:`.api` runs the steps. :mod:`.screen` is the cheap sampled look before a
full estimate, :mod:`.why` the per-mapping diagnosis.

``udedup.estimate(pid)`` calls :func:`estimate`, while ``from udedup import estimate`` gives this
package (its classes and helpers): the package exports both under one name."""
import sys as _sys
import types as _types

from ..ksm.accounting import RMAP_ITEM_BYTES, ksm_pages
from .api import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BYTES, default_threads, estimate
from .model import DomainReport, DomainSummary, Estimate, MappingReport, Prediction, TargetReport

__all__ = ["estimate", "Estimate", "Prediction", "MappingReport", "TargetReport", "DomainReport",
           "DomainSummary", "ksm_pages",
           "RMAP_ITEM_BYTES", "DEFAULT_CHUNK_BYTES", "DEFAULT_CACHE_BYTES", "default_threads"]


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return estimate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
