"""The MPO math: exact TT-SVD, truncation errors, canonical form, factor policy."""

import math

import numpy as np
import pytest
import tensorly as tl
import torch

from bondgate import MPO, choose_factors, factorize_shape

SHAPES = [(256, 256), (62, 256), (384, 1536), (1536, 384), (1000, 777), (1024, 4096)]


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_without_truncation(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    mpo = MPO.from_matrix(W)
    assert mpo.to_matrix().shape == shape
    assert rel(mpo.to_matrix(), W) < 1e-10
    assert mpo.error < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kw", [{"max_bond": 8}, {"tol": 0.5}, {"max_bond": 12, "tol": 0.9}])
def test_reported_error_is_the_true_error(shape, kw):
    W = torch.randn(*shape, dtype=torch.float64)
    mpo = MPO.from_matrix(W, **kw)
    true = rel(mpo.to_matrix(), W)
    assert mpo.error == pytest.approx(true, rel=1e-6)
    if "tol" in kw and "max_bond" not in kw:  # with both, the cap is hard and may cost more than tol
        assert true <= kw["tol"] + 1e-12
    if "max_bond" in kw:
        assert max(mpo.bond_dims) <= kw["max_bond"]


def _unfolding(W, out_f, in_f, k):
    d = len(out_f)
    T = W.reshape(*out_f, *in_f).permute(*[j for i in range(d) for j in (i, d + i)])
    left = math.prod(o * i for o, i in zip(out_f[: k + 1], in_f[: k + 1]))
    return T.reshape(left, -1)


@pytest.mark.parametrize("bond", [0, 1, 2])
def test_single_bond_truncation_is_eckart_young(bond):
    W = torch.randn(256, 256, dtype=torch.float64)
    caps = [None, None, None]
    caps[bond] = 5
    mpo = MPO.from_matrix(W, num_cores=4, max_bond=caps)
    s = torch.linalg.svdvals(_unfolding(W, (4,) * 4, (4,) * 4, bond))
    expected = float(torch.sqrt((s[5:] ** 2).sum()) / torch.linalg.norm(W))
    assert mpo.bond_dims[bond] == 5
    assert rel(mpo.to_matrix(), W) == pytest.approx(expected, rel=1e-9)
    assert mpo.error == pytest.approx(expected, rel=1e-9)


def test_canonical_form_and_schmidt_ordering():
    W = torch.randn(384, 1536, dtype=torch.float64)
    mpo = MPO.from_matrix(W, max_bond=16)
    for c in mpo.cores[:-1]:
        Q = c.reshape(-1, c.shape[3])
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), atol=1e-10)
    for k, s in enumerate(mpo.bond_spectra):
        assert s.numel() == mpo.bond_dims[k]
        assert bool((s[:-1] >= s[1:] - 1e-12).all())
        # Schmidt values of the MPO across cut k = singular values of its k-th unfolding
        sv = torch.linalg.svdvals(_unfolding(mpo.to_matrix(), mpo.out_factors, mpo.in_factors, k))
        assert torch.allclose(s, sv[: s.numel()], rtol=1e-8, atol=1e-10)
    # slicing one bond to a prefix costs exactly its discarded Schmidt mass (relative to the MPO)
    k, w = 1, 6
    widths = list(mpo.bond_dims)
    widths[k] = w
    sliced = mpo.slice_bonds(widths)
    err = torch.linalg.norm(sliced.to_matrix() - mpo.to_matrix())
    assert float(err) == pytest.approx(float(torch.sqrt((mpo.bond_spectra[k][w:] ** 2).sum())), rel=1e-8)


def test_truncate_existing_mpo():
    W = torch.randn(256, 256, dtype=torch.float64)
    exact = MPO.from_matrix(W)
    small = exact.truncate(max_bond=8)
    direct = MPO.from_matrix(W, max_bond=8)
    assert small.bond_dims == (8, 8, 8)
    assert small.error == pytest.approx(rel(small.to_matrix(), W), rel=1e-6)
    # canonical sweep truncation is at least as good as one-pass TT-SVD here (both near-optimal)
    assert small.error <= direct.error * 1.05


