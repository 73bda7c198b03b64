"""`vit attention` as one call: options in, files out, a summary back.

`run` collects the inputs, loads the model, streams batches through it and hands each
image's maps to threads that draw and write while the model runs the next batch. Progress
and per-image failures go to a callback (the CLI binds it to a progress bar; tests to
`list.append`); nothing here prints.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...data.inputs import (
    InputItem,
    collect_inputs,
    is_within,
    no_images_error,
    refuse_output_among_inputs,
)
from ...errors import InputError
from ...explain.registry import METHODS, parse_targets
from ...fileio import is_output_folder
from ...runtime import resolve_device, resolve_dtype
from ...weights.format import ModelBundle
from ..batchrun import ProgressCallback
from ..int8 import is_int8, prepare_int8
from .batches import ImageAttention, attention_batches
from .figure import display_long_side
from .files import (
    IndexEntry,
    RenderError,
    RunContext,
    prepare_out_dir,
    write_image_outputs,
)
from .index import write_index_html
from .names import output_names, readable
from .options import AttentionOptions, parse_layers, refuse_gradients
from .preview import preview_name
from .sheet import sheet_size

MAX_SHEET_PIXELS = 100_000_000  # ~300 MB as RGB, per sheet


@dataclass
class RunSummary:
    total: int = 0
    written: list[tuple[str, Path]] = field(default_factory=list)  # (input path, output folder)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input path, error)
    out_dir: Path | None = None
    index_html: Path | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _is_scan(argument: str) -> bool:
    """Whether an argument names many files (a folder or a glob) rather than one."""
    if argument == "-":
        return False
    path = Path(argument).expanduser()
    return path.is_dir() or (not path.exists() and glob.has_magic(argument))


def _scan_root(argument: str) -> str:
    """The folder a scan starts from: the folder itself, or a glob's leading plain folders."""
    path = os.path.expanduser(argument)
    if os.path.isdir(path):
        return os.path.abspath(path)
    parts = []
    for part in Path(path).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.path.abspath(os.path.join(*parts) if parts else ".")


def _output_folder_test(root: str, out_dir: Path) -> Callable[[str], bool]:
    """folder -> whether it is `out_dir` or inside it, or below `root` and inside a folder
    holding an earlier run's MARKER (answers cached: one check per folder, not per file)."""
    verdicts: dict[str, bool] = {}

    def is_output(folder: str) -> bool:
        if folder not in verdicts:
            parent = os.path.dirname(folder)
            verdicts[folder] = is_within(folder, out_dir) or (
                folder != root
                and parent != folder
                and (is_output_folder(folder) or is_output(parent))
            )
        return verdicts[folder]

    return is_output


def collect(arguments: tuple[str, ...], out_dir: Path) -> tuple[list[InputItem], int]:
    """(inputs, how many images were left out as outputs of `vit attention`).

    A folder or glob never yields files inside `out_dir` or inside a folder below its start
    that holds the MARKER of an earlier run, so a run's sheets never become inputs of the
    next. Files named one by one are always kept (the user asked for them).
    """
    if not arguments:
        return collect_inputs(arguments), 0  # raises the "no inputs given" error
    items: list[InputItem] = []
    skipped = 0
    for argument in arguments:
        found = collect_inputs([argument], skip_outputs=False, allow_empty=True)
        if not _is_scan(argument):
            items.extend(found)
            continue
        root = _scan_root(argument)
        if is_within(root, out_dir):
            raise InputError(
                f"--out {readable(str(out_dir))} holds the input folder {readable(argument)}: "
                "its images would be skipped as outputs; pick an --out outside the inputs"
            )
        is_output = _output_folder_test(root, out_dir)

        for item in found:
            if item.error is None and is_output(os.path.dirname(os.path.abspath(item.path))):
                skipped += 1
            else:
                items.append(item)
    if not items:
        why = f" ({skipped} images left out as outputs of `vit attention`)" if skipped else ""
        raise no_images_error(arguments, why)
    return items, skipped


