"""Writing one image's outputs (sheet.png, maps, meta.json, per-head PNGs), the output
folder and index.html. Every file is written atomically (temp file + rename): a reader, a
kill or a full disk never leaves half a file, and a failed write removes its temp file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..._version import __version__
from ...data.images import display_size, open_image
from ...errors import ImageDecodeError, InputError, VitError
from ...explain.maps import token_order
from ...fileio import OUTPUT_MARKER, atomic_write_bytes, mark_output_folder
from ...weights.format import ModelBundle
from .batches import ImageAttention
from .figure import captioned, display_long_side, key_labels, key_pixels, tile_size
from .heading import model_phrase
from .meta import QUERY_ARRAYS, QUERY_NOTES, prefix_mass_meta
from .names import json_text, readable
from .options import AttentionOptions, MapsFormat, Scale, Style
from .paint import peak_ratio, range_note
from .png import png_bytes
from .preview import PREVIEW, preview, preview_map
from .sheet import all_tiles, render_sheet

TOKEN_ORDER = "[CLS, patch_0, ..., patch_{N-1}]; patch k covers grid row k // Wp, column k % Wp"
MARKER = OUTPUT_MARKER  # in every output folder: scans for inputs skip such folders


class RenderError(VitError):
    """One image whose outputs could not be drawn or written; the run records it and goes on."""


@dataclass(frozen=True)
class RunContext:
    """What every image of a run shares: model facts for meta.json, and the options."""

    model: dict
    preprocess: dict
    patch_size: int
    options: AttentionOptions
    depth: int = 0
    num_heads: int = 0
    num_prefix_tokens: int = 1
    model_phrase: str = ""  # the sheet's line naming the model (sheet.model_phrase)
    token_order: str = TOKEN_ORDER

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, options: AttentionOptions) -> RunContext:
        config = bundle.config
        model = {
            "reference": bundle.reference,
            "format": bundle.source_format,
            "name": config.name,
            "config": config.to_dict(),
        }
        return cls(
            model=model,
            preprocess=bundle.preprocess.to_dict(),
            patch_size=config.patch_size,
            options=options,
            depth=config.depth,
            num_heads=config.num_heads,
            num_prefix_tokens=config.num_prefix_tokens,
            token_order=token_order(config),
            model_phrase=model_phrase(
                str(bundle.reference or config.name or "model"), tuple(bundle.labels)
            ),
        )


@dataclass
class IndexEntry:
    path: str
    name: str
    label: str | None = None
    score: float | None = None
    error: str | None = None
    preview: str | None = None  # file name inside the folder
    note: str | None = None  # the preview map's range (paint.range_note)
    explorer: str | None = None


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the output folder, marked as such (MARKER) when it is new or empty: later scans
    skip marked folders. A folder that already held other files is not marked, so that
    marking it never hides the user's own images from a later scan."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(
            f"--out {readable(str(out_dir))}: exists and is not a folder; pick another --out"
        )
    try:
        fresh = not out_dir.exists() or next(os.scandir(out_dir), None) is None
        out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            mark_output_folder(out_dir)
    except OSError as error:
        raise InputError(
            f"--out {readable(str(out_dir))}: cannot write there ({error.strerror or error}); "
            "pick another --out"
        ) from None
    return out_dir


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic, without fsync: a sheet is cheap to redo and a run writes thousands of files."""
    atomic_write_bytes(path, data, durable=False)


def maps_arrays(result: ImageAttention) -> dict[str, np.ndarray]:
    """Array name -> array: "heads", "head_mean", "layers" (raw), then one (Hp, Wp) map per
    method and target, named as in `compute_batch` ("rollout", "gae.top1", "gae.class3")."""
    arrays: dict[str, np.ndarray] = {}
    if result.heads is not None and result.head_mean is not None:
        arrays["heads"] = np.ascontiguousarray(result.heads, dtype=np.float32)  # L,nh,Hp,Wp
        arrays["head_mean"] = np.ascontiguousarray(result.head_mean, dtype=np.float32)  # L,Hp,Wp
        arrays["layers"] = np.asarray(result.layers, dtype=np.int64)
        if result.prefix_mass is not None and result.prefix_mass.shape[-1]:
            arrays["prefix_mass"] = np.ascontiguousarray(result.prefix_mass, dtype=np.float32)
    for name, query in result.queries.items():  # dist_heads, probe_head_mean, ...
        for key, array in query.items():
            if key == "prefix_mass" and not array.shape[-1]:
                continue  # no prefix tokens (SigLIP): nothing to record
            dtype = np.uint8 if key == "masks" else np.float32
            arrays[QUERY_ARRAYS[key].format(name)] = np.ascontiguousarray(array, dtype=dtype)
    for name, grid_map in result.methods.items():
        arrays[name] = np.ascontiguousarray(grid_map, dtype=np.float32)  # Hp, Wp
    if result.masks is not None:
        arrays["masks"] = np.ascontiguousarray(result.masks, dtype=np.uint8)  # layers, nh, Hp, Wp
    return arrays


