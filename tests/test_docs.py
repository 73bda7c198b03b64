"""The docs stay true to the CLI, and every command's --help reads the same way.

- Every `vit ...` line in a fenced code block of README.md and docs/*.md names a command that
  exists, and each option it uses is one of that command's options.
- Every option-table row (`| \\`--xyz\\` | ...`) names an option of the command the page (or the
  section, under a heading naming `vit xyz`) is about.
- Every command's --help: no `<bool>`, `<list[...]>`, `<... range>` or `[x>=1]` placeholders,
  argument names in capitals, choices listed, defaults shown, and an Examples section at the end.

What is known to be wrong elsewhere is listed in small allow-lists naming the pending work, so
that the lead can delete entries as branches merge; an entry that no longer applies fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from vitcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the docs name that are not on main yet: (command, the work that adds it).
PENDING_COMMANDS: dict[tuple[str, ...], str] = {}
# Options the docs name that are not on main yet: (command, option) -> the work that adds it.
PENDING_OPTIONS: dict[tuple[tuple[str, ...], str], str] = {}

# Pages linked before they are merged: path -> the work that adds it.
PENDING_PAGES: dict[str, str] = {}

# Help problems in commands whose files other branches own: (command, check) -> owner.
HELP_KNOWN: dict[tuple[str, str], str] = {}

# The page a table belongs to when no heading names a command.
PAGE_COMMAND: dict[str, tuple[str, ...]] = {
    "predict.md": ("predict",),
    "attention.md": ("attention",),
    "train.md": ("train",),
    "explain.md": ("score",),
    "explorer.md": ("attention",),
    "inspect.md": ("inspect",),
    "export.md": ("export",),
    "embed.md": ("embed",),
    "int8.md": ("predict",),
}


def _commands() -> dict[tuple[str, ...], Any]:
    root = typer.main.get_command(app)
    found: dict[tuple[str, ...], typer.core.TyperCommand | TyperGroup] = {}

    def walk(group: Any, path: tuple[str, ...]) -> None:
        found[path] = group
        if isinstance(group, TyperGroup):
            for name, sub in group.commands.items():
                walk(sub, (*path, name))

    walk(root, ())
    return found


COMMANDS = _commands()
LEAVES = {p: c for p, c in COMMANDS.items() if p and not isinstance(c, TyperGroup)}


def option_names(command: typer.core.TyperCommand | TyperGroup) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, TyperOption):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _code_lines(text: str):
    """(line number, text) of each line inside a fenced code block and of each inline code
    span that starts with `vit ` elsewhere."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            yield number, line
        else:
            for span in re.findall(r"`((?:\.venv/bin/)?vit [^`]*)`", line):
                yield number, span


def vit_invocations(line: str) -> list[list[str]]:
    """The argument lists of each `vit ...` (`.venv/bin/vit ...`, `python -m vitcli ...`,
    `torchrun ... -m vitcli ...`) command on a shell line."""
    found = []
    # Split on shell separators written with spaces; `auto|cpu` stays one word.
    for part in re.split(r"\s(?:&&|\|\||\||;)\s", line.strip().removeprefix("$ ")):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:  # an unbalanced quote in prose: not a command line
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # VIT_MODEL=... vit predict
        if words and (words[0] == "vit" or words[0].endswith("/vit")):
            found.append([w.strip("[]") for w in words[1:]])
        elif "vitcli" in words and words[words.index("vitcli") - 1] == "-m":
            found.append([w.strip("[]") for w in words[words.index("vitcli") + 1 :]])
    return found


