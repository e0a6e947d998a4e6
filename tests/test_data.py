"""Dataset loaders (bondgate.data) and a smoke test of examples/bank_mlp.py. Nothing here downloads."""

import dataclasses
import functools
import hashlib
import io
import json
import re
import sys
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from bondgate import data as bd

pytest.importorskip("pandas")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# small hand-written files under the published names: the loaders warn that they are not the published files
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the published:UserWarning")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Only file:// URLs may be opened, so a resolver bug cannot turn into a download."""
    real = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        if not str(getattr(url, "full_url", url)).startswith("file:"):
            raise AssertionError(f"test tried to download {url}")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(bd.urllib.request, "urlopen", guarded)


@functools.lru_cache(maxsize=1)
def _bank(root: str) -> bd.BankMarketing:
    return bd.load_bank_marketing(root, download=False)


@pytest.fixture
def bank(data_dir) -> bd.BankMarketing:
    return _bank(str(data_dir))


# ------------------------------------------------------------------------------------ bank marketing
def test_bank_shapes_and_splits(bank):
    # 41,188 rows -> test ceil(0.2 n) = 8,238; the remaining 32,950 -> valid 6,590, train 26,360.
    assert bank.X_train.shape == (26360, 62)
    assert bank.X_valid.shape == (6590, 62)
    assert bank.X_test.shape == (8238, 62)
    assert bank.y_train.shape == (26360,) and bank.y_valid.shape == (6590,) and bank.y_test.shape == (8238,)
    for t in (bank.X_train, bank.y_train, bank.X_valid, bank.y_valid, bank.X_test, bank.y_test):
        assert t.dtype == torch.float32
    assert len(bank.feature_names) == 62 == bank.num_features
    assert "duration" not in bank.feature_names
    assert bank.feature_names[:9] == list(bd.BANK_NUMERIC)
    assert {"job_admin.", "poutcome_success", "month_dec", "day_of_week_fri"} <= set(bank.feature_names)


def test_bank_values(bank):
    X = torch.cat([bank.X_train, bank.X_valid, bank.X_test])
    y = torch.cat([bank.y_train, bank.y_valid, bank.y_test])
    assert X.min() == 0 and X.max() == 1
    # min-max over the full table: every numeric column reaches both 0 and 1 somewhere
    assert torch.all(X[:, :9].amin(0) == 0) and torch.all(X[:, :9].amax(0) == 1)
    # one-hot blocks: each row has exactly one 1 per categorical column (10 in all)
    assert torch.all(X[:, 9:].sum(1) == 10)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert y.sum().item() == 4640
    for part in (bank.y_train, bank.y_valid, bank.y_test):
        assert part.mean().item() == pytest.approx(0.113, abs=0.006)


def test_bank_split_is_deterministic(data_dir):
    again = bd.load_bank_marketing(data_dir / "bank-marketing" / "bank-additional-full.csv", download=False)
    first = _bank(str(data_dir))
    assert torch.equal(again.X_test, first.X_test) and torch.equal(again.y_valid, first.y_valid)


