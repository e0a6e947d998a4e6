"""Fast end-to-end check of examples/gpt2_wikitext.py on a tiny config (2 layers, n_embd 64, vocab 512)."""

import functools
import importlib.util
import math
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpt2_wikitext.py"
_spec = importlib.util.spec_from_file_location("gpt2_wikitext", _SCRIPT)
lm = importlib.util.module_from_spec(_spec)
sys.modules["gpt2_wikitext"] = lm
_spec.loader.exec_module(lm)

BLOCK = 32


@functools.lru_cache(maxsize=1)
def _tiny(data: Path):
    with open(data / "wiki.train.tokens", encoding="utf-8") as f:
        train_lines = list(islice(f, 3000))
    with open(data / "wiki.valid.tokens", encoding="utf-8") as f:
        valid_lines = list(islice(f, 300))
    tok = lm.train_tokenizer(train_lines, vocab_size=512)
    return tok, train_lines, lm.encode_blocks(train_lines, tok, BLOCK), lm.encode_blocks(valid_lines, tok, BLOCK)


@pytest.fixture
def tiny(data_dir):
    """(tokenizer, train lines, train_blocks, valid_blocks) from the first 3000 / 300 lines, built once."""
    return _tiny(data_dir / "wikitext-2")


def test_tokenizer_round_trip_and_determinism(tiny):
    tok, train_lines, _, _ = tiny
    assert len(tok) == 512 and tok.eos_token_id == 0
    s = " The game 's opening theme was sung by May 'n , in 2011 @-@ Senjō no <unk> ."
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    assert len(ids) < len(s.encode())  # merges were learned
    again = lm.train_tokenizer(train_lines, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_blocks_shape(tiny):
    tok, _, train_blocks, valid_blocks = tiny
    for b in (train_blocks, valid_blocks):
        assert b.dtype == torch.long and b.dim() == 2 and b.size(1) == BLOCK and b.size(0) > 10
        assert int(b.min()) >= 0 and int(b.max()) < len(tok)
    # one eos per non-empty line of the 300 valid lines, minus at most the dropped tail
    assert (valid_blocks == tok.eos_token_id).sum() > 50


def test_evaluate_ppl_matches_manual_nll(tiny):
    tok, _, _, valid_blocks = tiny
    torch.manual_seed(0)
    model = lm.build_model(len(tok), n_layer=2, n_embd=64, n_head=2, block_size=BLOCK, dropout=0.1)
    x = valid_blocks[:3]
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.double(), dim=-1)  # (3, T, V)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean().item()
    model.train()  # evaluate_ppl must switch dropout off itself and restore the mode
    ppl = lm.evaluate_ppl(model, x, batch_size=2)
    assert model.training
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_train_loss_decreases_and_reload(tiny, tmp_path):
    tok, _, train_blocks, valid_blocks = tiny
    torch.manual_seed(0)
    model = lm.build_model(len(tok), n_layer=2, n_embd=64, n_head=2, block_size=BLOCK, dropout=0.0)
    res = lm.train(
        model, train_blocks, valid_blocks, minutes=1.0, lr=3e-3, batch_size=8, warmup=5, seed=0,
        log_every=10, ckpt_dir=tmp_path, max_steps=30,
    )
    assert res["steps"] == 30 and res["tokens_seen"] == 30 * 8 * BLOCK
    first, last = res["losses"][0][1], res["losses"][-1][1]
    assert last < first - 0.3, res["losses"]
    assert math.isfinite(res["val_ppl"]) and res["val_ppl"] < len(tok)

    tok.save_pretrained(tmp_path)
    model2, tok2 = lm.load_model(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert lm.evaluate_ppl(model2, valid_blocks, batch_size=32) == pytest.approx(res["val_ppl"], rel=1e-6)


def test_read_split_goes_through_the_checked_loader(data_dir, tmp_path):
    # read_split opened wiki.*.tokens itself: a truncated copy gave a perplexity on 27% of validation, no warning
    full = lm.read_split(data_dir, "valid")
    assert lm.read_split(data_dir / "wikitext-2", "valid") == full
    cut = tmp_path / "wikitext-2"
    cut.mkdir()
    (cut / "wiki.valid.tokens").write_text(full[:300_000], encoding="utf-8")
    with pytest.warns(UserWarning, match="differs from the published wiki.valid.tokens"):
        assert lm.read_split(tmp_path, "valid") == full[:300_000]
