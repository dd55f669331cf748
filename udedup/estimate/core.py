"""Transitional: the estimator's old single module, now split (see the package docstring).
Callers outside the package import from :mod:`udedup.estimate`; this goes once they do."""
from .api import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BYTES, default_threads, estimate  # noqa: F401,F811
from .model import Estimate, MappingReport, Prediction, TargetReport  # noqa: F401
from ..ksm.accounting import RMAP_ITEM_BYTES, ksm_pages  # noqa: F401
