"""`vit predict` against hostile inputs and outputs: each case of issue 10 and its neighbours.

The promise: one `error:` line that says what to do, the rest of the run goes on, exit
status 1 if anything failed (2 for a usage error), nothing lost, no hang. Anything that could
hang runs in a subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.images import open_image
from vitcli.data.inputs import collect_inputs, glob_paths
from vitcli.errors import ImageDecodeError
from vitcli.model import ViT, ViTConfig
from vitcli.services.outputs import csv_text, csv_unescape
from vitcli.weights.format import save_model

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["=cmd|' /C calc'!A0", "@SUM(1)", "-2+3", "\x1b[2Jclear", "plain"]


def tiny_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return path


def tiny_model(path: Path, labels=LABELS, nan: bool = False) -> Path:
    config = ViTConfig(
        image_size=32, patch_size=8, num_classes=5, width=32, depth=1, num_heads=4, mlp_dim=32
    )
    torch.manual_seed(0)
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
        if nan:
            model.head.bias[0] = float("nan")
    return save_model(model, path, labels=list(labels))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "hostile.safetensors")


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 120, **kwargs):
    """`python -m vitcli ...` with bytes in and out (names need not be UTF-8)."""
    return subprocess.run(
        [sys.executable, "-m", "vitcli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def invoke(*args: str):
    return CliRunner().invoke(app, [*args])


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict readers do."""

    def refuse(constant: str):
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# -- the output is one of the inputs ----------------------------------------------------------


def test_output_that_is_an_input_is_refused_before_anything_is_opened(model_file, tmp_path):
    image = tiny_image(tmp_path / "img.png")
    before = image.read_bytes()
    (tmp_path / "link.json").symlink_to(image)
    os.link(image, tmp_path / "hard.csv")
    for output in ("img.png", "link.json", "hard.csv"):
        result = invoke("predict", str(image), "-m", str(model_file), "-o", str(tmp_path / output))
        assert result.exit_code == 1 and "is one of the inputs" in result.output, output
        assert image.read_bytes() == before
    # A folder input: its images are inputs too.
    tiny_image(tmp_path / "b.png", seed=1)
    result = invoke(
        "predict", str(tmp_path), "-m", str(model_file), "-f", "json", "-o", str(tmp_path / "b.png")
    )
    assert result.exit_code == 1 and "is one of the inputs" in result.output
    assert Image.open(tmp_path / "b.png").size == (12, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.png",
        "hard.csv",
        "img.png",
        "link.json",
    ]


