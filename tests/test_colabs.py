"""The Colab notebooks (colabs/*.ipynb), each run end to end on a CPU in tiny mode (BIGR_COLAB_TINY=1).

Tiny mode converts the parity fixtures (the small models recorded from the original code) instead of
downloading the released weights, and uses images that ship with scikit-image / scikit-learn.
"""

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
# What each notebook writes into BIGR_COLAB_OUT.
OUTPUTS = {
    "generation": ["samples.png", "decoding_order.png"],
    "editing": ["input.png", "inpaint.png", "outpaint.png", "edit_class.png", "interpolate.png"],
    "representation": ["digits.png", "probe.json"],
}
CELL_TIMEOUT_S = 300


def _read(name):
  return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_notebook_is_clean(name):
  """Stored without outputs; the first code cell installs the package on Colab only."""
  nb = _read(name)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert "if IN_COLAB:" in code[0].source and "pip install" in code[0].source
  assert nb.cells[0].cell_type == "markdown"


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  out = tmp_path / "out"
  monkeypatch.setenv("BIGR_COLAB_TINY", "1")
  monkeypatch.setenv("BIGR_COLAB_OUT", str(out))
  monkeypatch.setenv("BIGR_COLAB_FIXTURES", str(ROOT / "tests" / "fixtures" / "bigr_original"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as a notebook on one accelerator
  # The tests' persistent compilation cache (conftest.py), unless one is set.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax")))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  nb = _read(name)
  # Runs in tmp_path: nothing lands in the checkout. Raises CellExecutionError on any failing cell.
  nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  shown = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert shown, "the notebook showed no image"
  for filename in OUTPUTS[name]:
    path = out / filename
    assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {filename}"
    if path.suffix == ".png":
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  if name == "representation":
    top1 = json.loads((out / "probe.json").read_text())
    assert set(top1) == {"pixels", "layer 0", "layer 1"}
    assert all(0.0 <= v <= 100.0 for v in top1.values())
    assert top1["pixels"] > 50.0  # real digits: a linear probe on pixels is far above chance (10%)
