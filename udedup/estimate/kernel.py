"""What the running kernel's KSM is set to, for the estimator and "why": read through one
:class:`~udedup.ksm.Ksm` built from the caller's roots, never a hidden default."""
from __future__ import annotations

import logging
import os

from ..errors import KsmError, UsageError
from ..host.fs import ProcFs
from ..ksm import DEFAULT_ROOT, Ksm

log = logging.getLogger(__name__)

#: max_page_sharing when the kernel's cannot be read (the kernel's own default)
DEFAULT_MAX_PAGE_SHARING = 256


def controller(ksm, procfs: ProcFs) -> Ksm:
    """``ksm`` as a controller: a :class:`Ksm` as is, a path as ``Ksm(root=path)``, None as the
    default root; ``procfs`` goes with it. Raises KsmError where there is no KSM."""
    if isinstance(ksm, Ksm):
        return ksm
    return Ksm(DEFAULT_ROOT if ksm is None else os.fspath(ksm), procfs=procfs.root)


def current_knobs(ksm, procfs: ProcFs, max_page_sharing: int | None = None):
    """(max_page_sharing, use_zero_pages or None) from the running kernel where readable:
    ``max_page_sharing`` given wins; unreadable knobs fall back to the kernel's defaults."""
    uzp = None
    try:
        ctl = controller(ksm, procfs)
        uzp = bool(ctl.get("use_zero_pages"))
        if max_page_sharing is None:
            max_page_sharing = int(ctl.get("max_page_sharing"))
    except (KsmError, OSError) as err:
        log.debug("estimate: KSM knobs not readable (%s); using defaults", err)
    if max_page_sharing is None:
        max_page_sharing = DEFAULT_MAX_PAGE_SHARING
    if int(max_page_sharing) < 2:
        raise UsageError(f"max_page_sharing must be at least 2, got {max_page_sharing}")
    return int(max_page_sharing), uzp


def ksm_state(ctl: Ksm) -> dict:
    """{"run", "use_zero_pages", "max_page_sharing"}, or {"error": why} where they are unreadable."""
    try:
        return {"run": ctl.get("run"), "use_zero_pages": bool(ctl.get("use_zero_pages")),
                "max_page_sharing": ctl.get("max_page_sharing")}
    except (KsmError, OSError) as err:
        return {"error": str(err)}
