"""Pure arithmetic of ksmd's speed: the knobs that give a scan rate, the sleep that keeps batches
large, and whether the host is under memory pressure. No state, no I/O."""
from __future__ import annotations

import math

from .config import Config
from .model import Memory


def pressure_state(cfg: Config, mem: Memory | None) -> tuple[bool, str]:
    """(under memory pressure, why) by ``cfg.pressure``'s thresholds."""
    if mem is None or mem.total <= 0:
        return False, "no memory figures"
    p = cfg.pressure
    avail_pct = 100.0 * mem.available / mem.total
    if avail_pct < p.mem_available_percent:
        return True, (f"MemAvailable {avail_pct:.1f}% of MemTotal < pressure.mem_available_percent "
                      f"{p.mem_available_percent:g}")
    if p.psi_some_avg10 > 0 and mem.psi_some_avg10 is not None and mem.psi_some_avg10 > p.psi_some_avg10:
        return True, (f"memory PSI some avg10 {mem.psi_some_avg10:.1f} > pressure.psi_some_avg10 "
                      f"{p.psi_some_avg10:g}")
    return False, f"MemAvailable {avail_pct:.1f}%"


def knobs_for_rate(pages_per_second: float, sleep_ms: int, seconds_per_page: float,
                   max_pages: int) -> int:
    """pages_to_scan such that batches of it, separated by ``sleep_ms``, scan ``pages_per_second``.

    One cycle lasts sleep + pages * cost, so rate = p / (s + p c), i.e. p = R s / (1 - R c).
    """
    s = max(sleep_ms, 1) / 1000.0
    busy = pages_per_second * seconds_per_page
    if busy >= 1.0:
        return max_pages
    return int(min(max_pages, max(1, math.ceil(pages_per_second * s / (1.0 - busy)))))


def sleep_for_batch(pages_per_second: float, sleep_ms: int, seconds_per_page: float,
                    min_batch: int, max_sleep_ms: int = 60000) -> int:
    """The least sleep_millisecs >= ``sleep_ms`` at which ``pages_per_second`` comes in batches of
    at least ``min_batch`` pages (the inverse of :func:`knobs_for_rate`).

    ksmd pays for every wake-up: merging the same memory took 2.39 CPU-s at 500 pages per 20 ms
    and 1.73 at 5000 per 200 ms, the same rate (docs/results/bench_ksmd_rate.txt)."""
    if pages_per_second <= 0 or min_batch <= 1:
        return sleep_ms
    busy = pages_per_second * seconds_per_page
    if busy >= 1.0:
        return sleep_ms
    need = math.ceil(1000.0 * min_batch * (1.0 - busy) / pages_per_second)
    return int(min(max_sleep_ms, max(sleep_ms, need)))


def ewma_weight(weight: float, elapsed: float, period: float) -> float:
    """The weight of a sample covering ``elapsed`` seconds in a moving average that gives a sample
    of one ``period`` the weight ``weight``: 1 - (1 - weight) ** (elapsed / period), capped at
    ``weight``.

    A round that estimates or registers decides up to three times, seconds apart: each decide
    sees a short stretch (mostly the estimate's own CPU), which must count for its time, not as a
    whole round."""
    if period <= 0 or elapsed >= period:
        return weight
    return 1.0 - (1.0 - weight) ** (max(0.0, elapsed) / period)
