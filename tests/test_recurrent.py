"""bondgate.Recurrent: nn.LSTM / nn.GRU / nn.RNN with separate projection modules, and compressing them."""

import copy
import itertools
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import bondgate
from bondgate.recurrent import Recurrent

CASES = [(mode, layers, bidir, proj) for mode, layers, bidir, proj in
         itertools.product(("LSTM", "GRU", "RNN"), (1, 2), (False, True), (0, 3)) if not (proj and mode != "LSTM")]


def _outputs(out) -> list[torch.Tensor]:
    y, hidden = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _max_diff(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(_outputs(a), _outputs(b), strict=True))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode,layers,bidir,proj", CASES)
def test_matches_torch(mode, layers, bidir, proj, fused):
    torch.manual_seed(0)
    kw = {"num_layers": layers, "bidirectional": bidir, **({"proj_size": proj} if proj else {})}
    D, H = (2 if bidir else 1), 7
    for batch_first, bias in ((False, True), (True, False)):
        ref = getattr(nn, mode)(5, H, batch_first=batch_first, bias=bias, **kw).double()
        rec = Recurrent.from_torch(ref)
        rec.fused = fused
        x = torch.randn(4, 6, 5, dtype=torch.float64)  # (L, N) or (N, L)
        N = 4 if batch_first else 6
        h0 = torch.randn(layers * D, N, proj or H, dtype=torch.float64)
        hx = (h0, torch.randn(layers * D, N, H, dtype=torch.float64)) if mode == "LSTM" else h0
        assert _max_diff(ref(x), rec(x)) < 1e-12
        assert _max_diff(ref(x, hx), rec(x, hx)) < 1e-12
        xu = torch.randn(6, 5, dtype=torch.float64)  # unbatched
        assert _max_diff(ref(xu), rec(xu)) < 1e-12
        # variable lengths (packed, unsorted): ended sequences keep their state, the reverse direction starts at
        # each sequence's own end
        lengths = torch.tensor([6, 2, 5, 3])
        xp = torch.randn(4, 6, 5, dtype=torch.float64) if batch_first else torch.randn(6, 4, 5, dtype=torch.float64)
        packed = pack_padded_sequence(xp, lengths, batch_first=batch_first, enforce_sorted=False)
        a, b = ref(packed), rec(packed)
        assert torch.equal(a[0].batch_sizes, b[0].batch_sizes)
        assert torch.equal(a[0].sorted_indices, b[0].sorted_indices)
        assert _max_diff(a, b) < 1e-12


def test_gradients_match_torch_and_shared_parameters():
    torch.manual_seed(0)
    ref = nn.LSTM(6, 8, 2, bidirectional=True).double()
    rec = Recurrent.from_torch(ref)
    assert {id(p) for p in rec.parameters()} == {id(p) for p in ref.parameters()}  # no copies
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    ref(x)[0].square().sum().backward()
    want = [p.grad.clone() for p in ref.parameters()]
    for fused in (True, False):
        ref.zero_grad()
        rec.fused = fused
        rec(x)[0].square().sum().backward()
        assert max((p.grad - g).abs().max().item() for p, g in zip(ref.parameters(), want)) < 1e-12


def test_to_torch_round_trip_and_dropout_only_in_training():
    torch.manual_seed(0)
    rec = Recurrent("GRU", 4, 6, num_layers=3, dropout=0.5)
    back = rec.to_torch()
    x = torch.randn(5, 2, 4)
    rec.eval(), back.eval()
    assert _max_diff(rec(x), back(x)) == 0
    rec.train()
    for fused in (True, False):
        rec.fused = fused
        torch.manual_seed(1)
        a = rec(x)[0]
        torch.manual_seed(2)
        assert (a - rec(x)[0]).abs().max() > 1e-3  # dropout between layers draws per call


def test_bad_input_errors():
    rec = Recurrent("LSTM", 4, 6, num_layers=2)
    rec.fused = False
    with pytest.raises(ValueError, match="input_size=4"):
        rec(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 6\)"):
        rec(torch.randn(3, 2, 4), (torch.zeros(1, 2, 6), torch.zeros(2, 2, 6)))
    with pytest.raises(ValueError, match="pair"):
        rec(torch.randn(3, 2, 4), torch.zeros(2, 2, 6))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        rec(torch.randn(4))
    # the shapes as given (an unbatched input's h_0 was reported after its own unsqueeze: "(2, 1, 6), got
    # (2, 1, 1, 6)"), and the dtype named as torch names it (was "mat1 and mat2 must have the same dtype")
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 6\), got \(2, 1, 6\)"):
        rec(torch.randn(3, 4), (torch.zeros(2, 1, 6), torch.zeros(2, 1, 6)))
    assert rec(torch.randn(3, 4), (torch.zeros(2, 6), torch.zeros(2, 6)))[0].shape == (3, 6)
    with pytest.raises(ValueError, match="input dtype torch.float64 does not match the LSTM's parameters' torch.float32"):
        rec(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="proj_size"):
        Recurrent("GRU", 4, 6, proj_size=2)
    with pytest.raises(ValueError, match="mode"):
        Recurrent("LSTMCell", 4, 6)


