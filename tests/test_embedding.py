import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import bondgate
from bondgate.embedding import MPOEmbedding, lookup, most_frequent
from bondgate.mpo import MPO
from bondgate.planner import PlanPolicy

FLOPS = PlanPolicy(select="flops")  # no autotuning of the tied heads' plans: keeps the tests fast


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("shape", [(1000, 32), (1009, 48), (2 * 3 * 509, 24)])  # exact, prime, 2*3*prime
def test_exact_decomposition_reproduces_lookups(shape):
    emb = nn.Embedding(*shape)
    m = MPOEmbedding.from_embedding(emb)
    assert m.error < 1e-6
    ids = torch.arange(shape[0])
    assert rel(m(ids), emb(ids)) < 1e-5
    assert rel(m.to_embedding()(ids), emb(ids)) < 1e-5
    if shape[0] != 1000:
        assert m.cores[0].shape[1] * m.cores[1].shape[1] * m.cores[2].shape[1] > shape[0]  # padded vocabulary


@pytest.mark.parametrize("kw", [{"max_bond": 6}, {"tol": 0.4}])
def test_reported_error_is_table_error(kw):
    emb = nn.Embedding(1009, 48)
    m = MPOEmbedding.from_embedding(emb, **kw)
    err = rel(m.weight_matrix().detach(), emb.weight.detach())
    assert 0.05 < err < 1 and m.error == pytest.approx(err, rel=1e-4)
    if "tol" in kw:
        assert m.error <= 0.4 + 1e-6
    ids = torch.randint(0, 1009, (50,))
    assert rel(m(ids), m.weight_matrix()[ids]) < 1e-5


