"""Embed many images: one pooled vector per image, in input order, with the paths.

The vector is the family's own embedding (`ViT.embed`): CLS after the final LayerNorm for
ViT/DeiT/DINO/DINOv2, the projection output for CLIP and OpenCLIP towers, the attention-pool
output for SigLIP. `pool` picks another reading of the same tokens: `cls`, `mean` (patch
tokens, prefix tokens left out) or `cls+mean` (DINOv2's linear-probe features); the CLIP
projection is applied by `default` only, since it was trained on the family's pooling.

Files (chosen by the --output suffix):
- .jsonl: streamed, one {"path", "embedding": [...]} or {"path", "error"} per input, in
  input order, flushed per batch (an interrupted run keeps every finished line).
- .npy: an (N, E) float32 matrix of the images that succeeded, plus a sidecar
  `<output>.paths.jsonl` with one line per input: {"path", "row"} or {"path", "error"}.
- .safetensors: tensor "embeddings" (N, E) float32; metadata "paths" (JSON list, one per
  row) and "errors" (JSON list of {"path", "error"}).
Matrices are collected in memory (N x E x 4 bytes) and written atomically at the end.
Decoding, batching, failures and torchrun sharding are predict's (services/batchrun.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..data.decoders import EarlyDecoding
from ..data.images import pixel_limit
from ..data.inputs import InputItem, collect_inputs, refuse_output_among_inputs
from ..errors import OptionError
from ..fileio import atomic_write_bytes, output_errors, temp_file_beside, write_target
from ..runtime import BatchOptions, resolve_device, resolve_dtype
from ..weights.format import ModelBundle
from .batchrun import LoaderOptions, OrderedRun, ProgressCallback, Summary, drain, model_batches
from .batchrun import share_inputs as share_inputs
from .early import EarlyStart
from .int8 import prepare_int8, runs_on
from .outputs import json_line, open_writer

POOLS = ("default", "cls", "mean", "cls+mean")
EMBED_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npy": "npy",
    ".safetensors": "safetensors",
}
SIDECAR_SUFFIX = ".paths.jsonl"


def embed_format(output: Path) -> str:
    """The file format an --output name asks for; an OptionError for any other suffix."""
    kind = EMBED_FORMATS.get(output.suffix.lower())
    if kind is None:
        raise OptionError(
            f"--output {output}: unknown embedding format {output.suffix or '(no suffix)'}; "
            "use .safetensors, .npy or .jsonl"
        )
    return kind


@dataclass(frozen=True)
class EmbedOptions(BatchOptions):
    """Everything `vit embed` was asked, defaults resolved, beside the shared BatchOptions."""

    output: Path
    inputs: tuple[str, ...] = ()
    pool: str = "default"
    fast_decode: bool = False  # opt-in JPEG draft decoding (not the home's pixels)
    int8: bool = False  # int8 Linear layers on the CPU (docs/int8.md)

    def __post_init__(self) -> None:
        super().__post_init__()
        embed_format(self.output)
        if self.pool not in POOLS:
            raise OptionError(f"--pool {self.pool}: use one of {', '.join(POOLS)}")


@dataclass(frozen=True)
class EmbedResult:
    summary: Summary
    device: str
    dim: int
    output: Path
    is_main: bool


class Embedder:
    """A model on a device, turning normalised pixel batches into embeddings."""

    def __init__(
        self,
        bundle: ModelBundle,
        options: EmbedOptions,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        config = bundle.config
        if options.pool in ("cls", "cls+mean") and not config.class_token:
            raise OptionError(
                f"--pool {options.pool}: this model has no class token; use mean or default"
            )
        self.bundle = bundle
        self.pool = options.pool
        self.device = resolve_device(
            prepare_int8(bundle, options.int8, options.device, options.dtype, "embed", on_note)
        )
        self.dtype, self.warning = resolve_dtype(options.dtype, self.device)
        self.model = bundle.model.eval().to(device=self.device, dtype=self.dtype)
        self.dim = self._dim()

    def _dim(self) -> int:
        config = self.bundle.config
        if self.pool == "default":
            head = self.model.head
            if config.head_kind == "projection" and isinstance(head, torch.nn.Linear):
                return head.out_features
            return config.pooled_dim
        return 2 * config.width if self.pool == "cls+mean" else config.width

    def vectors(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised input -> (B, E) float32 embeddings."""
        model = self.model
        if self.pool == "default":
            return model.embed(inputs).float()
        tokens, _ = model.forward_features(inputs)  # B,T,D
        return model.pool(tokens, how=self.pool).float()

    @torch.inference_mode()
    def compute(self, inputs: torch.Tensor) -> list[dict | str]:
        # A copy: `model.embed` may return a view of the (B, T, D) tokens, which a row kept by
        # a writer would hold alive (~150 KB per image for a B/16).
        vectors = self.vectors(inputs).cpu().numpy().copy()
        finite = np.isfinite(vectors).all(axis=1)
        return [
            {"embedding": row}
            if ok
            else "embedding is not finite (NaN or infinity); the model has broken weights or "
            "preprocessing values (std 0?)"
            for row, ok in zip(vectors, finite)
        ]

    def batches(self, items, options: EmbedOptions, early: EarlyDecoding | None = None):
        loader = LoaderOptions(
            batch_size=options.batch_size,
            workers=options.workers,
            fast_decode=options.fast_decode,
            device=self.device,
            dtype=self.dtype,
            early=early,
        )
        if not options.fast_decode:
            return model_batches(items, self.bundle.preprocess, loader, self.compute)

        def compute(inputs: torch.Tensor) -> list[dict | str]:  # records say "decode": "fast"
            return [
                r if isinstance(r, str) else {**r, "decode": "fast"} for r in self.compute(inputs)
            ]

        return model_batches(items, self.bundle.preprocess, loader, compute)


