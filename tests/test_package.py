"""The package's public names: every one resolves, and importing the package stays cheap."""
from __future__ import annotations

import subprocess
import sys

import udedup


def test_every_public_name_resolves():
    for name in udedup.__all__:
        assert getattr(udedup, name) is not None, name
    assert callable(udedup.estimate) and udedup.estimate.Estimate is udedup.Estimate
    assert issubclass(udedup.KsmError, udedup.UdedupError)


def test_import_loads_neither_numpy_nor_the_native_module():
    code = "import sys, udedup; print('numpy' in sys.modules, 'udedup._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
