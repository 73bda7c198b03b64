"""`make weights` end to end on tiny settings: data, train, convert, evaluate (into tmp_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "weights" / "vit-shapes-p16.safetensors"


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_tiny_settings(tmp_path):
    before = BUNDLED.stat().st_mtime_ns if BUNDLED.exists() else None
    env = {
        **os.environ,
        "VIT": f"{sys.executable} -m vitcli",
        "PYTHON": sys.executable,
        "RUN": str(tmp_path / "run"),
        "MODEL_OUT": str(tmp_path / "model.safetensors"),
        "RESULTS": str(tmp_path / "results.json"),
        "TRAIN_PER_CLASS": "4",
        "VAL_PER_CLASS": "2",
        "TEST_PER_CLASS": "2",
        "IMAGE_SIZE": "32",
        "EPOCHS": "1",
        "MIX_PER_CLASS": "2",
        "MIX_PER_PAIR": "1",
        "MIX_VAL_PER_PAIR": "1",
        "MIX_EPOCHS": "1",
        "PAIRS_TEST_PER_PAIR": "1",
        "BATCH_SIZE": "8",
        "WORKERS": "0",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "weights" / "recipe" / "recipe.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["images"] == 12 and results["failures"] == 0
    assert 0.0 <= results["top1"] <= 1.0 and results["fp16_vs_fp32_top1_agreement"] >= 0.5
    assert results["pair_images"] == 15 and 0.0 <= results["pair_both_top2"] <= 1.0
    # Stage 2 fine-tuned stage 1's model on the mixed folder, whose groups it recorded.
    stage2 = json.loads((tmp_path / "run" / "mixed-out" / "config.json").read_text())
    assert stage2["mode"] == "finetune" and len(stage2["groups"]) == 15
    assert stage2["source"].endswith("stage1.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    # The bundled model is never touched by the test.
    assert (BUNDLED.stat().st_mtime_ns if BUNDLED.exists() else None) == before


def test_recipe_scripts_do_not_ship_in_the_wheel():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    bundled = Path(config["package-dir"]["vitcli.bundled"])
    assert not list((ROOT / bundled).glob("*.py")), "a .py file beside the bundled model ships"
    assert "vitcli.bundled.recipe" not in config["packages"]
    assert (ROOT / bundled / "recipe" / "recipe.sh").exists()