@pytest.mark.parametrize("fused", [True, False])
def test_an_hx_of_the_wrong_kind_or_dtype_and_string_flags_are_clear_errors(fused):
    # the fused path passed torch's kernel messages through ("index 1 is out of bounds", "get_mkldnn_dtype:
    # unsupported data type"); the stepped path checked no dtype ("mat1 and mat2 must have the same dtype")
    rec = Recurrent("LSTM", 4, 6, num_layers=2)
    rec.fused = fused
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="an LSTM's hx must be a pair \\(h_0, c_0\\), got Tensor"):
        rec(x, torch.zeros(2, 2, 6))
    with pytest.raises(ValueError, match="h_0 dtype torch.float64 does not match the LSTM's parameters' torch.float32"):
        rec(x, (torch.zeros(2, 2, 6, dtype=torch.float64), torch.zeros(2, 2, 6)))
    with pytest.raises(ValueError, match="c_0 must be a tensor, got list"):
        rec(x, (torch.zeros(2, 2, 6), [0.0]))
    gru = Recurrent("GRU", 4, 6)
    gru.fused = fused
    with pytest.raises(ValueError, match="hx dtype torch.float64 does not match the GRU's"):
        gru(x, torch.zeros(1, 2, 6, dtype=torch.float64))
    h = torch.randn(2, 2, 6)
    out, (hn, cn) = rec(x, (h, h.clone()))  # a right hx still runs, as torch's LSTM would
    ref = nn.LSTM(4, 6, 2)
    ref.load_state_dict(rec.to_torch().state_dict())
    want, (hn_ref, _) = ref(x, (h, h.clone()))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(hn, hn_ref)
    for flag in ("bias", "batch_first", "bidirectional"):  # bool("no") is True: bias="no" built biases
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
            Recurrent("LSTM", 4, 6, **{flag: "no"})
    assert Recurrent("LSTM", 4, 6, bias=0).bias is False
    assert Recurrent("LSTM", 4, 6, batch_first=None).batch_first is False  # torch's LSTM takes None as False too


class LM(nn.Module):
    def __init__(self, vocab=60, dim=32, mode="LSTM"):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = getattr(nn, mode)(dim, dim, 2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


def _lm(mode="LSTM"):
    torch.manual_seed(0)
    return LM(mode=mode).eval(), [torch.randint(0, 60, (4, 12)) for _ in range(3)]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_compress_lstm_lm_and_save_load(tmp_path, mode):
    model, data = _lm(mode)
    ref = model(data[0])
    c = bondgate.compress(copy.deepcopy(model), bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, target_modules=["rnn"]),
                          calibration=data, progress=False)
    assert isinstance(c.rnn, Recurrent)
    rows = {r.name: r for r in c.bondgate_report.layers}
    assert set(rows) == {"rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1"}
    assert c.bondgate_report.params_before == sum(p.numel() for n, p in model.rnn.named_parameters() if "weight" in n)
    assert 0.4 < c.bondgate_report.ratio <= 0.5
    assert any(isinstance(m, bondgate.MPOLinear) for m in c.rnn.children())
    out = c(data[0])
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.5  # compressed (not the identity), but still the same network
    bondgate.save(c, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "bondgate.json").read_text())
    assert meta["layers"]["rnn"]["type"] == "Recurrent"
    fresh, _ = _lm(mode)
    loaded = bondgate.load(tmp_path / "ck", model=fresh)
    assert isinstance(loaded.rnn, Recurrent)
    assert torch.equal(loaded(data[0]), out)
    # a model of another size is refused before it is touched
    other = LM(mode=mode)
    other.rnn = getattr(nn, mode)(32, 16, 2, batch_first=True)
    with pytest.raises(ValueError, match="hidden_size 16 in the model, 32 in the checkpoint"):
        bondgate.load(tmp_path / "ck", model=other)
    assert type(other.rnn) is getattr(nn, mode)


