"""One read of the KSM counters and the figures derived from them, through the one accounting
model (:mod:`udedup.ksm.accounting`)."""
from __future__ import annotations

from dataclasses import dataclass

from . import accounting


@dataclass(frozen=True)
class KsmStats:
    """One read of every KSM counter.

    ``saved_bytes`` is the kernel's ``general_profit`` where it exists (5.19+ as a file), else the
    same formula rebuilt from the counters (:func:`accounting.general_profit`): ``(pages_sharing +
    ksm_zero_pages) * page_size - rmap_items * 64``, where the global rmap item count is recovered
    as ``pages_shared + pages_sharing + pages_unshared + pages_volatile`` (the kernel derives
    ``pages_volatile`` as the remainder of exactly that sum, so this is exact unless the kernel
    clamped ``pages_volatile`` at 0 in a racy read) and 64 is ``sizeof(struct ksm_rmap_item)`` on
    64-bit kernels.
    """

    timestamp: float
    page_size: int
    counters: dict[str, int]

    def counter(self, name: str) -> int:
        """Counter ``name``, 0 where this kernel has none."""
        return int(self.counters.get(name, 0))

    pages_shared = property(lambda self: self.counter("pages_shared"))
    pages_sharing = property(lambda self: self.counter("pages_sharing"))
    pages_unshared = property(lambda self: self.counter("pages_unshared"))
    pages_volatile = property(lambda self: self.counter("pages_volatile"))
    full_scans = property(lambda self: self.counter("full_scans"))
    pages_scanned = property(lambda self: self.counter("pages_scanned"))
    pages_skipped = property(lambda self: self.counter("pages_skipped"))
    ksm_zero_pages = property(lambda self: self.counter("ksm_zero_pages"))
    stable_node_chains = property(lambda self: self.counter("stable_node_chains"))
    stable_node_dups = property(lambda self: self.counter("stable_node_dups"))

    @property
    def general_profit(self) -> int | None:
        return self.counters.get("general_profit")

    @property
    def saved_pages(self) -> int:
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def rmap_items(self) -> int:
        return self.pages_shared + self.pages_sharing + self.pages_unshared + self.pages_volatile

    @property
    def saved_bytes(self) -> int:
        if self.general_profit is not None:
            return int(self.general_profit)
        return accounting.general_profit(self.pages_sharing, self.ksm_zero_pages, self.rmap_items,
                                         self.page_size)

    @property
    def sharing_ratio(self) -> float:
        return self.pages_sharing / self.pages_shared if self.pages_shared else 0.0

    def as_dict(self) -> dict:
        return {"timestamp": self.timestamp, "page_size": self.page_size,
                "counters": dict(self.counters), "saved_pages": self.saved_pages,
                "saved_bytes": self.saved_bytes, "sharing_ratio": self.sharing_ratio,
                "saved_bytes_source": ("general_profit" if self.general_profit is not None
                                       else "computed")}

    def _asdict(self) -> dict:  # for console.print_json
        return self.as_dict()
