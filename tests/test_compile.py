"""torch.compile, torch.export and ONNX (issue 18.6): compressed models trace with no graph break, with a dynamic
number of rows, and match eager; gated layers trace at fixed widths and refuse export while they route."""

import importlib.util

import pytest
import torch
from torch import nn

import bondgate
from bondgate import CompressionConfig, GatingConfig, MPOLinear, compress

transformers = pytest.importorskip("transformers")
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                                reason="onnx, onnxscript and onnxruntime are not installed")
DYNAMIC = torch.export.Dim.DYNAMIC


def tiny_gpt2(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    compress(model, CompressionConfig(max_bond=8, num_cores=3), progress=False)
    return model


def mlp(gated: bool = False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 96), nn.GELU(), MPOLinear.from_linear(nn.Linear(96, 80), max_bond=8, num_cores=3),
                        nn.ReLU(), MPOLinear.from_linear(nn.Linear(80, 62), max_bond=6, num_cores=3))  # 62: padded
    if gated:
        bondgate.gate(net, GatingConfig())
    return net.eval()


def test_compressed_gpt2_forward_has_no_graph_break():
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 16))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]  # was 39


def _compiled_gpt2_matches_eager_and_generates(backend: str) -> None:
    model = tiny_gpt2(layers=1)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want_logits = {n: model(ids[:, :n]).logits for n in (10, 7)}
        want_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=True)
    with torch.no_grad():
        for n, want in want_logits.items():  # two sequence lengths: one graph with a symbolic length
            torch.testing.assert_close(model(ids[:, :n]).logits, want, rtol=1e-5, atol=1e-5)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)  # with the KV cache
    assert torch.equal(got, want_tokens)


@pytest.mark.slow
def test_compiled_gpt2_with_dynamic_shapes_matches_eager_and_generates():
    _compiled_gpt2_matches_eager_and_generates("aot_eager")  # traced and functionalized like inductor's input


@pytest.mark.slow
def test_inductor_compiled_gpt2_matches_eager_and_generates():
    _compiled_gpt2_matches_eager_and_generates("inductor")  # builds C++ kernels: ~1.5 min on 2 cores


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_export_with_a_dynamic_batch_matches_eager(batch):
    net = mlp()
    ep = torch.export.export(net, (torch.randn(5, 32),), dynamic_shapes=({0: DYNAMIC},))
    x = torch.randn(batch, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-5)
    ep2 = torch.export.export(net, (torch.randn(5, 32),), dynamic_shapes=({0: DYNAMIC},))  # twice: nothing left over
    with torch.no_grad():
        torch.testing.assert_close(ep2.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_compiled_forward_follows_cores_of_other_widths():
    # the traced sweep was the one kept at the layer's bonds: cores of other widths through functional_call, or set
    # through .data after a compiled call, failed ("shape '[4, 3, 16, 5, 1]' is invalid"); eager handled both
    from torch.func import functional_call

    torch.manual_seed(0)
    layer = bondgate.MPOLinear(64, 48, num_cores=3, max_bond=4)
    other = bondgate.MPO.random(48, 64, bond=2, num_cores=3, in_factors=layer.in_factors, out_factors=layer.out_factors)
    params = {f"cores.{k}": c for k, c in enumerate(other.cores)} | {"bias": layer.bias.detach()}
    x = torch.randn(5, 64)
    ref = x @ other.to_matrix().T + layer.bias.detach()
    with torch.no_grad():
        fn = torch.compile(lambda x: functional_call(layer, params, (x,)), backend="eager")
        torch.testing.assert_close(fn(x), ref, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(layer, backend="eager")
        compiled(x)
        for core, new in zip(layer.cores, other.cores):
            core.data = new.clone()
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_export_with_a_named_batch_dim_in_either_sweep_direction(reverse):
    # a named Dim (the usual spelling) failed: splitting the merged (rest * B) axis made a guard torch could not prove
    from bondgate.planner import sweep_steps

    layer = bondgate.MPOLinear(60, 70, max_bond=6, num_cores=3)
    layer._traced = (reverse, sweep_steps(layer.out_factors, layer.in_factors, layer.bond_dims, reverse))
    ep = torch.export.export(layer, (torch.randn(4, 60),),
                             dynamic_shapes=({0: torch.export.Dim("B", max=4096)},))
    x = torch.randn(7, 60)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), layer.to_linear()(x), rtol=1e-5, atol=1e-5)