def test_training_reaches_the_cores():
    model, data = _lm()
    c = bondgate.compress(model, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.4, target_modules=["rnn"]),
                          calibration=data, progress=False)
    c.train()
    mpo = next(m for m in c.rnn.children() if isinstance(m, bondgate.MPOLinear))
    before = [p.detach().clone() for p in mpo.parameters()]
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(c(data[0]).flatten(0, 1), data[1].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mpo.parameters())
    opt.step()
    c.eval()
    assert any(not torch.equal(a, b) for a, b in zip(before, mpo.parameters()))
    # the inference cache of dense weights follows the update
    with torch.no_grad():
        y1 = c(data[0])
        c.rnn.fused = False
        y2 = c(data[0])
    assert (y1 - y2).abs().max() < 1e-5


def test_selection_and_dense_leftovers():
    model, data = _lm()
    # excluded: torch's module stays
    c = bondgate.compress(copy.deepcopy(model), bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, exclude=["rnn"]),
                          calibration=data, progress=False)
    assert type(c.rnn) is nn.LSTM and [r.name for r in c.bondgate_report.layers] == ["head"]
    # one projection by its name
    c = bondgate.compress(copy.deepcopy(model), bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, target_modules=["hh_l1"]),
                          calibration=data, progress=False)
    assert isinstance(c.rnn, Recurrent) and isinstance(c.rnn.hh_l1, bondgate.MPOLinear)
    assert type(c.rnn.ih_l0) is nn.Linear
    # a budget that keeps every projection dense gives torch's module back, its rows named after its parameters
    c = bondgate.compress(copy.deepcopy(model), bondgate.CompressionConfig(kinds="mpo", param_ratio=1.0, target_modules=["rnn"]),
                          calibration=data, progress=False)
    assert type(c.rnn) is nn.LSTM
    assert sorted(r.name for r in c.bondgate_report.layers) == ["rnn.weight_hh_l0", "rnn.weight_hh_l1",
                                                               "rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    assert torch.equal(c(data[0]), model(data[0]))


def test_failed_compress_gives_torch_module_back():
    model, data = _lm()
    lstm = model.rnn
    with pytest.raises(IndexError):  # an id beyond the table: the calibration pass fails inside the model
        bondgate.compress(model, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5), calibration=[torch.full((2, 3), 999)],
                          progress=False)
    assert model.rnn is lstm


def test_subclass_with_own_forward_is_skipped():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model, data = _lm()
    model.rnn = MyLSTM(32, 32, 2, batch_first=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = bondgate.compress(model, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5), calibration=data, progress=False)
    assert type(c.rnn) is MyLSTM
    assert any("overrides forward" in str(w.message) for w in caught)
    assert any(r.name == "rnn" and r.status.startswith("skipped") for r in c.bondgate_report.layers)


def test_gated_projections_loop_and_save(tmp_path):
    model, data = _lm()
    c = bondgate.compress(model, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, target_modules=["rnn"]),
                          calibration=data, progress=False)
    bondgate.gate(c, bondgate.GatingConfig())
    assert any(isinstance(m, bondgate.GatedMPOLinear) for m in c.rnn.children())
    assert c.rnn._dense_weights() is None  # a gated width depends on the input: stepped through time
    bondgate.set_mode(c, "full")
    full = c(data[0])
    bondgate.save(c, tmp_path / "g")
    fresh, _ = _lm()
    loaded = bondgate.load(tmp_path / "g", model=fresh)
    bondgate.set_mode(loaded, "full")
    assert torch.allclose(loaded(data[0]), full, atol=1e-6)


def test_corrupt_spec_is_refused():
    rec = Recurrent("LSTM", 4, 6)
    spec = rec.spec()
    bad = copy.deepcopy(spec)
    del bad["projections"]["hh_l0"]
    with pytest.raises(ValueError, match="projections"):
        Recurrent.from_spec(bad)
    bad = copy.deepcopy(spec)
    bad["projections"]["hh_l0"]["in_features"] = 5
    with pytest.raises(ValueError, match="hh_l0"):
        Recurrent.from_spec(bad)
    bad = copy.deepcopy(spec)
    bad["projections"]["ih_l0"]["type"] = "Recurrent"
    with pytest.raises(ValueError, match="unknown layer type"):
        Recurrent.from_spec(bad)
    # num_layers is checked against the projections before the layers are built (10**6 layers: ~10 minutes), and
    # the error does not list the million names it expected
    with pytest.raises(ValueError, match=r"must describe 2000000 projections \(ih_l0, hh_l0 per layer\)$"):
        Recurrent.from_spec({**spec, "num_layers": 10**6})