def test_matches_tensorly_reconstruction():
    W = torch.randn(96, 120, dtype=torch.float64)
    mpo = MPO.from_matrix(W, num_cores=3, max_bond=7)
    tl.set_backend("pytorch")
    try:
        ref = tl.tt_matrix_to_matrix([c for c in mpo.cores])
    finally:
        tl.set_backend("numpy")
    assert torch.allclose(ref, mpo.to_matrix(), atol=1e-12)


def test_params_and_bonds():
    mpo = MPO.from_matrix(torch.randn(256, 256), num_cores=4, max_bond=32)
    assert mpo.bond_dims == (16, 32, 16)
    assert mpo.num_params == 16 * 16 + 16 * 16 * 32 + 32 * 16 * 16 + 16 * 16 == 16_896
    assert mpo.max_bond_dims() == (16, 256, 16)


def test_float32_input_keeps_dtype():
    W = torch.randn(64, 48)
    mpo = MPO.from_matrix(W, num_cores=3)
    assert mpo.dtype == torch.float32
    assert rel(mpo.to_matrix(), W) < 1e-5


@pytest.mark.parametrize(
    "n,d,expected",
    [(256, 4, (256, (4, 4, 4, 4))), (62, 4, (64, (2, 2, 4, 4))), (777, 4, (784, (4, 4, 7, 7))),
     (1000, 4, (1000, (5, 5, 5, 8))), (1536, 3, (1536, (8, 12, 16))), (1, 3, (1, (1, 1, 1)))],
)
def test_factor_policy(n, d, expected):
    assert choose_factors(n, d) == expected


@pytest.mark.parametrize("n", [30522, 50257, 9973, 4099])
def test_large_primes_are_padded_a_little(n):
    padded, f = choose_factors(n, 4)
    assert math.prod(f) == padded and n <= padded <= n * 1.02
    assert max(f) <= 1.5 * padded ** 0.25


@pytest.mark.parametrize("max_pad", [float("nan"), float("inf"), -0.1, "x", True])
def test_choose_factors_checks_max_pad(max_pad):
    with pytest.raises(ValueError, match="max_pad must be None or a finite number"):
        choose_factors(997, 2, max_pad=max_pad)
    assert choose_factors(997, 2, max_pad=np.float32(0.25)) == choose_factors(997, 2)  # any real number


def test_choose_factors_max_pad_bounds_the_padding():
    # max_pad below 1 had no effect: the search always ran to 2n (62 in 3 padded to 64 with max_pad=0)
    assert choose_factors(62, 3, max_pad=0) == (62, (1, 2, 31))  # no padding allowed: 62's balanced factors
    assert choose_factors(62, 3, max_pad=0.05) == (64, (4, 4, 4))  # 64 <= 62 * 1.05
    assert choose_factors(41, 4) == (54, (2, 3, 3, 3))  # default: up to 2n (32% here)
    assert choose_factors(41, 4, max_pad=0.25) == (41, (1, 1, 1, 41))  # nothing up to 51 is balanced enough
    for n, d, pad in ((97, 3, 0.1), (4099, 3, 0.01), (30522, 4, 0.002)):
        padded, legs = choose_factors(n, d, max_pad=pad)
        assert n <= padded <= n * (1 + pad) and math.prod(legs) == padded


def test_factorize_shape_orders_legs():
    out_f, in_f = factorize_shape(1536, 384, 3)
    assert out_f == (8, 12, 16) and in_f == (8, 8, 6)
    assert factorize_shape(256, 256, 4, out_factors=(2, 8, 4, 4)) == ((2, 8, 4, 4), (4, 4, 4, 4))


def test_padded_mpo_never_leaks():
    W = torch.randn(62, 777, dtype=torch.float64)
    mpo = MPO.from_matrix(W, max_bond=6)
    assert (mpo.padded_out, mpo.padded_in) == (64, 784)
    full = mpo.to_tensor().reshape(64, 784)
    assert torch.equal(mpo.to_matrix(), full[:62, :777])
    assert mpo.error == pytest.approx(rel(mpo.to_matrix(), W), rel=1e-6)


