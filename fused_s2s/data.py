"""Data for the ``fused-s2s`` command: a character vocabulary, built-in tasks, TSV files, batching.

Tasks
- ``dates`` (default): multilingual date normalisation. A random date in [1950-01-01, 2049-12-31]
  written the way a locale writes it (Babel's CLDR data, no download), in one of the four CLDR
  formats short / medium / long / full  ->  ISO "YYYY-MM-DD". The 100-year range makes the two-digit
  years of the short formats unambiguous (50..99 -> 19xx, 00..49 -> 20xx).
- ``reverse`` / ``sort`` / ``copy``: digit strings -> reversed / sorted / same string.
- user data: ``--train FILE`` (and ``--valid FILE``) with ``source<TAB>target`` lines.

Held-out split. An example's key is its source string: it is a test key iff a seeded hash of it falls
below ``test_frac``, and each split's generator rejects the other split's keys, so train and test never
share a source (not even when two locales or formats render a date identically, as ja_JP short and
medium do) and both are fixed by the seed alone.

Ambiguity: without a locale tag some short dates read two ways ("6/5/47" is June 5 in en_US and
6 May in es_ES), so a few per cent of short-format inputs have no single right answer.
"""
from __future__ import annotations

import datetime
import hashlib
import random
from typing import NamedTuple, Sequence

import torch

from fused_s2s._checks import to_device

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
UNK_CHAR = "\ufffd"  # what decode() writes for <unk>

TASKS = ("dates", "reverse", "sort", "copy")
LOCALES = ("en_US", "en_GB", "fr_FR", "de_DE", "es_ES", "it_IT", "pt_BR", "ru_RU", "ja_JP", "ko_KR",
           "zh_CN", "nl_NL", "tr_TR")
FORMATS = ("short", "medium", "long", "full")
DATE_MIN, DATE_MAX = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)

Pair = tuple[str, str]


class DataError(ValueError):
    """A malformed data file; the message starts with ``FILE:LINE:``."""


# ----------------------------------------------------------------------------------------------- vocab
class Vocab:
    """Character vocabulary shared by source and target: pad=0, bos=1, eos=2, unk=3, then characters."""

    def __init__(self, chars):
        chars = sorted(set(chars))
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"vocab entries must be single characters, got {c!r}")
        self.itos = list(SPECIALS) + chars
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= len(SPECIALS)}

    @classmethod
    def build(cls, texts) -> "Vocab":
        return cls({c for t in texts for c in t})

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.stoi.get(c, UNK) for c in text]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        """Characters up to the first EOS; pad/bos skipped, unk written as U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(UNK_CHAR if i == UNK or not 0 <= i < len(self.itos) else self.itos[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        itos = list(d["itos"])
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {itos[:len(SPECIALS)]}")
        v = cls(itos[len(SPECIALS):])
        if v.itos != itos:
            raise ValueError("vocab characters must be unique and sorted")
        return v


# ----------------------------------------------------------------------------------------------- split
def _unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key), stable across runs and platforms."""
    h = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def is_test_key(seed: int, key: str, test_frac: float) -> bool:
    return _unit_hash(seed, key) < test_frac


# ----------------------------------------------------------------------------------------------- dates
class DateExample(NamedTuple):
    src: str
    tgt: str
    date: datetime.date
    locale: str
    format: str

    @property
    def key(self) -> str:
        """The split key: the source string itself."""
        return self.src


class DateFormatter:
    """Babel's CLDR patterns, parsed once per (locale, format)."""

    def __init__(self, locales: Sequence[str] = LOCALES, formats: Sequence[str] = FORMATS):
        try:
            from babel import Locale
            from babel.dates import get_date_format
        except ImportError as e:  # pragma: no cover - babel is a declared dependency of the demo
            raise ImportError("the dates task needs Babel: pip install babel") from e
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise ValueError(f"formats must be among {list(FORMATS)}, got {bad}")
        self._loc = {}
        for name in locales:
            try:
                self._loc[name] = Locale.parse(name)
            except Exception as e:
                raise ValueError(f"unknown locale {name!r} ({e})") from None
        self._pat = {(l, f): get_date_format(f, locale=self._loc[l]) for l in locales for f in formats}
        self.locales, self.formats = tuple(locales), tuple(formats)

    def __call__(self, date: datetime.date, locale: str, fmt: str) -> str:
        return self._pat[(locale, fmt)].apply(date, self._loc[locale])