def stable_header(blob: bytes) -> bytes:
    """A safetensors file with its metadata in sorted order. The library writes the metadata
    from a hash map whose order changes from process to process; sorted, equal maps give
    byte-equal files. The header keeps its length (same content), so no offset moves."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # not the library's compact form: leave the file as it is
        return blob
    return blob[:8] + text.ljust(size, b" ") + blob[8 + size :]


def _write_maps(
    folder: Path, arrays: dict[str, np.ndarray], maps_format: MapsFormat, metadata: dict
) -> list[str]:
    if maps_format == MapsFormat.safetensors:
        from safetensors.numpy import save

        blob = save(arrays, metadata={k: json.dumps(v) for k, v in metadata.items()})
        write_atomic(folder / "maps.safetensors", stable_header(blob))
        return ["maps.safetensors"]
    written = []
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_atomic(folder / f"{name}.npy", buffer.getvalue())
        written.append(f"{name}.npy")
    return written


def _load_original(path: str, long_side: int, exif: bool = True) -> Image.Image:
    def draft_for(width: int, height: int) -> tuple[int, int]:
        return display_size((width, height), min(long_side, max(width, height)))

    image, _ = open_image(path, draft_for=draft_for, exif=exif)
    return image


def _display_fits(result: ImageAttention, tile: int) -> bool:
    """Whether the decoder's display image can make the sheet: at least the tiles' size, or
    the whole original. (A model whose JPEG draft decode came out smaller than the tiles
    sends less; then the file is read again.)"""
    if result.display is None:
        return False
    size = (result.display.shape[1], result.display.shape[0])
    width, height = tile_size(result.geometry.original_size, tile)
    return (size[0] >= width and size[1] >= height) or size == tuple(result.geometry.original_size)


def methods_meta(result: ImageAttention, depth: int) -> list[dict]:
    """meta.json's "methods": per map its array name, method, target and layers."""
    from ...explain.registry import METHODS

    entries = []
    if result.heads is not None:
        entries.append(
            {
                "method": "raw",
                "arrays": ["heads", "head_mean"],
                "class_specific": False,
                "layers": list(result.layers),
                "note": "attention of the query row (see query_note) of each chosen layer, "
                "per head and their mean, renormalised over the patches",
            }
        )
        for name in result.queries:
            entries.append(
                {
                    "method": "raw",
                    "query": name,
                    "arrays": [QUERY_ARRAYS["heads"].format(name)]
                    + [QUERY_ARRAYS["head_mean"].format(name)],
                    "class_specific": False,
                    "layers": ["probe"] if name == "probe" else list(result.layers),
                    "note": QUERY_NOTES[name],
                }
            )
    for key, grid_map in result.methods.items():
        method, target_name = result.map_info.get(key, (key, None))
        registered = METHODS.get(method)
        entry: dict = {
            "method": method,
            "array": key,
            "class_specific": target_name is not None,
            "layers": layers_read(method, registered, depth),
            "peak_over_uniform": peak_ratio(grid_map),
        }
        if target_name is not None:
            index, label, score = result.targets[target_name]
            entry["target"] = {"spec": target_name, "index": index, "label": label, "score": score}
        entries.append(entry)
    return entries


def layers_read(method: str, registered, depth: int) -> str | list[int]:
    if method in METHOD_LAYERS:
        return METHOD_LAYERS[method]
    return sorted(registered.layers(depth)) if registered is not None else []


# Which layers each built-in method reads (the registry knows only the weights a method asks
# the shared forward pass for; the class-specific ones run their own).
METHOD_LAYERS = {
    "rollout": "all",
    "gae": "all",
    "attribution": "all",
    "gradcam": "last (norm1 of the last block)",
}


