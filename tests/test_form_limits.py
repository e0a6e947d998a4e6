"""benchmarks/form_limits.py: each form's best error at a weight share, on matrices whose answer is known."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from bondgate.factors import factorize_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fl():
    spec = importlib.util.spec_from_file_location("form_limits", ROOT / "benchmarks" / "form_limits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rank_and_sparse_errors(fl):
    W = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))  # 16 weights; rank r costs 8 r
    total = 16 + 9 + 4 + 1
    assert fl.rank_error(W, 0.5) == pytest.approx(math.sqrt((9 + 4 + 1) / total))  # r = 1
    assert fl.rank_error(W, 1.0) == pytest.approx(math.sqrt((4 + 1) / total))  # r = 2
    assert fl.sparse_error(W, 1 / 16) == pytest.approx(math.sqrt((9 + 4 + 1) / total))  # keeps the 4
    assert fl.sparse_error(W, 2 / 16) == pytest.approx(math.sqrt((4 + 1) / total))
    assert fl.sparse_error(W, 4 / 16) == 0.0
    # a rank-3 matrix is exact once three ranks fit
    g = torch.Generator().manual_seed(0)
    L = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    assert fl.rank_error(L, 3 * 70 / 1200) < 1e-7 and fl.rank_error(L, 2 * 70 / 1200) > 0.1


def test_mpo2_error_exact_on_kronecker(fl):
    g = torch.Generator().manual_seed(1)
    (o1, o2), (i1, i2) = factorize_shape(48, 36, 2)
    A, B = torch.randn(o1, i1, generator=g), torch.randn(o2, i2, generator=g)
    W = torch.kron(A, B)  # W[(a o2 + b), (c i2 + d)] = A[a, c] B[b, d]: a bond-1 MPO on these legs
    share = (o1 * i1 + o2 * i2) / W.numel()
    own, best = fl.mpo2_error(W, share, perms=3)
    assert own < 1e-7 and best <= own
    # a permutation destroys the structure, which the best-of keeps at the identity's error
    p = torch.randperm(48, generator=g)
    assert fl.mpo2_error(W[p], share)[0] > 0.1
    noise = torch.randn(48, 36, generator=g)
    own, _ = fl.mpo2_error(noise, share)
    assert 0.5 < own < 1.0


def test_output_space_errors(fl):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    eye = torch.eye(16, dtype=torch.float64)
    for share in (0.25, 0.5, 0.75):
        assert fl.rank_out_error(W, fl.psd_root(eye), share) == pytest.approx(fl.rank_error(W, share))
        assert fl.sparse_out_error(W, eye, share) == pytest.approx(fl.sparse_error(W, share))
    # inputs confined to 4 directions: rank 4 reproduces every output exactly, while the weight error is large
    X = torch.randn(4, 16, generator=g, dtype=torch.float64)
    C = X.T @ X / 4
    share = 4 * 40 / W.numel()
    assert fl.rank_out_error(W, fl.psd_root(C), share) < 1e-6 and fl.rank_error(W, share) > 0.3
    # the optimum beats another rank-4 pair (the weight-space SVD) in output error
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    E = W - U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    C = torch.cov(torch.randn(16, 200, generator=g, dtype=torch.float64)) + torch.diag(torch.linspace(0, 3, 16,
                                                                                                       dtype=torch.float64))
    svd_out = math.sqrt(((E @ C) * E).sum() / ((W @ C) * W).sum())
    assert fl.rank_out_error(W, fl.psd_root(C), share) < svd_out