def _random_date(rng: random.Random, lo=DATE_MIN, hi=DATE_MAX) -> datetime.date:
    return lo + datetime.timedelta(days=rng.randrange((hi - lo).days + 1))


def date_examples(n: int, *, seed: int, split: str, test_frac: float = 0.02,
                  locales: Sequence[str] = LOCALES, formats: Sequence[str] = FORMATS,
                  formatter: DateFormatter | None = None) -> list[DateExample]:
    """``n`` examples of the ``split`` ("train" or "test"), deterministic in ``seed``.

    Example j uses the j-th (locale, format) pair in turn (so every pair appears once n >= 13 * 4)
    and a random date, redrawn until the source's key belongs to ``split``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    fmt = formatter or DateFormatter(locales, formats)
    rng = random.Random(f"fused_s2s-dates-{seed}-{split}")
    combos = [(l, f) for l in fmt.locales for f in fmt.formats]
    want_test = split == "test"
    out = []
    while len(out) < n:
        locale, form = combos[len(out) % len(combos)]
        while True:  # rejection: expected 1/test_frac tries for test, ~1 for train
            d = _random_date(rng)
            ex = DateExample(fmt(d, locale, form), d.isoformat(), d, locale, form)
            if is_test_key(seed, ex.key, test_frac) == want_test:
                break
        out.append(ex)
    return out


def date_vocab_chars(locales: Sequence[str] = LOCALES, formats: Sequence[str] = FORMATS) -> set[str]:
    """Every character any (locale, format) can write: one year covers all months and weekdays."""
    fmt = DateFormatter(locales, formats)
    chars = set("0123456789-")
    for day in range(366):  # 2024 is a leap year; digits are covered anyway
        d = datetime.date(2024, 1, 1) + datetime.timedelta(days=day)
        for l in fmt.locales:
            for f in fmt.formats:
                chars.update(fmt(d, l, f))
    return chars


# ----------------------------------------------------------------------------------------------- toys
def toy_target(task: str, src: str) -> str:
    if task == "reverse":
        return src[::-1]
    if task == "sort":
        return "".join(sorted(src))
    if task == "copy":
        return src
    raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")


def toy_examples(task: str, n: int, *, seed: int, split: str, test_frac: float = 0.05,
                 min_len: int = 3, max_len: int = 10) -> list[Pair]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    toy_target(task, "")  # validates the task name
    rng = random.Random(f"fused_s2s-{task}-{seed}-{split}")
    want_test = split == "test"
    out = []
    while len(out) < n:
        src = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))
        if is_test_key(seed, src, test_frac) == want_test:
            out.append((src, toy_target(task, src)))
    return out


# ----------------------------------------------------------------------------------------------- TSV
def read_tsv(path: str) -> list[Pair]:
    """``source<TAB>target`` lines. Any malformed line raises DataError("path:line: why")."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror or e})") from None
    pairs = []
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline does not start an empty line
    for no, line in enumerate(lines, 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{no}: not valid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})") from None
        if not text.strip():
            raise DataError(f"{path}:{no}: empty line; expected 'source<TAB>target'")
        cols = text.split("\t")
        if len(cols) != 2:
            raise DataError(f"{path}:{no}: expected 2 tab-separated columns (source<TAB>target), got {len(cols)}")
        if not cols[0] or not cols[1]:
            side = "source" if not cols[0] else "target"
            raise DataError(f"{path}:{no}: empty {side} column")
        pairs.append((cols[0], cols[1]))
    if not pairs:
        raise DataError(f"{path}: no examples (the file is empty)")
    return pairs


