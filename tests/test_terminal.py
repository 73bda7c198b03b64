"""What a person sees in a real terminal (a tmux pane 100 columns wide): result rows print
above the live progress bar, the bar is gone when the run ends, and every line fits the width.

rich's test console cannot show this: the bug it guards against (rows written to stdout
straight into the bar's line, bar lines left on screen) only happens between two real
streams sharing one terminal.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
needs_script = pytest.mark.skipif(
    shutil.which("script") is None or not sys.platform.startswith("linux"),
    reason="script (util-linux) is not installed",
)

WIDTH = 100
BAR = "━"  # rich's bar glyph


def _images(root: Path, count: int) -> None:
    for index in range(count):
        folder = root / "imgs" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (index * 5 % 256, 80, 160)).save(folder / f"i{index:02d}.png")


def _run_in_tmux(cwd: Path, command: str, timeout: float = 120.0) -> list[str]:
    """Run `command` in a fresh tmux server's 100x30 pane; its whole scrollback, wrapped lines
    joined back (so a line the terminal had to wrap shows as one long line)."""
    socket = f"vitcli-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    script = f"{command}; echo __END__; sleep 120"
    subprocess.run(
        [*tmux, "-f", "/dev/null", "new-session", "-d", "-x", str(WIDTH), "-y", "30"]
        + ["-c", str(cwd), "sh", "-c", script],
        check=True,
    )
    try:
        subprocess.run([*tmux, "set-option", "-g", "history-limit", "5000"], check=True)
        deadline = time.monotonic() + timeout
        while True:
            pane = subprocess.run(
                [*tmux, "capture-pane", "-p", "-J", "-S", "-"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if "__END__" in pane or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    lines = pane.rstrip("\n").splitlines()
    assert "__END__" in pane, "\n".join(lines)
    return [line.rstrip() for line in lines[: lines.index("__END__")]]


def _vit(*arguments: str) -> str:
    return shlex.join([sys.executable, "-m", "vitcli", *arguments])


@needs_tmux
def test_predict_rows_above_the_bar_and_nothing_left_behind(tmp_path, tiny_model_file):
    _images(tmp_path, 60)
    lines = _run_in_tmux(
        tmp_path, _vit("predict", "imgs", "-m", str(tiny_model_file), "-b", "1", "-w", "0")
    )
    screen = "\n".join(lines)
    assert BAR not in screen and "ETA" not in screen, screen
    rows = [line for line in lines if line.startswith("imgs/")]
    assert len(rows) == 60, screen  # each row whole, on its own line
    assert all(len(line) <= WIDTH for line in lines), screen
    assert "60 of 60 images classified" in screen


@needs_tmux
def test_embed_and_eval_leave_no_bar(tmp_path, tiny_model_file):
    _images(tmp_path, 20)
    model = str(tiny_model_file)
    lines = _run_in_tmux(
        tmp_path,
        _vit("embed", "imgs", "-o", "e.npy", "-m", model, "-b", "1", "-w", "0")
        + "; "
        + _vit("eval", "imgs", "-m", model, "-b", "1", "-w", "0"),
    )
    screen = "\n".join(lines)
    assert BAR not in screen and "ETA" not in screen, screen
    assert "20 of 20 images embedded" in screen
    assert all(len(line) <= WIDTH for line in lines), screen


@needs_script
def test_no_row_shares_a_line_with_the_bar_in_the_raw_stream(tmp_path, tiny_model_file):
    """The same run under util-linux `script` (a pseudo-terminal, no tmux): in the bytes the
    terminal receives, no result row is ever written into the bar's line, and the bar's last
    line is erased before the summary."""
    _images(tmp_path, 40)
    command = "stty cols 100 rows 30; " + _vit(
        "predict", "imgs", "-m", str(tiny_model_file), "-b", "1", "-w", "0"
    )
    done = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    raw = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, raw[-2000:]
    pieces = re.split(r"[\r\n]", raw)
    assert any(BAR in piece for piece in pieces), "the bar never showed: nothing was tested"
    assert not [piece for piece in pieces if BAR in piece and "imgs/" in piece]
    after_bar = raw[raw.rindex(BAR) :]
    assert "\x1b[2K" in after_bar.split("40 of 40 images classified")[0], after_bar[-500:]
