"""``kernels/`` is installed as ``ddiff.kernels`` and never shadows Hugging Face's ``kernels``.

transformers imports Hugging Face's ``kernels`` package; a top-level ``kernels`` package of ours
reachable from the repository root (``python -m pytest``, ``python -m benchmarks``) made every
transformers model import fail. The folder therefore has no ``__init__.py`` (a namespace portion
always loses to an installed regular package) and ddiff maps it to ``ddiff.kernels``.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("sampling", "rng", "selection", "noise", "anchor_attention")


def _python(code, cwd, **env):
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_kernels_folder_is_not_a_regular_package():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_repo_root_imports_hugging_face_kernels_and_transformers_models():
    pytest.importorskip("kernels")  # transformers >= 5.25 depends on it; the test environment has it
    out = _python(
        "import os, kernels\n"
        "print(os.path.realpath(kernels.__file__ or ''))\n"
        "from transformers import LlamaForCausalLM, Qwen3ForCausalLM\n"
        "import ddiff.kernels.sampling\n",
        cwd=ROOT,
    )
    location = out.strip().splitlines()[0]
    assert location and not location.startswith(os.path.realpath(ROOT) + os.sep + "kernels"), location


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_editable_install_imports_ddiff_kernels(cwd, tmp_path):
    out = _python(
        "import ddiff, ddiff.kernels.sampling as s, ddiff.kernels.selection\n"
        "print(s.__name__, ddiff.kernels.__name__)\n",
        cwd=ROOT if cwd == "root" else str(tmp_path),
    )
    assert out.split() == ["ddiff.kernels.sampling", "ddiff.kernels"]


def test_wheel_maps_kernels_under_ddiff(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    archive = zipfile.ZipFile(tmp_path / wheel)
    names = archive.namelist()
    for module in KERNEL_MODULES:
        assert f"ddiff/kernels/{module}.py" in names
    assert "ddiff/pipelines/block_diffusion.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would shadow HF kernels"
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert archive.read(top_level[0]).decode().split() == ["ddiff"]

    # The unpacked wheel, first on the path from an unrelated folder, imports its own kernels.
    site = tmp_path / "site"
    archive.extractall(site)
    out = _python(
        "import os, ddiff.kernels.sampling as s\nprint(os.path.realpath(s.__file__))\n",
        cwd=str(tmp_path), PYTHONPATH=str(site),
    )
    assert out.strip() == os.path.realpath(site / "ddiff" / "kernels" / "sampling.py")