def test_forward_never_builds_the_table(monkeypatch):
    mpo = MPO.random(2_000_000, 64, bond=4, num_cores=3)  # a 512 MB table, 12k parameters
    m = MPOEmbedding.from_mpo(mpo)
    monkeypatch.setattr(MPO, "to_tensor", lambda self: pytest.fail("forward rebuilt the table"))
    ids = torch.tensor([[0, 1_999_999, 123_456, 123_456], [777_777, 5, 0, 1_000_000]])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = m(ids)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    assert 0 < allocated < 2_000_000 * 64 * 4 / 1000
    # independent reference: the chain product of the cores' slices at each id's digits
    for t, v in zip(ids.flatten().tolist(), y.reshape(-1, 64)):
        o = [t // (125 * 128), t // 128 % 125, t % 128]
        g = [c[:, ok] for c, ok in zip(mpo.cores, o)]  # (r, in_k, r')
        ref = torch.einsum("aib,bjc,ckd->ijk", *g).reshape(64)
        assert rel(v, ref) < 1e-5


def test_chunked_inference_matches_training_path():
    m = MPOEmbedding.from_mpo(MPO.random(5000, 64, bond=32, num_cores=3))  # 512 numbers per token: 2048 a chunk
    ids = torch.randperm(5000)[:4500]
    with torch.no_grad():
        y = m(ids)
    assert torch.allclose(y, m(ids), rtol=1e-5, atol=1e-6)
    assert torch.allclose(y[:5], m.weight_matrix()[ids[:5]], rtol=1e-5, atol=1e-6)


def test_id_edge_cases():
    emb = nn.Embedding(100, 12)
    m = MPOEmbedding.from_embedding(emb, max_bond=4)
    W = m.weight_matrix().detach()
    ids = torch.tensor([[3, 3, 99], [0, 3, 99]])
    assert torch.allclose(m(ids), W[ids], atol=1e-6)
    assert torch.equal(m(ids)[0, 0], m(ids)[1, 1])
    assert torch.allclose(m(ids.int()), W[ids], atol=1e-6)
    assert m(torch.tensor(7)).shape == (12,) and torch.allclose(m(torch.tensor(7)), W[7], atol=1e-6)
    for shape in [(0,), (2, 0)]:
        y = m(torch.zeros(shape, dtype=torch.long))
        assert y.shape == (*shape, 12)
        y.sum().backward()  # differentiable with no tokens: zero gradients
        assert all(c.grad is not None and not c.grad.any() for c in m.cores)
    for bad in [torch.tensor([-1]), torch.tensor([100]), torch.tensor([[5, 1000]])]:
        with pytest.raises(IndexError, match="out of range"):
            m(bad)
    for bad in [torch.tensor([1.0]), torch.tensor([True])]:
        with pytest.raises(TypeError, match="integer ids"):
            m(bad)


def test_unsupported_embedding_options_and_padding_idx():
    for kw in [{"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}]:
        with pytest.raises(ValueError, match=next(iter(kw))):
            MPOEmbedding.from_embedding(nn.Embedding(50, 8, **kw))
    emb = nn.Embedding(50, 8, padding_idx=3)
    with torch.no_grad():
        emb.weight[3] = 1.0
    with pytest.raises(ValueError, match="padding_idx"):
        MPOEmbedding.from_embedding(emb)
    emb = nn.Embedding(50, 8, padding_idx=-1)  # nn.Embedding stores 49
    m = MPOEmbedding.from_embedding(emb, max_bond=3)  # the MPO's row 49 is then not zero
    assert m.padding_idx == 49 and m.weight_matrix()[49].abs().max() > 1e-3
    ids = torch.tensor([49, 2, 49])
    y = m(ids)
    assert torch.equal(y[0], torch.zeros(8)) and y[1].abs().sum() > 0
    m(torch.tensor([49, 49])).pow(2).sum().backward()  # padding positions send no gradient
    assert all(not c.grad.any() for c in m.cores)
    assert torch.allclose(m.to_embedding()(ids), y, atol=1e-6)
    assert MPOEmbedding.from_spec(m.spec()).padding_idx == 49


def test_gradients_match_dense_reference():
    mpo = MPO.random(30, 6, bond=3, num_cores=3, dtype=torch.float64)
    cores = [c.requires_grad_() for c in mpo.cores]
    ids = torch.tensor([0, 7, 7, 29, 13])
    assert torch.autograd.gradcheck(lambda *c: lookup(c, ids, 6), cores)
    m = MPOEmbedding.from_mpo(mpo)
    w = torch.randn(5, 6, dtype=torch.float64)
    (m(ids) * w).sum().backward()
    ref = [c.detach().clone().requires_grad_() for c in mpo.cores]
    (MPO(ref, 30, 6).to_matrix()[ids] * w).sum().backward()
    for c, r in zip(m.cores, ref):
        assert torch.allclose(c.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_tied_head_equality_and_shared_gradients():
    m = MPOEmbedding.from_embedding(nn.Embedding(1009, 48), max_bond=16)
    head = m.as_linear(policy=FLOPS)
    assert head.cores is m.cores and all(a is b for a, b in zip(head.cores, m.cores))
    assert head.bias is None and m.as_linear(bias=True).bias.shape == (1009,)
    h = torch.randn(4, 3, 48)
    assert rel(head(h), h @ m.weight_matrix().T) < 1e-5
    ids = torch.randint(0, 1009, (4, 3))

    def grads(use_emb: bool, use_head: bool) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss = (m(ids).pow(2).sum() if use_emb else 0) + (head(h).pow(2).sum() if use_head else 0)
        loss.backward()
        return [c.grad.clone() for c in m.cores]

    g_emb, g_head, g_both = grads(True, False), grads(False, True), grads(True, True)
    for a, b, c in zip(g_emb, g_head, g_both):
        assert a.abs().sum() > 0 and b.abs().sum() > 0
        assert torch.allclose(a + b, c, rtol=1e-4, atol=1e-4)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 300, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_tied_model_save_load_roundtrip(tmp_path):
    model = TinyLM()
    model.emb = MPOEmbedding.from_embedding(model.emb, max_bond=8)
    model.head = model.emb.as_linear(policy=FLOPS)
    ids = torch.randint(0, 300, (3, 5))
    y = model(ids)
    bondgate.save(model, tmp_path)
    meta = bondgate.io.read_metadata(tmp_path)
    assert {k: v for k, v in meta["tensor_aliases"].items() if "cores" in k} == {
        f"head.cores.{k}": f"emb.cores.{k}" for k in range(3)}  # stored once
    loaded = bondgate.load(tmp_path, model=TinyLM())
    assert isinstance(loaded.emb, MPOEmbedding) and loaded.head.cores is loaded.emb.cores
    assert torch.equal(loaded(ids), y.detach())
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    (loaded(ids).sum()).backward()  # one set of parameters, trained by both uses
    assert len(list(loaded.parameters())) == 3 + 2


def test_sequential_save_load_roundtrip(tmp_path):
    m = MPOEmbedding.from_embedding(nn.Embedding(1009, 48, padding_idx=0), max_bond=8)
    seq = nn.Sequential(m, nn.Linear(48, 4))
    ids = torch.randint(0, 1009, (2, 9))
    bondgate.save(seq, tmp_path)
    loaded = bondgate.load(tmp_path)
    assert isinstance(loaded[0], MPOEmbedding) and loaded[0].padding_idx == 0
    assert loaded[0].error == m.error and loaded[0].spec() == m.spec()
    assert torch.equal(loaded(ids), seq(ids))


def test_counts_weighting_favours_frequent_rows():
    emb = nn.Embedding(4096, 64)
    E = emb.weight.detach()
    counts = 1e6 / torch.arange(1.0, 4097.0) ** 1.1 * torch.rand(4096).mul(2).exp()  # Zipf over ids, noisy

    def weighted_error(m: MPOEmbedding) -> float:
        d2 = (m.weight_matrix().detach() - E).pow(2).sum(1)
        return float((d2 * counts).sum() / (E.pow(2).sum(1) * counts).sum()) ** 0.5

    plain = MPOEmbedding.from_embedding(emb, max_bond=16)
    weighted = MPOEmbedding.from_embedding(emb, max_bond=16, counts=counts)
    assert weighted.bond_dims == plain.bond_dims
    assert weighted_error(weighted) < 0.85 * weighted_error(plain)  # measured 0.76 vs 0.94
    assert weighted.error == pytest.approx(rel(weighted.weight_matrix().detach(), E), rel=1e-4)
    assert plain.error <= weighted.error  # the price: the plain error grows a little
    exact = MPOEmbedding.from_embedding(nn.Embedding(1009, 48), counts=torch.rand(1009) * 100)  # padded vocab
    assert exact.error < 1e-6
    with pytest.raises(ValueError, match=r"counts must be .*got negative values \(min -1\)$"):
        MPOEmbedding.from_embedding(emb, counts=-torch.ones(4096))  # was "got shape (4096,)", the right shape


@pytest.mark.parametrize("n, keep_rows", [(58, 0), (5, 0), (58, 1), (70, 0), (52, 2)])
def test_counts_must_have_one_entry_per_row(n, keep_rows):
    # 53 rows pad to a 60-row MPO: a length check against the padded size let 58 (or 5) counts through
    emb = nn.Embedding(53, 12)
    with pytest.raises(ValueError, match=rf"num_embeddings=53 .*got shape \({n},\)") as info:
        MPOEmbedding.from_embedding(emb, counts=torch.ones(n), keep_rows=keep_rows)
    assert "60" not in str(info.value)
    with pytest.raises(ValueError, match="num_embeddings=53 .*got NaN or infinite values"):
        MPOEmbedding.from_embedding(emb, counts=torch.full((53,), float("nan")))
    m = MPOEmbedding.from_embedding(emb, counts=torch.arange(53.0), keep_rows=1)
    assert m.kept_ids.tolist() == [52]


def _zipf_counts(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = 1e5 / torch.arange(1.0, n + 1) ** 1.2
    return counts[torch.randperm(n, generator=g)].round()  # frequency unrelated to the id order


def test_lowrank_form_is_the_exact_frequency_weighted_svd():
    # one digit holds the whole id, so the row weights divide one factor exactly: the result must be the optimum
    # of sum_v (c_v + 1) ||E_v - E_hat_v||^2 at the rank (Eckart-Young on diag(w) E), not an approximation of it
    torch.manual_seed(0)
    emb, counts = nn.Embedding(600, 24), _zipf_counts(600)
    E, w = emb.weight.detach().double(), (counts.double() + 1).sqrt()
    P, s, Qh = torch.linalg.svd(E * w[:, None], full_matrices=False)
    best = ((P[:, :6] * s[:6]) @ Qh[:6]) / w[:, None]
    m = MPOEmbedding.from_embedding(emb, max_bond=6, counts=counts, form="lowrank")
    assert m.out_factors == (600, 1) and m.in_factors == (1, 24) and m.bond_dims == (6,) and m.num_params == 6 * 624
    assert rel(m.weight_matrix().double(), best) < 1e-5

    def werr(mm):
        return float(((mm.weight_matrix().detach().double() - E).square().sum(1) * (counts + 1)).sum()) ** 0.5

    plain = MPOEmbedding.from_embedding(emb, max_bond=6, form="lowrank")
    assert werr(m) < 0.8 * werr(plain)
    assert m.error == pytest.approx(rel(m.weight_matrix(), emb.weight), rel=1e-4) and m.error > plain.error
    ids = torch.randint(0, 600, (7, 5))
    assert rel(m(ids), m.weight_matrix()[ids]) < 1e-5  # the gather path of the first core
    with pytest.raises(ValueError, match="form"):
        MPOEmbedding.from_embedding(emb, form="tucker")


@pytest.mark.parametrize("form", ["mpo", "lowrank"])
def test_kept_rows_are_exact_train_and_count_as_weights(form):
    torch.manual_seed(0)
    emb, counts = nn.Embedding(1009, 16), _zipf_counts(1009)
    m = MPOEmbedding.from_embedding(emb, max_bond=4, counts=counts, form=form, keep_rows=40)
    kept = torch.sort(-counts, stable=True).indices[:40]
    assert torch.equal(m.kept_ids, kept.sort().values)
    assert torch.equal(m(kept), emb(kept))  # exact rows
    others = torch.tensor([i for i in range(1009) if i not in set(kept.tolist())])
    assert 0.05 < rel(m(others), emb(others)) < 1  # the factors' approximation
    # the factors are fitted to the table with the kept rows zeroed: on the other rows the layer equals the same fit
    # (same counts, same bond) of that zeroed table without kept rows, and does better there than the fit of the
    # whole table, which spends part of its bond on the most frequent rows that the kept rows replace anyway
    zeroed = nn.Embedding(1009, 16)
    with torch.no_grad():
        zeroed.weight.copy_(emb.weight.index_fill(0, kept, 0.0))
    ref = MPOEmbedding.from_embedding(zeroed, max_bond=4, counts=counts, form=form)
    gap = rel(m(others), ref(others))
    assert gap < 1e-4
    whole = MPOEmbedding.from_embedding(emb, max_bond=4, counts=counts, form=form)
    err, err_whole = rel(m(others), emb(others)), rel(whole(others), emb(others))
    assert err < err_whole  # (measured: 0.968 vs 0.969, 0.851 vs 0.863)
    if form == "lowrank":  # and by hand: the frequency-weighted rank-4 SVD of the zeroed table (Eckart-Young)
        E0, w = zeroed.weight.detach().double(), (counts.double() + 1).sqrt()
        P, sv, Qh = torch.linalg.svd(E0 * w[:, None], full_matrices=False)
        best = ((P[:, :4] * sv[:4]) @ Qh[:4]) / w[:, None]
        gap = rel(m(others).double(), best[others])
        assert gap < 1e-5
    assert m.num_params == sum(c.numel() for c in m.cores) + 40 * 16
    assert m.error == pytest.approx(rel(m.weight_matrix(), emb.weight), rel=1e-4)
    ids = torch.cat([kept[:5], others[:5], kept[:2]]).reshape(3, 4)
    out = m(ids)
    assert torch.equal(out, m.weight_matrix()[ids]) or rel(out, m.weight_matrix()[ids]) < 1e-6
    out.square().sum().backward()
    assert m.kept_rows.grad is not None and m.kept_rows.grad.abs().sum() > 0
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in m.cores)
    assert "kept_rows=40" in repr(m)
    with pytest.raises(ValueError, match="tied MPO head"):
        m.as_linear()
    with pytest.raises(ValueError, match="needs counts"):
        MPOEmbedding.from_embedding(emb, max_bond=4, keep_rows=3)
    with pytest.raises(ValueError, match="distinct"):
        m.keep_rows_(torch.tensor([1, 1]), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="shape"):
        m.keep_rows_(torch.tensor([1, 2]), torch.zeros(3, 16))


def test_kept_rows_save_as_int8_and_reload_bit_exactly(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(1009, 16)
    model = nn.Sequential(MPOEmbedding.from_embedding(emb, max_bond=4, counts=_zipf_counts(1009), form="lowrank",
                                                      keep_rows=40), nn.Linear(16, 4))
    model[0].quantize_("int8")
    ids = torch.randint(0, 1009, (6, 9))
    want = model(ids)
    sd = model.state_dict()
    assert sd["0.kept_rows"].dtype == torch.int8 and sd["0.kept_rows_scale"].shape == (40,)
    bondgate.save(model, tmp_path / "ck")
    loaded = bondgate.load(tmp_path / "ck")
    assert torch.equal(loaded(ids), want) and torch.equal(loaded[0].kept_ids, model[0].kept_ids)
    assert abs(rel(model[0](model[0].kept_ids), emb(model[0].kept_ids)) - 0.005) < 0.005  # int8 rows: < 1%
    bad = {k: v.clone() for k, v in sd.items()}
    bad["0.kept_ids"] = bad["0.kept_ids"].flip(0)  # not increasing: the lookup's binary search would be wrong
    fresh = nn.Sequential(MPOEmbedding.from_spec(model[0].spec()), nn.Linear(16, 4))
    with pytest.raises(RuntimeError, match="kept_ids"):
        fresh.load_state_dict(bad)


def test_the_weight_reports_the_tables_shape_dtype_and_device_only():
    # it was an AttributeError: FSMT's forward reads embed_tokens.weight.dtype (every training step failed)
    m = MPOEmbedding.from_embedding(nn.Embedding(50, 8, dtype=torch.float64), max_bond=4)
    w = m.weight
    assert (w.shape, w.dtype, w.device, w.requires_grad) == ((50, 8), torch.float64, torch.device("cpu"), True)
    with pytest.raises(RuntimeError, match="MPOEmbedding has no dense weight.*weight_matrix"):
        _ = w.data
    with pytest.raises(RuntimeError, match="no dense weight"):
        _ = w + 1
    m.requires_grad_(False)
    assert not m.weight.requires_grad
    with pytest.raises(AttributeError, match="no attribute 'weights'"):
        _ = m.weights
    transformers = pytest.importorskip("transformers")
    # transformers' resize_token_embeddings refuses it (not an nn.Embedding) before changing anything
    model = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=32, vocab_size=50))
    model.embeddings.word_embeddings = m
    with pytest.raises(TypeError, match="not an instance of"):
        model.resize_token_embeddings(60)
    assert model.config.vocab_size == 50 and model.get_input_embeddings() is m


@pytest.mark.parametrize("grad", [False, True])
def test_every_lookup_path_returns_the_tables_rows(grad, monkeypatch):
    # few tokens without autograd gather each token's core slices (decoding), many go through the grouped lookup;
    # both must return the table's rows, for no token at all too
    from bondgate import embedding
    from bondgate.embedding import traced_lookup

    gathered = []
    monkeypatch.setattr(embedding, "traced_lookup", lambda c, ids, d: gathered.append(ids.numel()) or
                        traced_lookup(c, ids, d))
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 48, padding_idx=3)
    layer = MPOEmbedding.from_embedding(emb, max_bond=6)
    layer.keep_rows_(torch.tensor([5, 7]), emb.weight.detach()[[5, 7]])
    table = layer.weight_matrix().detach()
    table[3] = 0
    for n in (0, 1, 2, 5, 40, 300):
        ids = torch.randint(0, 1000, (n,))
        ids[: min(n, 3)] = torch.tensor([3, 5, 5])[: min(n, 3)]
        with torch.set_grad_enabled(grad):
            out = layer(ids.reshape(1, n))
        assert out.shape == (1, n, 48) and out.requires_grad == grad
        torch.testing.assert_close(out[0].detach(), table[ids], atol=1e-6, rtol=1e-5)
    # without autograd: up to ~the cores' output digits of (non-kept, distinct) tokens are gathered
    assert gathered == ([] if grad else [0, 1, 1, 3])  # 5 ids: 3, 5, 5 (kept) and two others
    assert traced_lookup(layer._lookup_cores(), torch.zeros(0, dtype=torch.long), 48).shape == (0, 48)


def test_uniform_allocation_keeps_the_tables_budget_rules():
    """allocation='uniform' gave a table the linear layers' share whatever embedding_ratio said (0.277 for 0.05 and
    for 0.9) and did not charge its kept rows (0.444 of the table at param_ratio=0.3)."""
    torch.manual_seed(0)
    table = torch.randn(600, 32) @ torch.randn(32, 32) * 0.3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.l = nn.Embedding(600, 32), nn.Linear(32, 8)
            self.e.weight.data = table.clone()

        def forward(self, x):
            return self.l(self.e(x))

    calib = [torch.randint(0, 600, (8, 64)) for _ in range(4)]
    for alloc in ("uniform", "global"):
        for ratio in (0.05, 0.9):
            net = Net()
            bondgate.compress(net, bondgate.CompressionConfig(param_ratio=0.3, allocation=alloc, embeddings=True,
                                                              embedding_ratio=ratio), calibration=calib, progress=False)
            assert 0.7 * ratio <= net.e.num_params / table.numel() <= ratio, (alloc, ratio)
        net = Net()
        bondgate.compress(net, bondgate.CompressionConfig(param_ratio=0.3, allocation=alloc, embeddings=True,
                                                          embedding_rows=50), calibration=calib, progress=False)
        assert net.e.kept_rows.shape[0] == 50
        assert net.e.num_params <= 0.3 * table.numel(), alloc


def test_kept_rows_only_for_ids_that_occur():
    emb = nn.Embedding(100, 16)
    counts = torch.zeros(100)
    counts[[3, 7, 9]] = torch.tensor([5.0, 2.0, 1.0])
    with pytest.warns(UserWarning, match="only 3 distinct ids occur"):
        layer = MPOEmbedding.from_embedding(emb, max_bond=4, counts=counts, keep_rows=np.int64(10))
    assert layer.kept_ids.tolist() == [3, 7, 9]


def test_compressed_tables_report_the_errors_of_what_they_look_up_and_their_padding():
    # with quantize="int8" a table's reported error left out the int8 rounding (3e-8 reported, 0.008 real); a
    # non-zero padding row lost its padding_idx in silence; embedding_rows kept the (masked, zero) padding row
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self, pad_row_zero: bool):
            super().__init__()
            self.emb, self.lin = nn.Embedding(1024, 64, padding_idx=0), nn.Linear(64, 64)
            with torch.no_grad():
                self.emb.weight.copy_(torch.randn(1024, 8) @ torch.randn(8, 64))  # rank 8: the pair is exact
                if pad_row_zero:
                    self.emb.weight[0] = 0

        def forward(self, x):
            return self.lin(self.emb(x))

    ids = torch.randint(1, 1024, (16, 32))
    ids[:, 24:] = 0  # padding, the most frequent id
    model = M(pad_row_zero=True)
    dense = model.emb.weight.detach().clone()
    cfg = bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, embedding_form="lowrank", quantize="int8",
                            embedding_rows=4, policy="memory")
    c = bondgate.compress(model, cfg, calibration=[ids], progress=False)
    row = next(r for r in c.bondgate_report.layers if r.name == "emb")
    real = float((c.emb.weight_matrix().detach() - dense).norm() / dense.norm())
    assert 1e-3 < real < 0.05
    assert row.weight_error == pytest.approx(real, rel=1e-4) and c.emb.error == pytest.approx(real, rel=1e-4)
    assert c.emb.padding_idx == 0 and 0 not in c.emb.kept_ids.tolist() and c.emb.kept_ids.numel() == 4
    # an MPO table: the fit leaves the padding row non-zero, the lookups return it as zeros
    full = M(pad_row_zero=True)
    dense = full.emb.weight.detach().clone()
    c = bondgate.compress(full, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, policy="memory"),
                          calibration=[ids], progress=False)
    row = next(r for r in c.bondgate_report.layers if r.name == "emb")
    with torch.no_grad():
        assert float(c.emb.weight_matrix()[0].norm()) > 1e-3  # the fitted row itself is not zero
        looked = float((c.emb(torch.arange(1024)) - dense).norm() / dense.norm())
    assert row.weight_error == pytest.approx(looked, rel=1e-6)
    with pytest.warns(UserWarning, match="padding row \\(0\\) is not zero"):
        c = bondgate.compress(M(pad_row_zero=False), bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, policy="memory"),
                                progress=False)
    assert c.emb.padding_idx is None


