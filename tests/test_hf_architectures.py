"""Compressed transformers architectures beyond BERT / GPT-2 / LLaMA (tiny configs, random weights): encoder-decoder
models, T5's feed-forward, renamed checkpoint keys, plain Linear subclasses."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import bondgate

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
transformers = pytest.importorskip("transformers")


def tiny_bart():
    cfg = transformers.BartConfig(vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 60, (2, 10)), "decoder_input_ids": torch.randint(3, 60, (2, 6))}
    return transformers.BartForConditionalGeneration(cfg).eval(), batch


def test_int8_kernels_in_a_compressed_encoder_decoder():
    # torch's int8 layers put a torch.dtype in the state dict; the bondgate config of the model read it as a tensor:
    # repr / deepcopy of the config failed, and an encoder-decoder's forward (which deep-copies it) crashed
    model, batch = tiny_bart()
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, num_cores=2), calibration=[batch],
                      progress=False)
    with torch.no_grad():
        ref = model(**batch).logits
    q = bondgate.deploy_int8(model, rows=None)
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules())
    assert "bondgate" in repr(q.config)
    copy.deepcopy(q)
    with torch.no_grad():
        out = q(**batch).logits
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("kinds", ["mpo", "lowrank"])
def test_t5_runs_generates_and_reloads_with_its_feed_forward_compressed(tmp_path, kinds):
    # T5's feed-forward reads self.wo.weight.dtype to cast its input: a compressed wo had no weight at all
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 50, (2, 8))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, target_modules=r".*\.w[io]$", kinds=kinds,
                                                        allocation="uniform"),
                      calibration=[{"input_ids": ids, "decoder_input_ids": ids[:, :4]}], progress=False)
    report = model.bondgate_report
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert {r.name for r in report.layers if r.form == kinds} >= {"encoder.block.0.layer.1.DenseReluDense.wo"}
    assert wo.weight.shape == (32, 64) and wo.weight.dtype == torch.float32 and wo.weight.device == ids.device
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back.generate(input_ids=ids, max_new_tokens=5, do_sample=False), out)
    with torch.no_grad():
        model.bfloat16()(input_ids=ids, decoder_input_ids=ids[:, :4])  # the cast reads the layer's own dtype
    assert wo.weight.dtype == torch.bfloat16


def test_falcon_linear_layers_are_compressed_and_the_model_matches_its_report():
    # FalconLinear overrides forward with the same map (x @ W.T + b): every Falcon projection was skipped
    cfg = transformers.FalconConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(3, 60, (8, 20))  # 160 rows: at least each layer's inputs (else a warning)
    layer = model.transformer.h[0].mlp.dense_h_to_4h
    x = torch.randn(5, 32)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # the map it claims
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overrides forward()" skip
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, num_cores=2, policy="memory", kinds="mpo"),
                          calibration=[{"input_ids": ids}], progress=False)
    report = model.bondgate_report
    falcon = [r for r in report.layers if r.kind == "FalconLinear"]
    assert len(falcon) == 4 and not any(r.status.startswith("skipped") for r in falcon)
    assert len(report.compressed) >= 2
    assert 0.45 < report.ratio < 0.55
    for r in report.compressed:  # each layer is the MPO its report row describes
        layer = model.get_submodule(r.name)
        assert isinstance(layer, bondgate.MPOLinear)
        W = dense[r.name]
        err = float((layer.weight_matrix().detach() - W).norm() / W.norm())
        assert err == pytest.approx(r.weight_error, rel=1e-4), (r.name, err, r.weight_error)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_checkpoint_transformers_saved_under_its_legacy_key_names_loads(tmp_path):
    # transformers saves a ViT under the key names of its older layout (vit.encoder.layer.0.intermediate.dense.*
    # for the module vit.layers.0.mlp.fc1) and renames them back when loading: bondgate's check of the checkpoint
    # against its layers compared the saved names with the modules' and refused it ("missing keys")
    from safetensors import safe_open

    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, num_cores=2, policy="memory", kinds="mpo"),
                      calibration=[{"pixel_values": x}], progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, bondgate.MPOLinear)}
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k.rsplit(".cores.", 1)[0] for k in f.keys() if ".cores." in k}
    # the file holds the old names: the case this test is about
    assert "vit.encoder.layer.0.intermediate.dense" in saved and "vit.layers.0.mlp.fc1" in names - saved
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert {n for n, m in back.named_modules() if isinstance(m, bondgate.MPOLinear)} == names
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, model(pixel_values=x).logits)
