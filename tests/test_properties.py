"""Property tests: random shapes, factorizations and bond caps."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bondgate import MPO, MPOLinear, PlanPolicy

FLOPS = PlanPolicy(select="flops")  # deterministic plan choice; autotuning is covered elsewhere


@st.composite
def layers(draw):
    d = draw(st.integers(1, 4))
    out_f = tuple(draw(st.lists(st.integers(1, 5), min_size=d, max_size=d)))
    in_f = tuple(draw(st.lists(st.integers(1, 5), min_size=d, max_size=d)))
    caps = draw(st.one_of(st.none(), st.integers(1, 6), st.lists(st.one_of(st.none(), st.integers(1, 6)),
                                                                  min_size=d - 1, max_size=d - 1)))
    rows = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    return out_f, in_f, caps, rows, seed


@settings(max_examples=60, deadline=None)
@given(layers(), st.booleans())
def test_planned_forward_equals_dense_product(spec, speed):
    out_f, in_f, caps, rows, seed = spec
    torch.manual_seed(seed)
    W = torch.randn(math.prod(out_f), math.prod(in_f))
    mpo = MPO.from_matrix(W, in_factors=in_f, out_factors=out_f, max_bond=caps)
    layer = MPOLinear.from_mpo(mpo, torch.randn(W.shape[0]),
                               policy=PlanPolicy(select="flops", cache_dense=speed))
    x = torch.randn(rows, W.shape[1])
    with torch.no_grad():
        ref = x @ mpo.to_matrix().T + layer.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 8)),
       st.one_of(st.none(), st.floats(0.0, 0.95)), st.integers(0, 2**16))
def test_auto_factors_error_report_and_param_count(n_out, n_in, d, cap, tol, seed):
    torch.manual_seed(seed)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    mpo = MPO.from_matrix(W, num_cores=d, max_bond=cap, tol=tol)
    true = float(torch.linalg.norm(mpo.to_matrix() - W) / torch.linalg.norm(W))
    assert mpo.error >= true - 1e-9  # the reported error bounds the true one ...
    assert abs(mpo.error - true) <= 1e-6 * max(true, 1e-12) + 1e-9  # ... and is in fact exact
    if tol is not None and cap is None:
        assert true <= tol + 1e-9
    r = [1, *mpo.bond_dims, 1]
    assert mpo.num_params == sum(r[k] * o * i * r[k + 1]
                                 for k, (o, i) in enumerate(zip(mpo.out_factors, mpo.in_factors)))
    if cap is not None:
        assert max(mpo.bond_dims, default=1) <= cap
    assert all(b <= m for b, m in zip(mpo.bond_dims, mpo.max_bond_dims()))
    # padded legs hold the real matrix in their leading block
    x = torch.randn(3, n_in, dtype=torch.float64)
    layer = MPOLinear.from_mpo(mpo, policy=PlanPolicy(select="flops"))
    torch.testing.assert_close(layer(x), x @ mpo.to_matrix().T, rtol=1e-9, atol=1e-9)
