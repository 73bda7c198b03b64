"""`--int8` for every command that runs a model: one check of the device and dtype, one
choice of engine, one quantisation (docs/int8.md).

A model runs in int8 when the user asks (`--int8`) or when it was loaded from an int8 file
(`vit convert --int8`); either way it runs on the CPU in float32 around the int8 layers. The
commands call `prepare_int8` where they pick their device: it puts the int8 model in
`bundle.model` (once: an int8 model is left as it is) and returns the device to run on.

Two engines: "torch" (vitcli.model.int8, fbgemm; the same ViT, every method) and
"onnxruntime" (services/ort_engine.py: faster, logits/embeddings/tokens only). `--int8` on
predict, embed and eval takes onnxruntime when it is installed, torch otherwise; attention
and int8 files always run on torch. VITCLI_INT8_ENGINE=torch|onnxruntime|auto overrides.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..model.int8 import is_quantized, quantize

if TYPE_CHECKING:
    from ..weights.format import ModelBundle

INT8_DEVICES = ("auto", "cpu")  # auto means the CPU for an int8 model, whatever GPU is there
INT8_DTYPES = ("auto", "float32")
ENGINE_ENV = "VITCLI_INT8_ENGINE"
ENGINES = ("auto", "torch", "onnxruntime")
ORT_COMMANDS = ("predict", "embed", "eval")  # they need logits or features, nothing more
ORT_HINT = "pip install 'vitcli[onnx]'"  # services/onnx_graph.py's INSTALL_HINT (not imported:
# that module imports torch.onnx's machinery, which the torch engine does not need)


def engine_setting() -> str:
    """VITCLI_INT8_ENGINE, checked: auto (unset or empty), torch or onnxruntime."""
    value = os.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
    if value not in ENGINES:
        raise OptionError(
            f"{ENGINE_ENV}={os.environ[ENGINE_ENV]}: use one of {', '.join(ENGINES)}, or unset it"
        )
    return value


def has_ort_engine() -> bool:
    """Whether onnx and onnxruntime are installed (found, not imported: imports cost)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def choose_engine(command: str | None) -> str:
    """The engine `--int8` uses for `command` ("predict", "embed", "eval"; None or anything
    else: a command that needs the ViT itself, such as attention, which gets torch)."""
    setting = engine_setting()
    if command not in ORT_COMMANDS:
        return "torch"
    if setting == "onnxruntime" and not has_ort_engine():
        raise OptionError(
            f"{ENGINE_ENV}=onnxruntime needs onnx and onnxruntime: {ORT_HINT}, or unset it"
        )
    if setting == "auto":
        return "onnxruntime" if has_ort_engine() else "torch"
    return setting


def check_int8_options(device: str = "auto", dtype: str = "auto") -> None:
    """Refuse, before anything loads, what `--int8` cannot do: another device than the CPU,
    a dtype other than float32, a VITCLI_INT8_ENGINE that is not an engine."""
    engine_setting()
    name = str(device).strip().lower()
    if name not in INT8_DEVICES:
        raise OptionError(f"--int8 runs on the CPU only: drop --device {name} or --int8")
    if dtype not in INT8_DTYPES:
        raise OptionError(
            f"--int8 computes in float32 around its int8 layers: drop --dtype {dtype} or --int8"
        )


def prepare_int8(
    bundle: ModelBundle,
    asked: bool,
    device: str = "auto",
    dtype: str = "auto",
    command: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> str:
    """The device to run `bundle` on. When int8 is `asked` for or the model already is int8:
    checks `device` and `dtype`, makes `bundle.model` int8 unless it already is (on the engine
    `choose_engine(command)` picks), and returns "cpu"; otherwise returns `device` unchanged
    and touches nothing."""
    quantized = int8_engine(bundle.model) is not None
    if not asked and not quantized:
        return device
    if not asked:  # an int8 file, loaded without --int8: the same limits, its own words
        name = str(device).strip().lower()
        what = bundle.reference or "the model"
        if name not in INT8_DEVICES:
            raise InputError(
                f"{what} holds int8 weights, which run on the CPU only: use --device cpu, "
                "or a float model"
            )
        if dtype not in INT8_DTYPES:
            raise InputError(
                f"{what} holds int8 weights, computed in float32 around them: drop --dtype "
                f"{dtype}, or use a float model"
            )
    else:
        check_int8_options(device, dtype)
    if quantized:
        return "cpu"
    model = bundle.model.to("cpu")
    if choose_engine(command) == "onnxruntime":
        from .onnx_graph import ExportError
        from .ort_engine import OrtInt8ViT

        try:
            # The session stands in for the ViT where the command calls it; the float model
            # goes with it (the graph holds the weights).
            bundle.model = OrtInt8ViT.from_bundle(bundle, on_note=on_note)  # type: ignore[assignment]
            return "cpu"
        except ExportError:
            if engine_setting() == "onnxruntime":
                raise
            # auto: a model ONNX cannot hold (over 2 GiB of weights) runs on torch instead
    bundle.model = quantize(model, inplace=True)
    return "cpu"


def int8_engine(model: object) -> str | None:
    """ "torch" or "onnxruntime" for an int8 model, None for a float one."""
    engine = getattr(model, "int8_engine", None)  # set by the onnxruntime engine
    if isinstance(engine, str):
        return engine
    if isinstance(model, nn.Module) and is_quantized(model):
        return "torch"
    return None


def is_int8(bundle: ModelBundle) -> bool:
    return int8_engine(bundle.model) is not None


def runs_on(model: object, device: torch.device, dtype: torch.dtype) -> str:
    """What summaries say the model runs on: "cpu int8 (onnxruntime)", "cpu int8 (torch)" or
    the device and dtype ("cuda float16")."""
    engine = int8_engine(model)
    precision = f"int8 ({engine})" if engine else str(dtype).removeprefix("torch.")
    return f"{device.type} {precision}"
