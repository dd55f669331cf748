"""The estimator: predict what KSM would save before it runs, and why memory does not merge.

``udedup.estimate(pid)`` calls :func:`estimate`, while ``from udedup import estimate`` gives this
package (its classes and helpers): the package exports both under one name."""
import sys as _sys
import types as _types

from .core import (RMAP_ITEM_BYTES, Estimate, MappingReport, Prediction, TargetReport, estimate,
                   ksm_pages)

__all__ = ["estimate", "Estimate", "Prediction", "MappingReport", "TargetReport", "ksm_pages",
           "RMAP_ITEM_BYTES"]


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return estimate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