class _HeadSubclass(nn.Linear):  # no forward of its own
    pass


def test_a_tied_head_the_table_cannot_take_along_keeps_the_table_dense():
    # a subclass head was left dense on the old Parameter while the table became an MPO: untied, inputs and logits
    # from two tables (logits 5.2 off the MPO table's), the model larger than before; an excluded tied head was
    # compressed anyway
    cfg = dict(param_ratio=0.5, embeddings=True, calibrate=False)
    for make, kw, why in ((lambda m: setattr(m, "head", _HeadSubclass(16, 300, bias=False)), {},
                           "weight is tied to head.weight"),
                          (lambda m: None, {"exclude": ["head"]}, "its tied head head is excluded")):
        torch.manual_seed(0)
        model = TinyLM()
        make(model)
        model.head.weight = model.emb.weight
        with pytest.warns(UserWarning, match=f"skipping emb: {why}"):
            bondgate.compress(model, bondgate.CompressionConfig(**cfg, **kw), progress=False)
        assert type(model.emb) is nn.Embedding and model.head.weight is model.emb.weight
        assert {r.name: r.status for r in model.bondgate_report.layers}["mix"] == "compressed"
    torch.manual_seed(0)
    model = TinyLM()  # the plain tied head still goes along
    bondgate.compress(model, bondgate.CompressionConfig(**cfg), progress=False)
    assert isinstance(model.emb, MPOEmbedding) and model.head.cores is model.emb.cores


