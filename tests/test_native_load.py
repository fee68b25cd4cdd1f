"""Loading the native modules: the jaxlib version check of _native._load."""

import jaxlib
import pytest

from jax_roipool import _cpu, _native


def test_extension_built_for_a_newer_jaxlib_is_refused(monkeypatch):
    assert _native._version_tuple(_cpu.build_jaxlib_version()) > (0, 0, 1)
    monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
    with pytest.raises(ImportError, match=r"jaxlib .* is running.*pip install --no-build-isolation -e \."):
        _native._load("_cpu")


@pytest.mark.parametrize("running", ["same", "newer"])
def test_extension_loads_in_its_own_or_a_newer_jaxlib(monkeypatch, running):
    built = _cpu.build_jaxlib_version()
    if running == "newer":
        major, minor, _ = _native._version_tuple(built)
        monkeypatch.setattr(jaxlib, "__version__", f"{major}.{minor + 1}.0")
    assert _native._load("_cpu") is _cpu
