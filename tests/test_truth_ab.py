"""A/B trials count the true saving's change from their start: the sampler's columns, the record's
headline over the plateau, old reports, and the engine on a fake kernel whose ksmd also 'splits
THPs' (hands zero pages back outside its counters)."""
from __future__ import annotations

import numpy as np
import pytest

from udedup.ab.records import ABResult, TrialRecord, plateau_rows
from udedup.ab.report import write_series_csv
from udedup.ab.sampler import SERIES_COLUMNS

from test_abtest import FakeKernel, FakeWorkload, _run
from test_truth import ZERO, ZERO_PFNS, present, write_proc


def series(true, scans, zero=None):
    n = len(true)
    return {"t": [0.1 * i for i in range(n)], "full_scans": scans, "true_saved_bytes": true,
            "zero_mapped_pages": zero if zero is not None else [0] * n}


def test_plateau_rows_are_the_window_of_full_scans_and_the_last_sample():
    s = series([0, 10, 50, 98, 100, 101, 99, 100], [5, 5, 6, 7, 8, 9, 10, 10])
    # settled 5 scans after the start, the window spanning the last 3 of them: the samples of the
    # window's first scan count (98, still merging) are not the plateau (VM study: on guests most
    # merging happens during that scan, and the median landed in the growth)
    assert plateau_rows(s, {"scans": 5, "scan_span": 3}) == [4, 5, 6, 7]
    assert plateau_rows(s, None) == [7]
    assert plateau_rows({"true_saved_bytes": [None, None]}, None) == []
    assert plateau_rows(series([1, None, 3], [0, 1, 2]), {"scans": 1, "scan_span": 1}) == [2]
    assert plateau_rows(series([1, 2, 3], [0, 1, 2]), {"scans": 2, "scan_span": 1}) == [2]


def test_take_true_saving_makes_the_headline_the_median_true_change():
    r = TrialRecord(index=0, block=0, arm="on", knobs={}, saved_bytes=4000, ksmd_cpu_seconds=2.0,
                    series=series([0, 10 << 20, 20 << 20, 21 << 20, 19 << 20],
                                  [0, 1, 2, 3, 4], zero=[0, 5, 9, 10, 10]),
                    plateau={"scans": 4, "scan_span": 2})
    r.take_true_saving()
    assert r.counter_saved_bytes == 4000
    assert r.saved_bytes == r.true_saved_bytes == 20 << 20     # median of 20, 21, 19 MiB
    assert r.zero_mapped_pages == 10
    assert r.saved_mib_per_cpu_second == 10.0
    plain = TrialRecord(index=1, block=0, arm="off", knobs={}, saved_bytes=4000, series={})
    plain.take_true_saving()
    assert plain.saved_bytes == 4000 and plain.counter_saved_bytes is None


def test_a_report_from_before_the_true_columns_loads_and_writes_its_series(tmp_path):
    old = {"index": 0, "block": 0, "arm": "off", "knobs": {}, "status": "ok", "saved_bytes": 7,
           "series": {c: [1, 2] for c in SERIES_COLUMNS if c not in ("true_saved_bytes",
                                                                   "zero_mapped_pages")}}
    r = TrialRecord.from_dict(old)
    assert r.series["true_saved_bytes"] == [None, None] and r.series["t"] == [1, 2]
    result = ABResult(config={"arms": {"off": {}, "on": {}}}, trials=[r])
    path = write_series_csv(result, str(tmp_path / "series.csv"))
    assert len(open(path).read().splitlines()) == 3          # header and both samples


class SplittingKernel(FakeKernel):
    """A fake ksmd that, as it merges, also 'splits THPs' of a fake VM (pid 500): 300 more of its
    mergeable pages map the zero page, outside every counter. 50 pages already mapped it before
    (read, never written): a trial's change leaves them out."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.vm = write_proc(self.proc, 500, [(1000, True, self.entries(False))], comm="vm")

    @staticmethod
    def entries(split: bool):
        e = np.full(1000, present(55), dtype=np.uint64)
        e[:350 if split else 50] = present(ZERO)
        return e

    def map_vm(self, split: bool):
        from test_truth import BASE, PS
        with open(self.vm / "pagemap", "r+b") as f:
            f.seek(BASE // PS * 8)
            f.write(self.entries(split).tobytes())

    def put(self, name, value):
        super().put(name, value)
        if name == "pages_sharing" and int(value) > 0:
            self.map_vm(True)


@pytest.fixture
def splitting(tmp_path, monkeypatch):
    import udedup.ksm.truth as truth
    monkeypatch.setattr(truth, "zero_page_pfns", lambda procfs: ZERO_PFNS)
    k = SplittingKernel(tmp_path)
    k.thread.start()
    yield k
    k.stop.set()
    k.thread.join()


class VmWorkload(FakeWorkload):
    def start(self, seed=0):
        self.kernel.map_vm(False)        # a fresh guest: nothing split yet
        return super().start(seed)


def test_each_trial_counts_the_zero_pages_a_split_hands_back(splitting):
    result = _run(splitting, VmWorkload(splitting), cow_sample=0)
    assert [t.status for t in result.trials] == ["ok"] * 4
    for t in result.trials:
        assert t.zero_mapped_pages == 300
        assert t.counter_saved_bytes == t.general_profit == (t.pages_sharing + t.ksm_zero_pages) * 4096
        assert t.saved_bytes == t.true_saved_bytes == t.counter_saved_bytes + 300 * 4096
        assert t.series["true_saved_bytes"][-1] == t.saved_bytes
        assert t.series["zero_mapped_pages"][-1] == 300
    m = result.summary["arms"]["on"]["metrics"]["saved_bytes"]
    assert m["median"] == (1000 + 1000 + 300) * 4096


def test_synthetic_like_trials_without_zero_mappings_equal_the_counters(tmp_path):
    k = FakeKernel(tmp_path)
    k.thread.start()
    try:
        result = _run(k, FakeWorkload(k), cow_sample=0, trials=1)
    finally:
        k.stop.set()
        k.thread.join()
    for t in result.trials:
        assert t.saved_bytes == t.counter_saved_bytes == t.saved_pages * 4096
        assert t.zero_mapped_pages == 0