def test_export_of_a_compressed_gpt2_matches_eager():
    model = tiny_gpt2(layers=1)
    ids = torch.randint(0, 100, (2, 12))
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                             dynamic_shapes={"input_ids": {0: DYNAMIC, 1: DYNAMIC}, "use_cache": None})
    other = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        got = ep.module()(input_ids=other, use_cache=False).logits
        torch.testing.assert_close(got, model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mpo", "lowrank"])
def test_non_strict_export_of_code_that_reads_the_weight_matches_eager(kind):
    # export's default (non-strict) tracing failed at .weight: "Creating a new Tensor subclass WeightStandIn but the
    # raw Tensor object is already associated to a python object of type FakeTensor" (T5's feed-forward casts to
    # wo.weight.dtype, nn.TransformerEncoderLayer reads linear1.weight)
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 40)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), Cast(), nn.ReLU())
    compress(net, CompressionConfig(param_ratio=0.5, kinds=kind, num_cores=2), progress=False)
    assert isinstance(net[1].fc, MPOLinear if kind == "mpo" else bondgate.LowRankLinear)
    net.eval()
    ep = torch.export.export(net, (torch.randn(5, 32),), strict=False, dynamic_shapes=({0: DYNAMIC},))
    assert torch.ops.aten.empty.memory_format not in {n.target for n in ep.graph.nodes}  # the stand-in is no node
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-5)


@needs_onnx
def test_onnx_export_runs_in_onnxruntime_and_matches_eager(tmp_path):
    import onnxruntime

    net = mlp()
    path = tmp_path / "model.onnx"
    torch.onnx.export(net, (torch.randn(5, 32),), str(path), dynamo=True, dynamic_shapes=({0: DYNAMIC},))
    session = onnxruntime.InferenceSession(str(path))
    for batch in (1, 5, 33):
        x = torch.randn(batch, 32)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", 0.5])
def test_gated_layers_at_fixed_widths_trace_without_breaks_and_export(mode):
    net = mlp(gated=True)
    bondgate.set_mode(net, mode)
    x = torch.randn(7, 32)
    with torch.no_grad():
        want = net(x)
    assert torch._dynamo.explain(net)(x).graph_break_count == 0
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: DYNAMIC},))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)


def test_routing_gated_layers_compile_with_a_break_and_refuse_export():
    net = mlp(gated=True)
    bondgate.set_mode(net, "gate")
    x = torch.randn(7, 32)
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be exported.*set_mode"):
        torch.export.export(net, (x,))


@pytest.mark.parametrize("cores", [14, 17])
def test_many_cores_work_up_to_the_einsum_alphabet(cores):
    torch.manual_seed(0)
    lin = nn.Linear(2**12, 8)  # legs of size 1 fill up the cores
    layer = MPOLinear.from_linear(lin, max_bond=2, num_cores=cores, policy=bondgate.PlanPolicy(select="flops"))
    assert len(layer.cores) == cores
    x = torch.randn(3, 2**12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_linear()(x), rtol=1e-4, atol=1e-4)


def test_too_many_cores_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 17 cores"):
        MPOLinear(2**18, 4, num_cores=18)
    with pytest.raises(ValueError, match=r"num_cores must be an integer in \[1, 17\]"):
        CompressionConfig(max_bond=2, num_cores=18)


def test_export_of_compressed_embeddings_matches_eager():
    # MPOEmbedding's lookup (dedup, digit groups) failed export: GuardOnDataDependentSymNode
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    compress(model, CompressionConfig(max_bond=8, num_cores=3, embeddings=True, quantize="int8"), progress=False)
    assert isinstance(model.transformer.wte, bondgate.MPOEmbedding)
    ids = torch.randint(0, 100, (2, 12))
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                             dynamic_shapes={"input_ids": {0: DYNAMIC, 1: DYNAMIC}, "use_cache": None})
    other = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(input_ids=other, use_cache=False).logits,
                                   model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="index out of range"):  # as eager refuses it, not a wrong row
            ep.module()(input_ids=torch.tensor([[5, 100]]), use_cache=False)


@pytest.mark.parametrize("kind", ["mpo", "lowrank", "kept_rows"])
def test_compressed_table_compiles_and_exports_like_eager(kind):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(500, 24, padding_idx=7)
    kw = {"lowrank": {"form": "lowrank"}, "kept_rows": {"counts": torch.rand(500), "keep_rows": 30}}.get(kind, {})
    table = bondgate.MPOEmbedding.from_embedding(emb, max_bond=6, **kw)
    ids = torch.randint(0, 500, (4, 11))
    ids[0, :3] = 7
    with torch.no_grad():
        want = table(ids)
        assert torch.equal(torch.compile(table)(ids), want)
        ep = torch.export.export(table, (ids,), dynamic_shapes=({0: DYNAMIC, 1: DYNAMIC},))
        torch.testing.assert_close(ep.module()(ids), want, rtol=1e-6, atol=1e-6)
        assert ep.module()(ids)[0, :3].abs().max() == 0  # padding rows