# ---- cases a mutation run of embedding.py showed untested
def _layer(n=50, dim=8, **kw):
    torch.manual_seed(0)
    return MPOEmbedding.from_embedding(nn.Embedding(n, dim), max_bond=3, **kw)


def test_keep_rows_in_any_order_pairs_each_id_with_its_own_row():
    # keep_rows_ sorts the ids; the rows must follow them (rows given for ids [7, 2] were kept as 2's and 7's)
    torch.manual_seed(0)
    E = torch.randn(50, 8)
    m = _layer()
    m.keep_rows_(torch.tensor([7, 2, 31]), E[[7, 2, 31]])
    assert m.kept_ids.tolist() == [2, 7, 31]
    ids = torch.tensor([31, 2, 7, 2])
    with torch.no_grad():
        assert torch.equal(m(ids), E[ids])
        assert torch.equal(m.weight_matrix()[[2, 7, 31]], E[[2, 7, 31]])


def test_an_empty_table_is_refused_by_the_embeddings_own_names():
    # was "out_features must be a positive integer, got 0": the MPO's name for the number of rows
    for make, name in ((lambda: MPOEmbedding(0, 4), "num_embeddings"), (lambda: MPOEmbedding(4, 0), "embedding_dim"),
                       (lambda: MPOEmbedding.from_embedding(nn.Embedding(0, 4)), "num_embeddings"),
                       (lambda: MPOEmbedding.from_embedding(nn.Embedding(4, 0)), "embedding_dim")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            make()


def test_padding_idx_out_of_range_is_refused_and_negative_one_counts_from_the_end():
    # nn.Embedding refuses padding_idx=num_embeddings; accepting it here wrapped it round to id 0 in silence
    for bad in (50, 51, -51):
        with pytest.raises(ValueError, match="padding_idx"):
            MPOEmbedding(50, 8, padding_idx=bad)
    m = MPOEmbedding(50, 8, max_bond=3, padding_idx=-1)
    assert m.padding_idx == 49 == nn.Embedding(50, 8, padding_idx=-1).padding_idx
    with torch.no_grad():
        y = m(torch.tensor([49, 0]))
    assert torch.equal(y[0], torch.zeros(8)) and y[1].abs().sum() > 0
    assert MPOEmbedding.from_spec(m.spec()).padding_idx == 49


def test_kept_ids_must_lie_inside_the_vocabulary():
    m = _layer()
    with pytest.raises(ValueError, match=r"distinct and lie in \[0, 50\)"):
        m.keep_rows_(torch.tensor([3, 50]), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"lie in"):
        m.keep_rows_(torch.tensor([-1, 3]), torch.zeros(2, 8))


@pytest.mark.parametrize("ids", [[3, 3, 9], [3, 9, 50], [3, 9, 10**6], [-1, 4, 9]])
def test_a_state_dict_with_duplicate_or_out_of_range_kept_ids_is_refused(ids):
    # duplicates break the lookup's binary search (one id, two rows); an id == num_embeddings makes
    # weight_matrix() index out of the table
    m = _layer()
    m.keep_rows_(torch.tensor([1, 4, 9]), torch.randn(3, 8))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["kept_ids"] = torch.tensor(ids)
    fresh = MPOEmbedding.from_spec(m.spec())
    with pytest.raises(RuntimeError, match="kept_ids"):
        fresh.load_state_dict(sd)


def test_kept_rows_follow_the_cores_trainability():
    # a frozen table (cores requires_grad=False) must not grow trainable kept rows
    m = _layer()
    for c in m.cores:
        c.requires_grad_(False)
    m.keep_rows_(torch.tensor([1, 2]), torch.randn(2, 8))
    assert not m.kept_rows.requires_grad
    assert not any(p.requires_grad for p in m.parameters())


def test_most_frequent_breaks_ties_by_the_lower_id():
    counts = torch.zeros(4000)
    counts[100:3000] = 5.0  # 2900 tied ids, more than a small-array sort keeps in order by accident
    counts[3500] = 9.0
    got = most_frequent(counts, 10)
    assert got.tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 108, 3500]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_kept_rows_are_refused(value):
    m = _layer()
    rows = torch.randn(2, 8)
    rows[1, 3] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.keep_rows_(torch.tensor([1, 2]), rows)
    assert m.kept_ids is None