class EmbedRun(OrderedRun):
    """Records {"path", "embedding": (E,) float32 array} or {"path", "error"}, in input order."""

    def __init__(
        self,
        bundle: ModelBundle,
        items: list[InputItem],
        options: EmbedOptions,
        on_progress: ProgressCallback | None = None,
        on_note: Callable[[str], None] | None = None,
        early: EarlyDecoding | None = None,
    ) -> None:
        self.embedder = Embedder(bundle, options, on_note)
        super().__init__(
            items,
            lambda chosen: self.embedder.batches(chosen, options, early),
            options.batch_size,
            on_progress,
        )


# -- sinks ---------------------------------------------------------------------------------------


class _JsonLinesSink:
    def __init__(self, path: Path) -> None:
        self.writer = open_writer("jsonl", path=path)

    def write(self, records: list[dict]) -> None:
        self.writer.write(
            {"path": r["path"], "embedding": r["embedding"].tolist()} if "embedding" in r else r
            for r in records
        )

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class _MatrixSink:
    """Streams rows as raw float32 to a temporary file beside the output, then writes .npy
    (+ sidecar) or .safetensors atomically on close(): memory stays flat in the number of
    images (only the paths are held), the output appears whole or not at all."""

    def __init__(self, path: Path, kind: str, dim: int) -> None:
        if path.is_dir():
            raise OptionError(f"--output {path}: is a folder; give a file name such as emb.npy")
        self.path, self.kind, self.dim = path, kind, dim
        self.rows = 0
        self.index: list[dict] = []  # per input: {"path", "row"} or {"path", "error"}
        with output_errors(f"--output {path}"):
            fd, self.raw_path = temp_file_beside(write_target(path))
        self.raw = os.fdopen(fd, "w+b")

    def write(self, records: list[dict]) -> None:
        rows = []
        for record in records:
            if "embedding" in record:
                self.index.append({"path": record["path"], "row": self.rows})
                rows.append(record["embedding"])
                self.rows += 1
            else:
                self.index.append({"path": record["path"], "error": record["error"]})
        if rows:
            with output_errors(f"--output {self.path}"):
                self.raw.write(np.stack(rows).astype("<f4", copy=False).tobytes())

    def close(self) -> None:
        with output_errors(f"--output {self.path}"):
            self.raw.flush()
            self.raw.seek(0)
            if self.kind == "npy":
                sidecar = "".join(json_line(entry) + "\n" for entry in self.index)
                atomic_write_bytes(sidecar_path(self.path), sidecar.encode("utf-8"))
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.dim)}
                )
                self._write_file(header.getvalue())
            else:
                self._write_file(self._safetensors_header())
        self.abort()  # the raw rows are in the output now

    def _safetensors_header(self) -> bytes:
        """The safetensors header for one F32 tensor "embeddings" (rows, dim), padded with
        spaces to 8 bytes as the library writes it."""
        size = self.rows * self.dim * 4
        paths = [entry["path"] for entry in self.index if "row" in entry]
        errors = [entry for entry in self.index if "error" in entry]
        header = {
            "__metadata__": {
                "format": "vitcli-embeddings",
                # ASCII JSON: a name that is not UTF-8 stays a \udcXX escape, lossless.
                "paths": json.dumps(paths, ensure_ascii=True),
                "errors": json.dumps(errors, ensure_ascii=True),
            },
            "embeddings": {
                "dtype": "F32",
                "shape": [self.rows, self.dim],
                "data_offsets": [0, size],
            },
        }
        text = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    def _write_file(self, header: bytes) -> None:
        """`header` then the raw rows, to a temp file renamed over the output."""
        target = write_target(self.path)
        fd, tmp = temp_file_beside(target)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(header)
                shutil.copyfileobj(self.raw, handle, 1 << 20)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.raw.close()
        Path(self.raw_path).unlink(missing_ok=True)


