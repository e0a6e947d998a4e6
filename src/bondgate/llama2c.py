"""Load karpathy/llama2.c checkpoints and tokenizers, so a real pretrained LLaMA-architecture model can be
compressed offline.

* :func:`load_llama2c` reads a llama2.c *legacy* ``.bin`` checkpoint (the format of ``stories15M.bin``,
  ``stories260K.bin``...) into a Hugging Face :class:`transformers.LlamaForCausalLM`;
* :class:`Llama2cTokenizer` reads a llama2.c tokenizer ``.bin`` (``tokenizer.bin``, ``tok512.bin``...) and
  encodes/decodes text exactly as llama2.c's ``run.c`` does;
* :func:`tinystories_perplexity` scores held-out TinyStories text with such a model.

Legacy checkpoint layout (all little-endian): seven int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len`` (a negative ``vocab_size`` means the output classifier is stored separately instead of
being tied to the embedding), then float32 arrays, each ``nn.Linear`` weight stored as PyTorch keeps it,
``(out_features, in_features)`` row-major::

    token_embedding_table (vocab, dim)
    rms_att_weight        (n_layers, dim)
    wq                    (n_layers, n_heads*head_size, dim)
    wk, wv                (n_layers, n_kv_heads*head_size, dim)     each
    wo                    (n_layers, dim, n_heads*head_size)
    rms_ffn_weight        (n_layers, dim)
    w1                    (n_layers, hidden_dim, dim)
    w2                    (n_layers, dim, hidden_dim)
    w3                    (n_layers, hidden_dim, dim)
    rms_final_weight      (dim,)
    freq_cis_real         (seq_len, head_size/2)
    freq_cis_imag         (seq_len, head_size/2)
    wcls                  (vocab, dim)                              only if not shared

llama2.c rotates interleaved pairs ``(x[2i], x[2i+1])`` of each head while Hugging Face Llama rotates the two
halves of the head (``rotate_half``), so the rows of ``wq`` and ``wk`` are permuted per head, as transformers'
``convert_llama_weights_to_hf`` does; the attention scores, and so the model, are unchanged.

``transformers`` is imported inside the functions only: ``import bondgate`` does not need it.
"""

from __future__ import annotations

import heapq
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ._warn import warn_user

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "Llama2cHeader",
    "Llama2cTokenizer",
    "Perplexity",
    "llama2c_config",
    "load_llama2c",
    "read_llama2c_header",
    "split_stories",
    "tinystories_perplexity",
]

HEADER_FORMAT = "<7i"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 28
# The newer llama2.c export formats (version >= 1) start with this magic ("ak42" as a little-endian uint32).
LLAMA2C_MAGIC = 0x616B3432
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 0  # <unk>: what generate() pads finished rows of a batch with
STORY_SEPARATOR = "<|endoftext|>"