def test_collect_inputs_can_exclude_an_output_folder(tmp_path):
    tiny_image(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    tiny_image(tmp_path / "out" / "sheet.png")
    every = [Path(i.path).name for i in collect_inputs([str(tmp_path)])]
    kept = [Path(i.path).name for i in collect_inputs([str(tmp_path)], exclude=[tmp_path / "out"])]
    assert every == ["a.png", "sheet.png"] and kept == ["a.png"]


# -- file names that are not UTF-8, or carry control characters --------------------------------


@pytest.mark.slow
def test_names_that_are_not_utf8_are_written_losslessly_in_every_format(model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = os.fsencode(folder) + b"/bad\xff.png"
    broken = os.fsencode(folder) + b"/broken\xfe\x1b[2J.jpg"
    tiny_image(Path(os.fsdecode(good)))
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    common = ["predict", str(folder), "-m", str(model_file), "-w", "0"]
    for fmt in ("json", "jsonl", "csv"):
        target = tmp_path / f"out.{fmt}"
        result = invoke(*common, "-o", str(target))
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and "\x1b" not in result.output
        text = target.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            paths = [os.fsencode(csv_unescape(row["path"])) for row in rows]
        else:
            records = (
                strict_json(text)
                if fmt == "json"
                else [strict_json(x) for x in text.split("\n") if x]
            )
            paths = [os.fsencode(record["path"]) for record in records]
        assert sorted(paths) == sorted([good, broken]), fmt
    # The table and the error lines show the bytes as escapes: printable, nothing raw.
    result = run_cli(*common, "-f", "table", env={**os.environ, "COLUMNS": "600"})
    assert result.returncode == 1
    assert b"bad\\xff.png" in result.stdout and b"broken\\xfe\\x1b[2J.jpg" in result.stdout
    assert b"\x1b" not in result.stdout and b"\x1b" not in result.stderr
    # Names read from stdin as bytes are not UTF-8 either.
    result = run_cli("predict", "-", "-m", str(model_file), "-w", "0", stdin=good + b"\n")
    assert result.returncode == 0, result.stderr
    assert os.fsencode(json.loads(result.stdout)["path"]) == good


@pytest.mark.slow
def test_control_characters_never_reach_the_terminal(tmp_path, model_file):
    image = tiny_image(tmp_path / "esc\x1b]0;title\x07.png")
    broken = tmp_path / "esc\x1b[2J\u202e.jpg"
    broken.write_bytes(b"")
    out = tmp_path / "out\x1b[31m.json"
    result = run_cli(
        "predict",
        str(image),
        str(broken),
        "-m",
        str(model_file),
        "-w",
        "0",
        "-f",
        "table",
        env={**os.environ, "COLUMNS": "600"},
    )
    assert result.returncode == 1
    for stream in (result.stdout, result.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream and "\u202e".encode() not in stream
    assert b"esc\\x1b[2J\\u202e.jpg" in result.stdout  # the label's ESC is escaped as well
    assert b"\\x1b[2Jclear" in result.stdout or b"plain" in result.stdout
    result = run_cli("predict", str(broken), "-m", str(model_file), "-o", str(out))
    assert result.returncode == 1 and b"\x1b" not in result.stderr
    assert b"out\\x1b[31m.json" in result.stderr  # the summary's target, escaped


# -- CSV: rows and formulas ----------------------------------------------------------------


def test_csv_rows_never_split_and_cells_never_run_as_formulas(model_file, tmp_path):
    names = ["cr\rname.png", "lf\nname.png", "=1+2.png", "+x.png", "-y.png", "@z.png", "'q.png"]
    for i, name in enumerate(names):
        tiny_image(tmp_path / name, seed=i)
    target = tmp_path / "out" / "r.csv"
    result = invoke("predict", str(tmp_path), "-m", str(model_file), "-w", "0", "-o", str(target))
    assert result.exit_code == 0, result.output
    raw = target.read_text(encoding="utf-8")
    assert "\r" not in raw and raw.count("\n") == len(names) + 1  # header + one line each
    rows = list(csv.DictReader(io.StringIO(raw)))
    assert sorted(Path(csv_unescape(row["path"])).name for row in rows) == sorted(names)
    text_cells = [row[key] for row in rows for key in row if not key.startswith("score")]
    assert not [cell for cell in text_cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    labels = {row["label_1"] for row in rows} | {row["label_2"] for row in rows}
    assert all(label.startswith("'") for label in labels if csv_unescape(label)[:1] in "=@-")
    # Scores stay numbers, even negative logits.
    result = invoke(
        "predict", str(tmp_path), "-m", str(model_file), "-w", "0", "--logits", "-o", str(target)
    )
    for row in csv.DictReader(io.StringIO(target.read_text())):
        float(row["score_1"]), float(row["score_5"])


def test_csv_escape_round_trips_every_awkward_string():
    for text in [
        "",
        "plain",
        "back\\slash",
        "\\x41",
        "=",
        "'",
        "''",
        "\t=",
        "a\r\nb",
        "\x00\x7f\x9b",
    ]:
        assert csv_unescape(csv_text(text)) == text
    assert csv_unescape(csv_text(os.fsdecode(b"\xff\\xff"))) == os.fsdecode(b"\xff\\xff")


# -- non-regular files ----------------------------------------------------------------------


@pytest.mark.slow
def test_fifos_sockets_and_devices_are_never_opened(model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    tiny_image(folder / "a.png")
    os.mkfifo(folder / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    (folder / "dev.jpg").symlink_to("/dev/zero")
    specials = ("fifo.jpg", "sock.png", "dev.jpg")
    args = ["predict", "-m", str(model_file), "-w", "1", "-b", "2"]
    # A folder scan, a glob and the names themselves in one run; then a stdin list.
    named = [str(folder / name) for name in specials]
    result = run_cli(*args, str(folder), str(folder / "*.*"), *named, timeout=60)
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    names = [Path(r["path"]).name for r in records]
    assert names.count("a.png") == 2 and all(names.count(n) == 3 for n in specials), names
    for record in records:
        if Path(record["path"]).name in specials:
            assert "not a regular file" in record["error"], record
    stdin = b"".join(os.fsencode(folder / name) + b"\n" for name in specials)
    result = run_cli(*args, "-", stdin=stdin, timeout=60)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and len(records) == 3
    assert all("not a regular file" in record["error"] for record in records)
    server.close()
    # The decoder itself (attention and train call it directly) refuses without blocking.
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(a FIFO\)"):
        open_image(folder / "fifo.jpg")


# -- globs and symlink loops ----------------------------------------------------------------


def test_quoted_globstar_ignores_symlink_loops_and_lists_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    tiny_image(tmp_path / "a.png")
    tiny_image(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "loop").symlink_to("..")
    (tmp_path / "self").symlink_to(".")
    script = (
        "import sys, json\n"
        "from vitcli.data.inputs import collect_inputs\n"
        "print(json.dumps([i.path for i in collect_inputs(sys.argv[1:])]))\n"
    )
    for pattern, expected in (
        ("**/*.png", ["a.png", "sub/b.png"]),
        ("**", ["a.png", "sub/b.png"]),
        ("*/*.png", ["sub/b.png"]),
    ):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / pattern)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        found = [Path(p).relative_to(tmp_path).as_posix() for p in json.loads(done.stdout)]
        assert found == expected, pattern
    # A symlinked folder spelled out in full is followed, as a shell would.
    assert [Path(p).name for p in glob_paths(str(tmp_path / "self" / "*.png"))] == ["a.png"]


# -- resources --------------------------------------------------------------------------------


def test_worker_counts_above_the_cpus_are_clamped_and_absurd_ones_refused(model_file, tmp_path):
    image = tiny_image(tmp_path / "a.png")
    result = invoke("predict", str(image), "-m", str(model_file), "-w", "64", "-f", "jsonl")
    assert result.exit_code == 0, result.output
    assert "warning: --workers 64 is more than the" in result.stderr  # 64 > the CPUs of CI
    result = invoke("predict", str(image), "-m", str(model_file), "-w", "1000000", "-f", "jsonl")
    assert result.exit_code == 2
    assert "--workers must be a whole number from 0 to 64, got 1000000" in result.output


@pytest.mark.slow
def test_decoding_workers_die_with_their_parent(model_file, tmp_path):
    for i in range(400):  # enough work that the run is still going when it is killed
        tiny_image(tmp_path / f"{i}.png", seed=i)
    for how in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitcli", "predict", str(tmp_path), "-m", str(model_file)]
            + ["-w", "2", "-b", "1", "-o", str(tmp_path / "out.jsonl")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(children) < 2 and proc.poll() is None:
            time.sleep(0.05)
            listed = ""
            for task in Path(f"/proc/{proc.pid}/task").glob("*"):  # any thread may fork
                with contextlib.suppress(OSError):
                    listed += " " + (task / "children").read_text()
            children = sorted({int(pid) for pid in listed.split()})
        assert len(children) >= 2, f"the workers never started (exit status {proc.poll()})"
        proc.send_signal(how)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # they get SIGKILL with their parent (prctl)
        while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
            time.sleep(0.2)
        alive = [c for c in children if _alive(c)]
        described = [_describe(c) for c in alive]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"orphaned workers after {how.name}: {described}"


def _describe(pid: int) -> str:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {stat_line.split(')')[-1].split()[:2]} {command[:120]}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- disk full, file size limits, modes, symlinks ----------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_leaves_no_temp_file(model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        tiny_image(folder / f"image-with-a-long-name-{i:03d}.png", seed=i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("old")
    for name in ("r.json", "r.csv", "r.jsonl"):
        result = run_cli(
            "predict",
            str(folder),
            "-m",
            str(model_file),
            "-w",
            "0",
            "-b",
            "4",
            "-o",
            str(out / name),
            preexec_fn=_limit_file_size(3000),
        )
        assert result.returncode == 1, result.stderr
        line = one_error_line(result.stderr.decode())
        assert f"--output {out / name}" in line and "cannot write (File too large)" in line
    assert (out / "r.json").read_text() == "old"  # atomic formats: the old file is untouched
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.jsonl"]  # jsonl keeps a prefix
    kept = (out / "r.jsonl").read_text().splitlines()
    assert kept and all(json.loads(line) for line in kept[:-1])
    # stdout on a full device: the same one line.
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "vitcli", "predict", str(folder), "-m", str(model_file)],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert "standard output: cannot write (No space left on device)" in one_error_line(
        result.stderr.decode()
    )


def test_replacing_an_output_keeps_its_mode_and_writes_through_a_symlink(model_file, tmp_path):
    image = tiny_image(tmp_path / "a.png")
    for fmt in ("json", "csv", "jsonl"):
        target = tmp_path / f"real.{fmt}"
        target.write_text("old")
        target.chmod(0o640)
        link = tmp_path / f"link.{fmt}"
        link.symlink_to(target.name)
        result = invoke("predict", str(image), "-m", str(model_file), "-o", str(link))
        assert result.exit_code == 0, result.output
        assert link.is_symlink() and os.readlink(link) == target.name
        assert target.read_text() != "old" and "a.png" in target.read_text()
        assert stat.S_IMODE(target.stat().st_mode) == 0o640, fmt


# -- what the model says -------------------------------------------------------------------


def test_non_finite_scores_are_error_records_and_json_stays_strict(tmp_path):
    model = tiny_model(tmp_path / "nan.safetensors", nan=True)
    image = tiny_image(tmp_path / "a.png")
    for fmt in ("json", "jsonl"):
        result = invoke("predict", str(image), "-m", str(model), "-f", fmt, "-w", "0")
        assert result.exit_code == 1
        text = result.stdout
        records = strict_json(text) if fmt == "json" else [strict_json(text)]
        assert "model output is not finite" in records[0]["error"]
    assert "0 of 1 images classified, 1 failed" in result.stderr
    assert "img/s" not in result.stderr  # no rate when nothing was classified


def test_probabilities_are_rounded_and_logits_are_not(model_file, tmp_path):
    image = tiny_image(tmp_path / "a.png")
    (probs,) = map(
        json.loads,
        invoke("predict", str(image), "-m", str(model_file), "-f", "jsonl").stdout.splitlines(),
    )
    for prediction in probs["predictions"]:
        assert prediction["score"] == float(f"{prediction['score']:.6g}")
    raw = invoke("predict", str(image), "-m", str(model_file), "-f", "jsonl", "--logits").stdout
    scores = [p["score"] for p in json.loads(raw)["predictions"]]
    assert any(len(repr(s).lstrip("-").replace("0.", "", 1)) > 8 for s in scores)


# -- names the system cannot take ------------------------------------------------------------


def test_paths_longer_than_the_system_allows_are_error_records(model_file, tmp_path):
    image = tiny_image(tmp_path / "a.png")
    too_long_name = str(tmp_path / ("n" * 300 + ".png"))
    too_long_path = str(tmp_path / "/".join(["d" * 200] * 25)) + ".png"
    result = invoke(
        "predict", too_long_name, str(image), too_long_path, "-m", str(model_file), "-f", "jsonl"
    )
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert "file name too long" in records[0]["error"] and "predictions" in records[1]
    assert "file name too long" in records[2]["error"]
    assert "Traceback" not in result.output


# -- exit statuses and limits ---------------------------------------------------------------


def test_usage_errors_exit_2_and_run_errors_exit_1(model_file, tmp_path):
    image = str(tiny_image(tmp_path / "a.png"))
    assert invoke("predict", image, "--top-k", "0").exit_code == 2  # a usage error
    assert invoke("predict", image, "-m", str(model_file), "--device", "gpu7").exit_code == 2
    assert invoke("predict", image, "-f", "table", "-o", str(tmp_path / "t.json")).exit_code == 2
    assert invoke("predict", image, "-m", str(tmp_path / "missing.safetensors")).exit_code == 1


def test_vitcli_max_pixels_governs_pillows_own_limit(model_file, tmp_path, monkeypatch):
    image = tmp_path / "wide.png"
    Image.new("1", (400, 300)).save(image)  # 120 000 pixels
    args = ["predict", str(image), "-m", str(model_file), "-w", "0", "-f", "jsonl"]
    monkeypatch.setenv("VITCLI_MAX_PIXELS", "50000")
    result = invoke(*args)
    assert result.exit_code == 1
    assert "over the 50000 pixels limit" in json.loads(result.stdout)["error"]
    monkeypatch.setenv("VITCLI_MAX_PIXELS", "many")
    result = invoke(*args)
    assert result.exit_code == 1 and "VITCLI_MAX_PIXELS='many'" in result.output
    monkeypatch.setenv("VITCLI_MAX_PIXELS", "200000")
    assert invoke(*args).exit_code == 0
    # Pillow's own limit (89 MP by default) no longer decides: ours raises it as well.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    decoded, size = open_image(image, max_pixels=200_000)
    assert size == (400, 300) and decoded.mode == "RGB"


@pytest.mark.slow
def test_vitcli_max_pixels_above_pillows_default_really_decodes(tmp_path):
    """95 MP is over Pillow's 89 MP warning, under our default 100 MP: it decodes."""
    image = tmp_path / "big.png"
    Image.new("1", (10_000, 9_500)).save(image, optimize=True)  # a few kB on disk
    _, size = open_image(image, draft_for=lambda w, h: (32, 32))
    assert size == (10_000, 9_500)
    with pytest.raises(ImageDecodeError, match="over the 90 MP limit"):
        open_image(image, max_pixels=90_000_000)


@pytest.mark.slow
def test_on_a_terminal_json_ends_above_the_progress_bar(model_file, tmp_path):
    """stdout and stderr on one terminal: the closing bracket is printed while the bar is
    live (so above it), never after the bar's last frame."""
    import pty
    import re

    image = tiny_image(tmp_path / "a.png")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitcli",
            "predict",
            str(image),
            "-m",
            str(model_file),
            "-f",
            "json",
        ],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    bracket = max(i for i, line in enumerate(lines) if line == "]")
    bar = max(i for i, line in enumerate(lines) if line.startswith("predict"))
    assert bracket < bar, lines
