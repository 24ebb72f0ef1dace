"""The live notebook runs headless (nbclient) against a real run, with the venv's own ipykernel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "analysis" / "ffn_vs_kv.ipynb"


def _execute(tmp_path: Path) -> nbformat.NotebookNode:
    # a private kernelspec that runs this interpreter, so no installed "python3" spec is needed or used
    spec_dir = tmp_path / "kernels" / "harness-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "harness", "language": "python"}))
    km = KernelManager(kernel_name="harness-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def _outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            text.append(out.get("text", ""))
            data = out.get("data", {})
            text.append(data.get("text/markdown", "") + data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_notebook_runs_on_tiny_run(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_RUN", str(tiny_run))
    monkeypatch.delenv("HARNESS_MODEL_VARIANT", raising=False)
    nb = _execute(tmp_path)
    text, images = _outputs(nb)
    assert images == 4
    assert "tiny-2t" in text and "read model: exact" in text
    assert "| Context | Input tokens | KV-cache MB |" in text
    assert "## Crossovers" in text and "attn_kv reaches ffn" in text  # the time model's cell


def test_notebook_parameter_cell_defaults_to_reference_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    assert "HARNESS_RUN" in params[0].source and "reference_run_path()" in params[0].source
    # no recorded numbers are hard-coded in the notebook's code
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for literal in ("993.8", "1372.1", "75.3", "16384"):
        assert literal not in code


def test_notebook_runs_on_reference_run(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_RUN", raising=False)
    monkeypatch.delenv("HARNESS_MODEL_VARIANT", raising=False)
    text, images = _outputs(_execute(tmp_path))
    assert images == 4
    assert "| short | 13 | 0.89 | 1680.0 | 0.89 | 0.001 | 75.3 | 0.9 |" in text
    assert "No time model for this run: a reference run" in text