def test_cli_inspect_lists_the_factored_projections(tmp_path, capsys):
    from bondgate.cli import main

    model, data = _lm()
    c = bondgate.compress(model, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, target_modules=["rnn"]),
                          calibration=data, progress=False)
    bondgate.save(c, tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    rep = c.bondgate_report
    assert f"targeted weights: {rep.params_before:,} -> {rep.params_after:,}" in out
    for name in ("rnn.ih_l0", "rnn.hh_l1"):
        assert f"| {name} | 128x32 | " in out
    assert "| rnn | ?" not in out


def test_a_bare_lstm_says_how_and_from_torch_compresses():
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 32)
    x = torch.randn(6, 3, 16)
    with pytest.warns(UserWarning, match="Recurrent.from_torch"):
        bondgate.compress(lstm, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5), calibration=[x], progress=False)
    rec = bondgate.compress(Recurrent.from_torch(copy.deepcopy(lstm)), bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5),
                            calibration=[x], progress=False)
    assert isinstance(rec.hh_l0, bondgate.MPOLinear) or isinstance(rec.ih_l0, bondgate.MPOLinear)
    err = (rec(x)[0] - lstm(x)[0]).norm() / lstm(x)[0].norm()
    assert 0 < err < 0.5


# ------------------------------------------------------------------------------------------- review fixes
def _compressed_lm(**cfg):
    model, data = _lm()
    cfg = {"kinds": "mpo", **cfg}
    c = bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, target_modules=["rnn"], **cfg),
                          calibration=data, progress=False)
    return c.eval(), data


def _fused_and_loop(m, x):
    with torch.no_grad():
        m.rnn.fused = True
        a = m(x)
        m.rnn.fused = False
        b = m(x)
        m.rnn.fused = True
    return a, b


def test_kept_dense_weights_follow_quantization_and_writes():
    c, data = _compressed_lm()
    with torch.no_grad():
        before = c(data[0])
    bondgate.quantize_mpo(c)  # changes the weights, not the master cores
    a, b = _fused_and_loop(c, data[0])
    assert (a - before).abs().max() > 1e-5 and (a - b).abs().max() < 1e-5
    mpo = next(m for m in c.rnn.children() if isinstance(m, bondgate.MPOLinear))
    mpo.cores[0].data.mul_(0.5)  # a write through .data
    a, b = _fused_and_loop(c, data[0])
    assert (a - b).abs().max() < 1e-5
    low, data = _compressed_lm(kinds=("lowrank",), allocation="uniform")
    lr = next(m for m in low.rnn.children() if isinstance(m, bondgate.LowRankLinear))
    with torch.no_grad():
        before = low(data[0])
        lr.U.data.mul_(2)  # a plain parameter's .data write: no counter moves
    a, b = _fused_and_loop(low, data[0])
    assert (a - before).abs().max() > 1e-4 and (a - b).abs().max() < 1e-5


def test_low_rank_dense_weights_are_kept_between_inference_calls_and_follow_writes(monkeypatch):
    """A low-rank projection's U @ V is built once for inference calls (it was rebuilt per call: 0.61x the dense
    model's tokens/s at one sequence) and rebuilt after any write to a factor."""
    low, data = _compressed_lm(kinds=("lowrank",), allocation="uniform")
    lr = next(m for m in low.rnn.children() if isinstance(m, bondgate.LowRankLinear))
    built = []
    original = bondgate.LowRankLinear.weight_matrix
    monkeypatch.setattr(bondgate.LowRankLinear, "weight_matrix", lambda self: built.append(1) or original(self))
    n = len(low.rnn.projection_names())
    with torch.no_grad():
        first = low(data[0])
        assert torch.equal(low(data[0]), first) and len(built) == n  # the second call builds nothing
        lr.V.add_(0.1)  # an in-place write under no_grad
    a, b = _fused_and_loop(low, data[0])
    assert len(built) == n + 1 and (a - first).abs().max() > 1e-4 and (a - b).abs().max() < 1e-5
    lr.U = nn.Parameter(lr.U.detach() * 2)  # a plain parameter put in by the user: its writes cannot be seen
    a, b = _fused_and_loop(low, data[0])
    with torch.no_grad():
        lr.U.data.mul_(0.5)
    c, d = _fused_and_loop(low, data[0])
    assert (a - b).abs().max() < 1e-5 and (c - d).abs().max() < 1e-5 and (a - c).abs().max() > 1e-4
    low.train()
    loss = low(data[0]).square().mean()  # training rebuilds per call, so the factors get gradients
    loss.backward()
    assert lr.V.grad is not None and lr.V.grad.abs().max() > 0


