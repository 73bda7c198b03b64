"""`vit attention` against hostile folders, names, options and ends (issue 10): a one-line
error, the rest of the run goes on, nothing lost, no hang, nothing left behind."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.cli.attention import terminal_safe
from vitcli.data.preprocess import Preprocess
from vitcli.errors import InputError
from vitcli.services.attention import AttentionOptions, run
from vitcli.services.attention.files import MARKER, prepare_out_dir
from vitcli.services.attention.names import readable
from vitcli.services.attention.paint import Sampler

ROOT = Path(__file__).resolve().parents[1]


def save_images(folder: Path, count: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    paths = []
    for number in range(count):
        path = folder / f"img{number}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def options(model: Path, inputs, out: Path, **overrides) -> AttentionOptions:
    return AttentionOptions(
        inputs=tuple(str(item) for item in inputs),
        out=out,
        model=str(model),
        workers=0,
        render_threads=0,
        **overrides,
    )


def cli(*args: str):
    result = CliRunner().invoke(app, ["attention", *args])
    return result.exit_code, result.output  # stdout and stderr, interleaved


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# -- outputs never become inputs -----------------------------------------------------------
def test_out_inside_the_input_folder_is_never_read_back(tmp_path, tiny_model_file):
    photos = tmp_path / "photos"
    save_images(photos, 2)
    for _ in range(3):  # 2 -> 2 -> 2, not 2 -> 4 -> 6
        summary = run(options(tiny_model_file, [photos], photos / "attention"))
        assert summary.total == 2 and len(summary.written) == 2 and not summary.failures
    assert (photos / "attention" / MARKER).is_file()
    # Another --out inside the folder: the first run's folder is still skipped (its marker).
    summary = run(options(tiny_model_file, [photos], photos / "second"))
    assert summary.total == 2 and "left out" in summary.warnings[0]
    # A glob over everything skips both output folders too.
    summary = run(options(tiny_model_file, [f"{photos}/**/*.png"], photos / "second"))
    assert summary.total == 2
    # A file named one by one is read, wherever it is.
    sheet = photos / "attention" / "img0" / "sheet.png"
    summary = run(options(tiny_model_file, [sheet], tmp_path / "elsewhere"))
    assert summary.total == 1 and len(summary.written) == 1


def test_out_that_holds_the_inputs_or_is_an_input_is_refused(tmp_path, tiny_model_file):
    photos = tmp_path / "photos"
    (image,) = save_images(photos, 1)
    with pytest.raises(InputError, match="holds the input folder"):
        run(options(tiny_model_file, [photos], tmp_path))
    with pytest.raises(InputError, match=r"not a folder|one of the inputs"):
        run(options(tiny_model_file, [image], image))
    assert image.read_bytes()[:4] == b"\x89PNG"  # untouched


# -- file names ------------------------------------------------------------------------------
def test_names_that_are_not_utf8_are_written_losslessly(tmp_path, tiny_model_file):
    folder = tmp_path / "in"
    (plain,) = save_images(folder, 1)
    raw = os.fsencode(folder) + b"/bad\xff name\x1b[2J.png"
    os.rename(plain, raw)
    out = tmp_path / "out"
    code, output = cli(
        str(folder), "--model", str(tiny_model_file), "--out", str(out), "--html", "-w", "0"
    )
    assert code == 0, output
    (written,) = [p for p in out.iterdir() if p.is_dir()]
    meta_bytes = (written / "meta.json").read_bytes()
    meta_bytes.decode("utf-8")  # valid UTF-8 ...
    assert os.fsencode(json.loads(meta_bytes)["input"]) == raw  # ... and reversible
    page = (out / "index.html").read_bytes().decode("utf-8")
    assert "bad%FF%20name_%5B2J/sheet.png" in page  # the href holds the folder name's bytes
    assert "bad\\xff name\\x1b[2J.png" in page and "\x1b" not in page
    assert "Traceback" not in output


def test_terminal_output_escapes_control_characters(tmp_path, tiny_model_file):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "\x1b[2Jbroken.jpg").write_bytes(b"not a jpeg")
    code, output = cli(str(folder), "--model", str(tiny_model_file), "--out", str(tmp_path / "o"))
    assert code == 1 and "\x1b[2J" not in output and "\\x1b[2Jbroken.jpg" in output
    assert terminal_safe("a\rb\x9bc") == "a\\x0db\\x9bc" and terminal_safe("é ok") == "é ok"
    assert readable(os.fsdecode(b"x\xff\n")) == "x\\xff\\x0a"


# -- FIFOs and other non-files -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_fifo_named_like_an_image_is_never_opened(tmp_path, tiny_model_file, workers):
    folder = tmp_path / "in"
    save_images(folder, 2)
    os.mkfifo(folder / "pipe.png")
    process = subprocess.run(
        [sys.executable, "-m", "vitcli", "attention", str(folder), str(folder / "pipe.png")]
        + ["--model", str(tiny_model_file), "--out", str(tmp_path / "o"), "-w", workers, "-b", "1"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,  # a regression hangs on open(); this turns it into a failure
    )
    assert process.returncode == 1, process.stderr
    assert process.stderr.count("(a FIFO)") == 2  # found by the scan, and named
    assert "2 of 4 images written" in process.stderr


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,option",
    [
        (["--tile", "100000"], "--tile"),
        (["--tile", "8"], "--tile"),
        (["--blur", "1e9"], "--blur"),
        (["--blur", "nan"], "--blur"),
        (["--blur", "-1"], "--blur"),
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--discard-ratio", "1"], "--discard-ratio"),
        (["--discard-ratio", "inf"], "--discard-ratio"),
        (["--threshold", "0"], "--threshold"),
        (["--threshold", "nan"], "--threshold"),
        (["--layer", "last"], "--layer"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "100000"], "--batch-size"),
        (["--device", "cuda:7"], "--device"),
        (["--device", "tpu"], "device"),
    ],
)
def test_absurd_numbers_are_one_line_errors(tmp_path, args, option):
    started = time.perf_counter()
    code, output = cli(str(tmp_path / "none.png"), "--out", str(tmp_path / "o"), *args)
    # A value that can never work is a usage error (2); a GPU this machine lacks is not (1).
    assert code == (1 if args == ["--device", "cuda:7"] else 2)
    assert option in output and "Traceback" not in output
    assert output.strip().startswith("error:") and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing created
    assert time.perf_counter() - started < 5


def test_a_huge_blur_stays_bounded_and_flat():
    geometry = Preprocess(size=(32, 32)).geometry(1, 1)  # a 1x1 image shown at 1024
    started = time.perf_counter()
    sampler = Sampler.build(geometry, (1024, 1024), (4, 4), "bilinear", blur=10_000)
    grid = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    values = sampler(grid)
    assert time.perf_counter() - started < 5
    assert grid.min() - 1e-6 <= values.min() and values.max() <= grid.max() + 1e-6


def test_a_sheet_too_large_is_refused_before_any_work(tmp_path, tiny_model_file, monkeypatch):
    from vitcli.services.attention import runner

    monkeypatch.setattr(runner, "MAX_SHEET_PIXELS", 1_000_000)
    (image,) = save_images(tmp_path / "in", 1)
    with pytest.raises(InputError, match="megapixels"):
        run(options(tiny_model_file, [image], tmp_path / "o", tile=1024, layers=("all",)))
    assert not (tmp_path / "o").exists()


# -- full disk ---------------------------------------------------------------------------------
def test_a_full_disk_is_one_error_per_image_and_leaves_no_temp_files(
    tmp_path, tiny_model_file, monkeypatch
):
    images = save_images(tmp_path / "in", 2)
    out = prepare_out_dir(tmp_path / "o")  # the folder exists; then the disk fills up
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):  # flush, fileno, ...: the real file's
            return getattr(self.handle, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    code, output = cli(
        *map(str, images), "--model", str(tiny_model_file), "--out", str(out), "-w", "0", "--html"
    )
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in output
    assert output.count("No space left on device") == 3  # two images, then index.html
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- workers die with their parent -----------------------------------------------------------
def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_decoding_workers_die_with_the_command(tmp_path, tiny_model_file, how):
    folder = tmp_path / "in"
    save_images(folder, 60, size=(400, 300))
    command = [sys.executable, "-m", "vitcli", "attention", str(folder)]
    command += ["--model", str(tiny_model_file), "--out", str(tmp_path / "o"), "-w", "1", "-b", "1"]
    process = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while not workers and time.monotonic() < deadline and process.poll() is None:
            workers = children_of(process.pid)
            time.sleep(0.05)
        assert workers, "the decoding worker never started"
        time.sleep(0.5)  # let it fill its result pipe
        process.send_signal(how)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if alive(pid)]
    finally:
        process.kill()
        process.wait()
    for pid in survivors:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their parent"


def test_maps_files_are_byte_identical_run_after_run(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save

    from vitcli.services.attention.files import stable_header

    arrays = {"heads": np.ones((1, 2, 3, 3), np.float32), "layers": np.arange(1)}
    metadata = {"layers": "[0]", "grid": "[3, 3]", "token_order": '"[CLS, ...]"', "z": "1"}
    blobs = {stable_header(save(arrays, metadata=dict(metadata))) for _ in range(30)}
    assert len(blobs) == 1  # the library alone gives several orders of the metadata
    (blob,) = blobs
    path = tmp_path / "maps.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "np") as handle:
        assert handle.metadata() == metadata
        np.testing.assert_array_equal(handle.get_tensor("heads"), arrays["heads"])


def test_an_existing_folder_of_the_users_is_not_marked(tmp_path, tiny_model_file):
    desktop = tmp_path / "desktop"
    save_images(desktop, 1)
    (image,) = save_images(tmp_path / "in", 1)
    run(options(tiny_model_file, [image], desktop))
    assert not (desktop / MARKER).exists()  # a later scan of tmp_path still sees img0.png
    summary = run(options(tiny_model_file, [tmp_path / "in"], tmp_path / "fresh"))
    assert (tmp_path / "fresh" / MARKER).exists() and summary.total == 1
