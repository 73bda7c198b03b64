"""CPU int8: the quantised ViT keeps the interface and the answers, and never saturates."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vitcli.data.preprocess import Preprocess
from vitcli.errors import CheckpointError, InputError
from vitcli.model import ViT, ViTConfig
from vitcli.model.int8 import (
    WEIGHT_QMAX,
    Int8Linear,
    default_engine,
    is_quantized,
    quantize,
    quantize_weight,
)
from vitcli.weights.format import ModelBundle, save_model
from vitcli.weights.int8 import is_quantized_file, load_quantized, save_quantized


def tiny(**overrides) -> ViT:
    torch.manual_seed(0)
    fields = dict(
        image_size=32, patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128, num_classes=10
    )
    fields.update(overrides)
    model = ViT(ViTConfig(**fields)).eval()
    if isinstance(model.head, nn.Linear):
        nn.init.normal_(model.head.weight, std=0.5)  # spread logits: argmax is not a coin toss
    return model


def images(count: int = 16, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_weights_are_seven_bit_per_channel():
    weight = torch.randn(8, 32) * torch.logspace(-3, 1, 8)[:, None]  # rows of very unlike size
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == WEIGHT_QMAX == 63
    assert (q.abs().amax(dim=1) == WEIGHT_QMAX).all()  # every row uses its own full range
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-12).all()


@pytest.mark.parametrize("engine", ["fbgemm", "int_mm"])
def test_int8_linear_is_close_to_float(engine):
    if engine == "fbgemm" and default_engine() != "fbgemm":
        pytest.skip("this torch has no fbgemm")
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Int8Linear.from_float(linear, engine=engine)
    x = torch.randn(3, 7, 96)
    want, got = linear(x).detach(), layer(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.02
    assert layer(torch.empty(0, 96)).shape == (0, 40)


@pytest.mark.parametrize("engine", ["fbgemm", "int_mm"])
def test_quantized_vit_keeps_interface_and_answers(engine):
    if engine == "fbgemm" and default_engine() != "fbgemm":
        pytest.skip("this torch has no fbgemm")
    model = tiny()
    quantized = quantize(model, engine=engine)
    assert type(quantized) is ViT and quantized.config == model.config
    names = {n for n, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    assert names == {
        f"blocks.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    } | {"head"}
    assert not is_quantized(model)  # a copy: the float model is untouched
    x = images()
    with torch.inference_mode():
        want, got = model(x), quantized(x)
        logits, weights = quantized.forward_with_attention(x, [0, -1])
        tokens, _ = quantized.forward_features(x)
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.9
    torch.testing.assert_close(logits, got)
    assert sorted(weights) == [0, 1] and weights[1].shape == (16, 2, 17, 17)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(16, 2, 17))
    assert tokens.shape == (16, 17, 64)


def test_quantize_inplace_and_features_only_model():
    model = tiny(num_classes=0)
    same = quantize(model, inplace=True)
    assert same is model and isinstance(model.blocks[0].mlp.fc1, Int8Linear)
    assert isinstance(model.head, nn.Identity)
    with torch.inference_mode():
        assert model(images(2)).shape == (2, 64)


def test_dtype_round_trip_repacks():
    model = quantize(tiny(), engine=default_engine())
    x = images(2)
    with torch.inference_mode():
        before = model(x)
        model.to(torch.bfloat16).to(torch.float32)  # scales and bias pass through bfloat16
        after = model(x)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.int8
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())


def test_int_mm_answer_does_not_depend_on_the_batch():
    # Per-token activation scales: unlike per-call schemes (the fbgemm engine, torch
    # quantize_dynamic, ONNX Runtime), a loud image cannot coarsen its neighbours' quantisation.
    quantized = quantize(tiny(), engine="int_mm")
    x = images(4)
    loud = torch.cat([x[:1], x[1:] * 50])
    with torch.inference_mode():
        torch.testing.assert_close(quantized(loud)[:1], quantized(x[:1]), rtol=1e-5, atol=1e-5)


def test_int8_refuses_other_devices():
    with torch.device("meta"):
        model = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2))
    with pytest.raises(InputError, match="CPU only"):
        quantize(model)


SATURATION_CASE = textwrap.dedent(
    """
    import sys
    import warnings

    import torch
    from torch import nn

    from vitcli.model.int8 import Int8Linear

    engine = sys.argv[1]
    # Every activation quantises to the top of its range (u8 255 inside the kernels) and every
    # weight to the top of its own: the worst case for vpmaddubsw's int16 pair sums.
    K, N = 256, 16
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.weight[1::2].fill_(-0.5)
    x = torch.full((4, K), 2.0)
    exact = (x.double() @ linear.weight.double().t()).float()  # +-256
    got = Int8Linear.from_float(linear, engine=engine)(x)
    ours = float(((got - exact).abs() / exact.abs()).max())
    # The same product with full 8-bit weights (127), as a naive scheme would store them.
    full = torch.full((N, K), 127, dtype=torch.int8)
    if engine == "int_mm":
        a = torch.full((4, K), 127, dtype=torch.int8)
        naive = torch._int_mm(a, full.t()).double() / (127 * 127 * K)
    else:
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            full, torch.ones(N, dtype=torch.double), torch.zeros(N, dtype=torch.long), 0
        )
        packed = torch.ops.quantized.linear_prepack(qweight, None)
        naive = torch.ops.quantized.linear_dynamic(x, packed, False).double() / (2.0 * 127 * K)
    print(ours, float((naive - 1).abs().max()))
    """
)
CAPS = {"int_mm": "ONEDNN_MAX_CPU_ISA", "fbgemm": "FBGEMM_ENABLE_INSTRUCTIONS"}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernels only")
@pytest.mark.parametrize(
    "capped", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["AVX2", "native"]
)
@pytest.mark.parametrize("engine", ["int_mm", "fbgemm"])
def test_no_int16_saturation_without_vnni(engine, capped):
    """With the kernel capped at AVX2 (no VNNI) s8 x u8 goes through vpmaddubsw: full 8-bit
    weights saturate there (the naive product is far off); our 7-bit weights do not."""
    env = dict(os.environ)
    env.pop(CAPS[engine], None)
    if capped:
        env[CAPS[engine]] = "AVX2"
    result = subprocess.run(
        [sys.executable, "-c", SATURATION_CASE, engine],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    ours, naive = (float(v) for v in result.stdout.split())
    assert ours < 0.01, f"{engine} int8 output off by {ours:.1%} (capped at AVX2: {capped})"
    if capped:
        assert naive > 0.2, "the case did not saturate the naive product: the test proves nothing"


def test_save_and_load_quantized_roundtrip(tmp_path):
    model = tiny()
    bundle = ModelBundle(model, [f"c{i}" for i in range(10)], Preprocess(size=(32, 32)))
    path = save_quantized(bundle, tmp_path / "m-int8.safetensors")
    loaded = load_quantized(path)
    assert is_quantized(loaded.model) and not is_quantized(model)
    assert loaded.labels == bundle.labels and loaded.preprocess == bundle.preprocess
    assert loaded.model.blocks[0].attn.qkv.weight.dtype == torch.int8
    x = images(3)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), quantize(model)(x), rtol=0, atol=0)
    from vitcli.weights.readers import read_safetensors

    assert is_quantized_file(read_safetensors(path)[1])
    float_file = save_model(bundle, tmp_path / "m.safetensors")
    assert not is_quantized_file(read_safetensors(float_file)[1])
    with pytest.raises(CheckpointError, match="not a vitcli int8 file"):
        load_quantized(float_file)


@pytest.mark.slow
def test_bundled_model_int8_agrees_on_shapes(tmp_path):
    from vitcli.data.shapes import generate
    from vitcli.weights.resolve import load_model

    bundle = load_model(None)
    generate(tmp_path, per_class=8, seed=2)
    from PIL import Image

    paths = sorted(p for p in tmp_path.glob("*/*.jpg") if p.parent.name in bundle.labels)
    from vitcli.data.loader import prepare

    x = torch.stack([prepare(Image.open(p).convert("RGB"), bundle.preprocess) for p in paths])
    truth = torch.tensor([bundle.labels.index(p.parent.name) for p in paths])
    with torch.inference_mode():
        want, got = bundle.model(x).argmax(1), quantize(bundle.model)(x).argmax(1)
    assert len(paths) == 48
    assert float((got == want).float().mean()) >= 0.97
    assert abs(float((got == truth).float().mean()) - float((want == truth).float().mean())) <= 0.05