# ------------------------------------------------------------------------------------ text corpora
def test_stsb_dev(data_dir):
    pairs = bd.load_stsb(data_dir, split="dev")
    assert len(pairs) == 1500
    assert all(isinstance(a, str) and isinstance(b, str) and 0.0 <= s <= 5.0 for a, b, s in pairs)
    assert pairs[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    # quotes inside a field must not be treated as CSV quoting
    assert ("A woman posing by a pillar with a U2 sign.",
            'a woman is standing by a pillar where "u2" is written.', 4.2) in pairs
    assert sum('"' in a or '"' in b for a, b, _ in pairs) > 50


def test_stsb_train_and_bad_split(data_dir):
    assert len(bd.load_stsb(data_dir, split="train")) == 5749
    with pytest.raises(ValueError, match="train"):
        bd.load_stsb(data_dir, split="test")


def test_text_corpora(data_dir):
    wiki = bd.load_text("wikitext-2", "valid", data_dir)
    assert wiki.count("\n") == 3760 and len(wiki.split()) == 213886
    ptb = bd.load_text("ptb", "valid", data_dir)
    assert ptb.count("\n") == 3370 and len(ptb.split()) == 70390
    assert bd.load_text("ptb", "test", data_dir / "ptb")  # dataset folder works as path too
    with pytest.raises(ValueError, match="split"):
        bd.load_text("wikitext-2", "test", data_dir)
    with pytest.raises(ValueError, match="unknown corpus"):
        bd.load_text("wikitext-103", "valid", data_dir)


def test_stsb_reads_crlf_and_names_the_file_and_line_of_bad_input(tmp_path):
    p = tmp_path / REL
    p.parent.mkdir(parents=True)
    p.write_bytes(b"score\tsentence1\tsentence2\r\n4.0\tA cat. \tA dog.\r\n1.5\tB.\tC.\r\n")
    assert bd.load_stsb(tmp_path) == [("A cat. ", "A dog.", 4.0), ("B.", "C.", 1.5)]  # trailing space kept
    p.write_text("score\tsentence1\tsentence2\n4.0\tA cat.\tA dog.\nx\tA b.\tC d.\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:3: score 'x' is not a number")):
        bd.load_stsb(tmp_path)
    p.write_bytes(b"score\tsentence1\tsentence2\n4.0\tA \xe9 cat.\tA dog.\n")  # latin-1
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: not UTF-8 text (byte 0xe9 at offset 32)")):
        bd.load_stsb(tmp_path)


def test_bank_csv_errors_name_the_file_and_the_expected_format(tmp_path):
    csv = tmp_path / bd.BANK_FILE
    csv.parent.mkdir(parents=True)
    csv.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: cannot read it as a table")) as err:
        bd.load_bank_marketing(tmp_path, download=False)
    assert "';'-separated" in str(err.value)
    csv.write_text("age,job,y\n30,admin,no\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: one column 'age,job,y', so it looks ','-separated")):
        bd.load_bank_marketing(tmp_path, download=False)
    csv.write_text("age;job;y\n30;admin;no\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: no column(s) 'duration', 'campaign'")):
        bd.load_bank_marketing(tmp_path, download=False)


# ------------------------------------------------------------------------------------ resolver
REL = "stsb/sts-dev.tsv"


