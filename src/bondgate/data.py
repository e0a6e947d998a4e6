"""Dataset loaders for the examples, tutorials and benchmarks.

Every file is found by one resolver, in this order:

1. the ``path`` argument of the loader (the file itself, a folder laid out like the shared data
   root, or the dataset's own folder); an explicit path that does not exist is an error;
2. ``$BONDGATE_DATA``, a folder laid out like the shared data root::

       <root>/bank-marketing/bank-additional-full.csv
       <root>/stsb/sts-{train,dev}.tsv
       <root>/wikitext-2/wiki.{train,valid}.tokens
       <root>/ptb/ptb.{train,valid,test}.txt

3. the cache, ``$BONDGATE_CACHE`` or ``~/.cache/bondgate``, same layout;
4. a download into the cache, only for files with a known public URL (today: bank marketing), checked
   against the sha256 recorded in the dataset's ``SOURCE.md``.

A file found under its published name is compared with the published sha256 (``KNOWN_SHA256``): a copy that differs
(truncated, edited) loads with a warning, since every published figure was computed on the original bytes.

``pandas`` and ``scikit-learn`` (the ``data`` extra) are imported only by :func:`load_bank_marketing`.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._warn import warn_user

__all__ = [
    "BankMarketing",
    "cache_dir",
    "resolve",
    "load_bank_marketing",
    "load_stsb",
    "load_text",
]

BANK_FILE = "bank-marketing/bank-additional-full.csv"
BANK_URL = "https://archive.ics.uci.edu/static/public/222/bank+marketing.zip"
BANK_SHA256 = "74adfc578bf77a7ff4bb1ba4a9f8709d9e3c6907342959c2c8416847e0afb4d8"
# The UCI archive nests a second zip: bank+marketing.zip -> bank-additional.zip -> the CSV.
BANK_MEMBERS = ("bank-additional.zip", "bank-additional/bank-additional-full.csv")

BANK_CATEGORICAL = ("job", "marital", "education", "default", "housing", "loan", "contact", "month",
                    "day_of_week", "poutcome")
BANK_NUMERIC = ("age", "campaign", "pdays", "previous", "emp.var.rate", "cons.price.idx", "cons.conf.idx",
                "euribor3m", "nr.employed")
BANK_NUM_FEATURES = 62

#: sha256 of the published files (from each dataset's SOURCE.md): a local copy that differs (truncated, edited)
#: loads with a warning, since every published figure was computed on these bytes
KNOWN_SHA256 = {
    BANK_FILE: BANK_SHA256,
    "stsb/sts-train.tsv": "d46b45477888dd90b914ef6cf502bd8f4b27d52c792b6e54baec729705a14441",
    "stsb/sts-dev.tsv": "9847c811e123501874b7296eb2780c2e6864f19c51342590cc9db7abefe9840e",
    "wikitext-2/wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wikitext-2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "ptb/ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb/ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb/ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}

STSB_SPLITS = ("train", "dev")
TEXT_FILES = {
    "wikitext-2": {"train": "wikitext-2/wiki.train.tokens", "valid": "wikitext-2/wiki.valid.tokens"},
    "ptb": {"train": "ptb/ptb.train.txt", "valid": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
}


@dataclass(frozen=True)
class _Remote:
    url: str
    members: tuple[str, ...]  # path of the file through (possibly nested) zip archives
    sha256: str


# Module-level so that tests can point it at a local file:// archive.
REMOTES: dict[str, _Remote] = {BANK_FILE: _Remote(BANK_URL, BANK_MEMBERS, BANK_SHA256)}


# ---------------------------------------------------------------------------------------- resolver
#: each known file's name -> its path under the data folder (the bank CSV too: given as PTB it loaded as text)
_KNOWN_FILES = {Path(f).name: f for f in [*(f"stsb/sts-{s}.tsv" for s in STSB_SPLITS), *KNOWN_SHA256,
                                          *(f for fs in TEXT_FILES.values() for f in fs.values())]}


def cache_dir() -> Path:
    """The download cache: ``$BONDGATE_CACHE`` if set, else ``~/.cache/bondgate``."""
    env = os.environ.get("BONDGATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bondgate"


def _check_published(p: Path, relpath: str, blob: bytes | None = None) -> bytes | None:
    """Warn when a file under its published name is not the published file (a truncated or edited copy loads
    fine and silently changes every figure computed on it). Returns the published bytes when the file is the
    published one saved with Windows line ends or a BOM (``None`` otherwise): the text to use, so that every
    figure is the same."""
    known = KNOWN_SHA256.get(relpath)
    if known is None or p.name != Path(relpath).name:
        return None
    blob = p.read_bytes() if blob is None else blob
    digest = hashlib.sha256(blob).hexdigest()
    if digest == known:
        return None
    # the same lines with a BOM, or saved with the other line ends (the bank CSV is published with CRLF, the text
    # files with LF); a stray CR left after CRLF -> LF (a CRLF file converted again, "\r\r\n") is not the same text
    lf = blob.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")
    if b"\r" not in lf:
        for same_text in (lf, lf.replace(b"\n", b"\r\n")):
            if hashlib.sha256(same_text).hexdigest() == known:
                return same_text
    warn_user(f"{p} differs from the published {Path(relpath).name} (sha256 {digest[:12]}..., published "
              f"{known[:12]}...; {p.stat().st_size:,} bytes): a truncated or edited copy changes every "
              "figure computed on it")
    return None


def resolve(relpath: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Find the data file ``relpath`` (e.g. ``"stsb/sts-dev.tsv"``); see the module docstring for the order.

    Raises:
        FileNotFoundError: the file is in none of the places, and could not or may not be downloaded (a
            failed download or checksum is the cause). The message lists every place that was looked at.
    """
    name = Path(relpath).name
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file() and p.name != name and p.name in _KNOWN_FILES:  # e.g. the dev file asked for as train
            known = Path(_KNOWN_FILES[p.name]).parent
            if known != Path(relpath).parent:  # another dataset's file altogether
                raise ValueError(f"{p} is the {p.name} file of {known}, not a {Path(relpath).parent} file ({name} "
                                 f"was asked for): pass that dataset's folder or file")
            raise ValueError(f"{p} is the {p.name} file, but {name} was asked for (the split comes from the file "
                             f"when a file is given: pass its folder, or the file of that split)")
        candidates = [p] if not p.is_dir() else [p / relpath, p / name]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"{relpath}: the given path has no such file; looked at "
                                + ", ".join(str(c) for c in candidates))

    looked: list[str] = []
    env = os.environ.get("BONDGATE_DATA")
    if env:
        c = Path(env).expanduser() / relpath
        if c.is_file():
            return c
        looked.append(f"$BONDGATE_DATA: {c}")
    else:
        looked.append("$BONDGATE_DATA: not set")
    cached = cache_dir() / relpath
    if cached.is_file():
        return cached
    looked.append(f"cache: {cached}")

    remote, cause = REMOTES.get(relpath), None
    if remote is None:
        reason = "no public download is known for this file (see its SOURCE.md)"
    elif not download:
        reason = f"download=False, so it was not fetched from {remote.url}"
    else:
        try:
            _download(remote, cached)
            return cached
        except OSError as exc:  # say where we looked too: a mistyped BONDGATE_DATA shows up here
            reason, cause = f"Downloading it into the cache failed: {exc}", exc
    raise FileNotFoundError(
        f"{relpath} not found. Looked in: " + "; ".join(looked) + f". {reason}. Pass the file's path, "
        "or set BONDGATE_DATA to a folder laid out like the shared data root "
        f"(<root>/{relpath})."
    ) from cause


