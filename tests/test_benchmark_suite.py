"""The benchmark suite's driver: a failing module is reported and the rest still runs; every op
gets a summary line; a user's run never writes the committed results; dev.sh says what it does."""

import os
import subprocess
import sys
import types

import pytest

import benchmarks.__main__ as suite
from benchmarks.common import ratio_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(op, ddiff_ms, other_ms):
    return [{"op": op, "shape": "s", "provider": "ddiff-torch", "ms": ddiff_ms},
            {"op": op, "shape": "s", "provider": "baseline", "ms": other_ms}]


@pytest.fixture
def fake_modules(monkeypatch):
    def broken(args):
        raise RuntimeError("boom in the middle")

    modules = {"bench_a_ok": lambda args: _rows("op-a", 1.0, 2.0), "bench_b_broken": broken,
               "bench_c_ok": lambda args: _rows("op-c", 4.0, 2.0)}
    for name, run in modules.items():
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", types.SimpleNamespace(run=run))
    monkeypatch.setattr(suite, "_bench_modules", lambda only: list(modules))
    return modules


def test_failing_module_is_reported_and_the_rest_runs(fake_modules, tmp_path, capsys):
    stem = tmp_path / "run"
    status = suite.main(["--out", str(stem)])
    out = capsys.readouterr().out
    assert status == 1
    assert "Traceback" in out and "boom in the middle" in out
    summary = out[out.index("== summary"):]
    assert "op-a: s: ddiff-torch 2.00x vs baseline" in summary
    assert "op-c: s: ddiff-torch 0.50x vs baseline" in summary
    assert "FAILED bench_b_broken: RuntimeError: boom in the middle" in summary
    import json

    record = json.loads((tmp_path / "run.json").read_text())
    assert {r["op"] for r in record["rows"]} == {"op-a", "op-c"}
    assert record["failed"] == ["FAILED bench_b_broken: RuntimeError: boom in the middle"]
    assert (tmp_path / "run.csv").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run-op-a.png").exists() and (tmp_path / "run-op-c.png").exists()


def test_default_results_go_to_an_ignored_folder(fake_modules, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "LOCAL_RESULTS_DIR", str(tmp_path / "local"))
    monkeypatch.setattr(suite, "RESULTS_DIR", str(tmp_path / "committed"))
    suite.main([])
    assert os.listdir(tmp_path / "local") and not (tmp_path / "committed").exists()
    suite.main(["--save"])
    assert any(n.endswith("-quick.json") for n in os.listdir(tmp_path / "committed"))


def test_local_results_and_plots_are_git_ignored():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    local = os.path.relpath(suite.LOCAL_RESULTS_DIR, ROOT)
    paths = [os.path.join(local, "cpu-2core-quick.json"), "benchmarks/results/cpu-2core-quick-sample.png"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths
    committed = subprocess.run(["git", "check-ignore", "benchmarks/results/cpu-2core-quick.json"], cwd=ROOT)
    assert committed.returncode == 1  # committed results stay tracked


def test_summary_has_a_line_for_every_op_and_says_why_rows_did_not_run():
    rows = _rows("compared", 1.0, 3.0) + [
        {"op": "alone", "shape": "tiny", "provider": "ddiff-torch", "ms": 5.0},
        {"op": "alone", "shape": "tiny", "provider": "ddiff-triton", "ms": None, "note": "needs a CUDA device"},
        {"op": "alone", "shape": "tiny", "provider": "flex", "ms": None, "note": "no CPU backward"},
        {"op": "only-others", "shape": "big", "provider": "hf", "ms": 2.0},
    ]
    lines = ratio_summary(rows)
    assert [line.split(":")[0] for line in lines] == ["compared", "alone", "only-others"]
    assert lines[0] == "compared: s: ddiff-torch 3.00x vs baseline"
    assert "tiny: ddiff-torch 5 ms" in lines[1]
    assert "ddiff-triton not run: needs a CUDA device" in lines[1] and "flex not run: no CPU backward" in lines[1]
    assert "no ddiff provider ran" in lines[2]


def test_dev_sh_says_what_it_sets_up(tmp_path):
    """With a stand-in python (it records its arguments and fails only `import torch`), dev.sh
    announces each set-up step on its own line before running it."""
    log = tmp_path / "calls.log"
    shim = tmp_path / "python"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {log}\n'
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi\n'
        'if [ "$1" = "-c" ]; then exit 1; fi\n'
        "exit 0\n"
    )
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "DDIFF_VENV": str(tmp_path / "venv"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", "scripts/dev.sh", "bench", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("[dev.sh]")]
    assert [line.split()[1] for line in said] == ["creating", "installing", "installing", "running"]
    assert "torch" in said[1] and "ddiff" in said[2]
    calls = log.read_text()
    assert "-c scripts/constraints.txt torch==2.13.0" in calls  # the tested set, pinned
    assert "-c scripts/constraints.txt -e .[test,bench]" in calls
    assert "-m benchmarks --help" in calls
