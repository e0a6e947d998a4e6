"""examples/ptb_lstm.py on a slice of PTB: vocabulary, batches, perplexity by hand, compress + heal end to end."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA

import bondgate
from bondgate.data import load_text

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ptb_lstm.py"
_spec = importlib.util.spec_from_file_location("ptb_lstm", _SCRIPT)
ptb = importlib.util.module_from_spec(_spec)
sys.modules["ptb_lstm"] = ptb
_spec.loader.exec_module(ptb)


@pytest.fixture(scope="module")
def corpus():
    if not (DATA / "ptb").exists():
        pytest.skip(f"PTB not found under {DATA}")
    train = "\n".join(load_text("ptb", "train", DATA).splitlines()[:3000])
    valid = "\n".join(load_text("ptb", "valid", DATA).splitlines()[:200])
    vocab = ptb.Vocab(train)
    return vocab, vocab.encode(train), vocab.encode(valid)


def test_vocab_and_windows(corpus):
    vocab, train, valid = corpus
    assert "<eos>" in vocab.stoi and "<unk>" in vocab.stoi
    line = load_text("ptb", "train", DATA).splitlines()[0]
    ids = vocab.encode(line + "\n\n")  # the blank line adds nothing
    assert [vocab.itos[i] for i in ids.tolist()] == line.split() + ["<eos>"]
    assert vocab.encode("zzzunseenword")[0] == vocab.stoi["<unk>"]
    batches = ptb.windows(train, 35, 8, seed=0)
    assert len(batches) == ((train.numel() - 1) // 35) // 8
    b = batches[0]
    assert b["ids"].shape == b["targets"].shape == (8, 35)
    # targets are the next tokens of the same stream position
    flat = train.tolist()
    s = next(i for i in range(len(flat) - 35) if flat[i:i + 35] == b["ids"][0].tolist())
    assert b["targets"][0].tolist() == flat[s + 1:s + 36]


def test_perplexity_is_exp_mean_cross_entropy(corpus):
    vocab, train, valid = corpus
    model = ptb.build(len(vocab), dim=16).eval()
    ids = valid[:401]
    got = ptb.perplexity(model, ids, batch=4, bptt=7)
    cols = ids[:400].view(4, 100)
    with torch.no_grad():  # one pass over each column: the state carried across windows is the whole-column state
        logits = model(cols[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cols[:, 1:].flatten())
    assert math.isclose(got, math.exp(float(ce)), rel_tol=1e-5)


@pytest.mark.slow
def test_train_compress_heal_end_to_end(corpus, tmp_path):
    vocab, train, valid = corpus
    torch.manual_seed(0)
    dense = ptb.build(len(vocab), dim=32)
    info = ptb.train_dense(dense, train, minutes=0.05, bptt=20, batch=16, progress=False)
    assert info["steps"] > 0
    dense.eval()
    student, fig = ptb.compress_and_heal(dense, vocab, train, valid, ratio=0.5, minutes=0.05, calib_batches=2,
                                         bptt=20, batch=16, progress=False)
    assert isinstance(student.rnn, bondgate.Recurrent)
    assert 0.45 < student.bondgate_report.ratio <= 0.5
    assert fig["heal_steps"] > 0 and set(fig["baselines"]) == {"svd", "magnitude prune"}
    assert all(math.isfinite(v) and v > 1 for v in (fig["ppl_compressed"], fig["ppl_healed"]))
    bondgate.save(student, tmp_path / "s")
    back = bondgate.load(tmp_path / "s", model=ptb.build(len(vocab), dim=32))
    assert math.isclose(ptb.perplexity(back, valid), fig["ppl_healed"], rel_tol=1e-6)


def test_too_little_text_is_an_error_not_a_hang(corpus):
    vocab, train, valid = corpus
    model = ptb.build(len(vocab), dim=16)
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        ptb.train_dense(model, train[:500], minutes=0.01, progress=False)  # 14 windows: no batch, ran forever
    with pytest.raises(ValueError, match="at least 20 tokens"):
        ptb.perplexity(model, valid[:5])


# ---------------------------------------------------------------------------------------------- the CLI's flags
# in-process runs of ptb.main on a made-up corpus: a flag that cannot work is refused before the corpus is read
_WORDS = [f"w{i}" for i in range(40)]


def _text(lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (10,), generator=g).tolist()) + "\n"
                   for _ in range(lines))


@pytest.fixture
def root(tmp_path):
    """A data root laid out as the script wants it: ptb/ptb.train.txt and ptb/ptb.valid.txt (words of one set)."""
    (tmp_path / "data" / "ptb").mkdir(parents=True)
    (tmp_path / "data" / "ptb" / "ptb.train.txt").write_text(_text(300, 0))
    (tmp_path / "data" / "ptb" / "ptb.valid.txt").write_text(_text(150, 1))  # 1,650 tokens: 32 rows of 35 and more
    return tmp_path / "data"


@pytest.fixture
def dense_dir(root, tmp_path):
    """A dense checkpoint as ``train`` saves it (its report records ``dim``), for the corpus under ``root``."""
    vocab = ptb.Vocab((root / "ptb" / "ptb.train.txt").read_text())
    return bondgate.save(ptb.build(len(vocab), dim=8).eval(), tmp_path / "dense", report={"dim": 8})


def _no_work(data):
    raise AssertionError("the run started (the corpus was read) before the flags were checked")


def _error(monkeypatch, capsys, argv, work: bool = False) -> tuple[int, str]:
    """(exit status, last stderr line) of ``ptb.main(argv)``, which must exit; unless ``work``, reading the corpus
    fails the test (the flags must be checked first)."""
    monkeypatch.setattr(sys, "argv", ["ptb_lstm.py"])  # argparse's prog, as when run
    if not work:
        monkeypatch.setattr(ptb, "_corpus", _no_work)
    with pytest.raises(SystemExit) as exc:
        ptb.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exc.value.code, err.strip().splitlines()[-1]


@pytest.mark.filterwarnings("ignore:.*differs from the published")
def test_data_is_a_folder_never_one_file_for_both_splits(root, tmp_path, monkeypatch, capsys):
    """A file given as --data was read as train and as valid: "valid" perplexity on the training text."""
    one = tmp_path / "corpus.txt"
    one.write_text((root / "ptb" / "ptb.train.txt").read_text())
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ptb._corpus(str(one))  # was: the same ids for train and valid
    for folder in (root, root / "ptb"):  # the data root and the ptb folder itself
        vocab, train, valid = ptb._corpus(str(folder))
        assert valid.numel() == 1650 and train.numel() == 3300
    for path in (one, root / "ptb" / "ptb.train.txt"):  # the split's own file: was a ValueError traceback
        code, last = _error(monkeypatch, capsys, ["train", "--out", tmp_path / "m", "--data", path])
        assert code == 2 and last.startswith("ptb_lstm.py train: error: argument --data:"), last
        assert f"'{path}' is a file" in last and "ptb/ptb.train.txt and ptb/ptb.valid.txt" in last, last
    assert not (tmp_path / "m").exists()


@pytest.mark.filterwarnings("ignore:.*differs from the published")
@pytest.mark.parametrize("bad,what", [(b"", "holds no text"), (b"w1 w2\n\xff\xfe w3\n", "not UTF-8")])
def test_a_bad_data_file_is_an_error_line_not_a_traceback(root, tmp_path, monkeypatch, capsys, bad, what):
    """The loader's ValueError (was uncaught: only FileNotFoundError was) ends the run like a missing file does."""
    (root / "ptb" / "ptb.valid.txt").write_bytes(bad)
    code, last = _error(monkeypatch, capsys, ["train", "--out", tmp_path / "m", "--data", root, "--minutes", "0.01"],
                        work=True)
    assert code == 1 and last.startswith("ptb_lstm.py: error: ") and what in last, last
    assert "ptb.valid.txt" in last and not (tmp_path / "m").exists()