def test_a_numpy_padding_idx_becomes_a_python_int_and_the_spec_serializes():
    # torch accepts nn.Embedding(padding_idx=np.int64(3)); the MPO table kept the numpy int and bondgate.save failed
    # ("Object of type int64 is not JSON serializable")
    import json

    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    m = MPOEmbedding.from_embedding(nn.Embedding(50, 8, padding_idx=np.int64(3)), max_bond=3)
    assert type(m.padding_idx) is int and m.padding_idx == 3
    assert json.loads(json.dumps(m.spec()))["padding_idx"] == 3
    assert type(MPOEmbedding(50, 8, padding_idx=np.int64(-1)).padding_idx) is int
    with pytest.raises((TypeError, ValueError)):
        MPOEmbedding(50, 8, padding_idx=3.0)  # nn.Embedding refuses a float padding_idx too


def test_uniform_counts_on_a_padded_vocabulary_give_the_unweighted_fit():
    # every row equally frequent: the weighting must be uniform, also where the vocabulary is padded (1009 rows in a
    # larger grid; the padded cells' weight is free and must not tilt the real rows' weights)
    from bondgate.embedding import row_weight_legs, table_factors

    out_f, _ = table_factors(1009, 48)
    assert len(out_f) == 3 and torch.tensor(out_f).prod() > 1009
    legs = row_weight_legs(torch.full((1009,), 41.0), out_f)
    assert all(float(a.abs().max()) < 1e-12 for a in legs)
    torch.manual_seed(0)
    emb = nn.Embedding(1009, 48)
    plain = MPOEmbedding.from_embedding(emb, max_bond=6)
    weighted = MPOEmbedding.from_embedding(emb, max_bond=6, counts=torch.full((1009,), 41.0))
    W0, W1 = plain.weight_matrix().detach(), weighted.weight_matrix().detach()
    assert float((W1 - W0).norm() / W0.norm()) < 1e-4
    assert weighted.error == pytest.approx(plain.error, rel=1e-4)