def test_random_mpo_matches_linear_init_variance():
    vals = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        vals.append(MPO.random(256, 384, bond=16, generator=g).to_matrix().var().item())
    expected = 1.0 / (3 * 384)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert sum(vals) / len(vals) == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("n, d", [(41, 4), (13, 3), (37, 4), (113, 5), (257, 6)])
def test_small_primes_in_many_cores_are_padded_not_left_as_one_leg(n, d):
    padded, legs = choose_factors(n, d)
    assert padded >= n and math.prod(legs) == padded and max(legs) <= 1.5 * padded ** (1 / d)


def test_factors_that_overflow_the_weights_dtype_are_refused():
    # the factorization runs in float64; a float32 weight near float32's maximum gave a core of inf, an output of
    # NaN, and error == 0.0 (exact)
    W = torch.full((8, 8), 3e38)
    with pytest.raises(ValueError, match="overflow torch.float32"):
        MPO.from_matrix(W, max_bond=4, num_cores=2)
    assert MPO.from_matrix(W.double(), max_bond=4, num_cores=2).error < 1e-12  # fine in float64


@pytest.mark.parametrize("shape", [(64, 96), (61, 97)])
def test_truncating_a_truncated_mpo_reports_its_error_against_the_matrix(shape):
    # error + rel added relative errors against different norms: 1.74 reported where the truth was 0.98
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64)
    W[:, :8] += 5 * torch.randn(shape[0], 1, dtype=torch.float64)  # some structure
    m = MPO.from_matrix(W, num_cores=3, max_bond=8)
    padded = (m.padded_out, m.padded_in) != shape
    for cut in ({"max_bond": 4}, {"max_bond": 2}, {"tol": 0.5}):
        t = m.truncate(**cut)
        true = float((t.to_matrix() - W).norm() / W.norm())
        if padded:  # an upper bound: the sliced-off block's part is counted
            assert true <= t.error + 1e-12 and t.error <= 1.0 and not t.error_exact
        else:
            assert t.error == pytest.approx(true, rel=1e-9) and t.error_exact
        again = t.truncate(max_bond=1)  # a chain stays a projection of W
        true = float((again.to_matrix() - W).norm() / W.norm())
        assert true <= again.error + 1e-12 <= 1.0 + 1e-12
        if not padded:
            assert again.error == pytest.approx(true, rel=1e-9)
    # without the source's norm (an MPO built from cores), the triangle bound, as documented
    bare = MPO(m.cores, *shape, error=m.error, error_exact=True)
    t = bare.truncate(max_bond=2)
    rel = float((t.to_matrix() - m.to_matrix()).norm() / m.to_matrix().norm())  # on the matrices, padding removed
    assert t.error == pytest.approx(m.error + rel) and not t.error_exact


def test_cut_errors_of_an_mpo_that_has_its_own_error_and_of_float32_cores():
    # the menus subtracted two errors that now add in squares (37.1 for a cut of 125.9); float32 cores reported a
    # ~1e-4 error floor, flagged exact, from 1 - ||W'||^2 / ||W||^2
    from bondgate.allocation import tolerance_menu

    torch.manual_seed(0)
    W = torch.randn(64, 96, dtype=torch.float64)
    m = MPO.from_matrix(W, num_cores=3, tol=0.3)
    assert m.error > 0.2
    menu = tolerance_menu(m, W.numel())
    for widths, err in zip(menu.widths[1:], menu.errors[1:]):
        cut = m.truncate(max_bond=list(widths))
        true = float((m.to_matrix() - cut.to_matrix()).square().sum())
        assert err == pytest.approx(true, rel=1e-6, abs=1e-10 * float(W.square().sum()))  # (float64 rounding)
    f = torch.randn(64, 64)
    m32 = MPO.from_matrix(f, num_cores=3)
    assert m32.truncate(max_bond=1000).error == m32.error == 0.0
    for cut in ({"tol": 3e-3}, {"max_bond": 12}):
        t = m32.truncate(**cut)
        measured = float((t.to_matrix().double() - f.double()).norm() / f.double().norm())
        assert abs(t.error - measured) < 1e-6  # no cancellation floor (the old form: ~1e-4)


