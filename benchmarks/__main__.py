"""Run every op benchmark across providers: ``python -m benchmarks [--full] [--only NAME]``.

Quick mode (the default) runs a reduced set of shapes so that the whole suite finishes in a few
minutes on a CPU; ``--full`` runs the shapes the issues name. Results go to
``benchmarks/results/local/<device>[-quick].json`` and ``.csv`` and a plot per op (CPU runs are
named after the core count, e.g. ``cpu-2core-quick``); that folder is git-ignored, so a user's run
never overwrites the committed results. ``--save`` writes to ``benchmarks/results/`` itself, to
regenerate the committed results on purpose (plots are never committed). The run ends with one
line per op: the fastest ddiff provider against the fastest other provider, or which providers did
not run at which shape and why.

A benchmark module that raises is reported (its traceback, then a ``FAILED`` line in the summary)
and the rest of the suite still runs and writes its results; the command then exits with 1.

On CPU the suite runs single-threaded unless ``--threads`` says otherwise: on a shared machine
a parallel torch op waits for its slowest thread, which turns other processes' load into
milliseconds of noise per op; one thread gives every provider the same conditions. Providers
that need CUDA are listed once per benchmark instead of as table rows (they stay in the files).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import pkgutil
import re
import sys
import time
import traceback
import warnings

import torch

from benchmarks.common import cpu_description, device_name, ratio_summary

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")  # committed: written with --save only
LOCAL_RESULTS_DIR = os.path.join(RESULTS_DIR, "local")  # git-ignored: every other run


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def _bench_modules(only):
    names = sorted(m.name for m in pkgutil.iter_modules([os.path.dirname(__file__)]) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if any(o in n for o in only)]
    return names


def _quiet_libraries() -> None:
    """No progress bars or library warnings between the tables."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for category in (UserWarning, FutureWarning, DeprecationWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers is optional here
        pass


def _print_rows(rows):
    skipped = [r for r in rows if r.get("ms") is None]
    rows = [r for r in rows if r.get("ms") is not None]
    for why in dict.fromkeys(str(r.get("note") or "not run") for r in skipped):
        names = ", ".join(dict.fromkeys(f"{r['provider']} at {r['shape']}" for r in skipped if
                                        str(r.get("note") or "not run") == why))
        print(f"(not run: {names}: {why})")
    if not rows:
        return
    cols = ["op", "shape", "provider", "ms", "gbps", "pct_copy_bw", "tflops", "peak_mb", "speedup", "note"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _plot(rows, path_prefix):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("(matplotlib not installed: no plot written)")
        return
    ops = sorted({r["op"] for r in rows})
    for op in ops:
        sub = [r for r in rows if r["op"] == op and r.get("ms") is not None]
        if not sub:
            continue
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shapes)), 4))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            ys = [next((r["ms"] for r in sub if r["shape"] == s and r["provider"] == prov), 0.0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=prov)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("median ms (log)")
        ax.set_yscale("log")
        ax.set_title(f"{op} on {device_name()}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}-{_slug(op)}.png", dpi=100)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--full", action="store_true", help="run the full shape grid named in the issues")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of bench module names to run")
    parser.add_argument("--out", default=None, help="results file stem (default: results/local/<device>)")
    parser.add_argument("--save", action="store_true",
                        help="write to the committed benchmarks/results/ (default: the ignored results/local/)")
    parser.add_argument("--no-save", action="store_true", help="write no results files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1)")
    args = parser.parse_args(argv)
    args.quick = not args.full
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _quiet_libraries()

    dev = device_name()
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
        dev_label = f"cpu ({cpu_description()}), {torch.get_num_threads()} torch thread(s)"
    else:
        dev_label = dev
    print(f"ddiff benchmarks on {dev_label} ({'quick' if args.quick else 'full'} mode), torch {torch.__version__}")
    if args.device == "cpu":
        print("No GPU here: only the torch providers run; every triton row needs a CUDA device.")

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    all_rows, failed = [], []
    for name in _bench_modules(args.only):
        print(f"\n== {name} ==", flush=True)
        started = time.time()
        try:
            rows = importlib.import_module(f"benchmarks.{name}").run(args)
        except Exception as e:  # noqa: BLE001 - one broken module must not cost the others' results
            traceback.print_exc(file=sys.stdout)
            failed.append(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            print(f"{failed[-1]} ({time.time() - started:.1f}s)", flush=True)
            continue
        for r in rows:
            r.setdefault("device", dev)
        _print_rows(rows)
        print(f"({time.time() - started:.1f}s)", flush=True)
        all_rows.extend(rows)

    summary = ratio_summary(all_rows) + failed
    if summary:
        print("\n== summary: fastest ddiff provider vs fastest other provider (x > 1: ddiff is faster) ==")
        for line in summary:
            print(line)
    status = 1 if failed else 0
    if args.no_save or not all_rows:
        return status
    name = f"cpu-{os.cpu_count()}core" if args.device == "cpu" else _slug(dev)
    stem = args.out or os.path.join(RESULTS_DIR if args.save else LOCAL_RESULTS_DIR,
                                    name + ("" if args.full else "-quick"))
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    record = {"device": dev, "torch": torch.__version__, "mode": "full" if args.full else "quick",
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
              "summary": summary, "failed": failed, "rows": all_rows}
    if args.device == "cpu":
        record["cpu"] = cpu_description()
        record["torch_threads"] = torch.get_num_threads()
        if load_at_start is not None:  # the other processes' load, as 1/5/15-minute averages
            record["load_average_start"] = load_at_start
            record["load_average_end"] = os.getloadavg()
    try:
        import triton

        record["triton"] = triton.__version__
    except Exception:
        pass
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    keys = sorted({k for r in all_rows for k in r})
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(all_rows)
    _plot(all_rows, stem)
    print(f"\nwrote {stem}.json, {stem}.csv and plots")
    return status


if __name__ == "__main__":
    sys.exit(main())