@pytest.mark.parametrize("k", [-1, 51])
def test_a_spec_with_a_kept_row_count_outside_the_vocabulary_is_refused(k):
    spec = _layer().spec()
    with pytest.raises(ValueError, match=r"kept_rows must be an int in \[0, 50\]"):
        MPOEmbedding.from_spec({**spec, "kept_rows": k})
    assert MPOEmbedding.from_spec({**spec, "kept_rows": 50}).kept_ids.numel() == 50


def test_a_fresh_table_has_rows_of_unit_variance_like_nn_embedding():
    """A randomly initialized MPOEmbedding draws entries of variance ~1, as nn.Embedding's N(0, 1) does."""
    torch.manual_seed(0)
    W = MPOEmbedding(2000, 64).weight_matrix().detach()
    assert 0.5 < float(W.var()) < 2.0


def test_from_mpo_copies_the_cores():
    """Training the layer built by from_mpo must not write into the MPO it was built from."""
    torch.manual_seed(0)
    mpo = MPO.random(50, 8, bond=3, num_cores=3)
    before = [c.clone() for c in mpo.cores]
    m = MPOEmbedding.from_mpo(mpo)
    with torch.no_grad():
        m.cores[0].mul_(2.0)
    assert all(torch.equal(a, b) for a, b in zip(mpo.cores, before, strict=True))


