"""The one KSM accounting model (udedup.ksm.accounting), and that the A/B workload's expected
counters use it: a group of n identical pages under max_page_sharing m makes n // m full KSM pages
plus one for a remainder of at least 2; a remainder of 1 stays unshared (measured on 6.18: 600
pages, m=256 -> shared 3, sharing 597; 33 pages, m=16 -> 2 / 30 / 1)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from udedup.ab.synthetic import SyntheticSpec, expected_counters, make_layout
from udedup.ksm.accounting import ksm_pages


@pytest.mark.parametrize("n, m, want", [
    (600, 256, (3, 597, 0)), (33, 16, (2, 30, 1)), (17, 16, (1, 15, 1)), (16, 16, (1, 15, 0)),
    (2, 256, (1, 1, 0)), (1, 256, (0, 0, 1)), (0, 256, (0, 0, 0)), (18, 16, (2, 16, 0)),
])
def test_one_group(n, m, want):
    assert ksm_pages([n], m) == want


@given(st.lists(st.integers(0, 5000), max_size=20), st.integers(2, 300))
def test_groups_add_up(sizes, m):
    shared, sharing, unshared = ksm_pages(sizes, m)
    parts = [ksm_pages([n], m) for n in sizes]
    assert (shared, sharing, unshared) == tuple(sum(p[i] for p in parts) for i in range(3))
    # every page of a group is either a KSM page, a mapping of one, or left unshared
    assert shared + sharing + unshared == sum(n for n in sizes if n > 0)


def test_workload_expected_counters_follow_the_model_17_pages_at_16():
    """The bug issue 11 names: the workload's own model rounded up (17 pages, m=16 -> 2 KSM pages)."""
    spec = SyntheticSpec(size=17 * 4096, zero=0.0, duplicate=1.0, unique=0.0, volatile=0.0,
                         group_sizes=(17,)).validate(4096)
    layout = make_layout(spec, 4096)
    assert list(layout.group_sizes) == [17]
    got = expected_counters(layout, use_zero_pages=False, max_page_sharing=16, page_size=4096)
    shared, sharing, _ = ksm_pages(np.array([17]), 16)
    assert (got["pages_shared"], got["pages_sharing"]) == (shared, sharing) == (1, 15)
