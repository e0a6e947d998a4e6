"""examples/ptb_lstm.py on a slice of PTB: vocabulary, batches, perplexity by hand, compress + heal end to end."""

import importlib.util
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
