"""Loading the native modules: the jaxlib version check of _native._load, and
when a missing CUDA module is expected."""

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


def _import_missing(name):
    def import_module(module_name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    return import_module


def test_only_an_unbuilt_cuda_module_is_skipped(monkeypatch):
    # Built without nvcc, jax_roipool._cuda does not exist and the package
    # runs on the CPU alone. A module that _cuda itself fails to find is a
    # broken install, which must not pass silently as a CPU-only one.
    monkeypatch.setattr(_native.importlib, "import_module", _import_missing("jax_roipool._cuda"))
    assert _native._cuda_module() is None
    monkeypatch.setattr(_native.importlib, "import_module", _import_missing("some_dependency"))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        _native._cuda_module()