def resolve(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The longest command path named by the leading words, and the words after it."""
    path: tuple[str, ...] = ()
    rest = list(words)
    while rest and (*path, rest[0]) in COMMANDS:
        path = (*path, rest.pop(0))
    return path, rest


def options_used(words: list[str]) -> list[str]:
    used = []
    for word in words:
        if word == "--":
            break
        if word.startswith("--"):
            used.append(word.split("=", 1)[0])
        elif re.fullmatch(r"-[A-Za-z]", word):
            used.append(word)
    return used


def check_line(line: str) -> list[str]:
    """What is wrong with the vit commands on one line (empty if nothing)."""
    problems = []
    for words in vit_invocations(line):
        if not words or words[0] in ("-h", "--help", "-V", "--version"):
            continue
        path, rest = resolve(words)
        if path and not rest:
            continue  # a group alone (`vit data`) prints its commands
        if not path or isinstance(COMMANDS[path], TyperGroup):
            name = (*path, *rest[:1])
            if re.fullmatch(r"<[^>]*>|\.\.\.", rest[0]):
                continue  # prose about commands in general: `vit <command> --help`
            if name in PENDING_COMMANDS or name[:1] in PENDING_COMMANDS:
                continue
            problems.append(f"no command `vit {' '.join(name)}`")
            continue
        known = option_names(COMMANDS[path])
        for option in options_used(rest):
            if option not in known and (path, option) not in PENDING_OPTIONS:
                problems.append(f"`vit {' '.join(path)}` has no option {option}")
    return problems


def test_code_blocks_name_real_commands_and_options():
    problems = []
    for page in PAGES:
        for number, line in _code_lines(page.read_text(encoding="utf-8")):
            problems += [f"{page.relative_to(ROOT)}:{number}: {p}" for p in check_line(line)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_made_up_option_and_command():
    assert check_line("vit predict photo.jpg --top-k 3 -q") == []
    assert check_line("$ .venv/bin/vit data shapes out --per-class 2 | tee log") == []
    assert check_line("vit predict photo.jpg --frobnicate 3") == [
        "`vit predict` has no option --frobnicate"
    ]
    assert check_line("find . | vit attention - -Z") == ["`vit attention` has no option -Z"]
    assert check_line("vit frobnicate x") == ["no command `vit frobnicate`"]
    assert check_line("vit data nothing") == ["no command `vit data nothing`"]
    assert check_line("vit <command> --help") == check_line("vit ...") == []
    assert check_line("vit embed photos/ -o e.safetensors") == []  # pending, allow-listed
    assert check_line("vit convert a b --int8") == []  # pending, allow-listed
    assert check_line("torchrun --nproc_per_node=2 -m vitcli train d --nope") == [
        "`vit train` has no option --nope"
    ]
    lines = list(_code_lines("see `vit predict x --nope` here\n```\nvit data shapes d -Q\n```"))
    assert [check_line(text) for _, text in lines] == [
        ["`vit predict` has no option --nope"],
        ["`vit data shapes` has no option -Q"],
    ]


def table_options(page: Path) -> list[tuple[int, tuple[str, ...] | None, str]]:
    """(line number, command, option) for each option named in an option-table row."""
    command: tuple[str, ...] | None = PAGE_COMMAND.get(page.name)
    rows = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#"):
            named = re.search(r"`vit ([a-z]+(?: [a-z]+)?)", line)
            if named:
                path, _ = resolve(named.group(1).split())
                command = path or tuple(named.group(1).split()[:1])
        cell = re.match(r"\| `(-[^`]*)`", line)
        if cell:
            for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", cell.group(1)):
                rows.append((number, command, option))
    return rows


def test_option_tables_name_options_of_their_command():
    problems = []
    checked = 0
    for page in PAGES:
        for number, command, option in table_options(page):
            where = f"{page.relative_to(ROOT)}:{number}"
            if command is None:
                problems.append(f"{where}: option table {option} under no command")
            elif command in PENDING_COMMANDS:
                continue
            elif command not in LEAVES:
                problems.append(f"{where}: no command `vit {' '.join(command)}`")
            elif option not in option_names(LEAVES[command]):
                problems.append(f"{where}: `vit {' '.join(command)}` has no option {option}")
            else:
                checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 20  # the tables were found at all


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path = (page.parent / target).resolve()
            if not path.exists() and str(path.relative_to(ROOT)) not in PENDING_PAGES:
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
    assert not problems, "\n".join(problems)


def test_pending_commands_are_few_and_still_pending():
    assert len(PENDING_COMMANDS) <= 2 and len(PENDING_OPTIONS) <= 3 and len(HELP_KNOWN) <= 8
    for command in PENDING_COMMANDS:
        assert command not in COMMANDS, f"`vit {' '.join(command)}` exists: drop its entry"
    for page in PENDING_PAGES:
        assert not (ROOT / page).exists(), f"{page} exists: drop its entry"
    for command, option in PENDING_OPTIONS:
        assert option not in option_names(COMMANDS[command]), f"{option} exists: drop its entry"


def help_text(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def help_problems(path: tuple[str, ...]) -> dict[str, str]:
    """check name -> what is wrong, for one command's --help."""
    command = LEAVES[path]
    text = help_text(path)
    problems: dict[str, str] = {}
    bad = re.findall(r"<bool>|<list\[[^>]*>|<\w+ range>|\[-?[\d.]*<?=?x[<>]=?[\d.]*\]", text)
    if bad:
        problems["placeholders"] = f"shows {sorted(set(bad))}"
    for param in command.params:
        if isinstance(param, TyperArgument):
            shown = param.metavar or param.name or ""
            if shown != shown.upper():
                problems["arguments"] = f"argument {shown} is not in capitals"
        if not isinstance(param, TyperOption) or param.hidden or param.is_flag:
            continue
        name = max(param.opts, key=len)
        if param.type_descriptor.is_choice:
            choices = param.type_descriptor.choices or ()
            missing = [getattr(c, "value", str(c)) for c in choices]
            missing = [c for c in missing if c not in text]
            if missing or not param.help:
                problems["choices"] = f"{name}: choices {missing} not listed, or no help"
        # None means "not given" (no output file, no threshold): nothing to show.
        if param.default is not None and "[default:" not in _row(text, name):
            problems["defaults"] = f"{name} shows no [default: ...]"
    tail = text.rsplit("Examples", 1)
    if len(tail) != 2 or "╭" in tail[1]:
        problems["examples"] = "no Examples section after the options"
    elif not re.search(r"^\s*(\S+ \| )?vit \w", tail[1], re.M) or not re.match(
        r"\s*\n\s*\n", tail[1]
    ):
        problems["examples-last"] = "Examples has no `vit ...` lines after a blank line"
    return problems


def _row(text: str, option: str) -> str:
    """The help text of one option: its table row and the continuation lines under it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(rf"│ {re.escape(option)}\b", line) or re.search(
            rf"\s{re.escape(option)}[\s,]", line.split("│")[1] if "│" in line else ""
        ):
            row = [line]
            for after in lines[i + 1 :]:
                if re.match(r"│ +-", after) or not after.startswith("│"):
                    break
                row.append(after)
            return "\n".join(row)
    return ""


@pytest.mark.parametrize("path", sorted(LEAVES), ids=lambda p: " ".join(p))
def test_help_is_consistent(path):
    problems = help_problems(path)
    expected = {check for (command, check) in HELP_KNOWN if command == " ".join(path)}
    assert set(problems) == expected, problems


GROUPS = sorted(p for p, c in COMMANDS.items() if isinstance(c, TyperGroup))


@pytest.mark.parametrize("path", GROUPS, ids=lambda p: " ".join(("vit", *p)))
def test_group_help_has_examples_and_no_placeholders(path):
    text = help_text(path)
    assert "<bool>" not in text and "<list[" not in text, text
    examples = text.rsplit("Examples", 1)
    assert len(examples) == 2 and re.search(r"^\s*vit \w", examples[1], re.M), text


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(("vit", *p)))
def test_help_paragraphs_never_break_mid_sentence(path):
    """rich markup keeps a docstring's single line breaks: prose is written on one logical
    line (a trailing backslash), only an indented list keeps one item per line."""
    import inspect

    command = COMMANDS[path]
    for paragraph in inspect.cleandoc(command.help or "").split("\n\n"):
        lines = paragraph.splitlines()
        assert len(lines) == 1 or all(line.startswith("  ") for line in lines), paragraph


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|^[a-zA-Z0-9:|]*\|[a-zA-Z0-9:|]*$")


def test_placeholders_are_one_style():
    """Option values are named in capitals (N, X, FILE, DIR, REF), or as a list of literal
    choices (auto|cpu|...), never as a range or a Python type."""
    wrong = []
    for path, command in LEAVES.items():
        for param in command.params:
            if not isinstance(param, TyperOption) or param.hidden or param.is_flag:
                continue
            if param.type_descriptor.is_choice:
                continue
            if not param.metavar or not PLACEHOLDER.match(param.metavar):
                wrong.append(f"vit {' '.join(path)} {max(param.opts, key=len)}: {param.metavar}")
    assert not wrong, wrong


def test_help_check_catches_a_placeholder_and_missing_examples():
    sample = typer.Typer()

    @sample.command("bad")
    def bad(files: list[str], n: int = typer.Option(1, min=1)) -> None:
        """Has no examples."""

    @sample.command("other")
    def other() -> None:
        """Keeps typer from collapsing a single command."""

    text = CliRunner().invoke(sample, ["bad", "--help"], terminal_width=200).output
    assert "<int range>" in text and "[x>=1]" in text and "Examples" not in text
    assert re.findall(r"<\w+ range>|\[-?[\d.]*<?=?x[<>]=?[\d.]*\]", text)


def _readme_demo_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```\n.venv/bin/vit predict") + 4
    return text[start : text.index("```", start)].splitlines()


def _timing_free(line: str) -> str:
    return re.sub(
        r"in [\d.]+ s( \([\d.]+ img/s)?", "in N s\\1", re.sub(r"[\d.]+ img/s", "N img/s", line)
    )


def test_readme_demo_commands_are_the_makefile_demo():
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ndemo:", 1)[1]
    commands = [
        line.strip().replace("$(BIN)", ".venv/bin")
        for line in recipe.split("\n\n", 1)[0].splitlines()[1:]
        if line.strip().startswith("$(BIN)/vit")
    ]
    block = _readme_demo_block()
    assert commands and [line for line in block if line.startswith(".venv/bin/vit")] == commands


@pytest.mark.slow
def test_readme_demo_output_is_what_predict_prints(tmp_path):
    """The README shows `make demo`'s predict table as printed to a pipe (timings aside)."""
    import os
    import subprocess
    import sys

    block = _readme_demo_block()
    command = block[0].split()[1:]  # after .venv/bin/vit
    end = next(i for i, line in enumerate(block) if line.startswith(".venv/bin/vit attention"))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "VIT_MODEL")}
    result = subprocess.run(
        [sys.executable, "-m", "vitcli", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = (result.stdout + result.stderr).splitlines()
    shown = block[1:end]
    assert [_timing_free(line.rstrip()) for line in printed] == [
        _timing_free(line.rstrip()) for line in shown
    ]