def test_an_exported_table_looks_up_its_kept_rows_exactly():
    """The exported lookup returns a kept id's exact row (the MPO's approximate one only for the others)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(200, 16)
    table = bondgate.MPOEmbedding.from_embedding(emb, max_bond=3, counts=torch.arange(200.0), keep_rows=20)
    assert table.kept_ids.tolist() == list(range(180, 200))
    ids = torch.tensor([[199, 5, 190], [180, 181, 7]])
    kept = ids >= 180
    with torch.no_grad():
        ep = torch.export.export(table, (ids,), dynamic_shapes=({0: DYNAMIC, 1: DYNAMIC},))
        out = ep.module()(ids)
        assert torch.equal(out[kept], emb.weight[ids[kept]])
        torch.testing.assert_close(out, table(ids), rtol=1e-6, atol=1e-6)
        assert not torch.equal(out[~kept], emb.weight[ids[~kept]])


def test_an_exported_table_refuses_negative_ids():
    """A negative id fails the exported graph's range check, as eager refuses it, instead of wrapping to a row."""
    torch.manual_seed(0)
    table = bondgate.MPOEmbedding.from_embedding(torch.nn.Embedding(60, 8), max_bond=3)
    ids = torch.tensor([[3, 59, 0], [7, 7, 21]])
    with torch.no_grad():
        ep = torch.export.export(table, (ids,), dynamic_shapes=({0: DYNAMIC, 1: DYNAMIC},))
        torch.testing.assert_close(ep.module()(ids), table(ids), rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="index out of range"):
            ep.module()(torch.tensor([[4, 5], [-1, 5]]))


@needs_onnx
def test_onnx_export_of_a_compressed_table_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    table = bondgate.MPOEmbedding.from_embedding(torch.nn.Embedding(300, 16), max_bond=6).eval()
    path = tmp_path / "table.onnx"
    torch.onnx.export(table, (torch.randint(0, 300, (2, 5)),), str(path), dynamo=True,
                      dynamic_shapes=({0: DYNAMIC, 1: DYNAMIC},))
    session = onnxruntime.InferenceSession(str(path))
    ids = torch.randint(0, 300, (3, 7))
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), table(ids), rtol=1e-5, atol=1e-5)


def test_torchscript_is_refused_clearly_and_a_traced_lowrank_layer_is_exact():
    # script failed on "try blocks aren't supported" / type annotations, trace on "'Tensor' object has no attribute
    # 'bit_length'"; an MPOEmbedding trace baked in the distinct ids of the example call
    from bondgate import LowRankLinear, MPOEmbedding, MPOLinear, Recurrent

    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 16), max_bond=4)
    table = MPOEmbedding(100, 16, max_bond=4)
    for module in (layer, nn.Sequential(nn.Linear(16, 16), layer), table, LowRankLinear.from_linear(nn.Linear(16, 16), rank=4),
                   Recurrent.from_torch(nn.LSTM(8, 8))):
        with pytest.raises(RuntimeError, match="does not support TorchScript"):
            torch.jit.script(module)
    for module, x in ((layer, torch.randn(3, 16)), (table, torch.tensor([1, 2]))):
        with pytest.raises(RuntimeError, match="does not support TorchScript"):
            torch.jit.trace(module, (x,))
    low = LowRankLinear.from_linear(nn.Linear(16, 16), rank=4)  # two matrix products: traces fine
    traced = torch.jit.trace(low, (torch.randn(3, 16),))
    x = torch.randn(7, 16)
    torch.testing.assert_close(traced(x), low(x), rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_compiled_layers_under_autocast_compute_and_return_as_eager(gated):
    # compiled, the sweep's products ran in bf16 and the float32 bias made the output float32 (eager: bf16 out of a
    # float32 contraction, as nn.Linear's dtype)
    net = mlp(gated)
    if gated:
        bondgate.set_mode(net, 0.5)
    x = torch.randn(6, 32)
    compiled = torch.compile(net, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = net(x), compiled(x)
        one = torch.compile(net[2], backend="aot_eager")(torch.randn(3, 96))
    assert got.dtype == want.dtype == one.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
