"""The wheel installs the Triton kernels as ``ddiff.kernels``, never as a top-level ``kernels``.

A top-level ``kernels`` module would shadow Hugging Face's ``kernels`` package, which
transformers probes for.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_maps_kernels_under_ddiff(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for module in ("sampling", "rng", "selection", "anchor_attention"):
        assert f"ddiff/kernels/{module}.py" in names
    assert "ddiff/pipelines/block_diffusion.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would shadow HF kernels"
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        content = zipfile.ZipFile(tmp_path / wheel).read(top_level[0]).decode().split()
        assert content == ["ddiff"]
