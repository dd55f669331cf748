"""The one KSM accounting model: what the kernel's counters read once a set of identical pages has
merged, and what a merged page costs and saves. The estimator, the A/B workloads and the tests all
predict counters through here.

A KSM page holds at most ``max_page_sharing`` mappings. ksmd fills one before it starts the next
(a "dup" in a stable node chain), and a new one starts only when two leftover pages meet in the
unstable tree, so a leftover of a single page stays unshared. Measured on 6.18: 600 identical pages
at 256 -> pages_shared 3, pages_sharing 597; 33 at 16 -> 2 / 30 / 1 unshared; 1 GiB of one content
-> 1024 / 261120.
"""
from __future__ import annotations

import os

#: kernel memory per page KSM tracks (struct ksm_rmap_item on x86_64): general_profit subtracts it
RMAP_ITEM_BYTES = 64


def ksm_pages(group_sizes, max_page_sharing: int) -> tuple[int, int, int]:
    """``(pages_shared, pages_sharing, pages_unshared)`` KSM settles at for groups of equal pages
    of the given sizes."""
    import numpy as np  # here, not at the top: status and the daemon's walks need no numpy
    sizes = np.asarray(group_sizes, dtype=np.int64)
    sizes = sizes[sizes > 0]
    full, rest = np.divmod(sizes, max_page_sharing)
    extra = rest >= 2
    shared = int(full.sum() + extra.sum())
    sharing = int((full * (max_page_sharing - 1)).sum() + (rest - 1)[extra].sum())
    unshared = int((rest == 1).sum())
    return shared, sharing, unshared


def sharing_fraction(group_sizes, max_page_sharing: int) :
    """Per page of a group of each size, its share of the group's pages_sharing (for attributing
    a saving to the processes and ranges that hold the group)."""
    import numpy as np
    sizes = np.asarray(group_sizes, dtype=np.int64)
    full, rest = np.divmod(sizes, max_page_sharing)
    sharing = full * (max_page_sharing - 1) + np.where(rest >= 2, rest - 1, 0)
    return np.divide(sharing, sizes, out=np.zeros(sizes.shape), where=sizes > 0)


def general_profit(pages_sharing: int, ksm_zero_pages: int, rmap_items: int,
                   page_size: int) -> int:
    """The kernel's general_profit: bytes saved less the rmap items' kernel memory (can be < 0)."""
    return (int(pages_sharing) + int(ksm_zero_pages)) * page_size - int(rmap_items) * RMAP_ITEM_BYTES


def profit_overcount_bytes(pages_shared: int, page_size: int | None = None) -> int:
    """How much the sum of all process profits exceeds the real saving: every KSM page's own
    mapping is counted in ``ksm_merging_pages`` although it saves nothing."""
    return int(pages_shared) * (page_size or os.sysconf("SC_PAGE_SIZE"))