# ----------------------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class Llama2cHeader:
    """The seven-integer header of a llama2.c legacy checkpoint, validated.

    ``vocab_size`` is always positive here; ``shared_classifier`` records the sign it had in the file.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def sections(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 arrays that follow the header, in file order, with their shapes as stored."""
        d, h, L, v, hs = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.head_size
        secs: list[tuple[str, tuple[int, ...]]] = [
            ("token_embedding_table", (v, d)),
            ("rms_att_weight", (L, d)),
            ("wq", (L, self.n_heads * hs, d)),
            ("wk", (L, self.kv_dim, d)),
            ("wv", (L, self.kv_dim, d)),
            ("wo", (L, d, self.n_heads * hs)),
            ("rms_ffn_weight", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final_weight", (d,)),
            ("freq_cis_real", (self.seq_len, hs // 2)),
            ("freq_cis_imag", (self.seq_len, hs // 2)),
        ]
        if not self.shared_classifier:
            secs.append(("wcls", (v, d)))
        return secs

    def n_floats(self) -> int:
        """Number of float32 values after the header (Python int: no overflow for any header)."""
        return sum(math.prod(shape) for _, shape in self.sections())

    def file_size(self) -> int:
        """The exact size in bytes of a checkpoint with this header."""
        return HEADER_BYTES + 4 * self.n_floats()


def read_llama2c_header(path: str | os.PathLike) -> Llama2cHeader:
    """Read and validate the header of the llama2.c legacy checkpoint at ``path``.

    Checks the dimensions for sense and the file size against the size the header implies, before
    anything is allocated.

    Raises:
        ValueError: not a valid legacy checkpoint (the message says why).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the llama2.c checkpoint file itself (e.g. stories260K.bin)")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for a llama2.c checkpoint header ({HEADER_BYTES} bytes)")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if struct.unpack("<I", raw[:4])[0] == LLAMA2C_MAGIC:
        version = struct.unpack("<i", raw[4:8])[0]
        raise ValueError(f"{path}: llama2.c export format version {version} (magic 'ak42') is not supported; "
                         "only the legacy format (export.py --version 0) is")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack(HEADER_FORMAT, raw)
    fields = {"dim": dim, "hidden_dim": hidden_dim, "n_layers": n_layers, "n_heads": n_heads,
              "n_kv_heads": n_kv_heads, "|vocab_size|": abs(vocab_size), "seq_len": seq_len}
    bad = [f"{k}={v}" for k, v in fields.items() if v <= 0]
    if bad:
        raise ValueError(f"{path}: nonsense llama2.c header, dimensions must be positive: {', '.join(bad)} "
                         f"(header {fields})")
    if dim % n_heads:
        raise ValueError(f"{path}: nonsense llama2.c header: dim={dim} is not divisible by n_heads={n_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: nonsense llama2.c header: n_heads={n_heads} is not divisible by "
                         f"n_kv_heads={n_kv_heads}")
    if (dim // n_heads) % 2:
        raise ValueError(f"{path}: nonsense llama2.c header: head size {dim // n_heads} is odd, rotary "
                         "embeddings need it even")
    header = Llama2cHeader(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len,
                           shared_classifier=vocab_size > 0)
    expected = header.file_size()
    if size < expected:
        unshared = "" if header.shared_classifier else (
            f" (its vocab_size {vocab_size} is negative: a separate ({header.vocab_size}, {dim}) classifier is "
            "expected after the rotary tables)")
        raise ValueError(f"{path}: truncated llama2.c checkpoint: {size} bytes, but the header {fields} "
                         f"implies {expected} bytes{unshared}")
    if size > expected:
        raise ValueError(f"{path}: {size - expected} trailing bytes after the llama2.c checkpoint ({size} bytes, "
                         f"header {fields} implies {expected}); not a legacy checkpoint, or corrupt")
    return header


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection ``(n_heads*head_size, in)`` from interleaved rotary pairs
    (llama2.c / Meta) to rotate-half order (Hugging Face), within each head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The :class:`transformers.LlamaConfig` of a checkpoint with this header."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_size,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_bias=False,
        mlp_bias=False,
    )


def load_llama2c(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a llama2.c legacy ``.bin`` checkpoint as a :class:`transformers.LlamaForCausalLM` in eval mode.

    The config has ``vocab_size``, ``hidden_size=dim``, ``intermediate_size=hidden_dim``, the layer and head
    counts of the header, ``max_position_embeddings=seq_len``, ``rms_norm_eps=1e-5``, rope theta 10000,
    ``tie_word_embeddings`` when the header's vocab size is positive (the classifier is the embedding), and
    BOS/EOS ids 1/2. ``generate()`` stops at BOS or EOS (llama2.c's models end a story with BOS) and pads with
    id 0. The weights are read as float32 and cast to ``dtype``. The rotary tables stored in the
    file are only checked (they must match theta 10000): Hugging Face recomputes them.

    Raises:
        ValueError: a bad file: too short/long for its header, nonsense header, non-finite weights, rotary
            tables that do not match theta 10000.
    """
    import transformers

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
        raise TypeError(f"dtype must be a torch floating dtype of 16 bits or more (torch.float32, torch.bfloat16, "
                        f"torch.float16, torch.float64), got {dtype!r}")
    path = Path(path)
    header = read_llama2c_header(path)  # checks the size before anything is allocated
    flat = np.fromfile(path, dtype="<f4", count=header.n_floats(), offset=HEADER_BYTES)
    if flat.size != header.n_floats():  # the file changed since its size was checked
        raise ValueError(f"{path}: truncated llama2.c checkpoint: read {flat.size} floats, expected {header.n_floats()}")
    arrays: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in header.sections():
        n = math.prod(shape)
        block = flat[offset:offset + n]
        offset += n
        if not np.isfinite(block).all():
            bad = int((~np.isfinite(block)).sum())
            raise ValueError(f"{path}: {bad} non-finite (NaN/inf) value(s) in {name}; the checkpoint is corrupt")
        arrays[name] = torch.from_numpy(block.reshape(shape))

    hs = header.head_size
    pos = np.arange(header.seq_len, dtype=np.float64)[:, None]
    inv_freq = ROPE_THETA ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)
    if not (np.allclose(arrays["freq_cis_real"].numpy(), np.cos(pos * inv_freq), atol=1e-3)
            and np.allclose(arrays["freq_cis_imag"].numpy(), np.sin(pos * inv_freq), atol=1e-3)):
        raise ValueError(f"{path}: the stored rotary tables (freq_cis_real/imag) do not match rope theta "
                         f"{ROPE_THETA:g} and head size {hs}; the file is corrupt or not a llama2.c legacy checkpoint")

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": arrays["token_embedding_table"],
                                   "model.norm.weight": arrays["rms_final_weight"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att_weight"][i]
        sd[p + "self_attn.q_proj.weight"] = _hf_permute(arrays["wq"][i], header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _hf_permute(arrays["wk"][i], header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn_weight"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    sd["lm_head.weight"] = arrays["token_embedding_table"] if header.shared_classifier else arrays["wcls"]

    model = transformers.LlamaForCausalLM(llama2c_config(header))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in sd.items():
            target = params[name]
            if target.shape != value.shape:  # a transformers version with another layout: fail loudly
                raise RuntimeError(f"{name}: model expects {tuple(target.shape)}, checkpoint gives {tuple(value.shape)}")
            target.copy_(value)
    if header.shared_classifier and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()
    # llama2.c's models end a story with BOS (run.c stops there), never with EOS: generate() stops at either
    model.generation_config.eos_token_id = [BOS_ID, EOS_ID]
    model.generation_config.pad_token_id = PAD_ID
    model.config.dtype = dtype  # saved in config.json: transformers then loads it in this dtype, whatever it reads first
    # the weights only: buffers that are not saved (the rotary inv_freq) stay float32, as every loader rebuilds them
    # (cast, a bfloat16 model's logits moved by 0.19 through any save and load)
    unsaved = {n: b for n, b in model.named_buffers() if n not in model.state_dict()}
    model.to(dtype)
    for name, buf in unsaved.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    return model.eval()


# ------------------------------------------------------------------------------------------- tokenizer
class Llama2cTokenizer:
    """The llama2.c tokenizer (a sentencepiece BPE vocabulary exported by llama2.c's ``tokenizer.py``).

    File format: int32 ``max_token_length``, then per token a float32 merge score, an int32 byte length and
    the token's UTF-8 bytes. Ids 0, 1, 2 are ``<unk>``, BOS, EOS; ids 3..258 are the byte-fallback tokens
    ``<0x00>``..``<0xFF>``. Spaces are stored as plain ``" "`` (not sentencepiece's ``"▁"``).

    Args:
        path: the tokenizer ``.bin``.
        vocab_size: if given, the file must hold exactly this many tokens (the tokenizer file does not
            record its size; pass the model's ``config.vocab_size`` to catch a file cut at a token boundary).

    Raises:
        ValueError: a corrupt or truncated file (the message says why).
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None) -> None:
        if isinstance(vocab_size, np.integer):  # (model.config values, numpy counts: taken as compress takes them)
            vocab_size = int(vocab_size)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 259):
            raise ValueError(f"vocab_size must be an int >= 259 (<unk>, BOS, EOS and 256 byte tokens), got "
                             f"{vocab_size!r}")
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory: give the llama2.c tokenizer file itself (e.g. tok512.bin)")
        data = path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= 1 << 16:
            raise ValueError(f"{path}: nonsense llama2.c tokenizer header: max_token_length={max_len}")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            i = len(pieces)
            if off + 8 > len(data):
                raise ValueError(f"{path}: llama2.c tokenizer: token {i}'s record header is cut at byte {off} "
                                 f"({len(data) - off} bytes left): a truncated file, or bytes after the last token "
                                 f"(vocab_size= reads only that many tokens)")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if not 0 < n <= max_len:
                raise ValueError(f"{path}: corrupt llama2.c tokenizer: token {i} has length {n} "
                                 f"(max_token_length={max_len})")
            if off + n > len(data):
                raise ValueError(f"{path}: truncated llama2.c tokenizer: token {i} needs {n} bytes at byte {off}, "
                                 f"the file has {len(data) - off}")
            if not math.isfinite(score):
                raise ValueError(f"{path}: corrupt llama2.c tokenizer: token {i} has score {score}")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{path}: truncated llama2.c tokenizer: {len(pieces)} tokens, expected {vocab_size}")
        if off != len(data):
            more = f" (more tokens than vocab_size={vocab_size}?)" if vocab_size is not None else ""
            raise ValueError(f"{path}: {len(data) - off} trailing bytes after {len(pieces)} tokens{more}")
        if len(pieces) < 259:
            raise ValueError(f"{path}: truncated llama2.c tokenizer: {len(pieces)} tokens, a sentencepiece "
                             "byte-fallback vocabulary has at least 259 (<unk>, BOS, EOS, 256 bytes)")
        for b in range(256):
            if pieces[b + 3] != f"<0x{b:02X}>".encode():
                raise ValueError(f"{path}: corrupt llama2.c tokenizer: token {b + 3} is {pieces[b + 3]!r}, "
                                 f"expected the byte-fallback token <0x{b:02X}>")
        self.path = path
        self.max_token_length = max_len
        self.pieces = pieces
        self.scores = scores
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._ids.setdefault(p, i)  # duplicates: the first id wins
        self.bos_id = BOS_ID
        self.eos_id = EOS_ID
        self.unk_id = 0

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def __repr__(self) -> str:
        return f"Llama2cTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, by llama2.c's algorithm.

        A dummy space is prepended (unless ``text`` is empty), each character is looked up as a token
        (unknown characters become their UTF-8 bytes' tokens, id = byte + 3), then the adjacent pair whose
        concatenation is a token with the highest score is merged (leftmost first on ties) until no pair
        merges. BOS and EOS are added around the result (they never merge).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        if text:
            ids.append(self._ids.get(b" ", ord(" ") + 3))
        for ch in text:
            b = ch.encode("utf-8")
            tok = self._ids.get(b)
            if tok is None:
                ids.extend(x + 3 for x in b)
            else:
                ids.append(tok)
        ids = self._merge(ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _merge(self, ids: list[int]) -> list[int]:
        """llama2.c's greedy BPE merge, with a heap instead of a rescan per merge (same result).

        Surviving nodes keep their original positions, so the ``(−score, position)`` heap order picks the
        same pair as llama2.c's left-to-right scan with a strict ``>``.
        """
        n = len(ids)
        if n < 2:
            return list(ids)
        lookup, scores = self._ids, self.scores
        cur = list(ids)
        text = [self.pieces[i] for i in ids]
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i] if i >= 0 else -1
            if j >= 0:
                m = lookup.get(text[i] + text[j])
                if m is not None:
                    heapq.heappush(heap, (-scores[m], i, j, m))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, j, m = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and lookup.get(text[i] + text[j]) == m):
                continue  # stale: a neighbour has merged since this pair was pushed
            cur[i], text[i] = m, self.pieces[m]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            push(prev[i])
            push(i)
        return [cur[i] for i in range(n) if alive[i]]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of token ids (a 1-D sequence or tensor).

        BOS, EOS and ``<unk>`` (id 0: never produced by :meth:`encode`, whose byte fallback covers every character,
        and the pad id :func:`load_llama2c` gives ``generate()``) produce no text; byte-fallback tokens are reassembled into UTF-8 (invalid sequences
        become U+FFFD); as in ``run.c``, a token right after BOS loses its leading space (the dummy prefix
        that :meth:`encode` added), so ``decode(encode(text))`` is ``text``. Without BOS the dummy space stays.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        prev = None
        for t in ids:
            if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point() and t.dtype != torch.bool:
                t = int(t)
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"token ids must be ints, got {type(t).__name__} {t!r}")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary (size {self.vocab_size})")
            if t == self.unk_id:  # padding: as if absent
                continue
            if t in (self.bos_id, self.eos_id):
                prev = t
                continue
            if 3 <= t < 259:
                piece = bytes([t - 3])
            else:
                piece = self.pieces[t]
                if prev == self.bos_id and piece.startswith(b" "):
                    piece = piece[1:]
            out += piece
            prev = t
        return out.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ evaluation
class Perplexity(NamedTuple):
    """Token-level perplexity ``exp(mean NLL)`` and the number of predicted tokens it averages over."""

    perplexity: float
    n_tokens: int


def split_stories(text: str, separator: str = STORY_SEPARATOR) -> list[str]:
    """The stories of a TinyStories dump: split at ``separator``, strip surrounding whitespace, drop empties."""
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first story
    return [s.strip() for s in text.split(separator) if s.strip()]


# A file suffix: a dot, a letter, then up to 7 letters/digits (".txt", ".json"; not "3.14" or "end.").
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")


def _looks_like_path(text: str) -> bool:
    """One line ending in a file suffix, with a path separator or no spaces (``data/sampel.txt``, ``a.txt``)."""
    return ("\n" not in text and _FILE_SUFFIX.search(text) is not None
            and ("/" in text or os.sep in text or " " not in text))


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name no file system accepts (a part over 255 bytes, a NUL): text
        return False


def _read_source(text_or_path: str | os.PathLike) -> str:
    if isinstance(text_or_path, os.PathLike):
        if not Path(text_or_path).is_file():
            raise FileNotFoundError(f"no such file: {os.fspath(text_or_path)}")
        return Path(text_or_path).read_text(encoding="utf-8-sig")
    if not isinstance(text_or_path, str):
        raise TypeError(f"expected text or a path, got {type(text_or_path).__name__}")
    if "\n" not in text_or_path and len(text_or_path) < 4096 and _is_file(text_or_path):
        return Path(text_or_path).read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    if _looks_like_path(text_or_path):  # most likely a mistyped path: scoring it as a story would mislead
        raise FileNotFoundError(f"no such file: {text_or_path} (it looks like a path, so it is not scored as "
                                "text; pass an existing file, or the text itself)")
    return text_or_path


def tinystories_perplexity(model: torch.nn.Module, tokenizer: Llama2cTokenizer, text_or_path: str | os.PathLike,
                           block: int | None = None, separator: str = STORY_SEPARATOR) -> Perplexity:
    """Token-level perplexity of a causal LM on TinyStories-style text.

    ``text_or_path`` is the text itself, or a file (a ``Path``, or a one-line ``str`` naming an existing
    file). It is split into stories at ``separator`` (see :func:`split_stories`); each story is encoded with
    BOS and without EOS (as llama2.c's pretokenizer does). What is counted: every token after the BOS of every
    story is predicted once from the tokens before it in the same story (never from another story), so a
    story of ``n`` tokens plus BOS contributes ``n`` predictions. The result is ``exp`` of the mean negative
    log-likelihood (natural log) over all these predictions of all stories, and their number.

    Stories longer than ``block`` tokens (default: ``model.config.max_position_embeddings``) are scored in
    windows of ``block`` tokens that overlap by one token; each window's first token is context only, so the
    context is cut at window starts. Runs under ``torch.no_grad``; the model's mode is left as it is (the
    loader returns it in eval mode).

    Raises:
        FileNotFoundError: a ``Path`` that does not exist, or a ``str`` that looks like a file path (one line
            ending in a suffix such as ``.txt``, with a path separator or no spaces) but names no file.
        ValueError: no story in the text, or ``block < 2``.
    """
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"separator must be a non-empty string, got {separator!r}")
    stories = split_stories(_read_source(text_or_path), separator)
    if not stories:
        raise ValueError("no stories in the text (nothing but separators and whitespace)")
    positions = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    if block is None:
        block = positions or 512
    if isinstance(block, np.integer):
        block = int(block)
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"block must be an int of at least 2 tokens, got {block!r}")
    if positions and block > positions:  # (scored, but at positions the model never saw in training)
        warn_user(f"tinystories_perplexity: block={block} is longer than the model's context "
                  f"(max_position_embeddings={positions}): tokens past position {positions} are scored where the "
                  f"model was never trained")
    device = next(model.parameters()).device
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(model_vocab, int) and tokenizer.vocab_size > model_vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model_vocab}: "
                         "they do not belong together")
    if isinstance(model_vocab, int) and tokenizer.vocab_size < model_vocab:  # (a cut tokenizer file: 1.8e11)
        warn_user(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model_vocab}: text encodes into "
                  f"other ids than the model was trained on, and the perplexity is meaningless unless the model's "
                  f"vocabulary is only padded; load the model's tokenizer with vocab_size={model_vocab}")
    nll, count = 0.0, 0
    with torch.no_grad():
        for story in stories:
            ids = torch.tensor(tokenizer.encode(story, bos=True, eos=False), device=device)
            for start in range(0, len(ids) - 1, block - 1):
                window = ids[start:start + block]
                logits = model(window[None], use_cache=False).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
                count += len(window) - 1
    return Perplexity(math.exp(nll / count), count)
