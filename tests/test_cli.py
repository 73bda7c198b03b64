"""The `vit` entry point itself: help and version stay fast and never import torch."""

import subprocess
import sys

from typer.testing import CliRunner

from vitcli import __version__
from vitcli.cli import app

PROBE = (
    # `main`, not the `vit` entry point, which ends the process without returning.
    "import sys; sys.argv = ['vit'] + sys.argv[1:]\n"
    "from vitcli.cli import main\n"
    "try:\n    main()\n"
    "except SystemExit:\n    pass\n"
    "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_NOT_LOADED', file=sys.stderr)\n"
)


def run_probe(*args):
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60
    )


def test_help_and_version_do_not_import_torch():
    for args in (
        ["--help"],
        ["--version"],
        ["predict", "--help"],
        ["attention", "--help"],
        ["train", "--help"],
        ["data", "shapes", "--help"],
    ):
        done = run_probe(*args)
        assert "TORCH_NOT_LOADED" in done.stderr, (args, done.stderr[-500:])


def test_version_prints_the_package_version():
    done = subprocess.run(
        [sys.executable, "-m", "vitcli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == f"vitcli {__version__}"


def test_every_command_is_registered():
    """By the names click resolves, not words in the help text (the app's description
    mentions attention and training, so a text search could not fail for those)."""
    import typer.main

    group = typer.main.get_command(app)
    registered = set(group.commands)  # type: ignore[attr-defined]
    expected = {
        *("predict", "embed", "eval", "attention", "score", "inspect", "export", "train"),
        *("info", "convert", "fetch", "data"),
    }
    assert registered == expected, registered ^ expected  # a new command is added here too
    for name in expected:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage: vit " + name in result.output, name


# The shared options of the batch commands: one set of limits, one wording, exit 2.
SHARED_ERRORS = [
    (["--batch-size", "0"], "--batch-size must be a whole number from 1 to 4096, got 0"),
    (["--batch-size", "5000"], "--batch-size must be a whole number from 1 to 4096, got 5000"),
    (["--workers", "-1"], "--workers must be a whole number from 0 to 64, got -1"),
    (["--device", "nope"], "--device nope: use auto, cpu, cuda, cuda:N or mps"),
]


def batch_commands(tmp_path):
    """Each batch command with valid arguments, so that only the shared option is wrong."""
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    return {
        "predict": ["predict", str(image)],
        "embed": ["embed", str(image), "-o", str(tmp_path / "e.npy")],
        "eval": ["eval", str(tmp_path)],
        "attention": ["attention", str(image), "--out", str(tmp_path / "att")],
        "score": ["score", str(tmp_path)],
        "inspect": ["inspect", "--out", str(tmp_path / "ins")],
    }


def test_batch_commands_share_one_contract_for_their_options(tmp_path):
    for name, args in batch_commands(tmp_path).items():
        for option, message in SHARED_ERRORS:
            if name == "inspect" and option[0] == "--workers":
                continue  # inspect decodes in the main process: it has no --workers
            result = CliRunner().invoke(app, [*args, *option])
            output = result.output + (result.stderr if result.stderr_bytes else "")
            assert result.exit_code == 2, (name, option, output)
            assert f"error: {message}" in output, (name, option, output)


def test_an_unknown_method_is_a_usage_error_in_attention_and_score(tmp_path):
    commands = batch_commands(tmp_path)
    for name in ("attention", "score"):
        result = CliRunner().invoke(app, [*commands[name], "--method", "nope"])
        output = result.output + (result.stderr if result.stderr_bytes else "")
        assert result.exit_code == 2, (name, output)
        assert "error: unknown --method 'nope': use one of raw, rollout, gae" in output, name


ENV_PROBE = PROBE.replace(
    "print('TORCH_LOADED'",
    "import os; print('POLICY=' + os.environ.get('OMP_WAIT_POLICY', 'unset'), file=sys.stderr)\n"
    "print('TORCH_LOADED'",
)


def test_predict_and_attention_choose_passive_openmp_waiting_unless_the_user_chose(
    tmp_path, examples_dir
):
    """Set before torch loads (OpenMP reads it once); a user's own choice is kept."""
    import os

    image = str(examples_dir / "shapes-ring.jpg")
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    for args in (
        ["predict", image, "--quiet"],
        ["attention", image, "--out", str(tmp_path / "a"), "--quiet"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", ENV_PROBE, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert "POLICY=PASSIVE" in done.stderr and "TORCH_LOADED" in done.stderr, done.stderr[-500:]
        done = subprocess.run(
            [sys.executable, "-c", ENV_PROBE, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        )
        assert "POLICY=ACTIVE" in done.stderr, done.stderr[-500:]