@pytest.mark.parametrize("ids", [torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_kept_ids_must_be_integers(ids):
    """keep_rows_ with float or bool ids raises a TypeError instead of keeping rows under truncated ids."""
    m = _layer()
    with pytest.raises(TypeError, match="kept ids must be integers"):
        m.keep_rows_(ids, torch.zeros(2, 8))
    assert m.kept_ids is None and m.kept_rows is None


def test_keeping_no_rows_removes_the_kept_rows():
    """keep_rows_ with zero ids drops the kept rows: lookups and the state dict are the plain MPO's again."""
    m = _layer()
    ids = torch.tensor([1, 2, 30])
    with torch.no_grad():
        plain = m(ids)
        m.keep_rows_(torch.tensor([1, 2]), torch.ones(2, 8))
        assert torch.equal(m(ids)[:2], torch.ones(2, 8))
        assert m.keep_rows_(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8)) is m
        assert m.kept_ids is None and m.kept_rows is None
        assert torch.equal(m(ids), plain)
    assert not any(k.startswith("kept") for k in m.state_dict())
    assert m.as_linear(policy=FLOPS).out_features == 50


def test_kept_rows_take_the_cores_dtype():
    """Rows given in another dtype are stored in the table's dtype (its state dict stays one dtype)."""
    m = _layer()
    rows = torch.randn(2, 8, dtype=torch.float64)
    m.keep_rows_(torch.tensor([4, 1]), rows)
    assert m.kept_rows.dtype == torch.float32 and m.state_dict()["kept_rows"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(m(torch.tensor([1, 4])), rows.flip(0).float())


@pytest.mark.parametrize("k", [-1, 51])
def test_a_keep_rows_count_outside_the_vocabulary_is_refused(k):
    """from_embedding(keep_rows=-1) raised nothing and kept all rows but one; keep_rows must lie in [0, vocab]."""
    with pytest.raises(ValueError, match="keep_rows"):
        _layer(counts=torch.arange(50.0), keep_rows=k)


def test_rows_whose_intermediates_exceed_a_chunk_are_looked_up_one_token_at_a_time():
    """A table whose per-token intermediates exceed the 2**20-number chunk still returns the table's rows."""
    torch.manual_seed(0)
    cores = [torch.randn(1, 2, 64, 8), torch.randn(8, 2, 64, 300) / 20, torch.randn(300, 2, 1, 1) / 20]
    m = MPOEmbedding.from_mpo(MPO(cores, 8, 4096))  # 64 * 64 * 300 > 2**20 numbers per token after core 2
    ids = torch.tensor([5, 0, 7, 3, 1, 6, 2, 4])
    with torch.no_grad():
        out = m(ids)
        torch.testing.assert_close(out, m.weight_matrix()[ids], atol=1e-6, rtol=1e-5)
    assert out.shape == (8, 4096)


@pytest.mark.parametrize("change", [{"dtype": "float17"}, {"in_factors": [2, 2, 2, 1]}, {"in_factors": [2, 2]},
                                    {"dtype": "int64"}, {"dtype": 5}])
def test_a_malformed_spec_is_refused(change):
    """A spec with an unknown or integer dtype or factor lists of different lengths raises instead of building
    another table."""
    spec = _layer().spec()
    assert spec["in_factors"] == [2, 2, 2] and spec["dtype"] == "float32"
    # an integer dtype said "Only Tensors of floating point and complex dtype can require gradients"
    with pytest.raises(ValueError, match="unknown dtype|inconsistent layer spec|dtype must be a floating-point one"):
        MPOEmbedding.from_spec({**spec, **change})


def test_the_ratio_a_too_small_embedding_budget_names_counts_the_kept_rows():
    # the hint asked for "at least 0.0333" when 0.05 was given: it left out the 640 weights of the 20 kept rows
    import warnings

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(500, 32), nn.Linear(32, 32)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    torch.manual_seed(0)
    calib = [torch.randint(0, 500, (8, 16)) for _ in range(4)]

    def run(ratio):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bondgate.compress(Net(), bondgate.CompressionConfig(param_ratio=0.3, embedding_ratio=ratio, embeddings=True,
                                                              embedding_form="lowrank", embedding_rows=20,
                                                              target_modules=["emb"]), calib, progress=False)

    with pytest.raises(ValueError, match=r"embedding_ratio=0.05 \(800 of 16,000 weights, 640 of them the kept rows'\) "
                                         r".*\(532 weights besides the kept rows\): give at least 0.0733"):
        run(0.05)
    assert run(0.0733).bondgate_report.layers[0].params_after <= 0.0733 * 16000


# ---- from a helper's review
def test_from_embedding_neither_keeps_nor_weights_the_padding_row():
    # the (zero, masked) padding row, the most frequent id of padded batches, took one of the exact rows kept, and
    # its count weighted the fit; compress leaves it out, from_embedding did not
    torch.manual_seed(0)
    emb = nn.Embedding(100, 16, padding_idx=0)
    ids = torch.randint(1, 100, (32, 20))
    ids[:, 12:] = 0
    counts = torch.bincount(ids.reshape(-1), minlength=100).double()
    m = MPOEmbedding.from_embedding(emb, max_bond=4, counts=counts, keep_rows=4)
    assert 0 not in m.kept_ids.tolist() and m.kept_ids.numel() == 4
    assert counts[0] == 32 * 8  # the caller's counts are left alone
    no_pad = counts.clone()
    no_pad[0] = 0
    ref = MPOEmbedding.from_embedding(emb, max_bond=4, counts=no_pad, keep_rows=4)
    assert torch.equal(m.kept_ids, ref.kept_ids) and all(torch.equal(a, b) for a, b in zip(m.cores, ref.cores))
    model = nn.Sequential(emb, nn.Linear(16, 4))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, embedding_rows=4,
                                                        target_modules=["0"], policy="memory"),
                      calibration=[ids], progress=False)
    assert torch.equal(model[0].kept_ids, m.kept_ids)  # compress keeps the same rows