def write_image_outputs(result: ImageAttention, folder: Path, context: RunContext) -> IndexEntry:
    """sheet.png, the maps, meta.json (and per-head PNGs) for one image, each file atomic."""
    options = context.options
    try:
        original_long = max(result.geometry.original_size)
        individual_long = min(max(original_long, options.tile), options.individual_size)
        needed = max(display_long_side(options.tile), individual_long if options.per_head else 0)
        if (
            result.display is not None
            and _display_fits(result, options.tile)
            and not options.per_head
        ):
            # The decoding worker already made the sheet-sized original: no second decode.
            image = Image.fromarray(result.display)
        else:
            image = _load_original(result.path, needed, exif=result.geometry.exif)
        folder.mkdir(parents=True, exist_ok=True)
        # Each image's folder is marked too: with --out inside (or equal to) an input folder,
        # which cannot be marked itself, a later scan still skips the sheets.
        mark_output_folder(folder)
        files: dict = {"sheet": "sheet.png"}
        write_atomic(
            folder / "sheet.png",
            png_bytes(render_sheet(result, image, options, context.model_phrase)),
        )
        if options.per_head:
            size = display_size(result.geometry.original_size, individual_long)
            individual = []
            key = key_pixels(
                options.style.value, options.colormap.value, options.overlay_alpha, 160, 10
            )
            labels = key_labels(options.scale == Scale.per_map, one=True)
            for tile in all_tiles(result, image, options, size):
                pixels = captioned(tile.pixels, tile.title, tile.note, key, labels)
                write_atomic(folder / f"{tile.stem}.png", png_bytes(pixels))
                individual.append(f"{tile.stem}.png")
            files["per_head"] = individual
        if options.html:
            write_atomic(folder / PREVIEW, png_bytes(preview(result, image, options)))
            files["preview"] = PREVIEW
        if options.explore and result.attentions is not None:
            write_explorer_page(result, folder / EXPLORER, context)
            files["explorer"] = EXPLORER
        arrays = maps_arrays(result)
        grid = list(result.grid_size)
        files["maps"] = _write_maps(
            folder,
            arrays,
            options.maps_format,
            {
                "layers": result.layers,
                "grid": grid,
                "token_order": context.token_order,
                "maps": list(result.methods),
            },
        )
        index, label, score = result.top[0]
        query_note = QUERY_NOTES[result.query]
        if result.query == "probe":
            query_note += (
                "; rollout is seeded by its head-mean row (probe_row @ R); the chosen layers' "
                "maps (heads) have no class query inside the encoder and use the mean over all "
                "queries"
            )
        meta = {
            "vitcli_version": __version__,
            "input": result.path,
            "model": context.model,
            "preprocess": context.preprocess,
            "geometry": {
                "original_size": list(result.geometry.original_size),
                "box": [float(v) for v in result.geometry.box],
                "note": "the model input is this (left, top, right, bottom) region of the "
                "original, stretched",
            },
            "prediction": {
                "index": index,
                "label": label,
                "score": score,
                "top5": [{"index": i, "label": name, "score": p} for i, name, p in result.top],
            },
            "options": options.meta(),
            "layers": list(result.layers),
            "num_heads": context.num_heads,
            "patch_size": context.patch_size,
            "grid": grid,
            "token_order": context.token_order,
            "prefix_tokens": list(result.prefix_names),
            "query": result.query,
            "query_note": query_note,
            "queries": [result.head_query, *result.queries],
            "prefix_mass": prefix_mass_meta(result),
            "methods": methods_meta(result, context.depth),
            # A target naming the class of an earlier one (top1 and class3 when top-1 is
            # class 3) has no maps of its own: target -> the target whose maps it shares.
            "merged_targets": dict(result.merged_targets),
            "maps": {name: list(array.shape) for name, array in arrays.items()},
            "files": files,
        }
        # Non-UTF-8 names stay lossless: their bytes become \udcXX escapes (names.json_text).
        write_atomic(
            folder / "meta.json",
            json_text(json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n"),
        )
    except ImageDecodeError as error:
        raise RenderError(str(error)) from None
    except OSError as error:
        raise RenderError(
            f"{result.path}: cannot write outputs to {folder} ({error.strerror or error}); "
            "check the free space and permissions of --out"
        ) from None
    return IndexEntry(
        path=result.path,
        name=folder.name,
        label=label,
        score=score,
        preview=files.get("preview"),
        note=range_note(preview_map(result)[1]) if "preview" in files else None,
        explorer=files.get("explorer"),
    )


EXPLORER = "explorer.html"
EXPLORER_LONG_SIDE = 640  # pixels of the original the explorer page shows, at most


def write_explorer_page(result: ImageAttention, path: Path, context: RunContext) -> None:
    """explorer.html from the batch's attention of every layer (no second forward pass)."""
    from ..explorer import write_explorer

    assert result.attentions is not None
    image, _ = open_image(
        result.path,
        draft_for=lambda w, h: display_size((w, h), min(EXPLORER_LONG_SIDE, max(w, h))),
        exif=result.geometry.exif,
    )
    model = context.model.get("reference") or context.model.get("name") or "model"
    options = context.options
    write_explorer(
        path,
        np.asarray(image.convert("RGB")),
        result.geometry,
        result.attentions,
        grid_size=result.grid_size,
        layers=sorted(result.attentions),
        num_prefix_tokens=context.num_prefix_tokens,
        patch_size=context.patch_size,
        title=readable(Path(result.path).name),
        subtitle=f"{model} · patch {context.patch_size} · grid "
        f"{result.grid_size[0]}x{result.grid_size[1]}",
        predictions=[(label, score) for _, label, score in result.top],
        colormap=options.colormap.value if options.style == Style.heatmap else "viridis",
    )
