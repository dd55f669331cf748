"""The built-in workload described, pure: :class:`SyntheticSpec` (a mix of zero, duplicate, unique
and volatile pages), the named :data:`PRESETS`, the seeded :class:`Layout` of which page is which
(shared by the child that writes it and the parent that predicts it) and :func:`expected_counters`,
what KSM should report once the layout has merged."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..ksm.accounting import ksm_pages
from ..units import parse_size as parse_bytes

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

ZERO, DUPLICATE, UNIQUE, VOLATILE = 0, 1, 2, 3
KIND_NAMES = ("zero", "duplicate", "unique", "volatile")


@dataclass(frozen=True)
class SyntheticSpec:
    """A buffer of ``size`` bytes made of four kinds of pages, placed at random (seeded).

    - zero: all-zero pages, really allocated (written once), as freed guest memory is;
    - duplicate: groups of identical random pages, group sizes drawn from ``group_sizes``;
    - unique: random pages, never equal to another;
    - volatile: random pages whose first word is rewritten ``volatile_hz`` times a second, so ksmd
      sees their checksum change and never merges them.
    """

    size: int
    zero: float
    duplicate: float
    unique: float
    volatile: float
    group_sizes: tuple[int, ...] = (2, 4, 16, 64)
    volatile_hz: float = 2.0
    seed: int = 0
    name: str = "custom"

    def validate(self, page_size: int = PAGE_SIZE) -> "SyntheticSpec":
        fractions = {"zero": self.zero, "duplicate": self.duplicate, "unique": self.unique,
                     "volatile": self.volatile}
        for key, value in fractions.items():
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise UsageError(f"workload fraction {key}={value!r} must be between 0 and 1")
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise UsageError(f"workload fractions add up to {total:g}, not 1 (zero {self.zero:g} + "
                             f"duplicate {self.duplicate:g} + unique {self.unique:g} + volatile "
                             f"{self.volatile:g}); adjust them")
        if self.size < page_size or self.size % page_size:
            raise UsageError(f"workload size {self.size} must be a positive multiple of the page "
                             f"size ({page_size} bytes)")
        if not self.group_sizes or any(int(g) != g or g < 2 for g in self.group_sizes):
            raise UsageError(f"duplicate group sizes {list(self.group_sizes)} must be integers >= 2")
        if not (self.volatile_hz > 0 and math.isfinite(self.volatile_hz)):
            raise UsageError(f"volatile rewrite rate {self.volatile_hz!r} Hz must be a positive number")
        return self

    def pages(self, page_size: int = PAGE_SIZE) -> int:
        return self.size // page_size

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["group_sizes"] = list(self.group_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticSpec":
        d = dict(d)
        d["group_sizes"] = tuple(int(g) for g in d.get("group_sizes", (2,)))
        return cls(**d)


#: Named mixes. Sizes come from the caller; these are the proportions and group sizes.
PRESETS: dict[str, dict] = {
    # a bit of everything: the quick default
    "mixed": dict(zero=0.20, duplicate=0.40, unique=0.30, volatile=0.10,
                  group_sizes=(2, 4, 16, 64), volatile_hz=2.0),
    # mostly zero pages, as a freshly booted or idle-after-free heap
    "zero-heavy": dict(zero=0.70, duplicate=0.10, unique=0.15, volatile=0.05,
                       group_sizes=(2, 8), volatile_hz=2.0),
    # several guests of one image: free guest RAM is zero, OS and library pages repeat once per
    # guest (groups of 4-8), application data is unique
    "vm-like": dict(zero=0.35, duplicate=0.35, unique=0.25, volatile=0.05,
                    group_sizes=(4, 4, 4, 8), volatile_hz=1.0),
    # the control: no zero pages at all, so use_zero_pages should change nothing
    "no-zero": dict(zero=0.0, duplicate=0.60, unique=0.30, volatile=0.10,
                    group_sizes=(2, 4, 16, 64), volatile_hz=2.0),
}


def preset(name: str, size: int, seed: int = 0) -> SyntheticSpec:
    """The preset ``name`` at ``size`` bytes."""
    if name not in PRESETS:
        raise UsageError(f"unknown workload preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SyntheticSpec(size=int(size), seed=int(seed), name=name, **PRESETS[name]).validate()


def parse_size(text: str, page_size: int = PAGE_SIZE) -> int:
    """``"256M"``, ``"1G"``, ``"64MiB"``, ``"4096"`` -> bytes, rounded down to whole pages."""
    raw = str(text).strip()
    try:
        nbytes = parse_bytes(raw) // page_size * page_size
    except ValueError:
        raise UsageError(f"size {raw!r} is not a size; write e.g. 256M, 1G or 65536") from None
    if nbytes < page_size:
        raise UsageError(f"size {raw!r} is smaller than one page ({page_size} bytes)")
    return nbytes


# --- layout: pure, shared by the child and the expectations ---------------------------------------
@dataclass(frozen=True)
class Layout:
    kinds: np.ndarray        # uint8 per page: ZERO, DUPLICATE, UNIQUE, VOLATILE
    group: np.ndarray        # int32 per page: duplicate group id, -1 elsewhere
    group_sizes: np.ndarray  # int64 per group id

    def count(self, kind: int) -> int:
        return int(np.count_nonzero(self.kinds == kind))


def make_layout(spec: SyntheticSpec, page_size: int = PAGE_SIZE) -> Layout:
    """Which page is which kind, and which duplicate group each duplicate page belongs to."""
    n = spec.pages(page_size)
    rng = np.random.default_rng(spec.seed)
    n_zero = int(round(n * spec.zero))
    n_dup = int(round(n * spec.duplicate))
    n_vol = int(round(n * spec.volatile))
    n_dup = min(n_dup, n - n_zero)
    n_vol = min(n_vol, n - n_zero - n_dup)
    sizes: list[int] = []
    left = n_dup
    choices = np.asarray(spec.group_sizes, dtype=np.int64)
    while left > 0:
        g = int(rng.choice(choices))
        if left - g == 1 or g > left:   # never leave a lone page: it would be unique
            g = left
        sizes.append(g)
        left -= g
    if sizes and sizes[-1] < 2:         # a duplicate "group" of one page is just a unique page
        n_dup -= sizes.pop()
    n_unique = n - n_zero - n_dup - n_vol
    kinds = np.concatenate([np.full(n_zero, ZERO, np.uint8), np.full(n_dup, DUPLICATE, np.uint8),
                            np.full(n_unique, UNIQUE, np.uint8), np.full(n_vol, VOLATILE, np.uint8)])
    group_of_dup = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    group = np.concatenate([np.full(n_zero, -1, np.int32), group_of_dup,
                            np.full(n_unique + n_vol, -1, np.int32)])
    order = rng.permutation(n)
    return Layout(kinds=kinds[order], group=group[order],
                  group_sizes=np.asarray(sizes, dtype=np.int64))


def expected_counters(layout: Layout, use_zero_pages: bool, max_page_sharing: int = 256,
                      page_size: int = PAGE_SIZE) -> dict[str, int]:
    """What KSM reports once this layout has fully merged (the workload alone, volatile never)."""
    sizes = layout.group_sizes
    n_zero = layout.count(ZERO)
    if not use_zero_pages and n_zero >= 2:
        sizes = np.append(sizes, n_zero)
    pages_shared, pages_sharing, _ = ksm_pages(sizes, max_page_sharing)
    zero = n_zero if use_zero_pages else 0
    return {"pages_shared": pages_shared, "pages_sharing": pages_sharing, "ksm_zero_pages": zero,
            "saved_pages": pages_sharing + zero,
            "saved_bytes_before_rmap": (pages_sharing + zero) * page_size}
