"""udedup: measure, predict and control Linux KSM (Kernel Samepage Merging)."""
from .errors import *  # noqa: F401,F403  (the exception tree is part of the public API)
from .pages import PAGE_SIZE

__version__ = "0.1.0"
__all__ = ["PAGE_SIZE", "__version__"]