def _from_unfolding(A, out_f, in_f):
    """The matrix whose 2-core unfolding ``(o1 i1, o2 i2)`` is ``A`` (the inverse of :func:`_unfolding`, k = 0)."""
    (o1, o2), (i1, i2) = out_f, in_f
    return A.reshape(o1, i1, o2, i2).permute(0, 2, 1, 3).reshape(o1 * o2, i1 * i2)


def test_tol_keeps_the_smallest_rank_that_meets_it():
    # the rank kept for a tolerance is the least one whose discarded mass fits, not one more
    out_f, in_f = (4, 6), (5, 4)
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([2.0 ** -j for j in range(20)], dtype=torch.float64)  # 1, 1/2, 1/4, ...
    W = _from_unfolding(U @ torch.diag(s) @ V[:, :20].T, out_f, in_f)
    assert torch.allclose(_unfolding(W, out_f, in_f, 0), U @ torch.diag(s) @ V[:, :20].T)
    norm = float(s.square().sum().sqrt())
    for k in (1, 3, 7):
        tail_k, tail_k1 = float(s[k:].square().sum().sqrt()), float(s[k - 1:].square().sum().sqrt())
        tol = math.sqrt(tail_k * tail_k1) / norm  # between the error of rank k and of rank k - 1
        mpo = MPO.from_matrix(W, out_factors=out_f, in_factors=in_f, tol=tol)
        assert mpo.bond_dims == (k,), (k, mpo.bond_dims)
        assert mpo.error == pytest.approx(tail_k / norm, rel=1e-9)  # Eckart-Young: the tail's norm
        assert MPO.from_matrix(W, out_factors=out_f, in_factors=in_f).truncate(tol=tol).bond_dims == (k,)
    # exactly rank 5 (per bond): a tiny tol keeps exactly 5
    low = _from_unfolding(U[:, :5] @ torch.diag(s[:5]) @ V[:, :5].T, out_f, in_f)
    assert MPO.from_matrix(low, out_factors=out_f, in_factors=in_f, tol=1e-9).bond_dims == (5,)
    # a Kronecker product of three factors is an MPO with every bond 1
    A, B, C = (torch.randn(o, i, generator=gen, dtype=torch.float64) for o, i in ((2, 3), (4, 2), (3, 4)))
    kron = torch.kron(torch.kron(A, B), C)
    exact = MPO.from_matrix(kron, out_factors=(2, 4, 3), in_factors=(3, 2, 4), tol=1e-9)
    assert exact.bond_dims == (1, 1) and rel(exact.to_matrix(), kron) < 1e-12
    full = MPO.from_matrix(kron, out_factors=(2, 4, 3), in_factors=(3, 2, 4))
    assert full.bond_dims == (6, 12) and full.truncate(tol=1e-9).bond_dims == (1, 1)


@pytest.mark.parametrize("shape,cores,cap,cut", [((64, 96), 3, 6, 3), ((96, 96), 4, 6, 3), ((128, 128), 5, 10, 4),
                                                 ((100, 97), 4, 6, 3)])
def test_truncating_a_truncated_mpo_never_reports_less_than_its_error(shape, cores, cap, cut):
    # the two errors were added in squares for any number of cores: from four on they are not orthogonal, and the
    # result read up to 0.2% under the truth while marked exact (96x96, 4 cores: 0.97976 vs 0.98024)
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64)
    t = MPO.from_matrix(W, num_cores=cores, max_bond=cap).truncate(max_bond=cut)
    true = float(torch.linalg.norm(W - t.to_matrix()) / torch.linalg.norm(W))
    assert t.error >= true - 1e-12
    if cores <= 3:  # disjoint legs: one projection, exact
        assert t.error_exact and t.error == pytest.approx(true, rel=1e-9)
    else:
        assert not t.error_exact