def test_attributes_changed_after_a_call_are_read_and_copies_leave_the_caches():
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, 2)
    rec = Recurrent.from_torch(ref)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        rec(x)
        ref.batch_first = rec.batch_first = True
        assert _max_diff(ref(x), rec(x)) < 1e-6
    c, data = _compressed_lm()
    with torch.no_grad():
        c(data[0])
    assert c.rnn.__dict__.get("_dense_cache")
    assert "_dense_cache" not in copy.deepcopy(c.rnn).__dict__
    c.rnn.flatten_parameters()  # nn.LSTM's cuDNN idiom: a no-op


def test_packed_batches_feed_real_tokens_only():
    c, _ = _compressed_lm()
    seen = {}
    for name in ("ih_l0", "hh_l0"):
        getattr(c.rnn, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, seen.get(name, 0) + i[0].shape[0]))
    lengths = torch.tensor([5, 2, 7])
    x = torch.randn(3, 7, 32)
    c.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    assert seen == {"ih_l0": 14, "hh_l0": 14}  # hooks: the loop path


def test_hooked_lstm_is_skipped_and_a_sequence_needs_a_step():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.LSTM(8, 8)
            self.b = nn.LSTM(8, 8)

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    m = Two()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.b = torch.nn.utils.weight_norm(m.b, "weight_hh_l0")
        bondgate.compress(m, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5), calibration=[torch.randn(4, 2, 8)],
                          progress=False)
    assert isinstance(m.a, Recurrent) and type(m.b) is nn.LSTM
    assert any(r.name == "b" and "hooks" in r.status for r in m.bondgate_report.layers)
    rec = Recurrent("LSTM", 3, 5)
    rec.fused = False
    assert rec(torch.randn(4, 0, 3))[0].shape == (4, 0, 5)
    with pytest.raises(ValueError, match="sequence length 0"):
        rec(torch.randn(0, 2, 3))


def test_load_refuses_another_recurrent_structure(tmp_path):
    c, data = _compressed_lm()
    bondgate.save(c, tmp_path / "ck")
    for rnn, what in ((nn.GRU(32, 32, 2, batch_first=True), "cell GRU in the model, LSTM in the checkpoint"),
                      (nn.LSTM(32, 32, 2, bidirectional=True, batch_first=True), "bidirectional True"),
                      (nn.LSTM(32, 32, 2), "batch_first False in the model, True in the checkpoint")):
        fresh, _ = _lm()
        fresh.rnn = rnn
        with pytest.raises(ValueError, match=what):
            bondgate.load(tmp_path / "ck", model=fresh)
        assert fresh.rnn is rnn


@pytest.mark.parametrize("key,value", [("bias", "no"), ("batch_first", "yes"), ("dropout", True),
                                       ("num_layers", "2"), ("proj_size", 0.0)])
def test_spec_values_of_the_wrong_type_are_refused(key, value):
    spec = Recurrent("LSTM", 4, 6).spec()
    spec[key] = value
    with pytest.raises(ValueError, match="wrong type"):
        Recurrent.from_spec(spec)
    spec = Recurrent("LSTM", 4, 6).spec()
    spec["projections"]["ih_l0"]["in_features"] = 4.5
    with pytest.raises(ValueError, match="int in_features"):
        Recurrent.from_spec(spec)


def test_inference_runner_follows_replaced_tensors_and_stays_out_of_copies():
    c, data = _compressed_lm()
    with torch.no_grad():
        c(data[0])
    assert "_runner_module" in c.rnn.__dict__ and "_runner_module" not in copy.deepcopy(c.rnn).__dict__
    mpo = next(n for n in c.rnn.projection_names() if isinstance(getattr(c.rnn, n), bondgate.MPOLinear))
    bias = getattr(c.rnn, mpo).bias
    bias.data = bias.data * 3  # new storage under the same parameter
    a, b = _fused_and_loop(c, data[0])
    assert (a - b).abs().max() < 1e-5
    with torch.no_grad():
        c.rnn.hh_l0.bias.mul_(0.5)  # an in-place write: the runner shares the storage
    a, b = _fused_and_loop(c, data[0])
    assert (a - b).abs().max() < 1e-5


