"""bondgate.llama2c: the llama2.c stories260K checkpoint and tok512 tokenizer, loaded into transformers."""

import copy
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED

pytest.importorskip("transformers")

from bondgate.llama2c import (  # noqa: E402
    Llama2cTokenizer,
    load_llama2c,
    read_llama2c_header,
    split_stories,
    tinystories_perplexity,
)

MODEL_DIR = SHARED / "models" / "stories260K"
BIN = MODEL_DIR / "stories260K.bin"
TOK = MODEL_DIR / "tok512.bin"
SAMPLE = MODEL_DIR / "tinystories_sample.txt"
GREEDY_PREFIX = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"
# Measured with this loader on the 5 stories of tinystories_sample.txt (llama2.c reports val loss 1.297,
# ppl 3.66, on the TinyStories validation set).
SAMPLE_PPL = 3.548
SAMPLE_TOKENS = 1804


@pytest.fixture(scope="module")
def files():
    missing = [p for p in (BIN, TOK, SAMPLE) if not p.is_file()]
    if missing:
        pytest.skip(f"stories260K files not found (set BONDGATE_SHARED): {', '.join(map(str, missing))}")
    return BIN, TOK, SAMPLE


@pytest.fixture(scope="module")
def model(files):
    return load_llama2c(files[0])


@pytest.fixture(scope="module")
def tok(files):
    return Llama2cTokenizer(files[1], vocab_size=512)


@pytest.fixture(scope="module")
def greedy(model):
    out = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=40, pad_token_id=2)
    return out[0].tolist()