def _put(root: Path, text: str, rel: str = REL) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_resolver_order(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "cache"
    monkeypatch.setenv("BONDGATE_DATA", str(env))
    monkeypatch.setenv("BONDGATE_CACHE", str(cache))
    assert bd.cache_dir() == cache
    p_exp, p_env, p_cache = _put(explicit, "explicit"), _put(env, "env"), _put(cache, "cache")

    assert bd.resolve(REL, p_exp) == p_exp  # the file itself
    assert bd.resolve(REL, explicit) == p_exp  # a root laid out like shared/data
    assert bd.resolve(REL, p_exp.parent) == p_exp  # the dataset's own folder
    assert bd.resolve(REL) == p_env
    p_env.unlink()
    assert bd.resolve(REL) == p_cache
    monkeypatch.delenv("BONDGATE_DATA")
    assert bd.resolve(REL) == p_cache


def test_explicit_path_does_not_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv("BONDGATE_DATA", str(tmp_path / "env"))
    _put(tmp_path / "env", "env")
    missing = tmp_path / "nowhere.tsv"
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        bd.resolve(REL, missing)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("BONDGATE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bd.cache_dir() == tmp_path / ".cache" / "bondgate"


def test_not_found_download_false(tmp_path, monkeypatch):
    monkeypatch.delenv("BONDGATE_DATA", raising=False)
    monkeypatch.setenv("BONDGATE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        bd.load_bank_marketing(download=False)
    msg = str(err.value)
    assert bd.BANK_FILE in msg and str(tmp_path / "cache") in msg
    assert "download=False" in msg and "BONDGATE_DATA" in msg
    assert not (tmp_path / "cache").exists()


def test_not_found_without_known_url(tmp_path, monkeypatch):
    monkeypatch.setenv("BONDGATE_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("BONDGATE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no public download"):
        bd.load_text("ptb", "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        bd.load_stsb()


def test_failed_download_lists_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("BONDGATE_DATA", str(tmp_path / "typo"))
    monkeypatch.setenv("BONDGATE_CACHE", str(tmp_path / "cache"))
    tried = []

    def refused(remote: bd._Remote, dest: Path) -> None:
        tried.append(dest)
        raise OSError(f"could not download {remote.url}: connection refused")

    monkeypatch.setattr(bd, "_download", refused)
    with pytest.raises(FileNotFoundError) as err:
        bd.load_bank_marketing()
    msg, cached = str(err.value), tmp_path / "cache" / bd.BANK_FILE
    assert tried == [cached]  # the search order is kept: the download comes last
    assert f"$BONDGATE_DATA: {tmp_path / 'typo' / bd.BANK_FILE}; cache: {cached}" in msg
    assert f"could not download {bd.BANK_URL}: connection refused" in msg
    assert isinstance(err.value.__cause__, OSError)


def _nested_zip(path: Path, csv: bytes) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("__MACOSX/bank-additional/._bank-additional-full.csv", b"junk")
        zf.writestr("bank-additional/bank-additional-full.csv", csv)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bank-additional.zip", inner.getvalue())
        zf.writestr("bank-full.csv", b"other file")


def test_download_unpacks_nested_zip_and_checks_sha(tmp_path, monkeypatch):
    # A local file:// archive with the UCI layout exercises the download path without a network.
    csv = b'"age";"y"\n30;"no"\n'
    archive = tmp_path / "bank+marketing.zip"
    _nested_zip(archive, csv)
    monkeypatch.delenv("BONDGATE_DATA", raising=False)
    monkeypatch.setenv("BONDGATE_CACHE", str(tmp_path / "cache"))
    good = bd._Remote(archive.as_uri(), bd.BANK_MEMBERS, hashlib.sha256(csv).hexdigest())

    monkeypatch.setitem(bd.REMOTES, bd.BANK_FILE, dataclasses.replace(good, sha256="0" * 64))
    with pytest.raises(OSError, match="checksum mismatch"):
        bd.resolve(bd.BANK_FILE)
    assert not list((tmp_path / "cache").rglob("*.csv*"))  # nothing (not even a .part) left behind

    monkeypatch.setitem(bd.REMOTES, bd.BANK_FILE, good)
    got = bd.resolve(bd.BANK_FILE)
    assert got == tmp_path / "cache" / bd.BANK_FILE and got.read_bytes() == csv
    assert bd.resolve(bd.BANK_FILE, download=False) == got  # now served from the cache


def test_a_trickling_download_stops_at_the_deadline(tmp_path, monkeypatch, capsys):
    # urlopen's timeout bounds each read only: a server sending a byte every 5 s held load_bank_marketing for good
    class Trickle:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read1(self, n):
            return b"x"

    monkeypatch.setattr(bd.urllib.request, "urlopen", lambda url, timeout: Trickle())
    clock = iter(range(0, 10**6, 7))  # 7 s per read
    monkeypatch.setattr(bd.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(bd, "DOWNLOAD_SECONDS", 60)
    dest = tmp_path / "cache" / bd.BANK_FILE
    with pytest.raises(OSError, match=r"more than 60 s \(9 bytes\); nothing was written"):
        bd._download(bd.REMOTES[bd.BANK_FILE], dest)
    assert not dest.parent.exists() or not list(dest.parent.iterdir())
    assert "bondgate: downloading https://archive.ics.uci.edu" in capsys.readouterr().err


def test_a_cut_download_says_so(tmp_path, monkeypatch):
    # read1 ends a transfer cut short without IncompleteRead: the error blamed the archive ("not a zip file")
    class Cut:
        headers = {"Content-Length": "1000"}
        sent = [b"x" * 400, b""]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read1(self, n):
            return self.sent.pop(0)

    monkeypatch.setattr(bd.urllib.request, "urlopen", lambda url, timeout: Cut())
    with pytest.raises(OSError, match="cut at 400 of 1,000 bytes; nothing was written"):
        bd._download(bd.REMOTES[bd.BANK_FILE], tmp_path / "cache" / bd.BANK_FILE)
    assert not (tmp_path / "cache").exists()


def test_real_remote_is_registered():
    r = bd.REMOTES[bd.BANK_FILE]
    assert r.url == "https://archive.ics.uci.edu/static/public/222/bank+marketing.zip"
    assert r.sha256 == "74adfc578bf77a7ff4bb1ba4a9f8709d9e3c6907342959c2c8416847e0afb4d8"


def test_shared_bank_file_matches_checksum(data_dir):
    p = data_dir / bd.BANK_FILE
    assert hashlib.sha256(p.read_bytes()).hexdigest() == bd.BANK_SHA256


# ------------------------------------------------------------------------------------ examples/bank_mlp.py
@pytest.fixture
def bank_mlp():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import bank_mlp
    finally:
        sys.path.remove(str(EXAMPLES))
    return bank_mlp


def test_bank_mlp_trains(bank, bank_mlp):
    small = dataclasses.replace(bank, X_train=bank.X_train[:2000], y_train=bank.y_train[:2000])
    model = bank_mlp.build_mlp(seed=0)
    assert bank_mlp.count_params(model) == 82177
    # lr 1e-3 rather than the recipe's 1e-4 so that 2 short epochs learn something robustly
    hist = bank_mlp.train(model, small, lr=1e-3, epochs=2, patience=20, seed=0)
    assert hist["epochs_run"] == 2 and len(hist["train_loss"]) == 2
    m = bank_mlp.evaluate(model, bank.X_test, bank.y_test)
    assert set(m) == {"accuracy", "recall", "precision", "roc_auc", "loss"}
    assert m["roc_auc"] > 0.6
    # the best epoch's weights were restored
    assert bank_mlp._loss(model, bank.X_valid, bank.y_valid) == pytest.approx(hist["best_valid_loss"], rel=1e-6)


def test_early_stopping_restores_best(bank, bank_mlp):
    small = dataclasses.replace(bank, X_train=bank.X_train[:256], y_train=bank.y_train[:256],
                                X_valid=bank.X_valid[:256], y_valid=bank.y_valid[:256])
    model = bank_mlp.build_mlp(seed=1)
    hist = bank_mlp.train(model, small, lr=3e-2, epochs=40, patience=2, seed=1)  # lr high enough to overfit
    assert hist["epochs_run"] == hist["best_epoch"] + 2 < 40  # stopped early (40: it never stopped)
    assert hist["best_valid_loss"] == min(hist["valid_loss"])
    assert bank_mlp._loss(model, small.X_valid, small.y_valid) == pytest.approx(hist["best_valid_loss"], rel=1e-6)


def test_bank_mlp_mpo_middle(bank, bank_mlp):
    from bondgate import MPOLinear

    model = bank_mlp.build_mlp(seed=0)
    X = bank.X_test[:512]
    chi32 = bank_mlp.mpo_middle(model, max_bond=32)
    layer = chi32[bank_mlp.MIDDLE]
    assert isinstance(layer, MPOLinear) and layer.bond_dims == (16, 32, 16)
    assert layer.num_params == 16896
    assert bank_mlp.count_params(chi32) == 82177 - 65536 + 16896
    assert isinstance(model[bank_mlp.MIDDLE], torch.nn.Linear)  # the original is untouched

    exact = bank_mlp.mpo_middle(model, max_bond=None)
    with torch.no_grad():
        assert torch.allclose(exact(X), model(X), atol=1e-4, rtol=0)


def test_compress_whole_model_to_ten_percent(bank_mlp):
    model = bank_mlp.build_mlp(seed=0)
    x = torch.rand(512, 62)
    small = bank_mlp.compress_whole_model(model, 0.10, x)
    dense_w = bank_mlp.linear_weights(model)
    assert dense_w == 62 * 256 + 256 * 256 + 256
    assert 0.08 * dense_w <= bank_mlp.linear_weights(small) <= 0.10 * dense_w
    # every linear layer targeted; the 256 -> 1 output layer, whose MPO cannot be smaller, kept dense by the budget
    assert [r.status for r in small.bondgate_report.layers] == ["compressed", "compressed", "kept dense (budget)"]
    with torch.no_grad():
        assert small(x).shape == (512, 1) and torch.isfinite(small(x)).all()


def test_bank_mlp_cli(data_dir, bank_mlp, tmp_path, capsys, monkeypatch):
    from bondgate import PlanPolicy

    # pick contraction plans by FLOPs: autotuning every row bucket would dominate this test's time
    monkeypatch.setattr(bank_mlp, "MPO_POLICY", PlanPolicy(select="flops"))
    out = tmp_path / "res.json"
    bank_mlp.main(["--seeds", "0", "1", "--epochs", "1", "--max-train-rows", "300", "--mpo-middle",
                   "--max-bond", "8", "--data", str(data_dir), "--no-download", "--out", str(out)])
    text = capsys.readouterr().out
    assert "torch=" in text and "cpu_count=" in text and "±" in text
    res = json.loads(out.read_text())
    assert set(res["summary"]) == {"baseline", "mpo-middle chi=8 (before ft)", "mpo-middle chi=8 (after ft)"}
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    assert res["runs"][0]["mpo"]["bond_dims"] == [8, 8, 8]


def test_bank_mlp_one_seed_has_no_spread_to_show(bank_mlp, capsys):
    # one seed printed "± 0.0000" and stored std 0.0, as if the seeds had agreed
    rows = [{k: 0.5 for k in bank_mlp.METRICS}]
    assert all(v["std"] is None for v in bank_mlp._summary(rows).values())
    bank_mlp._print_table({"baseline": rows}, {"baseline": 10})
    out = capsys.readouterr().out
    assert "± n/a" in out and "± 0.0000" not in out
    two = bank_mlp._summary(rows + [{k: 0.7 for k in bank_mlp.METRICS}])
    assert all(v["std"] == pytest.approx(0.1414, abs=1e-4) for v in two.values())


def test_a_file_of_another_split_is_refused_and_bom_and_blank_tails_are_read(tmp_path, data_dir):
    with pytest.raises(ValueError, match="is the sts-dev.tsv file, but sts-train.tsv was asked for"):
        bd.load_stsb(data_dir / "stsb" / "sts-dev.tsv", split="train")
    with pytest.raises(ValueError, match="is the wiki.valid.tokens file"):
        bd.load_text("wikitext-2", "train", data_dir / "wikitext-2" / "wiki.valid.tokens")
    with pytest.raises(ValueError, match="is the bank-additional-full.csv file of bank-marketing, not a ptb file"):
        bd.load_text("ptb", "train", data_dir / "bank-marketing" / "bank-additional-full.csv")  # (loaded as text once)
    with pytest.raises(ValueError, match="is the sts-dev.tsv file of stsb, not a bank-marketing file"):  # (said "the
        bd.load_bank_marketing(data_dir / "stsb" / "sts-dev.tsv")  # split comes from the file": the bank has none)
    p = tmp_path / REL
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\xef\xbb\xbfscore\tsentence1\tsentence2\r\n4.0\tA.\tB.\r\n\r\n\r\n")  # BOM, blank lines at the end
    assert bd.load_stsb(tmp_path) == [("A.", "B.", 4.0)]


def test_bank_rows_with_empty_cells_or_other_labels_are_refused(tmp_path, data_dir):
    src = bd.resolve(bd.BANK_FILE, data_dir / "bank-marketing", download=False).read_text().splitlines()
    csv = tmp_path / bd.BANK_FILE
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join([src[0], ";" + src[1].split(";", 1)[1], *src[2:50]]) + "\n")  # row 2: no age
    with pytest.raises(ValueError, match=re.escape(f"{csv}:2: empty cell in column 'age'")):
        bd.load_bank_marketing(tmp_path, download=False)
    csv.write_text("\n".join([src[0], *(line.rsplit(";", 1)[0] + ';"No"' for line in src[1:50])]) + "\n")
    with pytest.raises(ValueError, match="column 'y' must hold 'yes' or 'no'"):
        bd.load_bank_marketing(tmp_path, download=False)
    # a word in a number column was a TypeError from inside numpy, naming no file, row or column
    csv.write_text("\n".join([src[0], *src[1:3], '"unknown";' + src[3].split(";", 1)[1], *src[4:50]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:4: column 'age' holds 'unknown', not a number")):
        bd.load_bank_marketing(tmp_path, download=False)
    # inf / -inf / 1e400 passed pd.to_numeric and the NaN check, then the min-max scaling made NaN features (-inf:
    # every age NaN); a blank line above a bad row shifted the line the message named
    for value in ("inf", "-inf", "1e400"):
        csv.write_text("\n".join([src[0], *src[1:3], "", f"{value};" + src[3].split(";", 1)[1], *src[4:50]]) + "\n")
        shown = "inf" if value == "1e400" else value  # pandas reads 1e400 as inf
        with pytest.raises(ValueError, match=re.escape(f"{csv}:5: column 'age' holds '{shown}', not a finite number")):
            bd.load_bank_marketing(tmp_path, download=False)
    csv.write_text("\n".join([src[0], *src[1:3], "", ";" + src[3].split(";", 1)[1], *src[4:50]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:5: empty cell in column 'age'")):
        bd.load_bank_marketing(tmp_path, download=False)
    # a row of empty cells is refused (not taken for a blank line), and a blank line above the header is skipped
    csv.write_text("\n".join([src[0], *src[1:3], ";" * src[0].count(";"), *src[3:50]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:4: empty cell in column 'age'")):
        bd.load_bank_marketing(tmp_path, download=False)
    csv.write_text("\n".join(["", src[0], *src[1:3], "inf;" + src[3].split(";", 1)[1], *src[4:50]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:5: column 'age' holds 'inf', not a finite number")):
        bd.load_bank_marketing(tmp_path, download=False)


def test_copies_that_are_not_the_published_files(tmp_path, data_dir):
    """A truncated copy under a published name loads with a warning (every figure on it would change); the same
    bytes with Windows line ends do not warn; an empty corpus, a header without pairs, a download that is not a
    zip archive and a constant column of a subset of the bank table are errors or handled, never silent."""
    src = (data_dir / "stsb" / "sts-dev.tsv").read_bytes()
    p = tmp_path / REL
    p.parent.mkdir(parents=True)
    p.write_bytes(src[: len(src) // 2].rsplit(b"\n", 1)[0] + b"\n")
    with pytest.warns(UserWarning, match="differs from the published sts-dev.tsv"):
        assert len(bd.load_stsb(tmp_path)) < 1500
    p.write_bytes(src.replace(b"\n", b"\r\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(bd.load_stsb(tmp_path)) == 1500
        # a corpus saved that way reads as published (its "\r" stayed in the text, at every line end)
        ptb = (data_dir / "ptb" / "ptb.valid.txt").read_bytes()
        (tmp_path / "ptb").mkdir()
        (tmp_path / "ptb" / "ptb.valid.txt").write_bytes(b"\xef\xbb\xbf" + ptb.replace(b"\n", b"\r\n"))
        assert bd.load_text("ptb", "valid", tmp_path) == ptb.decode()
    p.write_text("score\tsentence1\tsentence2\n")
    with pytest.raises(ValueError, match="a header but no sentence pairs"):
        bd.load_stsb(tmp_path)
    _put(tmp_path, "\n \n", "ptb/ptb.valid.txt")
    with pytest.raises(ValueError, match="ptb.valid.txt: the file holds no text"):
        bd.load_text("ptb", "valid", tmp_path)

    archive = tmp_path / "error-page.html"
    archive.write_text("<html>503 Service Unavailable</html>")
    env = {"BONDGATE_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("BONDGATE_DATA", raising=False)
        mp.setitem(bd.REMOTES, bd.BANK_FILE, bd._Remote(archive.as_uri(), bd.BANK_MEMBERS, "0" * 64))
        with pytest.raises(FileNotFoundError, match="is not a zip archive"):
            bd.resolve(bd.BANK_FILE)

    # the bank CSV is published with CRLF line ends: an LF copy (or one with a BOM) is the same table and must not
    # warn, a CRLF file converted again ("\r\r\n") is not the published file (it passed as one)
    bank_src = bd.resolve(bd.BANK_FILE, data_dir / "bank-marketing", download=False).read_bytes()
    assert b"\r\n" in bank_src
    bank_copy = tmp_path / "bank-copy" / bd.BANK_FILE
    bank_copy.parent.mkdir(parents=True)
    for blob in (bank_src.replace(b"\r\n", b"\n"), b"\xef\xbb\xbf" + bank_src):
        bank_copy.write_bytes(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bd._check_published(bank_copy, bd.BANK_FILE)
    bank_copy.write_bytes(bank_src.replace(b"\n", b"\r\n"))
    with pytest.warns(UserWarning, match="differs from the published bank-additional-full.csv"):
        bd._check_published(bank_copy, bd.BANK_FILE)

    rows = bd.resolve(bd.BANK_FILE, data_dir / "bank-marketing", download=False).read_text().splitlines()
    head = rows[0].split(";")
    col = head.index('"campaign"')
    same = [";".join(f if i != col else "1" for i, f in enumerate(r.split(";"))) for r in rows[1:]]
    csv = tmp_path / bd.BANK_FILE
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join([rows[0], *same]) + "\n")
    bank = bd.load_bank_marketing(tmp_path, download=False)
    assert bool(torch.isfinite(bank.X_train).all())
    assert float(bank.X_train.min()) >= 0.0 and float(bank.X_train.max()) <= 1.0


# ------------------------------------------------------------------------------------ mutation-test additions
def test_bank_splits_are_the_published_ones(bank):
    """The rows of each split are pinned (random_state=0 twice): another seed or split order keeps every shape and
    the positive rate, but changes every published figure."""
    assert (bank.y_train.sum().item(), bank.y_valid.sum().item(), bank.y_test.sum().item()) == (2972, 749, 919)
    assert bank.X_test[0, 0].item() * (98 - 17) + 17 == pytest.approx(39)  # age of the first test row (min 17, max 98)
    assert bank.X_test[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10, 22, 27, 33, 38, 39, 42, 47,
                                                           54, 60]


def test_bank_header_only_or_a_subset_of_rows_is_refused(tmp_path, data_dir):
    src = (data_dir / bd.BANK_FILE).read_text().splitlines()
    csv = tmp_path / bd.BANK_FILE
    csv.parent.mkdir(parents=True)
    csv.write_text(src[0] + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: a header but no rows")):
        bd.load_bank_marketing(tmp_path, download=False)
    # 200 rows lack some categories (e.g. months): fewer one-hot columns, a model of another input width
    csv.write_text("\n".join(src[:201]) + "\n")
    with pytest.raises(ValueError, match=r"expected 62 features after preprocessing, got \d+ from"):
        bd.load_bank_marketing(tmp_path, download=False)


def test_stsb_malformed_files_name_the_file_and_line(tmp_path):
    cases = [
        ("4.0\tA cat.\tA dog.\n1.0\tB.\tC.\n", re.escape(": expected the header 'score<TAB>sentence1<TAB>sentence2'")),
        ("score\tsentence\tsentence2\n4.0\tA.\tB.\n", ": expected the header"),
        ("score\tsentence1\tsentence2\n4.0\tA.\tB.\n1.0\tB.\tC.\textra\n", ":3: expected 3 tab-separated fields, got 4"),
        ("score\tsentence1\tsentence2\n5.5\tA.\tB.\n", ":2: score 5.5 outside \\[0, 5\\]"),
        ("score\tsentence1\tsentence2\n4.0\tA.\tB.\n-0.5\tA.\tB.\n", ":3: score -0.5 outside \\[0, 5\\]"),
        ("score\tsentence1\tsentence2\nnan\tA.\tB.\n", ":2: score nan outside"),
    ]
    for text, match in cases:
        p = _put(tmp_path, text)
        with pytest.raises(ValueError, match=re.escape(str(p)) + match):
            bd.load_stsb(tmp_path)
    p.write_text("score\tsentence1\tsentence2\n0\tA.\tB.\n5.0\tC.\tD.\n")  # both ends of the range are valid
    assert bd.load_stsb(tmp_path) == [("A.", "B.", 0.0), ("C.", "D.", 5.0)]


def test_a_file_under_another_name_is_not_checked_against_the_published_hash(tmp_path, monkeypatch):
    own = tmp_path / "my-pairs.tsv"
    own.write_text("score\tsentence1\tsentence2\n4.0\tA.\tB.\n")
    (tmp_path / "home" / "stsb").mkdir(parents=True)
    (tmp_path / "home" / "stsb" / "my-pairs.tsv").write_bytes(own.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user's own file is not "a truncated copy of sts-dev.tsv"
        assert bd.load_stsb(own) == [("A.", "B.", 4.0)]
        assert bd.load_stsb("~/stsb/my-pairs.tsv") == [("A.", "B.", 4.0)]  # "~" is the home folder
    assert bd.resolve(REL, "~/stsb/my-pairs.tsv") == tmp_path / "home" / "stsb" / "my-pairs.tsv"


def _bank_archive(path, members):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bank-additional.zip", inner.getvalue())


def test_a_download_under_another_top_folder_picks_the_one_real_member(tmp_path, monkeypatch):
    archive = tmp_path / "bank+marketing.zip"
    monkeypatch.delenv("BONDGATE_DATA", raising=False)
    monkeypatch.setenv("BONDGATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bd.REMOTES, bd.BANK_FILE,
                        bd._Remote(archive.as_uri(), bd.BANK_MEMBERS, hashlib.sha256(b"real").hexdigest()))
    # another top folder is tolerated, a macOS copy beside it is never taken
    _bank_archive(archive, {"__MACOSX/v2/bank-additional-full.csv": b"fork", "v2/bank-additional-full.csv": b"real"})
    assert bd.resolve(bd.BANK_FILE).read_bytes() == b"real"
    (tmp_path / "cache" / bd.BANK_FILE).unlink()
    # two candidates and no exact match: refused, nothing written
    _bank_archive(archive, {"old/bank-additional-full.csv": b"real", "new/bank-additional-full.csv": b"other"})
    with pytest.raises(FileNotFoundError, match="has no unique member 'bank-additional/bank-additional-full.csv'"):
        bd.resolve(bd.BANK_FILE)
    assert not (tmp_path / "cache" / bd.BANK_FILE).exists()
