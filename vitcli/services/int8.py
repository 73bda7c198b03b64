"""`--int8` for every command that runs a model: one check of the device and dtype, one
quantisation (docs/int8.md).

A model runs in int8 when the user asks (`--int8`) or when it was loaded from an int8 file
(`vit convert --int8`); either way it runs on the CPU in float32 around the int8 layers. The
commands call `prepare_int8` where they pick their device: it quantises the model in place
(once: an int8 model is left as it is) and returns the device to run on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError, OptionError
from ..model.int8 import is_quantized, quantize

if TYPE_CHECKING:
    from ..weights.format import ModelBundle

INT8_DEVICES = ("auto", "cpu")  # auto means the CPU for an int8 model, whatever GPU is there
INT8_DTYPES = ("auto", "float32")


def check_int8_options(device: str = "auto", dtype: str = "auto") -> None:
    """Refuse, before anything loads, what `--int8` cannot do: another device than the CPU,
    a dtype other than float32."""
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
) -> str:
    """The device to run `bundle` on. When int8 is `asked` for or the model already is int8:
    checks `device` and `dtype`, quantises the model in place unless it already is, and
    returns "cpu"; otherwise returns `device` unchanged and touches nothing."""
    quantized = is_quantized(bundle.model)
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
    if not quantized:
        bundle.model = quantize(bundle.model.to("cpu"), inplace=True)
    return "cpu"


def is_int8(bundle: ModelBundle) -> bool:
    return is_quantized(bundle.model)