def test_keep_rows_is_refused_while_a_tied_head_shares_the_cores(tmp_path):
    # the table then looked the kept rows up while its tied head went on computing with the MPO's: untied in silence
    import copy
    import gc
    import pickle

    torch.manual_seed(0)
    model = TinyLM(60, 12)
    model.emb = MPOEmbedding.from_embedding(model.emb, max_bond=3)
    model.head = model.emb.as_linear(policy=FLOPS)
    bondgate.save(model, tmp_path)
    loaded = bondgate.load(tmp_path, model=TinyLM(60, 12))  # after_load ties the head again
    twins = [model, copy.deepcopy(model), pickle.loads(pickle.dumps(model)), loaded]
    rows = torch.randn(1, 12)
    for twin in twins:
        assert twin.head.cores is twin.emb.cores
        with pytest.raises(ValueError, match=r"tied head \(as_linear\), which would miss the kept rows: untie it"):
            twin.emb.keep_rows_(torch.tensor([5]), rows)
        assert twin.emb.kept_ids is None
    twins[1].head.set_cores(list(twins[1].head.cores))  # untied: the head has cores of its own
    twins[1].emb.keep_rows_(torch.tensor([5]), rows)
    del twins[2].head
    gc.collect()
    twins[2].emb.keep_rows_(torch.tensor([5]), rows)
    copy.deepcopy(model.emb).keep_rows_(torch.tensor([5]), rows)  # a copy of the table alone has no head
    with torch.no_grad():
        assert torch.equal(twins[1].emb(torch.tensor([5])), rows)
