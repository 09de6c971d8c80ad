"""plot_perplexity_vs_bits: a PNG written atomically, a clear error without matplotlib."""
import builtins
import math

import pytest
from aquakv.evaluation import PerplexityResult
from aquakv.evaluation.plot import plot_perplexity_vs_bits


def rows():
    return [("fp16", PerplexityResult(10.0, math.log(10.0), 100, 1, 2048, 16.0, 1.0)),
            ("AQUA-KV-2", PerplexityResult(10.2, math.log(10.2), 100, 1, 500, 3.66, 1.0)),
            ("quanto", PerplexityResult(11.0, math.log(11.0), 100, 1, None, None, 1.0))]


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_perplexity_vs_bits(rows(), tmp_path / "p.png", baseline=10.0, title="t")
    assert path == tmp_path / "p.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left


def test_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plot_perplexity_vs_bits(rows(), tmp_path / "p.pdf")


def test_missing_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_perplexity_vs_bits(rows(), tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []
