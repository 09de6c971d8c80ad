"""The cross-domain matrix's report, from its results.json alone (torch-free): the Markdown tables and the heatmap.

Every cell is a relative perplexity increase over the fp16 cache on the same evaluation windows. A cell is
  off-domain  calibrated on one domain, evaluated on another (what a user who calibrates once meets),
  mix         calibrated on the blend of every domain's calibration part (never on evaluation text),
  in-domain   calibrated and evaluated on the two disjoint parts of the same domain (the README's setting),
  data-free   a method without calibration (HIGGS-2, KIVI-2, fp8): one column of its own.
"""
from __future__ import annotations

import statistics
from pathlib import Path

KINDS = ("off-domain", "mix", "in-domain", "data-free")


def cell_kind(calibration: str | None, evaluation: str, mix: str = "mix") -> str:
    if calibration is None:
        return "data-free"
    if calibration == mix:
        return "mix"
    return "in-domain" if calibration == evaluation else "off-domain"


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def row_name(cell: dict) -> str:
    return cell["label"] if cell["calibration"] is None else f"{cell['label']} [{cell['calibration']}]"


def main_cells(results: dict) -> list[dict]:
    """The cells at the main seed (the noise seeds' cells are reported apart)."""
    return [c for c in results["cells"] if c["seed"] == results["settings"]["seed"]]


def summary_table(results: dict) -> str:
    """One row per method: off-domain mean and worst first, then the mix, then in-domain (data-free methods have no
    calibration: their every cell is unseen text, so they fill the off-domain columns)."""
    head = "| method | bits/value | off-domain mean | off-domain worst | mix mean | mix worst | in-domain mean |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    by_label: dict[str, list[dict]] = {}
    for c in main_cells(results):
        by_label.setdefault(c["label"], []).append(c)
    for label, cells in by_label.items():
        got = {k: [c["relative"] for c in cells if c["kind"] == k] for k in KINDS}
        off = got["off-domain"] + got["data-free"]
        bits = [c["bits_per_value"] for c in cells if c["bits_per_value"] is not None]
        cols = [label, f"{statistics.mean(bits):.2f}" if bits else "n/a",
                *(_mean_worst(off)), *(_mean_worst(got["mix"])),
                pct(statistics.mean(got["in-domain"])) if got["in-domain"] else ""]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _mean_worst(xs: list[float]) -> tuple[str, str]:
    return (pct(statistics.mean(xs)), pct(max(xs))) if xs else ("", "")


def matrix_table(results: dict) -> str:
    """Rows: method [calibration]; columns: evaluation domains. In-domain cells are in brackets; the first row is the
    fp16 reference perplexity each column is relative to."""
    domains = results["settings"]["domains"]
    ref = results["reference"]
    lines = ["| calibrated on \\ evaluated on | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains),
             "| fp16 perplexity (reference) | " + " | ".join(f"{ref[d]['ppl']:.3f}" for d in domains) + " |"]
    rows: dict[str, dict[str, dict]] = {}
    for c in main_cells(results):
        rows.setdefault(row_name(c), {})[c["evaluation"]] = c
    for name, cells in rows.items():
        out = []
        for d in domains:
            c = cells.get(d)
            out.append("not measured" if c is None else
                       f"[{pct(c['relative'])}]" if c["kind"] == "in-domain" else pct(c["relative"]))
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def noise_rows(results: dict) -> list[dict]:
    """Per (method, calibration, evaluation) measured at several sign seeds: the values, their spread and stdev."""
    groups: dict[tuple, list[dict]] = {}
    for c in results["cells"]:
        groups.setdefault((row_name(c), c["evaluation"]), []).append(c)
    out = []
    for (name, domain), cells in groups.items():
        if len(cells) < 2:
            continue
        vals = [c["relative"] for c in sorted(cells, key=lambda c: c["seed"])]
        out.append(dict(cell=f"{name} on {domain}", seeds=sorted(c["seed"] for c in cells), values=vals,
                        spread=max(vals) - min(vals), stdev=statistics.stdev(vals)))
    return out


def noise_table(results: dict) -> str:
    rows = noise_rows(results)
    if not rows:
        return "no cell was measured at more than one sign seed: the noise is not measured"
    lines = ["| cell | sign seeds | relative increase per seed | spread (max - min) | stdev |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {', '.join(map(str, r['seeds']))} | {', '.join(map(pct, r['values']))} | "
                     f"{100 * r['spread']:.2f} pp | {100 * r['stdev']:.2f} pp |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    s = results["settings"]
    done = "" if results.get("complete") else "\n**Incomplete: the run was stopped before every cell was measured.**\n"
    return (f"command: `{results['command']}`  \ndevice: {results['device']}; {results['date']}  \n"
            f"model: {results['model']}; windows of {s['window']} tokens fed {s['step']} at a time; "
            f"{s['eval_windows']} evaluation windows per domain, {s['calib_windows']} calibration windows; "
            f"sign seed {s['seed']}\n{done}\nRelative perplexity increase over the fp16 cache, off-domain first:\n\n"
            f"{summary_table(results)}\n\nEvery cell ([in-domain] in brackets):\n\n{matrix_table(results)}\n\n"
            f"Noise across HIGGS sign seeds:\n\n{noise_table(results)}\n")


def heatmap(results: dict, path: str | Path) -> Path:
    """The matrix as a PNG: one row per method [calibration], one column per evaluation domain, colour = relative
    increase (%), in-domain cells outlined. Needs matplotlib (the `plot` extra)."""
    from aquakv.atomic_writes import save_png_atomic
    from aquakv.evaluation.plot import pyplot

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"heatmap file must end in .png, got {path}")
    domains = results["settings"]["domains"]
    rows: dict[str, dict[str, dict]] = {}
    for c in main_cells(results):
        rows.setdefault(row_name(c), {})[c["evaluation"]] = c
    names = list(rows)
    values = [[100 * rows[n][d]["relative"] if d in rows[n] else float("nan") for d in domains] for n in names]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 3.5, 0.42 * len(names) + 1.6), dpi=120)
    try:
        from matplotlib.colors import SymLogNorm

        # Logarithmic above 0.5%: on a linear scale KIVI's +10% would paint every AQUA-KV cell the same colour.
        finite = [v for row in values for v in row if v == v]
        norm = SymLogNorm(linthresh=0.5, vmin=min(finite + [0.0]), vmax=max(finite + [1.0]))
        im = ax.imshow(values, cmap="viridis_r", aspect="auto", norm=norm)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("evaluated on")
        for i, n in enumerate(names):
            for j, d in enumerate(domains):
                c = rows[n].get(d)
                if c is None:
                    continue
                dark = norm(values[i][j]) > 0.5  # white text on the dark end of the map, black on the light end
                ax.text(j, i, f"{values[i][j]:+.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
                if c["kind"] == "in-domain":
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        fig.colorbar(im, ax=ax, label="perplexity vs fp16 (%)")
        ax.set_title(f"{results['model']}: relative perplexity (in-domain cells outlined)", fontsize=9)
        save_png_atomic(fig, path)
    finally:
        plt.close(fig)
    return path
