"""The benchmark's outputs: a text table, ``bench.json`` and ``bench.png``."""

from __future__ import annotations

import json
from pathlib import Path

from . import model, train


def _columns(unit: str, ceiling: str) -> str:
    return (f"{'shape':28} {'provider':15} {'median ms':>10} {unit:>8} {'of ' + ceiling:>9} {'floor ms':>9} "
            f"{'ours x':>7} {'peak MiB':>9}")


def format_table(result: dict) -> str:
    device, ceilings = result["device"], result["ceilings"]
    copy, matmul = ceilings["copy"], ceilings["matmul"]
    lines = [
        f"device: {device['name']} | torch {device['torch']} | triton {device['triton']} | {device['date']}",
        f"ceilings: copy {copy['gbps']:.1f} GB/s ({copy['tensor_bytes'] / 2**20:.0f} MiB copy_); "
        f"matmul {matmul['tflops']:.2f} TFLOP/s ({matmul['dtype']} {matmul['n']}^3)",
        f"dtype {result['dtype']}; times are medians; 'ours x' = provider time / ours' time; floor = bytes / copy "
        "bandwidth (FLOPs / matmul peak for attention); peak = memory one call allocates (GPU: the allocator's peak; "
        "CPU, cross_entropy only: the call's peak resident memory in a fresh process)",
    ]
    if "notice" in device:
        lines.append(device["notice"])
    for case, title in result["cases"].items():
        rows = [r for r in result["rows"] if r["case"] == case]
        measured = next((r for r in rows if r["status"] == "ok"), {"unit": "rate", "ceiling": "ceiling"})
        lines += ["", f"{case}: {title}", _columns(measured["unit"], measured["ceiling"])]
        previous_shape = None
        for row in rows:
            shape = row["shape_label"] if row["shape_label"] != previous_shape else ""
            previous_shape = row["shape_label"]
            lines.append(f"{shape:28} {row['provider']:15} {_figures(row)}")
    if "model" in result:
        lines += ["", *model.format_section(result["model"])]
    if "train" in result:
        lines += ["", *train.format_section(result["train"])]
    return "\n".join(lines)


def ours_lines(rows: list[dict], ceilings: dict) -> list[str]:
    """One line per "ours" row: time, rate, fraction of the ceiling and the speed-up over each peer (a summary)."""
    copy, matmul = ceilings["copy"], ceilings["matmul"]
    lines = [f"bench: copy ceiling {copy['gbps']:.0f} GB/s, matmul {matmul['tflops']:.0f} TFLOP/s ({matmul['dtype']})",
             f"  {'case':20} {'shape':30} {'ours ms':>9} {'rate':>14} {'of ceiling':>17}  "
             "ours' speed-up over each peer"]
    for row in (r for r in rows if r["provider"] == "ours"):
        if row["status"] != "ok":
            lines.append(f"  {row['case']:20} {row['shape_label']:30} {row['status']}: {row['reason']}")
            continue
        peers = [r for r in rows if r["case"] == row["case"] and r["shape_label"] == row["shape_label"]
                 and r["provider"] != "ours" and r["status"] == "ok" and r.get("ours_speedup")]
        speedups = " ".join(f"{p['provider']} {p['ours_speedup']:.2f}x" for p in peers)
        lines.append(f"  {row['case']:20} {row['shape_label']:30} {row['median_ms']:9.4f} {row['rate']:6.0f} "
                     f"{row['unit']:7} {row['fraction_of_ceiling']:8.0%} of {row['ceiling']:6}  {speedups}")
    return lines


def _figures(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    speedup = "-" if row["provider"] == "ours" or row["ours_speedup"] is None else f"{row['ours_speedup']:.2f}x"
    peak = "n/a" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.1f}"
    return (f"{row['median_ms']:10.4f} {row['rate']:8.1f} {row['fraction_of_ceiling']:9.0%} {row['floor_ms']:9.4f} "
            f"{speedup:>7} {peak:>9}")


def write_outputs(result: dict, out_dir: Path, table: str, plot: bool = True) -> list[str]:
    """Write bench.json, bench.txt and (unless plot is False) bench.png; return one line per file or problem."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "bench.txt").write_text(table + "\n")
    lines = [f"wrote {out_dir / 'bench.json'}", f"wrote {out_dir / 'bench.txt'}"]
    if plot and not result["cases"]:
        lines.append("no plot: no op case was run (the plot shows the op cases; the model section is in the table)")
    elif plot:
        try:
            write_plot(result, out_dir / "bench.png")
            lines.append(f"wrote {out_dir / 'bench.png'}")
        except ImportError:  # matplotlib is an optional extra ("bench"); the figures are all in the JSON
            lines.append("no plot: matplotlib is not installed (pip install matplotlib, or the [bench] extra)")
    return lines


def write_plot(result: dict, path: Path) -> None:
    """Rate per provider (GB/s or TFLOP/s), grouped by shape, one panel per case, the ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["cases"].items())
    ceiling_rates = {"copy": result["ceilings"]["copy"]["gbps"], "matmul": result["ceilings"]["matmul"]["tflops"]}
    # One colour per provider across panels; a provider with no measurement in a panel leaves no bar.
    all_providers = list(dict.fromkeys(r["provider"] for r in result["rows"] if r["status"] == "ok"))
    colours = {p: f"C{i}" for i, p in enumerate(all_providers)}
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 3.4 * len(cases)), squeeze=False)
    for ax, (case, title) in zip(axes[:, 0], cases):
        rows = [r for r in result["rows"] if r["case"] == case]
        shapes = list(dict.fromkeys(r["shape_label"] for r in rows))
        providers = [p for p in all_providers if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
        width = 0.8 / max(len(providers), 1)
        measured = [r for r in rows if r["status"] == "ok"]
        for j, provider in enumerate(providers):
            rates = {r["shape_label"]: r["rate"] for r in measured if r["provider"] == provider}
            ax.bar([i + j * width for i in range(len(shapes))], [rates.get(s, 0.0) for s in shapes], width,
                   label=provider, color=colours[provider])
        if measured:
            ceiling = measured[0]["ceiling"]
            ax.axhline(ceiling_rates[ceiling], linestyle="--", color="gray", label=f"{ceiling} ceiling")
            ax.set_ylabel(measured[0]["unit"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.set_title(f"{case}: {title}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    device = result["device"]
    cpu_note = " | CPU figures, not GPU" if device["kind"] == "cpu" else ""
    fig.suptitle(f"{device['name']} | {device['date']}{cpu_note}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
