"""udedup.signals: the one deferral helper (knob writes, A/B cleanup)."""
from __future__ import annotations

import os
import signal

import pytest

from udedup import signals


def _kill(sig):
    os.kill(os.getpid(), sig)
    # give the interpreter a bytecode boundary to run the Python-level handler
    for _ in range(1000):
        pass


def test_held_records_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in signals.DEFAULT_SIGNALS}
    with signals.held() as pending:
        _kill(signal.SIGINT)
        _kill(signal.SIGTERM)
    assert pending == [signal.SIGINT, signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in signals.DEFAULT_SIGNALS} == before


def test_deferred_delivers_ctrl_c_after_the_block_and_not_before(sigint_default):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            _kill(signal.SIGINT)
            done.append("whole block ran")
    assert done == ["whole block ran"]


def test_nothing_arrives_nothing_is_delivered():
    with signals.deferred():
        pass


def test_nested_blocks_pass_the_signal_outwards():
    with signals.held() as outer:
        with signals.deferred():
            _kill(signal.SIGINT)
    # the inner block delivered to the handler installed then: the outer recorder
    assert outer == [signal.SIGINT]


def test_sigterm_raises_keyboardinterrupt_inside_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with signals.sigterm_raises():
            _kill(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before