def _bf16_autocast_lstm_runs() -> bool:
    """Whether torch's own nn.LSTM runs under CPU bfloat16 autocast on this machine."""
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(4, 4, batch_first=True)(torch.randn(1, 2, 4))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("proj_size", [0, 4])
def test_the_stepped_lstm_returns_torchs_dtypes_under_autocast(proj_size):
    """Stepped (fused=False: gated or hooked projections, calibration), an LSTM under CPU bfloat16 autocast returned
    float32 output and states where torch's returns bfloat16 (with proj_size torch keeps c in float32)."""
    if not _bf16_autocast_lstm_runs():
        pytest.skip("oneDNN has no bfloat16 LSTM on this CPU")
    torch.manual_seed(0)
    ref = nn.LSTM(8, 8, num_layers=2, proj_size=proj_size)
    rec = Recurrent.from_torch(ref)
    rec.fused = False
    x = torch.randn(4, 2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, (ha, ca) = ref(x)
        b, (hb, cb) = rec(x)
    assert (b.dtype, hb.dtype, cb.dtype) == (a.dtype, ha.dtype, ca.dtype), (b.dtype, hb.dtype, cb.dtype)
    assert float((b.float() - a.float()).norm() / a.float().norm()) < 0.02


def test_a_non_floating_dtype_is_refused_by_name():
    # was "Only Tensors of floating point and complex dtype can require gradients", naming no argument
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype, got torch.int32"):
        Recurrent("LSTM", 3, 4, dtype=torch.int32)


def test_autocast_init_and_the_given_models_dropout(tmp_path):
    """Under CPU bfloat16 autocast a compressed LSTM runs (its factored projections' dense weights are built in the
    parameters' dtype, as torch's LSTM holds them: built under autocast they were bfloat16 beside float32 ones, which
    oneDNN refused, and stayed cached for the float32 calls after); Recurrent is initialized as nn.LSTM is; load
    into a given model keeps that model's dropout."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self, dropout=0.0):
            super().__init__()
            self.rnn = nn.LSTM(16, 32, 2, batch_first=True, dropout=dropout)

        def forward(self, x):
            return self.rnn(x)[0]

    m = M().eval()
    bondgate.compress(m, bondgate.CompressionConfig(kinds="mpo", param_ratio=0.5, target_modules=["rnn"]),
                      calibration=[torch.randn(4, 9, 16)], progress=False)
    factored = [mod for mod in m.rnn.children() if hasattr(mod, "weight_matrix")]
    assert factored
    x = torch.randn(4, 9, 16)
    if _bf16_autocast_lstm_runs():  # (oneDNN has no bfloat16 LSTM on some CPUs: torch's own LSTM fails there)
        with torch.no_grad():
            ref = copy.deepcopy(m)(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = m(x)
                assert all(mod.weight_matrix().dtype == torch.float32 for mod in factored)
            assert (low.float() - ref).abs().max() < 0.05
            assert torch.equal(m(x), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training: gradients reach the cores
            m.train()(x).float().sum().backward()
        assert all(p.grad is not None for mod in factored for p in mod.parameters())

    r, t = Recurrent("LSTM", 512, 16), nn.LSTM(512, 16)
    for p in r.parameters():
        assert 0.9 * 0.25 < float(p.abs().max()) <= 0.25  # nn.LSTM: U(-1/sqrt(16), 1/sqrt(16))
    assert float(t.weight_ih_l0.abs().max()) <= 0.25

    bondgate.save(m, tmp_path / "ck")
    assert bondgate.load(tmp_path / "ck", model=M(dropout=0.5)).rnn.dropout == 0.5


def test_from_torch_refuses_what_it_would_change_and_options_torch_refuses(tmp_path):
    # from_torch converted a subclass with its own forward (what compress skips) and dropped that forward in silence
    class Scaled(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(TypeError, match="overrides forward"):
        Recurrent.from_torch(Scaled(4, 8))
    hooked = nn.GRU(4, 8)
    hooked.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(TypeError, match="forward hooks"):
        Recurrent.from_torch(hooked)
    # nn.GRU / nn.LSTM have no nonlinearity option: accepted here and ignored before
    with pytest.raises(ValueError, match="mode='RNN' only"):
        Recurrent("GRU", 3, 4, nonlinearity="relu")
    assert Recurrent("RNN", 3, 4, nonlinearity="relu").nonlinearity == "relu"
    # dropout with one layer does nothing, as torch warns; said once, where the module is made
    with pytest.warns(UserWarning, match="does nothing"):
        r = Recurrent("LSTM", 3, 4, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Recurrent.from_torch(r.to_torch())
        bondgate.save(r, tmp_path / "r")
        bondgate.load(tmp_path / "r")


def test_a_flop_budget_buys_nothing_in_a_recurrent_layers_matrices():
    # torch's fused kernel runs a compressed LSTM's dense weights at inference: the budget priced and the report
    # counted its factored matrices at 0.30x dense FLOPs (measured whole-LSTM time: 1.04-1.06x dense)
    from bondgate import CompressionConfig, compress

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(64, 64)
            self.head = nn.Linear(64, 512)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    calib = [torch.randn(6, 4, 64)]
    only_rnn = CompressionConfig(param_ratio=0.5, flops_ratio=0.6, target_modules=["rnn"], deploy_rows=32)
    with pytest.raises(ValueError, match=r"flops_ratio=0.6 is out of reach: .* take 1 of the dense layers' FLOPs .*"
                                         r"recurrent layers — rnn.ih_l0, rnn.hh_l0 — run dense"):
        compress(Net(), only_rnn, calibration=calib, progress=False)
    model = Net()
    compress(model, CompressionConfig(param_ratio=0.5, flops_ratio=0.6, deploy_rows=32), calibration=calib,
             progress=False)
    rows = {r.name: r for r in model.bondgate_report.layers}
    assert {n for n, r in rows.items() if n.startswith("rnn.")} == {"rnn.ih_l0", "rnn.hh_l0"}
    for n in ("rnn.ih_l0", "rnn.hh_l0"):
        assert rows[n].flops_mpo == rows[n].flops_dense > 0
    flops = sum(r.flops_mpo for r in rows.values())
    dense = sum(r.flops_dense for r in rows.values())
    assert flops <= 0.6 * dense + 1  # the head alone carries the cut
    assert rows["head"].flops_mpo <= 0.6 * dense - (dense - rows["head"].flops_dense) + 1


def test_refresh_drops_the_kept_dense_weights_after_a_write_torch_cannot_see():
    torch.manual_seed(0)
    rec = Recurrent.from_torch(nn.LSTM(8, 8))
    rec.ih_l0 = bondgate.MPOLinear.from_linear(rec.ih_l0, max_bond=4)
    rec.eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        before = rec(x)[0]
        rec.ih_l0.cores[0].numpy()[...] *= 0.25  # no version counter moves
        assert torch.equal(rec(x)[0], before)  # the kept dense weight: stale
        rec.refresh()
        after = rec(x)[0]
        rec.fused = False
        assert torch.allclose(after, rec(x)[0], atol=1e-6) and not torch.allclose(after, before, atol=1e-3)


# ------------------------------------------------ from a mutation run of recurrent.py (each kills a mutant that lived)
@pytest.mark.parametrize("fused", [True, False])
def test_dropout_only_between_layers_and_only_in_training(fused):
    # kills R06 (dropout also after the last layer) and R07 (dropout in eval too) on the Python loop path
    torch.manual_seed(0)
    ref = nn.GRU(4, 6, num_layers=2, dropout=0.5).double()
    rec = Recurrent.from_torch(ref)
    rec.fused = fused
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    ref.eval(), rec.eval()
    assert _max_diff(ref(x), rec(x)) < 1e-12  # eval: no dropout at all
    rec.train()
    torch.manual_seed(1)
    out, h_n = rec(x)
    # the last layer's output is not dropped: its last step is h_n of the top layer, exactly
    assert torch.equal(out[-1], h_n[-1])
    assert (out != 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_unbatched_input_with_a_given_state_matches_torch(fused):
    # kills R08 (an unbatched LSTM's c_0 taken from h_0): the suite passed only zero states to unbatched inputs
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, num_layers=2, bidirectional=True).double()
    rec = Recurrent.from_torch(ref)
    rec.fused = fused
    xu = torch.randn(6, 5, dtype=torch.float64)
    hx = (torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    assert _max_diff(ref(xu, hx), rec(xu, hx)) < 1e-12
    ref = nn.GRU(5, 7).double()
    rec = Recurrent.from_torch(ref)
    rec.fused = fused
    h = torch.randn(1, 7, dtype=torch.float64)
    assert _max_diff(ref(xu, h), rec(xu, h)) < 1e-12


@pytest.mark.parametrize("fused", [True, False])
def test_relu_rnn_matches_torch(fused):
    # kills R11 (the loop's cell ignores nonlinearity='relu') and R12 (the fused module built without it):
    # the suite compared only tanh RNNs with torch
    torch.manual_seed(0)
    ref = nn.RNN(5, 7, num_layers=2, nonlinearity="relu", bidirectional=True).double()
    rec = Recurrent.from_torch(ref)
    rec.fused = fused
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert _max_diff(ref(x), rec(x)) < 1e-12
    assert _max_diff(ref(x), Recurrent.from_torch(ref).to_torch()(x)) < 1e-12


def test_from_torch_and_to_torch_keep_the_training_mode():
    # kills R10 (from_torch leaves the Recurrent in training mode whatever rnn's) and R16 (to_torch's module in
    # training mode whatever the Recurrent's): an eval model with dropout would drop units at inference, in silence
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, num_layers=2, dropout=0.5).double().eval()
    rec = Recurrent.from_torch(ref)
    assert not rec.training
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert _max_diff(ref(x), rec(x)) < 1e-12
        back = rec.to_torch()
        assert not back.training
        assert _max_diff(ref(x), back(x)) < 1e-12
    assert Recurrent.from_torch(ref.train()).training and rec.train().to_torch().training


def test_projected_multilayer_lstm_built_and_saved(tmp_path):
    # kills R19 (layer k > 0's input projection sized hidden_size * D instead of proj_size * D): the suite built
    # projected multi-layer LSTMs only with from_torch, which hands over torch's (correctly shaped) weights
    torch.manual_seed(0)
    rec = Recurrent("LSTM", 5, 8, num_layers=2, bidirectional=True, proj_size=3).double()
    assert rec.ih_l1.in_features == rec.ih_l1.weight.shape[1] == 6
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    back = rec.to_torch()
    assert _max_diff(back(x), rec(x)) < 1e-12
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3).double()
    bondgate.save(Recurrent.from_torch(ref), tmp_path / "r")
    loaded = bondgate.load(tmp_path / "r")
    assert _max_diff(ref(x), loaded(x)) < 1e-12


def test_excluding_a_recurrent_module_leaves_its_dense_projections_dense():
    """exclude=["rnn"] on a model whose LSTM is already a Recurrent must not factor the projections left dense."""
    model, data = _lm()
    cfg = dict(param_ratio=0.5, policy="memory", refine_steps=0, kinds="mpo")
    bondgate.compress(model, bondgate.CompressionConfig(**cfg, target_modules=["hh_l1"]), calibration=data,
                      progress=False)
    assert isinstance(model.rnn, Recurrent) and type(model.rnn.ih_l0) is nn.Linear
    bondgate.compress(model, bondgate.CompressionConfig(**cfg, exclude=["rnn"]), calibration=data, progress=False)
    assert [type(getattr(model.rnn, n)) for n in ("ih_l0", "hh_l0", "ih_l1")] == [nn.Linear] * 3
    assert isinstance(model.head, bondgate.MPOLinear)
    assert [r.name for r in model.bondgate_report.layers if r.status == "compressed"] == ["rnn.hh_l1", "head"]


def test_packed_sequences_are_one_input_to_calibration_and_distillation():
    # a PackedSequence is a named tuple: calibration and distillation passed its four fields as four arguments
    # (TypeError), so a model over packed batches needed each wrapped as (packed,)
    from torch.nn.utils.rnn import pad_packed_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(16, 48), nn.Linear(48, 32)

        def forward(self, packed):
            return self.head(pad_packed_sequence(self.rnn(packed)[0])[0])

    torch.manual_seed(0)
    batches = [pack_padded_sequence(torch.randn(9, 6, 16), torch.randint(1, 10, (6,)), enforce_sorted=False)
               for _ in range(6)]
    dense = Packed().eval()
    cfg = bondgate.CompressionConfig(param_ratio=0.5)
    packed = bondgate.compress(copy.deepcopy(dense), cfg, calibration=batches, progress=False)
    wrapped = bondgate.compress(copy.deepcopy(dense), cfg, calibration=[(b,) for b in batches], progress=False)
    with torch.no_grad():
        y, ref = packed(batches[0]), dense(batches[0])
        assert torch.equal(y, wrapped(batches[0]))  # the same statistics either way
        assert 0 < (y - ref).norm() / ref.norm() < 0.2
    before = copy.deepcopy(packed.state_dict())
    bondgate.distill(packed, dense, batches, loss=bondgate.DistillLoss(hidden=0, output=1), steps=3, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in packed.state_dict().items())


def test_a_bare_lstm_is_refused_by_one_warning_not_contradicted_by_the_log(caplog):
    # the warning said why ("a bare recurrent module cannot be replaced in place"), then the log "no layer to
    # compress (skipped: none matched)"
    lstm = nn.LSTM(16, 16)
    with pytest.warns(UserWarning, match="a bare recurrent module cannot be replaced in place: compress "
                                         r"bondgate.Recurrent.from_torch\(it\)"):
        bondgate.compress(lstm, bondgate.CompressionConfig(param_ratio=0.5), calibration=[torch.randn(5, 2, 16)],
                          progress=False)
    assert "none matched" not in caplog.text
    assert isinstance(lstm, nn.LSTM)
