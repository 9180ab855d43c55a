"""Quantised storage of the factors and the remaining linear layers (jointrank.quantize, --quantize).

What must hold: a quantised module computes exactly F.linear with its dequantized weight; what is stored is integer
data of the shapes the scheme implies (so the bytes are really smaller); a saved checkpoint reloads through plain
transformers to identical logits; bad requests and a missing library are one clear error with nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jointrank
from jointrank import GroupRule, JointRankConfig, JointRankError
from jointrank.quantize import SCHEMES, QuantizedWeight, WeightSpec, dequantized_copy, spec_for
from tiny_models import random_tokens, save_tiny, tiny_model

REPO = Path(__file__).resolve().parents[1]
quanto = pytest.importorskip("optimum.quanto", reason="needs the quant extra: pip install 'jointrank[quant]'")

# tiny models whose widths let int4 groups fit (hidden 64, MLP 128): groups of 64 and 32, like 128 on real models
SHAPE = dict(hidden_size=64, intermediate_size=128)
RULES = {"qk": GroupRule("joint"), "gate_up": GroupRule("joint"), "v": GroupRule("separate"),
         "o": GroupRule("separate"), "down": GroupRule("separate")}


def compressed(arch: str, seed: int = 0):
    model = tiny_model(arch, seed=seed, **SHAPE)
    config = JointRankConfig(rules=RULES, ratio=0.5)
    result = jointrank.compress_(model, config, progress=False)
    return model, config, result


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (64, 37), (37, 64), (24, 48), (5, 7)])
def test_stored_shapes_are_what_the_spec_says(scheme, shape):
    # a reader rebuilds the module from the spec alone (config.json stores no shapes): they must agree with quanto's
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    spec = spec_for(scheme, *shape)
    q = QuantizedWeight(*shape, spec)
    q.set_(weight)
    for name, (want, dtype) in spec.shapes(*shape).items():
        stored = getattr(q, name)
        assert tuple(stored.shape) == want, name
        assert stored.dtype == (dtype or weight.dtype), name
    assert tuple(q.dequantized().shape) == shape


def test_int4_groups_fall_back_along_the_output_then_to_8_bits():
    assert spec_for("int4", 640, 2048) == WeightSpec(4, 0, 128)
    assert spec_for("int4", 640, 137) == WeightSpec(4, -1, 128)  # a factor's `out` of odd rank: groups along d_out
    assert spec_for("int4", 37, 5) == WeightSpec(8, 0, None)  # nothing fits: 8 bits, never silently float
    assert spec_for("int8", 640, 137) == WeightSpec(8, 0, None)
    assert spec_for("int4-g32", 640, 2048) == WeightSpec(4, 0, 32)  # never a larger group than the scheme's
    assert spec_for("int4-g32", 640, 137) == WeightSpec(4, -1, 32)


@pytest.mark.parametrize("scheme,bound", [("int8", 0.01), ("int4", 0.12), ("int4-g32", 0.10)])
def test_quantisation_error_is_that_of_the_scheme(scheme, bound):
    torch.manual_seed(0)
    weight = torch.randn(256, 512)
    q = QuantizedWeight(256, 512, spec_for(scheme, 256, 512))
    q.set_(weight)
    err = ((q.dequantized() - weight).norm() / weight.norm()).item()
    assert 0 < err < bound  # a gaussian: int8 ~0.8%, int4 in groups of 128 ~10%, smaller groups less


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantised_model_computes_with_its_dequantized_weights_and_reloads_identically(arch, scheme, tmp_path):
    model, config, result = compressed(arch)
    tokens = random_tokens()
    report = jointrank.quantize_(model, scheme)
    assert report.modules
    for name in report.modules:  # every decoder linear and factor at the scheme's bits, unless no group fits
        bits = 8 if name in report.kept_8bit else SCHEMES[scheme].bits
        assert model.get_submodule(name).quantized.spec.bits == bits
    # the decoder holds no float 2-D weight any more; embeddings stay
    floats = [n for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
    assert floats == []
    with torch.no_grad():
        logits = model(tokens).logits
        reference = dequantized_copy(model)(tokens).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    result.extra["quantization"] = report.to_dict()
    out = jointrank.save(model, None, tmp_path / "q", result, source="tiny", config=config)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, logits)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 2 and q["weights"]["scheme"] == scheme
    assert len(q["weights"]["modules"]) == len(report.modules)


def test_stored_bytes_shrink_by_the_bit_width(tmp_path):
    # bytes as stored (safetensors headers), not computed: the decoder's linear data at 1/4 (int8) and 1/8 (int4)
    # of float32, plus scales
    from jointrank.format import tensor_kind
    from jointrank.verify import stored_tensors

    sizes = {}
    for scheme in (None, "int8", "int4"):
        model, config, result = compressed("llama")
        if scheme:
            jointrank.quantize_(model, scheme)
        out = jointrank.save(model, None, tmp_path / str(scheme), result, source="tiny", config=config)
        stored = stored_tensors(out)
        sizes[scheme] = sum(t.end - t.start for n, t in stored.items()
                            if tensor_kind(n, t.shape) in ("low-rank factors", "dense linear layers")
                            and not n.endswith(".bias"))
    assert 0.25 < sizes["int8"] / sizes[None] < 0.30
    assert 0.125 < sizes["int4"] / sizes[None] < 0.25


def test_bfloat16_load_keeps_integer_data(tmp_path):
    model, config, result = compressed("llama")
    jointrank.quantize_(model, "int8")
    out = jointrank.save(model, None, tmp_path / "q", result, source="tiny", config=config)
    loaded = jointrank.load(out, dtype=torch.bfloat16)
    q = next(m for m in loaded.modules() if isinstance(m, QuantizedWeight))
    assert q.qdata.dtype == torch.int8 and q.qscale.dtype == torch.bfloat16
    with torch.no_grad():
        a = loaded(random_tokens()).logits.float()
        b = model(random_tokens()).logits
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_a_checkpoint_missing_a_scale_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, config, result = compressed("llama")
    jointrank.quantize_(model, "int4")
    out = jointrank.save(model, None, tmp_path / "q", result, source="tiny", config=config)
    tensors = load_file(out / "model.safetensors")
    victim = next(n for n in tensors if n.endswith(".qscale"))
    del tensors[victim]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(JointRankError, match="missing"):
        jointrank.load(out)


def test_compress_model_quantises_and_the_manifest_says_how(tmp_path):
    source = save_tiny("llama", tmp_path / "src", **SHAPE)
    run = jointrank.compress_model(str(source), tmp_path / "out", JointRankConfig(rules=RULES, ratio=0.5),
                                   quantize="int8")
    manifest = jointrank.read_manifest(run.out)
    q = manifest["result"]["extra"]["quantization"]
    assert q["scheme"] == "int8" and q["library"] == "optimum-quanto" and q["library_version"]
    cli = subprocess.run([sys.executable, "-m", "jointrank.cli", "info", str(run.out)], capture_output=True,
                         text=True)
    assert cli.returncode == 0, cli.stderr
    assert "quantised to int8 with optimum-quanto" in cli.stdout and "I8" in cli.stdout


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jointrank.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("extra,message", [
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--quantize", "int8", "--dense"], "--dense writes float matrices: drop --quantize"),
    (["--quantize", "int8", "--stream"], "--quantize need the whole model in memory"),
])
def test_bad_quantisation_requests_are_one_line_and_write_nothing(tmp_path, extra, message):
    source = save_tiny("llama", tmp_path / "src", **SHAPE)
    out = tmp_path / "out"
    r = _cli("compress", source, "--preset", "paper-10", "--out", out, *extra)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# Without the library: a fresh interpreter where `import optimum.quanto` fails
NO_QUANTO = "import sys; sys.modules['optimum'] = None; sys.modules['optimum.quanto'] = None; "


def test_without_the_library_compress_refuses_before_loading(tmp_path):
    source = save_tiny("llama", tmp_path / "src", **SHAPE)
    out = tmp_path / "out"
    code = NO_QUANTO + (f"from jointrank.cli import main; sys.exit(main(['compress', {str(source)!r}, '--preset', "
                        f"'paper-10', '--quantize', 'int4', '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "pip install 'jointrank[quant]'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_without_the_library_a_quantised_checkpoint_is_one_clear_error(tmp_path):
    model, config, result = compressed("llama")
    jointrank.quantize_(model, "int8")
    out = jointrank.save(model, None, tmp_path / "q", result, source="tiny", config=config)
    code = NO_QUANTO + ("import jointrank\ntry:\n    jointrank.load(sys.argv[1])\nexcept jointrank.JointRankError as e:"
                        "\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "stores int8 weights, which need optimum-quanto" in r.stdout


def test_a_merged_model_cannot_be_quantised_twice_or_merged_after():
    model, _, _ = compressed("llama")
    jointrank.quantize_(model, "int8")
    with pytest.raises(JointRankError, match="already quantised"):
        jointrank.quantize_(model, "int8")
    with pytest.raises(JointRankError, match="cannot be merged back"):
        jointrank.merge_(model)


def test_quantisation_alone_reloads_through_plain_transformers(tmp_path):
    # no low-rank units: quantize_ writes its own jointrank quantization_config, save_pretrained/from_pretrained
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2", **SHAPE)
    jointrank.quantize_(model, "int4")
    with torch.no_grad():
        logits = model(random_tokens()).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(random_tokens()).logits, logits)