def sidecar_path(output: Path) -> Path:
    """emb.npy -> emb.npy.paths.jsonl: the paths of an .npy matrix's rows."""
    return output.with_name(output.name + SIDECAR_SUFFIX)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, list[str], list[dict]]:
    """(matrix, paths of its rows, failures) from any file `vit embed` writes."""
    path = Path(path)
    kind = embed_format(path)
    if kind == "jsonl":
        rows, paths, errors = [], [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "embedding" in record:
                rows.append(record["embedding"])
                paths.append(record["path"])
            else:
                errors.append(record)
        return np.asarray(rows, dtype=np.float32), paths, errors
    if kind == "npy":
        matrix = np.load(path, allow_pickle=False)
        index = [json.loads(line) for line in sidecar_path(path).read_text("utf-8").splitlines()]
        paths = [entry["path"] for entry in index if "row" in entry]
        return matrix, paths, [entry for entry in index if "error" in entry]
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        matrix = handle.get_tensor("embeddings")
    return matrix, json.loads(metadata["paths"]), json.loads(metadata["errors"])


# -- the command -------------------------------------------------------------------------------


def run(
    options: EmbedOptions,
    on_progress: ProgressCallback | None = None,
    *,
    on_warning: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    stdin: Iterable[str] | None = None,
    early: EarlyStart | None = None,
) -> EmbedResult:
    """`vit embed`: embed `options.inputs` and write them, in input order, to options.output.

    Under torchrun every rank calls this, as with predict: rank 0 collects the inputs and
    writes, every rank embeds its shard. `early`: the inputs as collected, and their images
    decoding, before torch was imported (services/early.py).
    """
    from ..weights.resolve import load_model

    pixel_limit()
    kind = embed_format(options.output)

    def collect() -> list[InputItem]:
        items = early.items if early is not None else collect_inputs(options.inputs, stdin)
        refuse_output_among_inputs(options.output, items, "--output")
        if kind == "npy":
            refuse_output_among_inputs(sidecar_path(options.output), items, "--output")
        return items

    distributed.init_from_env(backend="gloo")
    try:
        main = distributed.is_main()
        items = share_inputs(collect)
        bundle = load_model(options.model)
        embed = EmbedRun(
            bundle,
            items,
            options,
            on_progress if main else None,
            on_note if main else None,
            early=early.decoding if early is not None else None,
        )
        if embed.embedder.warning and main and on_warning is not None:
            on_warning(embed.embedder.warning)
        sink: _JsonLinesSink | _MatrixSink | None = None
        if main:
            sink = (
                _JsonLinesSink(options.output)
                if kind == "jsonl"
                else _MatrixSink(options.output, kind, embed.embedder.dim)
            )
        drain(embed.records(), sink)
        distributed.barrier()
    finally:
        if early is not None:
            early.close()
        distributed.shutdown()
    return EmbedResult(
        summary=embed.summary,
        device=runs_on(embed.embedder.model, embed.embedder.device, embed.embedder.dtype)
        + (", fast decode" if options.fast_decode else ""),
        dim=embed.embedder.dim,
        output=options.output,
        is_main=main,
    )