def test_too_many_cores_is_a_clear_error():
    # the factor search recursed once per leg: 2,000 cores raised a bare RecursionError
    with pytest.raises(ValueError, match="num_cores must be at most 256"):
        MPO.from_matrix(torch.randn(8, 8), num_cores=2000)
    assert MPO.from_matrix(torch.randn(8, 8, dtype=torch.float64), num_cores=70).error < 1e-12


# ---- cases a mutation run of mpo.py showed untested
def test_tol_passes_an_exact_bonds_unused_budget_to_the_next_bond():
    """A bond that discards nothing leaves its share of the tol budget to the next bond (the smallest ranks)."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([2.0 ** -j for j in range(20)], dtype=torch.float64)
    A = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    W = torch.kron(A / A.norm(), _from_unfolding(U @ torch.diag(s) @ V[:, :20].T, (4, 6), (5, 4)))  # bond 0: rank 1
    legs = {"out_factors": (2, 4, 6), "in_factors": (3, 5, 4)}
    norm = float(s.square().sum().sqrt())
    for k in (2, 5):
        tail = float(s[k:].square().sum().sqrt())
        tol = math.sqrt(1.5) * tail / norm  # fits rank k on the last bond with the whole budget, not with half of it
        mpo = MPO.from_matrix(W, tol=tol, **legs)
        assert mpo.bond_dims == (1, k) and mpo.error == pytest.approx(tail / norm, rel=1e-9)
        assert MPO.from_matrix(W, **legs).truncate(tol=tol).bond_dims == (1, k)


def test_a_cut_that_drops_nothing_keeps_a_padded_mpos_exact_error():
    """Truncating a padded MPO within its bonds reports its own exact error, not the padded operator's larger one."""
    torch.manual_seed(0)
    W = torch.randn(61, 97, dtype=torch.float64)
    m = MPO.from_matrix(W, num_cores=3, max_bond=8)
    assert (m.padded_out, m.padded_in) != (61, 97)
    t = m.truncate(max_bond=1000)
    assert t.bond_dims == m.bond_dims and t.error_exact
    assert t.error == m.error == pytest.approx(rel(t.to_matrix(), W), rel=1e-9)


def test_truncated_bond_spectra_are_the_results_schmidt_values_or_none():
    """bond_spectra of a truncation are the result's Schmidt values; where a later bond's cut changed an earlier
    bond's values (read before that cut: 20.7 where the result's are 14.9), they are None and canonicalize() has them."""
    torch.manual_seed(0)
    m = MPO.from_matrix(torch.randn(64, 96, dtype=torch.float64), num_cores=3)

    def schmidt(mpo, k, n):
        return torch.linalg.svdvals(_unfolding(mpo.to_matrix(), mpo.out_factors, mpo.in_factors, k))[:n]

    first_only = m.truncate(max_bond=[4, None])  # nothing cut after bond 0: every bond's values are the result's
    assert first_only.bond_dims[0] == 4 and [s.numel() for s in first_only.bond_spectra] == list(first_only.bond_dims)
    for k, s in enumerate(first_only.bond_spectra):
        assert torch.allclose(s, schmidt(first_only, k, s.numel()), rtol=1e-8, atol=1e-10)
    both = m.truncate(max_bond=4)
    assert both.bond_dims == (4, 4) and both.bond_spectra is None
    canon = both.canonicalize()
    assert torch.allclose(canon.to_matrix(), both.to_matrix(), atol=1e-10)
    for k, s in enumerate(canon.bond_spectra):
        assert torch.allclose(s, schmidt(both, k, 4), rtol=1e-8, atol=1e-10)
    assert float(canon.bond_spectra[0][0]) < 0.8 * float(m.bond_spectra[0][0])  # the stale value it would have had
    two = MPO.from_matrix(torch.randn(64, 96, dtype=torch.float64), num_cores=2).truncate(max_bond=5)
    assert torch.allclose(two.bond_spectra[0], schmidt(two, 0, 5), rtol=1e-8, atol=1e-10)
    # dropping only the zero Schmidt values of a rank-deficient MPO is rounding: its spectra stay (and are right)
    low = MPO.from_matrix(m.truncate(max_bond=[6, 3]).to_matrix(), num_cores=3, out_factors=m.out_factors,
                          in_factors=m.in_factors)
    assert max(low.bond_dims) > 6
    kept = low.truncate(tol=1e-10)
    assert kept.bond_dims == (6, 3) and kept.bond_spectra is not None
    for k, s in enumerate(kept.bond_spectra):
        assert torch.allclose(s, schmidt(kept, k, s.numel()), rtol=1e-8, atol=1e-10)


