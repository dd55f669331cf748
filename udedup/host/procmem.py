"""Transitional: the names of the old flat ``procmem`` module, now in maps/pagemap/remote/fs."""
from .fs import process_error as _translate  # noqa: F401
from .maps import Mapping, parse_smaps, read_mappings  # noqa: F401
from .pagemap import (PAGEMAP_BLOCK, PM_FILE, PM_PFN_MASK, PM_PRESENT, PM_SWAPPED,  # noqa: F401
                      open_pagemap, present_blocks, present_offsets, present_pages, read_pagemap,
                      zero_page_pfns)
from .parse import PF_KTHREAD  # noqa: F401
from .remote import DEFAULT_BUFFER_BYTES, RemoteReader, read_ahead  # noqa: F401
from .remote import aligned_buffer as _aligned_buffer  # noqa: F401
from .remote import page_runs as _runs  # noqa: F401
from .fs import ProcFs as _ProcFs


def check_process(pid, procfs="/proc"):
    _ProcFs(procfs).check_process(pid)


def comm(pid, procfs="/proc", default=None):
    return _ProcFs(procfs).comm(pid, default)


def ksm_stat(pid, procfs="/proc"):
    """Old shape: yes/no stay text."""
    out = _ProcFs(procfs).ksm_stat(pid)
    return {k: ("yes" if v is True else "no" if v is False else v) for k, v in out.items()}
