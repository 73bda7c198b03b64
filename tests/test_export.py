"""`vit export`: an ONNX graph that matches our forward, with its preprocessing and labels."""

import json
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.preprocess import Preprocess
from vitcli.errors import InputError
from vitcli.model import ViT, ViTConfig
from vitcli.model.int8 import quantize
from vitcli.services import export as export_service
from vitcli.services.export import ExportError, export_onnx, read_metadata
from vitcli.weights.format import ModelBundle, save_model


def bundle_for(**overrides) -> ModelBundle:
    torch.manual_seed(0)
    fields = dict(
        image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5
    )
    fields.update(overrides)
    model = ViT(ViTConfig(**fields)).eval()
    if isinstance(model.head, nn.Linear):
        nn.init.normal_(model.head.weight, std=0.5)
    labels = [f"class {i}" for i in range(fields["num_classes"])]
    preprocess = Preprocess(
        size=(32, 32), resize="shorter", crop_pct=0.875, interpolation="bicubic"
    )
    return ModelBundle(model, labels, preprocess)


def run_onnx(path, x: torch.Tensor) -> list:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"pixel_values": x.numpy()})]


@pytest.mark.slow
def test_fp32_export_matches_forward_with_dynamic_batch_and_metadata(tmp_path):
    pytest.importorskip("onnxruntime")
    bundle = bundle_for()
    result = export_onnx(bundle, tmp_path / "m.onnx", attention_layers=[-1, 0, 1])
    assert result.verified and result.max_abs_diff < 1e-4 and result.attention_max_abs_diff < 1e-4
    assert result.outputs == ["logits", "attention_1", "attention_0"]  # -1 and 1 are one layer
    x = torch.randn(3, 3, 32, 32)  # another batch size than the traced one
    logits, last, first = run_onnx(tmp_path / "m.onnx", x)
    with torch.inference_mode():
        want, weights = bundle.model.forward_with_attention(x, [0, 1])
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(last, weights[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(first, weights[0], rtol=0, atol=1e-5)
    meta = read_metadata(tmp_path / "m.onnx")
    assert json.loads(meta["labels"]) == bundle.labels
    assert Preprocess.from_dict(json.loads(meta["preprocess"])) == bundle.preprocess
    assert ViTConfig.from_json(meta["config"]) == bundle.config
    assert meta["quantization"] == "none"


def test_int8_export_quantises_linear_layers_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    bundle = bundle_for()
    result = export_onnx(bundle, tmp_path / "q.onnx", int8=True)
    assert result.verified and result.top1_agreement is not None and result.top1_agreement >= 0.75
    graph = onnx.load(str(tmp_path / "q.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    # The 4 Linear layers of each block in int8; q k^T and weights v (2 per block) stay float,
    # and so does the head (a Gemm, which ORT's dynamic quantiser leaves alone; ~0.1% of FLOPs).
    assert ops.count("DynamicQuantizeLinear") >= 1
    assert ops.count("MatMulInteger") == 4 * 2
    attention = [n.op_type for n in graph.graph.node if n.name.endswith(("attn/MatMul", "_1"))]
    assert attention.count("MatMul") == 2 * 2
    assert read_metadata(tmp_path / "q.onnx")["quantization"].startswith("onnxruntime-dynamic")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        want = bundle.model(x)
    (got,) = run_onnx(tmp_path / "q.onnx", x)
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pos_embed="sincos2d", pool="mean", class_token=False),
        dict(num_classes=0),
    ],
)
def test_other_families_and_image_size_export(tmp_path, overrides):
    pytest.importorskip("onnxruntime")
    bundle = bundle_for(**overrides)
    result = export_onnx(bundle, tmp_path / "m.onnx", image_size=(48, 64))
    assert result.verified and result.max_abs_diff < 1e-4
    x = torch.randn(2, 3, 48, 64)
    (got,) = run_onnx(tmp_path / "m.onnx", x)
    with torch.inference_mode():
        torch.testing.assert_close(got, bundle.model(x), rtol=0, atol=1e-4)
    assert result.outputs[0] == ("features" if overrides.get("num_classes") == 0 else "logits")
    meta = read_metadata(tmp_path / "m.onnx")
    assert json.loads(meta["preprocess"])["size"] == [48, 64]


def test_refusals_name_the_reason(tmp_path):
    pytest.importorskip("onnx")
    bundle = bundle_for()
    with pytest.raises(InputError, match="opset"):
        export_onnx(bundle, tmp_path / "m.onnx", opset=9)
    with pytest.raises(InputError, match="out of range"):
        export_onnx(bundle, tmp_path / "m.onnx", attention_layers=[2])
    with pytest.raises(InputError, match="multiple of the patch size"):
        export_onnx(bundle, tmp_path / "m.onnx", image_size=(30, 32))
    quantized = ModelBundle(quantize(bundle.model), bundle.labels, bundle.preprocess)
    with pytest.raises(ExportError, match="already vitcli int8"):
        export_onnx(quantized, tmp_path / "m.onnx")
    meta_model = ViT(bundle.config).to("meta")
    with pytest.raises(InputError, match="on the CPU"):
        export_onnx(ModelBundle(meta_model, bundle.labels, bundle.preprocess), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_mismatch_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(export_service, "FP32_TOLERANCE", 0.0)
    with pytest.raises(ExportError, match="differs from vitcli's forward"):
        export_onnx(bundle_for(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_without_onnx_the_command_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    result = CliRunner().invoke(app, ["export", "default", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "pip install 'vitcli[onnx]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_export_writes_and_reports(tmp_path):
    pytest.importorskip("onnxruntime")
    model_path = save_model(bundle_for(), tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(
        app,
        ["export", str(model_path), str(out), "--image-size", "48x32", "--attention-layer", "-1"],
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and "max abs diff" in result.output and "48x32" in result.output
    bad = CliRunner().invoke(app, ["export", str(model_path), str(tmp_path / "m.txt")])
    assert bad.exit_code == 2 and "must end in .onnx" in bad.output  # a usage error