def test_inconsistent_cores_and_bad_bond_arguments_are_refused():
    """Cores whose last bond is not 1 or whose legs cannot hold the shape, max_bond=True and a width of 0 raise."""
    with pytest.raises(ValueError, match="the last core must have right bond 1, got 2"):
        MPO([torch.randn(1, 2, 2, 3), torch.randn(3, 2, 2, 2)], 4, 4)
    with pytest.raises(ValueError, match=r"factors \(2, 2\) x \(2, 2\) cannot hold a \(5, 4\) matrix"):
        MPO([torch.randn(1, 2, 2, 3), torch.randn(3, 2, 2, 1)], 5, 4)
    with pytest.raises(TypeError, match="max_bond must be an int"):
        MPO.from_matrix(torch.randn(16, 16), num_cores=2, max_bond=True)
    mpo = MPO.from_matrix(torch.randn(16, 16), num_cores=3, max_bond=2)
    with pytest.raises(ValueError, match=r"width 0 for bond 1 is outside \[1, 2\]"):
        mpo.slice_bonds([2, 0])


def test_16_bit_cores_are_no_longer_a_projection_of_the_matrix():
    """MPO.to(float16) drops source_norm (rounded cores); float32 keeps it, so truncate's error stays a bound."""
    torch.manual_seed(0)
    W = torch.randn(64, 96, dtype=torch.float64)
    m = MPO.from_matrix(W, num_cores=3, max_bond=8)
    assert m.to(torch.float32).source_norm == m.source_norm > 0
    half = m.to(torch.float16)
    assert half.source_norm is None
    t = half.truncate(max_bond=4)
    assert not t.error_exact and t.error >= rel(t.to_matrix().double(), W)


def test_the_most_legs_allowed_is_256():
    """num_cores of exactly 256 is accepted; 257 is refused."""
    assert choose_factors(2, 256) == (2, (1,) * 255 + (2,))
    with pytest.raises(ValueError, match="num_cores must be at most 256, got 257"):
        choose_factors(2, 257)


def test_an_exact_split_within_twice_the_balanced_leg_is_kept_unpadded():
    """A largest leg up to 2 * n**(1/d) keeps n exact (10 -> (2, 5), 5 <= 6.32)."""
    assert choose_factors(10, 2) == (10, (2, 5))
    assert choose_factors(14, 2) == (14, (2, 7))


def test_default_padding_may_reach_twice_n():
    """With no max_pad the search runs up to 2 * n (5 in 3 cores pads to 8, 60% more)."""
    assert choose_factors(5, 3) == (8, (2, 2, 2))
    assert choose_factors(10, 4) == (16, (2, 2, 2, 2))


def test_max_pad_allows_a_padded_size_exactly_at_its_bound():
    """padded_n == n * (1 + max_pad) is allowed, also where the float product falls just below it."""
    assert choose_factors(62, 3, max_pad=2 / 62) == (64, (4, 4, 4))
    assert choose_factors(13, 2, max_pad=2 / 13) == (15, (3, 5))
    assert choose_factors(42, 4, max_pad=12 / 42) == (54, (2, 3, 3, 3))


def test_bool_factors_are_refused():
    """True is not a leg size, though it equals 1."""
    with pytest.raises(ValueError, match="out_factors must be a non-empty sequence of positive integers"):
        factorize_shape(64, 48, 3, out_factors=(True, 8, 8))
    with pytest.raises(ValueError, match="in_factors must be a non-empty sequence of positive integers"):
        factorize_shape(64, 48, 3, in_factors=(4, 4, 3, True))