#: the longest a download may take in all (each read may wait 60 s of its own)
DOWNLOAD_SECONDS = 600


def _download(remote: _Remote, dest: Path) -> None:
    """Fetch ``remote``, unpack ``remote.members``, check the sha256 and write ``dest`` atomically."""
    print(f"bondgate: downloading {remote.url} into {dest.parent}", file=sys.stderr)
    # urlopen's timeout bounds each socket read, not the transfer: a server trickling bytes would hold the caller
    # for hours; read1 returns what has arrived, so the deadline is checked at least every `timeout` seconds
    deadline = time.monotonic() + DOWNLOAD_SECONDS
    chunks = []
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as resp:  # noqa: S310 - fixed https URL
            while chunk := resp.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the transfer took more than {DOWNLOAD_SECONDS} s "
                                       f"({sum(map(len, chunks)):,} bytes); nothing was written")
            size, got = resp.headers.get("Content-Length"), sum(map(len, chunks))
            if size is not None and size.isdigit() and got < int(size):  # read1 ends a cut transfer quietly
                raise ConnectionError(f"the transfer was cut at {got:,} of {int(size):,} bytes; nothing was written")
    except OSError as exc:  # URLError and TimeoutError are OSErrors
        raise OSError(f"could not download {remote.url}: {exc}") from exc
    blob = b"".join(chunks)
    for member in remote.members:
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                blob = zf.read(_find_member(zf, member, remote.url))
        except zipfile.BadZipFile as exc:  # an HTML error page, a cut transfer: not an OSError of its own
            raise OSError(f"what {remote.url} sent is not a zip archive holding {member!r} ({len(blob):,} bytes: "
                          f"{exc}); nothing was written") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != remote.sha256:
        raise OSError(f"checksum mismatch for {dest.name} from {remote.url}: sha256 {digest}, "
                      f"expected {remote.sha256}; nothing was written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find_member(zf: zipfile.ZipFile, member: str, url: str) -> str:
    names = zf.namelist()
    if member in names:
        return member
    # Tolerate a different top folder, but never pick macOS resource-fork copies.
    base = member.rsplit("/", 1)[-1]
    hits = [n for n in names if n.rsplit("/", 1)[-1] == base and "__MACOSX" not in n]
    if len(hits) == 1:
        return hits[0]
    raise OSError(f"archive from {url} has no unique member {member!r} (members: {names[:20]})")


# ---------------------------------------------------------------------------------------- bank marketing
@dataclass
class BankMarketing:
    """UCI bank marketing, preprocessed as in the workshop.

    ``X_*``: float32 ``(n, 62)`` in [0, 1]; ``y_*``: float32 ``(n,)`` with 1.0 = subscribed ("yes").
    ``feature_names``: the 62 column names (9 scaled numeric columns, then the one-hot columns).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_valid: torch.Tensor
    y_valid: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]

    @property
    def num_features(self) -> int:
        return self.X_train.shape[1]


def load_bank_marketing(path: str | os.PathLike | None = None, *, download: bool = True) -> BankMarketing:
    """Load ``bank-additional-full.csv`` and split it 64/16/20 into train/valid/test.

    Preprocessing (workshop recipe): drop ``duration`` (it leaks the target), one-hot the 10
    categorical columns, min-max scale the 9 numeric ones over the full table, ``y = (y == "yes")``.
    Splits: ``train_test_split(test_size=0.2, random_state=0)``, then the same on the train part
    (41,188 rows -> 26,360 / 6,590 / 8,238).
    """
    try:
        import numpy as np
        import pandas as pd
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("load_bank_marketing needs pandas and scikit-learn: "
                          "pip install 'bondgate[data]'") from exc

    csv = resolve(BANK_FILE, path, download=download)
    _check_published(csv, BANK_FILE)
    expected = "the unmodified UCI bank-additional-full.csv: ';'-separated, a header row, then one row per call"
    try:
        df = pd.read_csv(csv, sep=";", low_memory=False)  # whole-file dtypes: no mixed-type chunk warning
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv}: cannot read it as a table ({exc}); expected {expected}") from exc
    missing = [c for c in ("y", "duration", *BANK_NUMERIC, *BANK_CATEGORICAL) if c not in df.columns]
    if len(df.columns) == 1 and "," in str(df.columns[0]):
        raise ValueError(f"{csv}: one column {str(df.columns[0])[:60]!r}, so it looks ','-separated; "
                         f"expected {expected}")
    if missing:
        raise ValueError(f"{csv}: no column(s) {', '.join(map(repr, missing))}; expected {expected}")
    if df.empty:
        raise ValueError(f"{csv}: a header but no rows; expected {expected}")
    df = df.drop(columns="duration")
    # the file's line of each row, for the messages: pandas skips blank lines, so a row's index + 2 is not its line
    lines = [n for n, line in enumerate(csv.read_bytes().split(b"\n"), 1) if line.strip(b"\r")]

    def line_of(row: int) -> int:
        return lines[row + 1] if row + 1 < len(lines) else row + 2

    empty = df.columns[df.isna().any()].tolist()
    if empty:  # a NaN would pass into X silently
        line = line_of(int(df[empty[0]].isna().to_numpy().argmax()))
        raise ValueError(f"{csv}:{line}: empty cell in column {empty[0]!r} (columns with empty cells: {empty})")
    for col in BANK_NUMERIC:
        values = pd.to_numeric(df[col], errors="coerce")
        # a word in a number column (pandas read the column as text), or inf / 1e400, which the scaling below would
        # turn into NaN features (an -inf age: every age)
        bad = ~np.isfinite(values.to_numpy(dtype="float64"))
        if bad.any():
            row = int(bad.argmax())
            what = "not a number" if pd.isna(values.iloc[row]) else "not a finite number"
            raise ValueError(f"{csv}:{line_of(row)}: column {col!r} holds {str(df[col].iloc[row])[:40]!r}, {what}")
        df[col] = values
    labels = set(df["y"].unique()) - {"yes", "no"}
    if labels:
        raise ValueError(f"{csv}: column 'y' must hold 'yes' or 'no', found {sorted(map(str, labels))[:5]}")
    y = (df.pop("y") == "yes").to_numpy()
    df = pd.get_dummies(df, columns=list(BANK_CATEGORICAL))
    for col in BANK_NUMERIC:
        lo, hi = df[col].min(), df[col].max()
        df[col] = (df[col] - lo) / (hi - lo) if hi > lo else 0.0  # a constant column (a subset of rows) -> 0, not NaN
    if df.shape[1] != BANK_NUM_FEATURES:
        raise ValueError(f"expected {BANK_NUM_FEATURES} features after preprocessing, got {df.shape[1]} "
                         f"from {csv}; is it the unmodified bank-additional-full.csv?")
    X = df.to_numpy(dtype="float32")

    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0)
    X_tr, X_va, y_tr, y_va = train_test_split(X_tr, y_tr, test_size=0.2, random_state=0)

    def t(a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    return BankMarketing(t(X_tr), t(y_tr), t(X_va), t(y_va), t(X_te), t(y_te), [str(c) for c in df.columns])


# ---------------------------------------------------------------------------------------- text
def _read_text(p: Path, relpath: str) -> str:
    # Decode bytes ourselves: no newline translation, so the text is byte-faithful to the file (but for a BOM,
    # which editors that save "UTF-8" put first, and a published file saved with Windows line ends, read as published).
    blob = p.read_bytes()
    blob = _check_published(p, relpath, blob) or blob
    try:
        return blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = blob.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte 0x{blob[exc.start]:02x} at offset {exc.start}); "
                         "save the file as UTF-8") from exc


def load_stsb(path: str | os.PathLike | None = None, split: str = "dev") -> list[tuple[str, str, float]]:
    """STS-B pairs ``(sentence1, sentence2, score)`` with scores in [0, 5] from ``sts-{split}.tsv``.

    The normalized file has a ``score<TAB>sentence1<TAB>sentence2`` header and no quoting (sentences
    contain ``"``), so lines are split on tabs only; sentences are kept verbatim (trailing spaces too).
    Splits: ``"train"`` (5,749 pairs) and ``"dev"`` (1,500); the test split is held out.
    """
    if split not in STSB_SPLITS:
        raise ValueError(f"STS-B split must be one of {STSB_SPLITS}, got {split!r}")
    p = resolve(f"stsb/sts-{split}.tsv", path, download=False)
    lines = [line.removesuffix("\r") for line in _read_text(p, f"stsb/sts-{split}.tsv").split("\n")]  # "\r": Windows line ends
    while lines and lines[-1] == "":  # trailing blank lines
        lines.pop()
    if not lines or lines[0].split("\t") != ["score", "sentence1", "sentence2"]:
        raise ValueError(f"{p}: expected the header 'score<TAB>sentence1<TAB>sentence2'")
    pairs = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{p}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
        try:
            score = float(fields[0])
        except ValueError:
            raise ValueError(f"{p}:{lineno}: score {fields[0]!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{p}:{lineno}: score {score} outside [0, 5]")
        pairs.append((fields[1], fields[2], score))
    if not pairs:
        raise ValueError(f"{p}: a header but no sentence pairs")
    return pairs


def load_text(name: str, split: str, path: str | os.PathLike | None = None) -> str:
    """Raw text of a language-modeling corpus (tokenized, one sentence/paragraph per line).

    ``name``: ``"wikitext-2"`` (splits train/valid; test is held out) or ``"ptb"`` (train/valid/test).
    """
    if name not in TEXT_FILES:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(TEXT_FILES)}")
    files = TEXT_FILES[name]
    if split not in files:
        raise ValueError(f"{name} split must be one of {tuple(files)}, got {split!r}")
    p = resolve(files[split], path, download=False)
    text = _read_text(p, files[split])
    if not text.strip():
        raise ValueError(f"{p}: the file holds no text")
    return text
