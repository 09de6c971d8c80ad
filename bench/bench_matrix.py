"""The cross-domain quality matrix (issue 24, docs/evaluation.md "Across text domains"): every method calibrated on
every text domain and on their mix, evaluated on every domain, relative to the fp16 cache.

    python bench/bench_matrix.py --out matrix/                  # bundled SmolLM2-135M, all domains, all methods
    python bench/bench_matrix.py --eval-windows 4 --calib-windows 16 --noise-seeds 1 2 --out matrix/
    python bench/bench_matrix.py --render matrix/results.json   # the tables and heatmap again, from the file alone

Writes results.json (after every cell, so a stopped run keeps what it measured), matrix.md and matrix.png. Each
cell is the README protocol (aquakv.evaluation.evaluate_perplexity: windows of --window fed --step at a time, a
fresh cache per window) on the first --eval-windows windows of a domain's evaluation part; AQUA-KV is calibrated
(aquakv.calibrate) on --calib-windows windows spread over a domain's calibration part. The noise is measured by
re-drawing the HIGGS sign seed (--noise-seeds): HIGGS-2 on every domain, and AQUA-KV-2 recalibrated on
--noise-calibration. Deterministic for fixed options.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matrix_report  # noqa: E402

CALIBRATED = {"aquakv2": 2, "aquakv3": 3}       # method -> bits, calibrated on each --calibrations entry
DATA_FREE = ("higgs2", "kivi2", "fp8")           # registry names, one column each
METHODS = tuple(CALIBRATED) + DATA_FREE
SEEDED = ("aquakv2", "higgs2")                   # the methods the noise seeds re-draw


@dataclass
class MatrixSettings:
    domains: list[str]
    calibrations: list[str]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    eval_windows: int = 4
    calib_windows: int = 16
    window: int = 1024
    step: int = 32
    seed: int = 0
    noise_seeds: list[int] = field(default_factory=list)
    noise_calibration: str | None = None

    def check(self, mix: str = "mix") -> None:
        """ValueError naming the first bad option."""
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"--domains needs at least two different domains (a matrix needs off-domain cells), "
                             f"got {self.domains}")
        for c in self.calibrations:
            if c != mix and c not in self.domains:
                raise ValueError(f"--calibrations {c!r} is neither one of --domains {self.domains} nor {mix!r}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
        if any(m in CALIBRATED for m in self.methods) and not self.calibrations:
            raise ValueError("AQUA-KV needs at least one --calibrations entry")
        for name in ("eval_windows", "calib_windows", "window", "step"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed in self.noise_seeds or len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise ValueError(f"--noise-seeds must differ from each other and from --seed {self.seed}, "
                             f"got {self.noise_seeds}")
        if self.noise_seeds and not any(m in SEEDED for m in self.methods):
            raise ValueError(f"--noise-seeds re-draws {' and '.join(SEEDED)}: add one of them to --methods")
        if self.noise_calibration is not None and self.noise_calibration not in self.calibrations:
            raise ValueError(f"--noise-calibration {self.noise_calibration!r} is not among --calibrations")

    def jobs(self) -> list[tuple[str, str | None, int]]:
        """(method, calibration or None, seed) in the order measured: data-free, AQUA-KV-2, the noise seeds, then
        AQUA-KV-3, so a run stopped early still holds the off-domain 2-bit cells and their noise."""
        out: list[tuple[str, str | None, int]] = [(m, None, self.seed) for m in DATA_FREE if m in self.methods]
        noise_cal = self.noise_calibration or (self.calibrations[0] if self.calibrations else None)
        for m in CALIBRATED:
            if m not in self.methods:
                continue
            out += [(m, c, self.seed) for c in self.calibrations]
            if m == "aquakv2":
                out += [(m, noise_cal, s) for s in self.noise_seeds]
                if "higgs2" in self.methods:
                    out += [("higgs2", None, s) for s in self.noise_seeds]
        if "higgs2" in self.methods and "aquakv2" not in self.methods:
            out += [("higgs2", None, s) for s in self.noise_seeds]
        return out


def run_matrix(model, tokenizer, settings: MatrixSettings, out_dir: str | Path, meta: dict, *, load=None,
               progress: bool = True) -> dict:
    """Measure every cell of `settings` and write out_dir/results.json after each; returns the results.

    load: (domain, split) -> list of texts (default aquakv.domains.domain_texts). meta: command, device, date, model.
    Raises ValueError before the slow part when a domain has fewer tokens than the windows asked for.
    """
    from aquakv.data import tokenize
    from aquakv.domains import MIX, domain_texts, mixed_calibration_texts
    from aquakv.progress import progress as progress_bar

    settings.check(MIX)
    load = load or domain_texts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unavailable = _unavailable(settings.methods)
    if unavailable:
        raise ValueError(f"methods unavailable here ({unavailable}): drop them from --methods")
    evaluation = {d: tokenize(tokenizer, load(d, "evaluation")) for d in settings.domains}
    for d, ids in evaluation.items():
        if ids.numel() < settings.window * settings.eval_windows:
            raise ValueError(f"domain {d!r}: its evaluation part has {ids.numel()} tokens, fewer than "
                             f"--eval-windows {settings.eval_windows} x --window {settings.window}")
    results = dict(meta, settings=asdict(settings), reference={}, cells=[], complete=False)
    jobs = settings.jobs()
    calibration_ids: dict[str, object] = {}
    with progress_bar(total=len(settings.domains) * (len(jobs) + 1), desc="matrix", unit="cell",
                      enabled=progress) as bar:
        for d, ids in evaluation.items():
            r = _evaluate(model, ids, "fp16", None, settings, settings.seed, f"fp16 on {d}", progress)
            results["reference"][d] = dict(ppl=r.ppl, n_windows=r.n_windows, n_tokens=r.n_tokens)
            bar.update(1)
        _save(results, out)
        for method, cal, seed in jobs:
            preds = None
            if cal is not None:
                if cal not in calibration_ids:
                    texts = mixed_calibration_texts(settings.domains, load) if cal == MIX else load(cal, "calibration")
                    calibration_ids[cal] = _calibration_tokens(tokenize(tokenizer, texts), cal, settings)
                preds = _calibrate(model, calibration_ids[cal], CALIBRATED[method], settings, seed, progress)
            for d, ids in evaluation.items():
                row = _evaluate(model, ids, method, preds, settings, seed, f"{method} [{cal or 'none'}] on {d}",
                                progress)
                results["cells"].append(_cell(method, row, preds, cal, d, seed, results["reference"][d]["ppl"], MIX))
                bar.update(1)
                _save(results, out)
    results["complete"] = True
    _save(results, out)
    return results


def _unavailable(methods) -> str:
    from aquakv.kv import registry

    return "; ".join(f"{m}: {why}" for m in methods if m in DATA_FREE and (why := registry.get(m).unavailable()))


def _calibration_tokens(ids, name: str, settings: MatrixSettings):
    """The calibration part's token ids, refused when it holds fewer windows than --calib-windows (calibrate would
    quietly use fewer)."""
    have = -(-ids.numel() // settings.window)
    if have < settings.calib_windows:
        raise ValueError(f"calibration set {name!r} holds {have} windows of {settings.window} tokens, fewer than "
                         f"--calib-windows {settings.calib_windows}")
    return ids


def _calibrate(model, ids, bits: int, settings: MatrixSettings, seed: int, progress: bool):
    from aquakv.kv.calibration import calibrate

    return calibrate(model, [ids], bits=bits, window=settings.window, max_windows=settings.calib_windows, seed=seed,
                     progress=progress)


def _evaluate(model, ids, method: str, preds, settings: MatrixSettings, seed: int, desc: str, progress: bool):
    from aquakv.evaluation.perplexity import evaluate_perplexity
    from aquakv.kv import registry

    name = "aquakv" if method in CALIBRATED else method
    factory = registry.get(name).factory(preds, seed=seed)
    r = evaluate_perplexity(model, ids, factory, window=settings.window, step=settings.step,
                            max_windows=settings.eval_windows, progress=progress, desc=desc)
    if r.never_compressed:
        raise ValueError(f"{desc}: nothing was quantized in a {settings.window}-token window (all of it stayed in the "
                         "cache's exact sinks and buffer): use a longer --window")
    return r


def _cell(method, r, preds, cal, domain, seed, ref_ppl, mix) -> dict:
    from aquakv.kv import registry

    label = registry.get("aquakv").label(preds) if method in CALIBRATED else registry.get(method).label()
    return dict(method=method, label=label, calibration=cal, evaluation=domain, seed=seed,
                kind=matrix_report.cell_kind(cal, domain, mix), ppl=r.ppl, relative=r.ppl / ref_ppl - 1,
                bits_per_value=r.bits_per_value, n_windows=r.n_windows, seconds=r.seconds)


def _save(results: dict, out: Path) -> None:
    from aquakv.atomic_writes import write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", results)
    if results["cells"]:
        write_text_atomic(out / "matrix.md", matrix_report.markdown(results))


def parse_args(argv=None) -> argparse.Namespace:
    from aquakv.domains import DOMAINS, MIX

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), help="evaluation domains (aquakv.domains)")
    p.add_argument("--calibrations", nargs="+", default=[*DOMAINS, MIX], help="AQUA-KV calibration sets")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--eval-windows", type=int, default=4, help="evaluation windows per domain (the first ones)")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows (spread over the set)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--step", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="HIGGS sign seed of every cell")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2],
                   help="extra sign seeds for HIGGS-2 and one AQUA-KV-2 row (the noise)")
    p.add_argument("--noise-calibration", default=None, help="the AQUA-KV-2 row re-drawn (default: the first "
                   "--calibrations entry)")
    p.add_argument("--out", default="matrix", help="folder for results.json, matrix.md, matrix.png")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", default=None, help="a local Hugging Face model folder, or one holding --gguf "
                   "(default: bundled SmolLM2)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="a GGUF file inside --model-dir (Gemma 3: "
                   "docs/model_families.md)")
    p.add_argument("--render", default=None, metavar="RESULTS_JSON",
                   help="only write matrix.md and matrix.png next to an existing results.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def render(results_json: str | Path) -> None:
    path = Path(results_json)
    results = json.loads(path.read_text())
    (path.parent / "matrix.md").write_text(matrix_report.markdown(results))
    matrix_report.heatmap(results, path.parent / "matrix.png")
    print(matrix_report.markdown(results))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    settings = MatrixSettings(args.domains, args.calibrations, args.methods, args.eval_windows, args.calib_windows,
                              args.window, args.step, args.seed, args.noise_seeds, args.noise_calibration)
    try:
        settings.check()
        from aquakv.evaluation.plot import pyplot

        pyplot()  # before an hour of measuring: the heatmap needs matplotlib
    except (ValueError, ImportError) as e:
        sys.exit(f"bench_matrix.py: {e}")
    import torch

    from aquakv.evaluation.table import count
    from aquakv.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_dir, args.gguf)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model_name = " / ".join(filter(None, (args.model_dir, args.gguf))) or "SmolLM2-135M (bundled)"
    meta = dict(command=f"python {shlex.join(sys.argv)}", date=now, model=model_name,
                device=f"cpu ({platform.processor() or platform.machine()}, {count(torch.get_num_threads(), 'thread')}); "
                       f"torch {torch.__version__}")
    try:
        results = run_matrix(model, tokenizer, settings, args.out, meta, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"bench_matrix.py: {e}")
    matrix_report.heatmap(results, Path(args.out) / "matrix.png")
    print(matrix_report.markdown(results))


if __name__ == "__main__":
    main()