def test_truncating_an_mpo_with_values_in_its_padded_block_meets_tol_on_its_matrix():
    # random (and trained) cores put values in the padded block; the sweep's Schmidt masses counted them, so a cut
    # could land 0.52 off the matrix at tol=0.4 (reported 0.37), or 0.80 off at tol=0.5 reported exact at 0.28
    worst = 0.0
    for seed in range(12):
        for shape in [(7, 11, 4), (41, 41, 4), (11, 41, 3)]:
            m = MPO.random(*shape[:2], bond=6, num_cores=shape[2], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))
            W = m.to_matrix()
            for tol in (0.2, 0.4):
                t = m.truncate(tol=tol)
                actual = float(torch.linalg.norm(W - t.to_matrix()) / torch.linalg.norm(W))
                assert actual <= tol + 1e-12 and t.error == pytest.approx(actual, rel=1e-9, abs=1e-12)
                worst = max(worst, actual)
    assert worst > 0.1  # the cuts do cut
    g = torch.Generator().manual_seed(0)
    Wp = torch.randn(8, 16, dtype=torch.float64, generator=g)
    Wp[7] *= 30  # the padded row of a 7 x 16 matrix on legs (2, 4) x (4, 4)
    m = MPO(MPO.from_matrix(Wp, out_factors=(2, 4), in_factors=(4, 4)).cores, 7, 16)
    t = m.truncate(tol=0.5)
    actual = float(torch.linalg.norm(m.to_matrix() - t.to_matrix()) / torch.linalg.norm(m.to_matrix()))
    assert t.bond_dims[0] < m.bond_dims[0] and actual <= 0.5 and t.error == pytest.approx(actual)


def test_truncating_a_padded_tt_svd_meets_tol_on_its_matrix():
    # a cut TT-SVD's padded block is not zero, and tol was measured on the padded operator (its norm is larger than
    # the matrix's): 13 x 17 on 18 x 18 legs, cut at tol=0.7, landed 0.709 off its matrix
    torch.manual_seed(41)
    torch.randn(41, 41, dtype=torch.float64)
    m = MPO.from_matrix(torch.randn(13, 17, dtype=torch.float64), num_cores=3, max_bond=2)
    assert m.source_norm and (m.padded_out, m.padded_in) == (18, 18)
    assert rel(m.truncate(tol=0.7).to_matrix(), m.to_matrix()) <= 0.7
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        for o, i, d in [(13, 17, 3), (7, 11, 3), (9, 9, 2), (11, 41, 4)]:
            W = torch.randn(o, i, dtype=torch.float64, generator=g)
            m = MPO.from_matrix(W, num_cores=d, max_bond=2)
            M = m.to_matrix()
            for tol in torch.linspace(0.05, 0.95, 46).tolist():
                t = m.truncate(tol=tol)
                assert rel(t.to_matrix(), M) <= tol + 1e-12
                assert rel(t.to_matrix(), W) <= t.error + 1e-12  # (the error against W stays a bound)


def test_cores_that_are_not_floating_tensors_of_one_dtype_and_device_are_refused():
    # each failed later and raw: a list ('list' object has no attribute 'ndim'), int64 cores (the layer's "Only
    # Tensors of floating point ... can require gradients"), float32 with float64 (to_matrix's matmul)
    with pytest.raises(TypeError, match="cores must be tensors, got a list for core 0"):
        MPO([[[[1.0]]]], 1, 1)
    with pytest.raises(TypeError, match="cores must be floating point, got dtype torch.int64 for core 0"):
        MPO([torch.ones(1, 2, 2, 1, dtype=torch.long)], 2, 2)
    with pytest.raises(TypeError, match="one dtype and device: core 0 is torch.float32 on cpu, core 1 torch.float64"):
        MPO([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1, dtype=torch.float64)], 4, 4)
    with pytest.raises(TypeError, match="core 1 torch.float32 on meta"):
        MPO([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1, device="meta")], 4, 4)
    with pytest.raises(ValueError, match="is on the meta device: a shape without values, nothing to factor"):
        MPO.from_matrix(torch.empty(8, 8, device="meta"), num_cores=2)