# ------------------------------------------------------------------------------------------- model
def test_config_and_parameter_count(model):
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (512, 64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (8, 4, 512)
    assert c.rms_norm_eps == 1e-5 and c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # SOURCE.md's 260,032: all weights, the tied embedding/classifier once, not the stored rotary tables.
    assert sum(p.numel() for p in model.parameters()) == 260_032
    # the file is exactly header + those weights + the two (512, 4) rotary tables
    assert BIN.stat().st_size == 28 + 4 * (260_032 + 2 * 512 * 4)


def _raw_arrays(path):
    """The checkpoint parsed independently of the module, straight from the llama2.c layout."""
    data = path.read_bytes()
    dim, hid, L, nh, nkv, vocab, seq = struct.unpack("<7i", data[:28])
    hs = dim // nh
    flat = np.frombuffer(data, dtype="<f4", offset=28)
    shapes = [("emb", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, nh * hs, dim)), ("wk", (L, nkv * hs, dim)),
              ("wv", (L, nkv * hs, dim)), ("wo", (L, dim, nh * hs)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
              ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)), ("cos", (seq, hs // 2)),
              ("sin", (seq, hs // 2))]
    out, off = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = torch.from_numpy(flat[off:off + n].reshape(shape).copy())
        off += n
    assert off == len(flat)
    return out, (nh, nkv, hs)


def _llama2c_forward(w, heads, tokens):
    """llama2.c's forward (run.c): interleaved-pair rotary from the stored tables, GQA head h -> kv h // kv_mul."""
    nh, nkv, hs = heads
    T = len(tokens)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(q):
        a, b = q.view(T, -1, hs // 2, 2).unbind(-1)
        c, s = w["cos"][:T, None], w["sin"][:T, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(T, -1, hs)

    x = w["emb"][tokens]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(w["wq"].shape[0]):
        xb = rms(x, w["rms_att"][layer])
        q = rope((xb @ w["wq"][layer].T).view(T, nh, hs))
        k = rope((xb @ w["wk"][layer].T).view(T, nkv, hs)).repeat_interleave(nh // nkv, 1)
        v = (xb @ w["wv"][layer].T).view(T, nkv, hs).repeat_interleave(nh // nkv, 1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w["wo"][layer].T
        xb = rms(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w["emb"].T


def test_logits_match_a_direct_llama2c_forward(model, tok, files):
    w, heads = _raw_arrays(files[0])
    tokens = torch.tensor(tok.encode(split_stories(files[2].read_text(encoding="utf-8"))[1])[:96])
    ref = _llama2c_forward(w, heads, tokens)
    with torch.no_grad():
        got = model(tokens[None], use_cache=False).logits[0]
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_source_and_no_cache_loop(model, tok, greedy):
    text = tok.decode(greedy)
    assert greedy[0] == 1 and len(greedy) == 41
    assert text.startswith(GREEDY_PREFIX), text
    # the same greedy tokens, one full forward per step, no KV cache
    ids = [1]
    with torch.no_grad():
        for _ in range(40):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert ids == greedy


def test_bfloat16_load(files, tmp_path):
    from transformers import AutoModelForCausalLM

    m = load_llama2c(files[0], dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and not m.training
    # the rotary inv_freq (not saved) stays float32, as a loader rebuilds it: cast, logits moved 0.19 on a round trip
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)


def test_import_does_not_load_transformers():
    code = "import sys, bondgate, bondgate.llama2c; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_basics(tok, greedy):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    assert tok.encode("Once upon a time") == greedy[:5]
    assert tok.encode("Once upon a time", bos=False, eos=True) == greedy[1:5] + [2]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode("\n", bos=False) == [tok.encode(" ", bos=False)[0], 0x0A + 3]  # newline: byte fallback
    assert tok.pieces[0x0A + 3] == b"<0x0A>"
    assert tok.decode([1, 0x0A + 3]) == "\n"
    assert tok.decode(torch.tensor([1, 0xC3 + 3, 0xBC + 3])) == "ü"  # bytes reassembled into UTF-8
    assert tok.decode(tok.encode("hi", bos=False)) == " hi"  # no BOS: the dummy space stays (as run.c)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])


@pytest.mark.parametrize("text", [
    "Once upon a time",
    " leading space, double  space and trailing ",
    "Line one\nLine two\n\n\tTabbed <0x0A> literal",
    "Grüße aus Zürich — “quotes” 🙂 中文 café ñ €",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_round_trip_sample(tok, files):
    text = files[2].read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 1.5  # BPE merges happened


def _naive_merge(tok, ids):
    """llama2.c's merge loop verbatim: rescan for the best pair (strict >, leftmost), merge, repeat."""
    ids = list(ids)
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            m = tok._ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best:
                best, best_i, best_id = tok.scores[m], i, m
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [best_id]


def test_heap_merge_equals_llama2c_loop(tok, files):
    texts = split_stories(files[2].read_text(encoding="utf-8"))[:2] + ["aaaaaaa bbbb the the  thethe", "é\n\n ü"]
    for text in texts:
        got = tok.encode(text, bos=False)
        chars = [tok._ids.get(b" ")]
        for ch in text:
            b = ch.encode()
            chars += [tok._ids[b]] if b in tok._ids else [x + 3 for x in b]
        assert got == _naive_merge(tok, chars)


# -------------------------------------------------------------------------------------- perplexity
def test_sample_perplexity(model, tok, files):
    assert len(split_stories(files[2].read_text(encoding="utf-8"))) == 5
    ppl, n = tinystories_perplexity(model, tok, files[2])
    assert n == SAMPLE_TOKENS
    assert SAMPLE_PPL - 0.01 < ppl < SAMPLE_PPL + 0.01
    # the text itself and the path as a str give the same figures
    assert tinystories_perplexity(model, tok, str(files[2])) == (ppl, n)
    assert tinystories_perplexity(model, tok, files[2].read_text(encoding="utf-8")) == (ppl, n)
    # 128-token windows (the stories have 223..457 tokens): every token still predicted once, with less
    # context (measured: ppl 3.93)
    ppl128, n128 = tinystories_perplexity(model, tok, files[2], block=128)
    assert n128 == n and 1.05 * ppl < ppl128 < 1.2 * ppl
    # each story is scored on its own: the count is the sum over stories of their tokens after BOS
    assert n == sum(len(tok.encode(s)) - 1 for s in split_stories(files[2].read_text(encoding="utf-8")))


def test_shuffled_weights_are_much_worse(model, tok, files):
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    ppl, _ = tinystories_perplexity(model, tok, files[2])
    bad_ppl, _ = tinystories_perplexity(bad, tok, files[2])
    assert bad_ppl > 10 * ppl


def test_perplexity_errors(model, tok, files, tmp_path):
    with pytest.raises(ValueError, match="no stories"):
        tinystories_perplexity(model, tok, "\n<|endoftext|>\n  ")
    with pytest.raises(ValueError, match="block"):
        tinystories_perplexity(model, tok, "Once upon a time.", block=1)
    # an empty separator was str.split's bare "empty separator"; a numpy block was refused (vocab_size takes one)
    with pytest.raises(ValueError, match="separator must be a non-empty string, got ''"):
        tinystories_perplexity(model, tok, "Once upon a time.", separator="")
    assert tinystories_perplexity(model, tok, "Once upon a time.", block=np.int64(64)) == \
        tinystories_perplexity(model, tok, "Once upon a time.", block=64)
    # a block past the model's context scored positions it never trained on, without a word
    with pytest.warns(UserWarning, match=r"block=4096 is longer than the model's context \(max_position_embeddings="
                                         r"512\)"):
        tinystories_perplexity(model, tok, "Once upon a time.", block=4096)
    # a tokenizer file cut at a record boundary loads as a smaller vocabulary: its text scored 1.8e11, silently
    data, off = files[1].read_bytes(), 4
    for _ in range(400):
        off += 8 + struct.unpack_from("<fi", data, off)[1]
    (tmp_path / "tok400.bin").write_bytes(data[:off])
    small = Llama2cTokenizer(tmp_path / "tok400.bin")
    assert small.vocab_size == 400
    with pytest.warns(UserWarning, match="the tokenizer has 400 tokens, the model 512"):
        tinystories_perplexity(model, small, "Once upon a time, there was a little girl.")


def test_a_mistyped_path_is_not_scored_as_text(model, tok, files, tmp_path):
    typo = str(files[2]).replace("sample", "sampel")
    for missing in (typo, "tinystories_sampel.txt", tmp_path / "missing.txt"):
        with pytest.raises(FileNotFoundError, match=r"no such file: .*(sampel|missing)\.txt"):
            tinystories_perplexity(model, tok, missing)
    # text stays text: spaces and no separator, or no file suffix at the end
    for text in ("Lily wrote her name on a note called note.txt", "Tom and/or Lily went home.", "Hi"):
        ppl, n = tinystories_perplexity(model, tok, text)
        assert n == len(tok.encode(text)) - 1 and math.isfinite(ppl)


# ---------------------------------------------------------------------------------------- bad files
def _header(data, **changes):
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    values = dict(zip(names, struct.unpack("<7i", data[:28])))
    values.update(changes)
    return struct.pack("<7i", *(values[k] for k in names)) + data[28:]


@pytest.mark.parametrize("case, match", [
    ("truncated", "truncated llama2.c checkpoint"),
    ("dim0", r"dimensions must be positive: dim=0"),
    ("negative_layers", r"n_layers=-5"),
    ("heads", "not divisible by n_heads"),
    ("kv_heads", "not divisible by n_kv_heads"),
    ("huge", "truncated llama2.c checkpoint"),
    ("extra", "4 trailing bytes"),
    ("unshared_without_wcls", r"truncated .*vocab_size -512 is negative: a separate \(512, 64\) classifier"),
    ("nan", r"non-finite .* in wq"),
    ("inf", r"non-finite .* in token_embedding_table"),
    ("rope", "rotary tables"),
    ("magic", "version 1"),
    ("tiny", "too short"),
])
def test_corrupt_checkpoint(files, tmp_path, case, match):
    data = files[0].read_bytes()
    floats = 28 // 4
    if case == "truncated":
        data = data[:-1000]
    elif case == "dim0":
        data = _header(data, dim=0)
    elif case == "negative_layers":
        data = _header(data, n_layers=-5)
    elif case == "heads":
        data = _header(data, n_heads=7)
    elif case == "kv_heads":
        data = _header(data, n_kv_heads=3)
    elif case == "huge":  # must be caught by the size check, not by a failed allocation
        data = _header(data, dim=1 << 20, n_layers=1 << 20)
    elif case == "extra":
        data = data + b"\0\0\0\0"
    elif case == "unshared_without_wcls":
        data = _header(data, vocab_size=-512)
    elif case in ("nan", "inf", "rope"):
        arr = bytearray(data)
        index = {"nan": floats + 512 * 64 + 5 * 64 + 10,  # inside wq
                 "inf": floats + 3,  # inside the embedding
                 "rope": floats + 260_032 + 4 * 7}[case]  # inside freq_cis_real
        value = {"nan": float("nan"), "inf": float("inf"), "rope": 0.5}[case]
        struct.pack_into("<f", arr, 4 * index, value)
        data = bytes(arr)
    elif case == "magic":
        data = struct.pack("<Ii", 0x616B3432, 1) + data[8:]
    elif case == "tiny":
        data = data[:10]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        load_llama2c(path)


def test_header_reader(files):
    h = read_llama2c_header(files[0])
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert h.shared_classifier and h.head_size == 8 and h.file_size() == files[0].stat().st_size


def test_corrupt_tokenizer(files, tmp_path):
    data = files[1].read_bytes()
    path = tmp_path / "tok.bin"
    cases = [
        (data[:-3], None, "truncated llama2.c tokenizer: token 511 needs"),  # cut inside the last token
        (data[:2], None, "too short"),
        (struct.pack("<i", 0) + data[4:], None, "max_token_length=0"),
        (data[:4] + struct.pack("<fi", 0.0, 99) + data[12:], None, "token 0 has length 99"),
        (data[:4] + struct.pack("<fi", float("nan"), 5) + data[12:], None, "score nan"),
        (data + b"\0\0\0\0\x07\0\0\0ab", None, "truncated"),  # a 13th byte record cut short
        (data, 513, "512 tokens, expected 513"),  # cut at a token boundary: caught with the model's vocab size
        (data, 400, "trailing bytes"),
        (data[:44], None, "at least 259"),  # <unk>, BOS, EOS only (4 + 13 + 13 + 14 bytes)
        (data[:44] + struct.pack("<fi", 0.0, 3) + b"abc" + data[44 + 14:], None, "token 3 is b'abc'"),  # not <0x00>
        # one byte too many: was "truncated ... record header is cut", for a file that is too long
        (data + b"\0", None, r"token 512's record header is cut at byte \d+ \(1 bytes left\): a truncated file, or "
                              r"bytes after the last token \(vocab_size= reads only that many tokens\)"),
    ]
    for blob, vocab_size, match in cases:
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=match):
            Llama2cTokenizer(path, vocab_size=vocab_size)
    # a folder (the model's, say) for either file: the message says which file is wanted (was a bare errno 21)
    with pytest.raises(IsADirectoryError, match="is a directory: give the llama2.c tokenizer file itself"):
        Llama2cTokenizer(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory: give the llama2.c checkpoint file itself"):
        load_llama2c(tmp_path)


# ------------------------------------------------------------------------------------------- review fixes
def test_one_long_story_line_and_a_byte_order_mark(model, tok, files, tmp_path):
    stories = split_stories(files[2].read_text(encoding="utf-8"))
    line = " ".join(stories[0].split())  # one paragraph: longer than a file name may be
    assert 255 < len(line.encode()) < 4096
    direct = tinystories_perplexity(model, tok, line)
    assert direct.n_tokens > 100
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + files[2].read_bytes())
    assert tinystories_perplexity(model, tok, bom) == tinystories_perplexity(model, tok, files[2])
    assert tinystories_perplexity(model, tok, "\ufeff" + line) == direct


def test_generate_stops_at_the_end_of_a_story(model):
    torch.manual_seed(0)
    out = model.generate(torch.ones(4, 1, dtype=torch.long), do_sample=True, max_new_tokens=400)
    ended = 0
    for row in out.tolist():
        if 1 in row[1:]:  # a story ended with BOS: only padding after it
            end = row.index(1, 1)
            assert set(row[end + 1:]) <= {0}
            ended += 1
    assert ended >= 2


def test_saved_dtype_survives_automodel(model, tmp_path):
    from transformers import AutoModelForCausalLM

    import bondgate

    m = copy.deepcopy(model)
    # the embedding table first in the file, then its gated tied head's float64 price: the first tensor
    bondgate.compress(m, bondgate.CompressionConfig(param_ratio=0.75, num_cores=2, refine_steps=0, embeddings=True),
                      progress=False)
    bondgate.gate(m, bondgate.GatingConfig(budget=0.5))
    m.config.dtype = None  # a model built from a config that names no dtype
    bondgate.save_pretrained(m, tmp_path / "g")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert {p.dtype for p in back.parameters()} == {torch.float32}


def test_bad_arguments(files, tok, model):
    with pytest.raises(TypeError, match="floating dtype"):
        load_llama2c(files[0], dtype="float16")
    with pytest.raises(TypeError, match="floating dtype"):
        load_llama2c(files[0], dtype=torch.complex64)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 259"):
        Llama2cTokenizer(files[1], vocab_size=0)
    with pytest.raises(ValueError, match="more tokens than vocab_size=300"):
        Llama2cTokenizer(files[1], vocab_size=300)
    # a numpy integer (a count, a config value read by numpy) is taken, as compress takes one
    assert Llama2cTokenizer(files[1], vocab_size=np.int64(512)).decode(tok.encode("Hi there")) == "Hi there"
    with pytest.raises(TypeError, match="must be ints"):
        tok.decode([1.7])
    with pytest.raises(TypeError, match="must be ints"):
        tok.decode([True, 400])
    assert tok.decode([torch.tensor(1), np.int64(400)]) == tok.decode([1, 400])
    small = copy.deepcopy(model)
    small.config.vocab_size = 300
    with pytest.raises(ValueError, match="512 tokens, the model only 300"):
        tinystories_perplexity(small, tok, "Once upon a time there was a cat.")


def test_padding_decodes_to_nothing_and_block_must_be_an_int(model, tok):
    """Batched generate() pads finished or shorter rows with id 0 (<unk>), which decode leaves out (it decoded as
    literal '<unk>' text); encode never produces id 0."""
    ids = tok.encode("Once upon a time, there was a cat.", bos=True)
    assert 0 not in ids
    text = tok.decode(ids)
    assert tok.decode([0, 0, *ids]) == text == "Once upon a time, there was a cat."
    assert tok.decode([*ids, 0, 0]) == text
    with pytest.raises(ValueError, match="block must be an int"):
        tinystories_perplexity(model, tok, "Once upon a time.", block=3.5)


# ------------------------------------------------------------------------------------ mutation-test additions
def _tiny_checkpoint(path, dim=8, hidden=12, n_layers=1, n_heads=2, n_kv_heads=1, vocab=16, seq_len=6,
                     shared=True, seed=0):
    """A small valid llama2.c legacy checkpoint with random weights and the true rotary tables; returns its arrays."""
    g = np.random.default_rng(seed)
    hs = dim // n_heads
    kv = n_kv_heads * hs
    shapes = [("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,))]
    arrays = {name: g.standard_normal(shape).astype("<f4") for name, shape in shapes}
    angles = np.arange(seq_len)[:, None] * 10000.0 ** (-np.arange(0, hs, 2) / hs)
    arrays["cos"], arrays["sin"] = np.cos(angles).astype("<f4"), np.sin(angles).astype("<f4")
    if not shared:
        arrays["wcls"] = g.standard_normal((vocab, dim)).astype("<f4")
    header = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv_heads, vocab if shared else -vocab, seq_len)
    path.write_bytes(header + b"".join(a.tobytes() for a in arrays.values()))
    return arrays


def test_an_unshared_classifier_is_loaded_from_wcls(tmp_path):
    path = tmp_path / "unshared.bin"
    w = _tiny_checkpoint(path, shared=False)
    h = read_llama2c_header(path)
    assert (h.vocab_size, h.shared_classifier, h.file_size()) == (16, False, path.stat().st_size)
    m = load_llama2c(path)
    assert m.config.tie_word_embeddings is False
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, torch.from_numpy(w["wcls"]))
    assert torch.equal(m.model.embed_tokens.weight, torch.from_numpy(w["emb"]))
    # the logits use wcls: the llama2.c forward with the classifier swapped in
    tokens = torch.tensor([1, 5, 9, 3, 15, 0])
    ref = _llama2c_forward({k: torch.from_numpy(v) for k, v in w.items()}, (2, 1, 4), tokens)  # rms(x) @ emb.T
    with torch.no_grad():
        got = m(tokens[None], use_cache=False).logits[0]
        hidden = m.model(tokens[None], use_cache=False).last_hidden_state[0]
    assert torch.allclose(got, hidden @ torch.from_numpy(w["wcls"]).T, atol=1e-5)
    assert not torch.allclose(got, ref, atol=1e-2)  # not the embedding as classifier
    # the same weights stored shared: the classifier is the embedding, and a direct llama2.c forward agrees
    _tiny_checkpoint(path, shared=True)
    m = load_llama2c(path)
    assert m.config.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(m(tokens[None], use_cache=False).logits[0], ref, atol=1e-4, rtol=1e-4)


def test_an_odd_head_size_is_refused(tmp_path):
    # dim 6, 2 heads: head size 3; the file has exactly the size the header implies, so only the odd check catches it
    path = tmp_path / "odd.bin"
    hs, L, dim, hid, vocab, seq = 3, 1, 6, 4, 8, 2
    n = vocab * dim + L * dim + L * dim * dim + 2 * L * hs * dim + L * dim * dim + L * dim + 3 * L * hid * dim + dim \
        + 2 * seq * (hs // 2)
    path.write_bytes(struct.pack("<7i", dim, hid, L, 2, 1, vocab, seq) + np.zeros(n, "<f4").tobytes())
    with pytest.raises(ValueError, match="head size 3 is odd, rotary embeddings need it even"):
        read_llama2c_header(path)


def test_the_dtype_is_recorded_and_8_bit_floats_are_refused(files):
    # config.dtype is what bondgate.save_pretrained / transformers reload the model in: not "the first tensor's dtype"
    assert load_llama2c(files[0], dtype=torch.bfloat16).config.dtype == torch.bfloat16
    assert load_llama2c(files[0]).config.dtype == torch.float32
    for bad in (torch.float8_e4m3fn, torch.int8):
        with pytest.raises(TypeError, match="floating dtype of 16 bits or more"):
            load_llama2c(files[0], dtype=bad)


def test_decode_bytes_at_both_ends_and_negative_ids(tok):
    assert tok.pieces[258] == b"<0xFF>" and tok.pieces[3] == b"<0x00>"
    # every byte token is a byte, the last (0xFF, never valid UTF-8) too: not the literal text "<0xFF>"
    assert tok.decode([1, 0xFF + 3]) == "\ufffd"
    assert tok.decode([1, 0x00 + 3, 0x41 + 3]) == "\x00A"
    assert tok.decode([1, *(b + 3 for b in "🙂".encode())]) == "🙂"
    for bad in ([-1], torch.tensor([1, -512])):  # a negative id indexed the vocabulary from its end
        with pytest.raises(ValueError, match="token id -(1|512) is outside the vocabulary"):
            tok.decode(bad)


def test_only_bos_strips_the_dummy_space(tok):
    hi = tok.encode("hi", bos=False)
    assert tok.decode([1, *hi]) == "hi"
    assert tok.decode([2, *hi]) == " hi"  # after EOS (not a story start, as in run.c) the space stays
    assert tok.decode([*tok.encode("a", eos=True), *hi]) == "a hi"


def test_default_block_is_the_models_context(model, tok, files):
    story = split_stories(files[2].read_text(encoding="utf-8"))[0][:300].rstrip()
    assert 100 < len(tok.encode(story)) < 200
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 32  # a model trained on 32-token windows is scored in such windows
    got = tinystories_perplexity(short, tok, story)
    assert got == tinystories_perplexity(model, tok, story, block=32)
    assert got.n_tokens == len(tok.encode(story)) - 1 and got.perplexity > tinystories_perplexity(model, tok, story).perplexity
