"""The hot path's public face: batched per-page kernels over any contiguous buffer.

Kept at ``udedup.pages`` for users and scripts; the wrappers live in :mod:`udedup.native`, the only
package that touches the compiled extension."""
from .native.pages import *  # noqa: F401,F403
from .native.pages import __all__  # noqa: F401