def prepare(
    options: AttentionOptions, bundle: ModelBundle | None = None
) -> tuple[AttentionOptions, ModelBundle, list[InputItem], list[str]]:
    """Everything checked before anything is written: inputs, model, layers, sheet size.
    Returns the options with layers resolved, the model, the inputs and warnings."""
    from ...weights.resolve import load_model

    items, skipped = collect(options.inputs, options.out)
    refuse_output_among_inputs(options.out, items, "--out")
    warnings = []
    if skipped:
        warnings.append(
            f"left out {skipped} images inside output folders of vit attention "
            f"(--out {readable(str(options.out))} or earlier runs); name files one by one to "
            "use them as inputs"
        )
    # A device that is not there, or a dtype it cannot run, is refused before any file.
    resolve_dtype(options.dtype, resolve_device(options.device))
    bundle = bundle if bundle is not None else load_model(options.model)
    if not options.int8 and is_int8(bundle):
        refuse_gradients(options.methods, f"{readable(bundle.reference)} holds int8 weights")
    # An int8 model (asked for, or read from an int8 file) runs on the CPU: options say so.
    device = prepare_int8(bundle, options.int8, options.device)
    options = replace(options, device=device, int8=is_int8(bundle))
    config = bundle.config
    options = replace(options, layers=parse_layers(options.layers, config.depth))
    specific = [name for name in options.methods if METHODS[name].class_specific]
    if specific and not config.num_classes:
        raise InputError(
            f"{', '.join(specific)} explain a class, and this model has no classifier head: "
            "use --method raw or rollout"
        )
    targets = parse_targets(options.targets, bundle.labels, config.num_classes) if specific else []
    maps = len(options.methods) - len(specific) + len(specific) * len(targets)
    width, height = sheet_size(options, config.num_heads, len(options.layers), maps)
    if width * height > MAX_SHEET_PIXELS:
        raise InputError(
            f"each sheet would be {width}x{height} pixels, over "
            f"{MAX_SHEET_PIXELS // 1_000_000} megapixels; use a smaller --tile or fewer --layer"
        )
    return options, bundle, items, warnings


def run(
    options: AttentionOptions,
    on_progress: ProgressCallback | None = None,
    *,
    bundle: ModelBundle | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> RunSummary:
    """Compute and write everything for every input; bad files are recorded and skipped.
    Progress as every batch command reports it, on_progress(done, total); each failure as it
    happens through on_failure(input path, one-line error).

    `bundle`: an already loaded model to use instead of loading `options.model`.
    """
    started = time.perf_counter()
    options, bundle, items, warnings = prepare(options, bundle)
    out_dir = prepare_out_dir(options.out)  # after every check: a typo creates nothing
    names = output_names([item.path for item in items])
    summary = RunSummary(total=len(items), out_dir=out_dir, warnings=warnings)
    entries: list[IndexEntry | None] = [None] * len(items)
    done = 0

    def report(count: int, failures: list[tuple[str, str]]) -> None:
        nonlocal done
        done += count
        if on_failure is not None:
            for path, message in failures:
                on_failure(path, message)
        if on_progress is not None:
            on_progress(done, len(items))

    report(0, [])

    def fail(position: int, message: str) -> tuple[str, str]:
        summary.failures.append((items[position].path, message))
        entries[position] = IndexEntry(
            path=items[position].path, name=names[position], error=message
        )
        return items[position].path, message

    context = RunContext.from_bundle(bundle, options)
    batches = (
        attention_batches(
            bundle,
            [item.path for item in items],
            options,
            errors=[item.error for item in items],
            # --per-head needs originals larger than a tile and reads the file again anyway.
            display_long_side=None if options.per_head else display_long_side(options.tile),
        )
        if items
        else iter(())
    )
    # Drawing and writing batch k happen in threads while the model runs batch k + 1 (PIL's
    # resize and PNG encoder release the GIL); at most two batches are ever alive.
    pending: list[tuple[ImageAttention, Path, Future]] = []

    def drain() -> None:
        failed = []
        for result, folder, future in pending:
            try:
                entries[result.index] = future.result()
            except RenderError as error:
                failed.append(fail(result.index, str(error)))
                continue
            summary.written.append((result.path, folder))
        if pending:
            report(len(pending), failed)
        pending.clear()

    threads = options.render_threads
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for results, failures in batches:
            if failures:
                report(len(failures), [fail(position, message) for position, message in failures])
            drain()
            for result in results:
                folder = out_dir / names[result.index]
                future: Future = Future()
                if threads:
                    future = pool.submit(write_image_outputs, result, folder, context)
                else:  # inline: the same code path, finished before the next batch starts
                    try:
                        future.set_result(write_image_outputs(result, folder, context))
                    except RenderError as error:
                        future.set_exception(error)
                pending.append((result, folder, future))
            if not threads:
                drain()
        drain()
    if options.html:
        try:
            summary.index_html = write_index_html(
                out_dir,
                [entry for entry in entries if entry is not None],
                context,
                shown=preview_name(options),
            )
        except OSError as error:
            raise InputError(
                f"cannot write {readable(str(out_dir / 'index.html'))} "
                f"({error.strerror or error}); the sheets are written, check --out's free space"
            ) from None
    summary.seconds = time.perf_counter() - started
    return summary
