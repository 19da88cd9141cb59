"""The MLflow UI, loaded in a real headless Chromium, shows the runs of a small benchmark side by side
(scripts/ui_screenshot.py). Skipped where Chromium is not installed (Debian: apt-get install chromium)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reports.synthetic import write_synthetic_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ui_screenshot import find_chromium  # noqa: E402

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (apt-get install chromium)")


def test_mlflow_ui_shows_the_runs_side_by_side(tmp_path):
    methods = ("pfedlora", "fedgh", "standalone")
    write_synthetic_results(tmp_path / "results", "ui-demo", methods=methods, seeds=(0,), rounds=3, mlflow=True,
                            experiment="mhpfl-bench")
    out = tmp_path / "shots"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "ui_screenshot.py"), "--output-dir",
                             str(tmp_path / "results"), "--out", str(out), "--timeout", "150"],
                            capture_output=True, text=True, timeout=400)
    check = json.loads((out / "ui_check.json").read_text())
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:], check)
    assert sorted(check["compared_runs"]) == sorted(f"{m}-seed0" for m in methods)
    assert all(check["checks"].values()) and not check["missing_in_page"]
    for name in ("mlflow_runs.png", "mlflow_compare.png"):
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.shape == (1200, 1900)
        assert img.std() > 10, f"{name} looks empty"  # text, tables and plots, not a blank page