def test_out_and_tag_are_checked_before_the_run(root, dense_dir, tmp_path, monkeypatch, capsys):
    """A --out that cannot be a checkpoint directory, or a --tag that is no part of a file name, failed when the
    results were written, after the training or compress + heal (FileExistsError, FileNotFoundError)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for cmd in ("train", "compress"):
        extra = [] if cmd == "train" else ["--dense", dense_dir]
        code, last = _error(monkeypatch, capsys, [cmd, "--data", root, "--out", a_file, *extra])
        assert code == 2 and f"error: argument --out: '{a_file}' exists and is not a directory" in last, last
        code, last = _error(monkeypatch, capsys, [cmd, "--data", root, "--out", a_file / "model", *extra])
        assert code == 2 and f"error: argument --out: cannot make the directory '{a_file / 'model'}'" in last, last
    for argv in (["compress"], ["control", "--compressed", dense_dir, "--steps", "1"],
                 ["speed", "--compressed", dense_dir]):
        code, last = _error(monkeypatch, capsys, [*argv, "--dense", dense_dir, "--data", root, "--tag", "_a/b"])
        assert code == 2 and f"ptb_lstm.py {argv[0]}: error: argument --tag: '_a/b' holds '/'" in last, last
    assert a_file.read_text() == ""


def test_dense_must_be_the_train_output(root, dense_dir, tmp_path, monkeypatch, capsys):
    """--dense at a checkpoint whose report has no 'dim' (a compressed one, any other model): was a bare KeyError /
    TypeError after the corpus was read."""
    vocab = ptb.Vocab((root / "ptb" / "ptb.train.txt").read_text())
    compressed = bondgate.load(dense_dir, model=ptb.build(len(vocab), dim=8))
    bondgate.compress(compressed, bondgate.CompressionConfig(param_ratio=0.5, target_modules=["rnn"], kinds=("mpo",)),
                      calibration=[{"ids": torch.randint(len(vocab), (2, 5))}], progress=False)
    bondgate.save(compressed, tmp_path / "compressed")  # its report is the compression report
    bondgate.save(torch.nn.Linear(2, 2), tmp_path / "no_report")
    for path in (tmp_path / "compressed", tmp_path / "no_report"):
        code, last = _error(monkeypatch, capsys, ["compress", "--dense", path, "--data", root])
        assert code == 2 and last.startswith("ptb_lstm.py compress: error: argument --dense:"), last
        assert "records no hidden size" in last and "--dense must be the output folder of python examples/ptb_lstm.py " \
            "train" in last, last


@pytest.mark.filterwarnings("ignore:.*differs from the published")
def test_a_tag_with_a_dot_keeps_it_in_the_file_names(root, dense_dir, tmp_path, monkeypatch, capsys):
    """``speed --tag _0.5`` wrote ptb_lstm_speed_0.{json,md} (``Path.with_suffix``), over another run's files."""
    monkeypatch.syspath_prepend(str(_SCRIPT.parents[1] / "benchmarks"))
    import common  # noqa: F401  (the script's helpers, imported before its ROOT points elsewhere)

    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "ptb_lstm_speed_0.json").write_text("another run")
    monkeypatch.setattr(ptb, "ROOT", tmp_path / "repo")
    assert ptb.main(["speed", "--dense", str(dense_dir), "--compressed", str(dense_dir), "--data", str(root),
                     "--rounds", "1", "--tag", "_0.5"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in results.iterdir()) == ["ptb_lstm_speed_0.5.json", "ptb_lstm_speed_0.5.md",
                                                         "ptb_lstm_speed_0.json"]
    assert (results / "ptb_lstm_speed_0.json").read_text() == "another run"
    assert {"1 whole model", "32 LSTM only"} <= set(json.loads((results / "ptb_lstm_speed_0.5.json").read_text())
                                                    ["tokens_per_s"])
    # --results DIR: the same files in DIR (made if missing), the repository's results untouched
    assert ptb.main(["speed", "--dense", str(dense_dir), "--compressed", str(dense_dir), "--data", str(root),
                     "--rounds", "1", "--tag", "_0.5", "--results", str(tmp_path / "mine" / "r")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "mine" / "r").iterdir()) == ["ptb_lstm_speed_0.5.json",
                                                                          "ptb_lstm_speed_0.5.md"]
    assert len(list(results.iterdir())) == 3