# ----------------------------------------------------------------------------------------------- bundle
class TaskData(NamedTuple):
    name: str
    train: list      # list of (src, tgt) pairs
    valid: list
    vocab: Vocab


def load_task(task: str = "dates", *, seed: int = 0, n_train: int = 50_000, n_valid: int = 500,
              train_file: str | None = None, valid_file: str | None = None) -> TaskData:
    """The training pool, the held-out split and the vocabulary, all fixed by ``seed``."""
    if train_file is None and valid_file is not None:
        raise ValueError("--valid FILE needs --train FILE")
    if train_file is not None:
        train = read_tsv(train_file)
        if valid_file is not None:
            valid = read_tsv(valid_file)
        else:  # hold out ~5% of the lines by key hash (at least one; never the whole file)
            held = [is_test_key(seed, f"{s}\t{t}", 0.05) for s, t in train]
            if not any(held):
                held[len(held) - 1] = True
            valid = [p for p, h in zip(train, held) if h]
            rest = [p for p, h in zip(train, held) if not h]
            train = rest or train
        return TaskData(f"file:{train_file}", train, valid, Vocab.build(s + t for s, t in train))
    if task == "dates":
        fmt = DateFormatter()
        train = [(e.src, e.tgt) for e in date_examples(n_train, seed=seed, split="train", formatter=fmt)]
        valid = [(e.src, e.tgt) for e in date_examples(n_valid, seed=seed, split="test", formatter=fmt)]
        return TaskData("dates", train, valid, Vocab(date_vocab_chars()))
    if task in TASKS:
        train = toy_examples(task, n_train, seed=seed, split="train")
        valid = toy_examples(task, n_valid, seed=seed, split="test")
        return TaskData(task, train, valid, Vocab("0123456789"))
    raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")


# ----------------------------------------------------------------------------------------------- batches
class Batch(NamedTuple):
    src: torch.Tensor          # (B, L) long, right-padded with PAD
    src_lengths: torch.Tensor  # (B,) long
    tgt: torch.Tensor          # (B, T+1) long: BOS y_1 .. y_T EOS, right-padded with PAD


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def encode_sources(texts: Sequence[str], vocab: Vocab, device=None, pad_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) padded ids on ``device`` and (B,) lengths on the CPU (the encoder packs by them on
    the host: no device round trip), L the longest source rounded up to ``pad_multiple``. Empty
    sources are rejected (nothing to attend to). The ids go to a GPU without a host sync."""
    ids = [vocab.encode(t) for t in texts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"source #{i} is empty; every source needs at least one character")
    L = _round_up(max(len(x) for x in ids), pad_multiple)
    src = torch.full((len(ids), L), PAD, dtype=torch.long)
    for i, x in enumerate(ids):
        src[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    return to_device(src, device), lengths


def collate(pairs: Sequence, vocab: Vocab, device=None, pad_multiple: int = 1) -> Batch:
    """src (B, L), src_lengths (B,) on the CPU, tgt (B, T+1) = BOS .. EOS right-padded with PAD.
    ``pad_multiple`` rounds L and T+1 up to a multiple (fewer distinct shapes: one CUDA graph per
    shape); the extra positions are masked (source) or PAD targets, which the loss leaves out."""
    if not pairs:
        raise ValueError("cannot make a batch of zero examples")
    src, lengths = encode_sources([p[0] for p in pairs], vocab, device, pad_multiple)
    tgt_ids = [vocab.encode(p[1], bos=True, eos=True) for p in pairs]
    T1 = _round_up(max(len(x) for x in tgt_ids), pad_multiple)
    tgt = torch.full((len(pairs), T1), PAD, dtype=torch.long)
    for i, x in enumerate(tgt_ids):
        tgt[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return Batch(src, lengths, to_device(tgt, device))


def batches(pairs: Sequence, vocab: Vocab, batch_size: int, device=None):
    """Consecutive batches in order (evaluation)."""
    for i in range(0, len(pairs), batch_size):
        yield pairs[i : i + batch_size], collate(pairs[i : i + batch_size], vocab, device)
