"""Start-up and batch speed: no random init under loaded weights, huge pages for torch."""

from __future__ import annotations

import json

import torch

from vitcli.model import ViT


def test_a_loaded_model_is_a_plain_vit_built_without_random_init(tiny_model_file, monkeypatch):
    from safetensors.torch import load_file

    from vitcli.weights.resolve import load_model

    def refuse(self) -> None:
        raise AssertionError("random init while loading weights")

    monkeypatch.setattr(ViT, "reset_parameters", refuse)
    model = load_model(str(tiny_model_file)).model
    assert type(model) is ViT and not model.training
    stored = load_file(tiny_model_file)
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    # Still trainable: every parameter a leaf that asks for gradients.
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())


def test_commands_ask_torch_for_huge_pages_unless_the_user_chose(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import os; from vitcli.runtime import prefer_passive_waiting; prefer_passive_waiting(); "
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for preset, expected in ((None, "1"), ("0", "0")):
        run_env = env if preset is None else {**env, "THP_MEM_ALLOC_ENABLE": preset}
        shown = subprocess.run(
            [sys.executable, "-c", code],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert shown.stdout.strip() == expected, shown.stderr


def test_a_one_image_predict_runs_no_full_garbage_collection(examples_dir):
    """Importing torch leaves ~1M long-lived objects; with Python's default thresholds a
    one-image `vit predict` ran three full collections over them (~90 ms) and one more at
    exit. `vitcli.cli.main` raises the young-generation threshold and freezes the heap at
    exit: no full collection from start to finish (measured margin: about 4x)."""
    import subprocess
    import sys

    code = """
import gc, sys
full = []
def count(phase, info):
    if phase == "start" and info["generation"] == 2:
        full.append(1)
gc.callbacks.append(count)
sys.argv = ["vit", "predict", sys.argv[1], "-q"]
from vitcli.cli import GC_THRESHOLDS, main
try:
    main()
except SystemExit as done:
    assert not done.code, done.code
assert gc.get_threshold() == GC_THRESHOLDS
print("full collections", len(full), file=sys.stderr)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(examples_dir / "shapes-star.jpg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "full collections 0" in done.stderr, done.stderr
    assert '"label": "star"' in done.stdout


def test_the_vit_program_runs_its_exit_handlers_and_keeps_its_status(tmp_path, examples_dir):
    """`vit` ends without the interpreter's teardown (cli.leave): the atexit handlers still
    run, every record is out, and the exit status is the command's."""
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "marker, image, top_k = sys.argv[1:4]\n"
        "atexit.register(lambda: open(marker, 'a').write('ran'))\n"
        "sys.argv = ['vit', 'predict', image, '-q', '--top-k', top_k]\n"
        "from vitcli.cli import entry\n"
        "entry()\n"
        "raise AssertionError('entry returned')\n"
    )
    image = str(examples_dir / "shapes-star.jpg")
    for name, target, top_k, status in (
        ("ok", image, "6", 0),
        ("usage", image, "0", 2),
        ("failed", str(tmp_path / "missing.jpg"), "2", 1),
    ):
        marker = tmp_path / name
        done = subprocess.run(
            [sys.executable, "-c", code, str(marker), target, top_k],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == status, (name, done.stderr)
        assert marker.read_text() == "ran", name
        if status == 0:
            record = json.loads(done.stdout)
            assert len(record["predictions"]) == 6
