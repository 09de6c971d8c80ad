"""The package's public face: names load on first use through one helper (aquakv.lazy), `import aquakv` alone
loads no torch, and `import torch, aquakv` makes torch.ops.aquakv.* callable."""
import subprocess
import sys
import types

import pytest

from aquakv.lazy import lazy_exports


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_torch_then_aquakv_registers_the_ops():
    out = _run("import torch, aquakv\n"
               "y = torch.ops.aquakv.hadamard(torch.randn(3, 16), None)\n"
               "print(tuple(y.shape))")
    assert out == "(3, 16)"


def test_lazy_exports_loads_on_first_use_and_caches(monkeypatch):
    pkg = types.ModuleType("fakepkg")
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "fakepkg", pkg)
    pkg.__getattr__, pkg.__dir__, pkg.__all__ = lazy_exports("fakepkg", {"dumps": "json", "path": "os"})
    assert pkg.__all__ == ["dumps", "path"]
    assert "dumps" not in vars(pkg)
    import json

    assert pkg.dumps is json.dumps and vars(pkg)["dumps"] is json.dumps  # stored: the next lookup is plain
    assert "path" in pkg.__dir__()
    with pytest.raises(AttributeError, match="module 'fakepkg' has no attribute 'nope'"):
        pkg.nope


def test_every_package_init_uses_the_one_helper():
    import pathlib

    import aquakv

    root = pathlib.Path(aquakv.__file__).parent
    for name in ("__init__.py", "evaluation/__init__.py", "longctx/__init__.py"):
        text = (root / name).read_text()
        assert "lazy_exports(" in text and "importlib.import_module" not in text, name
