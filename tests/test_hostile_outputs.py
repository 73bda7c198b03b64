"""Outputs that fail: a closed or full stdout, a file-size limit (real `ulimit -f` in the
child; Python ignores SIGXFSZ, so write raises EFBIG), a path that cannot be a file. Each is
one `error:` line and exit 1, never a traceback and never exit 0 with the output lost;
streamed files stop at a record boundary; nothing temporary is left behind.

We run as root, so a chmod'ed folder is no read-only folder: unwritable places are a path
under a regular file (ENOTDIR) and /proc (ENOENT/EACCES); the errno -> message mapping of a
real read-only filesystem (EROFS) is tested on fileio.output_error directly."""

from __future__ import annotations

import errno
import json
import os
import pty
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcli.fileio import output_error
from vitcli.services.embed import _MatrixSink, read_embeddings

VIT = [sys.executable, "-m", "vitcli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(40):
        pixels = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


def run(
    *args: str,
    stdout=subprocess.PIPE,
    size_limit: int | None = None,
    close_stdout=False,
    env=None,
    cwd=None,
) -> subprocess.CompletedProcess:
    def child() -> None:
        if size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (size_limit, size_limit))
        if close_stdout:
            os.close(1)

    return subprocess.run(
        [*VIT, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        preexec_fn=child,
        env=env or ENV,
        cwd=cwd,
        timeout=300,
    )


def one_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    text = result.stderr.decode()
    assert result.returncode == 1, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    return errors[0]


def whole_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-60:]
    return [json.loads(line) for line in data.splitlines()]


# -- stdout ---------------------------------------------------------------------------------
def test_info_to_a_closed_stdout_is_an_error():
    one_error(run("info", "bundled", close_stdout=True), "standard output", "closed")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["info", "bundled"],
        ["--version"],
        ["predict", "--help"],
        ["predict", "IMAGES"],
        ["predict", "IMAGES", "-f", "csv"],
        ["eval", "LAB", "-q", "-m", "MODEL"],
    ],
    ids=["info", "version", "help", "predict", "predict-csv", "eval-q"],
)
@pytest.mark.parametrize("where", ["closed", "full"])
def test_a_closed_or_full_stdout_is_exit_1_in_every_command(tmp_path, images, args, where):
    lab = tmp_path / "lab"
    for label in ("circle", "square"):
        (lab / label).mkdir(parents=True)
        Image.open(images / "000.png").save(lab / label / "0.png")
    args = [str(images) if a == "IMAGES" else str(lab) if a == "LAB" else a for a in args]
    args = ["bundled" if a == "MODEL" else a for a in args]
    if where == "closed":
        result = run(*args, close_stdout=True)
    else:
        with open("/dev/full", "w") as full:
            result = run(*args, stdout=full)
    one_error(result, "standard output")


@pytest.mark.slow
def test_score_to_a_full_stdout_is_exit_1(tmp_path):
    made = run("data", "shapes", str(tmp_path / "s"), "--per-class", "1", "-q")
    assert made.returncode == 0, made.stderr
    with open("/dev/full", "w") as full:
        result = run("score", str(tmp_path / "s"), "--limit", "1", "--method", "raw", stdout=full)
    one_error(result, "No space left")


@pytest.mark.slow
def test_a_zero_width_terminal_still_gets_the_table(images):
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*VIT, "predict", str(images / "000.png")],
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env={**ENV, "COLUMNS": "0"},
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0
    assert b"000.png" in output and b"prediction" in output


# -- file-size limits and record boundaries ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("to", ["file", "stdout"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_size_limit_stops_streams_at_a_record_boundary(tmp_path, images, to, fmt):
    target = tmp_path / f"out.{fmt}"
    if to == "file":
        if fmt == "csv":
            pytest.skip("csv files are atomic: tested below")
        result = run("predict", str(images), "-o", str(target), "-b", "4", size_limit=3000)
    else:
        with open(target, "w") as handle:
            args = ["predict", str(images), "-f", fmt, "-b", "4"]
            result = run(*args, stdout=handle, size_limit=3000)
    one_error(result, "File too large", "ulimit -f")
    data = target.read_bytes()
    assert 0 < len(data) <= 3000 and data.endswith(b"\n")
    if fmt == "jsonl":
        records = whole_jsonl(target)
        assert records and all("predictions" in record for record in records)
    else:
        rows = data.decode().splitlines()
        assert all(row.count(",") == rows[0].count(",") for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["json", "csv", "safetensors", "npy"])
def test_a_size_limit_on_an_atomic_output_leaves_nothing(tmp_path, images, suffix):
    target = tmp_path / f"out.{suffix}"
    command = "embed" if suffix in ("safetensors", "npy") else "predict"
    result = run(command, str(images), "-o", str(target), "-b", "4", size_limit=3000)
    one_error(result, "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["convert", "bundled", "OUT.safetensors"],
        ["export", "bundled", "OUT.onnx"],
        ["inspect", "--out", "OUT"],
    ],
    ids=["convert", "export", "inspect"],
)
def test_a_size_limit_on_convert_export_inspect_is_one_line(tmp_path, args):
    args = [str(tmp_path / a.replace("OUT", "o")) if a.startswith("OUT") else a for a in args]
    one_error(run(*args, size_limit=20_000), "File too large")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".pending"))]


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "bundled", "UNDER/x.safetensors"],
        ["export", "bundled", "UNDER/x.onnx"],
        ["score", "SHAPES", "--limit", "1", "--method", "raw", "-o", "UNDER/s.json"],
    ],
    ids=["convert", "export", "score"],
)
@pytest.mark.slow
def test_an_output_that_cannot_be_created_is_one_line(tmp_path, args):
    regular = tmp_path / "a-file"
    regular.write_text("x")
    if "SHAPES" in args:
        assert run("data", "shapes", str(tmp_path / "s"), "--per-class", "1", "-q").returncode == 0
    args = [a.replace("UNDER", str(regular)).replace("SHAPES", str(tmp_path / "s")) for a in args]
    one_error(run(*args), "cannot write", "is a file, not a folder")


def test_the_error_for_a_read_only_filesystem_says_what_to_do():
    error = OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert "choose a folder you can write to" in str(output_error("--output x.json", error))
    error = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert "ulimit -f" in str(output_error("--output x.json", error))


# -- vit embed -o x.safetensors holds no rows -------------------------------------------------
def test_the_matrix_sink_streams_rows_to_disk(tmp_path):
    sink = _MatrixSink(tmp_path / "e.safetensors", "safetensors", 4)
    row = np.arange(4, dtype=np.float32)
    alive = weakref.ref(row)
    sink.write([{"path": "a.png", "embedding": row}, {"path": "b.png", "error": "bad"}])
    del row
    assert alive() is None  # written out, not held
    sink.write([{"path": "c.png", "embedding": np.ones(4, np.float32)}])
    sink.close()
    matrix, paths, errors = read_embeddings(tmp_path / "e.safetensors")
    assert matrix.tolist() == [[0, 1, 2, 3], [1, 1, 1, 1]] and paths == ["a.png", "c.png"]
    assert errors == [{"path": "b.png", "error": "bad"}]
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_a_folder_even_root_cannot_write_is_one_line():
    from typer.testing import CliRunner

    from vitcli.cli import app

    result = CliRunner().invoke(app, ["convert", "bundled", "/sys/kernel/x.safetensors"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /sys/kernel/x.safetensors: cannot")
