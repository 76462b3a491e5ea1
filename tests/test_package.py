"""Packaging rules: kernels ship as fastdiff.kernels only, and `import fastdiff` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import fastdiff

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_ship_as_fastdiff_kernels():
    import fastdiff.kernels

    assert Path(fastdiff.kernels.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_no_source_imports_a_top_level_kernels_module():
    offenders = []
    for path in [*(ROOT / "fastdiff").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "kernels" or n.startswith("kernels.")]
    assert not offenders


def test_import_fastdiff_imports_neither_diffusers_nor_sklearn():
    code = "import sys, fastdiff; print(sorted(m for m in ('diffusers', 'sklearn') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_embedded_model_is_small_and_safetensors_only():
    folder = ROOT / "fastdiff" / "pretrained" / "digits"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    assert fastdiff.__version__
