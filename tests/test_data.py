"""Data for the CLI: the dates generator (determinism, split, locale coverage, round trip), toy tasks,
the vocabulary, TSV files and their error messages, batching."""
import datetime

import pytest
import torch

from fused_s2s import data as D


@pytest.fixture(scope="module")
def fmt():
    return D.DateFormatter()


# ------------------------------------------------------------------------------------------ dates
def test_dates_deterministic_by_seed(fmt):
    a = D.date_examples(120, seed=7, split="train", formatter=fmt)
    b = D.date_examples(120, seed=7, split="train", formatter=fmt)
    c = D.date_examples(120, seed=8, split="train", formatter=fmt)
    assert a == b
    assert [e.date for e in a] != [e.date for e in c]
    assert D.date_examples(60, seed=7, split="test", formatter=fmt) == D.date_examples(60, seed=7, split="test",
                                                                                       formatter=fmt)


@pytest.mark.parametrize("seed", [0, 3])
def test_dates_train_and_test_never_share_a_source(fmt, seed):
    train = D.date_examples(3000, seed=seed, split="train", formatter=fmt)
    test = D.date_examples(300, seed=seed, split="test", formatter=fmt)
    assert not {e.src for e in train} & {e.src for e in test}
    assert all(D.is_test_key(seed, e.key, 0.02) for e in test)
    assert not any(D.is_test_key(seed, e.key, 0.02) for e in train)
    # the held-out split depends on the seed
    other = D.date_examples(300, seed=seed + 1, split="test", formatter=fmt)
    assert {e.src for e in other} != {e.src for e in test}


def test_load_task_dates_split_is_disjoint():
    task = D.load_task("dates", seed=1, n_train=2000, n_valid=200)
    assert len(task.train) == 2000 and len(task.valid) == 200
    assert not {s for s, _ in task.train} & {s for s, _ in task.valid}
    # the vocabulary covers every character either split can produce
    assert all(c in task.vocab.stoi for s, t in task.train + task.valid for c in s + t)


def test_locale_and_format_coverage(fmt):
    assert len(D.LOCALES) >= 10 and "ko_KR" in D.LOCALES
    assert set(D.FORMATS) == {"short", "medium", "long", "full"}
    for split in ("train", "test"):
        ex = D.date_examples(len(D.LOCALES) * len(D.FORMATS) * 2, seed=0, split=split, formatter=fmt)
        assert {(e.locale, e.format) for e in ex} == {(l, f) for l in D.LOCALES for f in D.FORMATS}
    ko = [e for e in ex if e.locale == "ko_KR" and e.format == "long"]
    assert ko and all("년" in e.src and "월" in e.src and "일" in e.src for e in ko)
    de_full = [e for e in ex if e.locale == "de_DE" and e.format == "full"]
    weekdays = ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag")
    assert de_full and all(e.src.split(",")[0] in weekdays for e in de_full)


def test_dates_round_trip(fmt):
    ex = D.date_examples(400, seed=5, split="train", formatter=fmt)
    for e in ex:
        assert D.DATE_MIN <= e.date <= D.DATE_MAX
        assert datetime.date.fromisoformat(e.tgt) == e.date  # ISO target parses back to the date
        assert len(e.tgt) == 10 and e.tgt[4] == e.tgt[7] == "-"
        assert e.src == fmt(e.date, e.locale, e.format)
    # known renderings from CLDR (what the issue shows)
    d = datetime.date(2026, 11, 25)
    assert fmt(d, "fr_FR", "long") == "25 novembre 2026"
    assert fmt(d, "de_DE", "full") == "Mittwoch, 25. November 2026"
    assert fmt(d, "ko_KR", "long") == "2026년 11월 25일"
    assert fmt(d, "en_US", "short") == "11/25/26"


def test_date_formatter_bad_input():
    with pytest.raises(ValueError, match="formats"):
        D.DateFormatter(["en_US"], ["tiny"])
    with pytest.raises(ValueError, match="xx_YY"):
        D.DateFormatter(["xx_YY"])
    with pytest.raises(ValueError, match="split"):
        D.date_examples(1, seed=0, split="dev")


# ------------------------------------------------------------------------------------------ toys
@pytest.mark.parametrize("task,fn", [("reverse", lambda s: s[::-1]), ("sort", lambda s: "".join(sorted(s))),
                                     ("copy", lambda s: s)])
def test_toy_tasks(task, fn):
    train = D.toy_examples(task, 500, seed=2, split="train")
    test = D.toy_examples(task, 50, seed=2, split="test")
    assert train == D.toy_examples(task, 500, seed=2, split="train")
    assert all(t == fn(s) and s.isdigit() and 3 <= len(s) <= 10 for s, t in train + test)
    assert not {s for s, _ in train} & {s for s, _ in test}
    with pytest.raises(ValueError, match="task"):
        D.toy_examples("shuffle", 1, seed=0, split="train")


# ------------------------------------------------------------------------------------------ vocab
def test_vocab_round_trip_and_specials():
    v = D.Vocab.build(["héllo", "wörld 2026년"])
    assert v.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (D.PAD, D.BOS, D.EOS, D.UNK) == (0, 1, 2, 3)
    for s in ["héllo", "wörld 2026년", ""]:
        assert v.decode(v.encode(s)) == s
        ids = v.encode(s, bos=True, eos=True)
        assert ids[0] == D.BOS and ids[-1] == D.EOS and v.decode(ids) == s
    assert v.encode("hé?")[-1] == D.UNK and v.decode(v.encode("hé?")) == "hé" + D.UNK_CHAR
    assert v.decode([v.stoi["h"], D.EOS, v.stoi["é"]]) == "h"  # stops at EOS
    assert v.decode(torch.tensor([D.BOS, v.stoi["l"], D.PAD])) == "l"
    assert D.Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError):
        D.Vocab.from_dict({"itos": ["a", "b"]})


# ------------------------------------------------------------------------------------------ TSV
def _write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


def test_read_tsv_ok(tmp_path):
    p = _write(tmp_path, "ok.tsv", "abc\tcba\r\nx y\tz\n한국\t어\n".encode())
    assert D.read_tsv(p) == [("abc", "cba"), ("x y", "z"), ("한국", "어")]


@pytest.mark.parametrize("content,line,what", [
    (b"a\tb\nabc\n", 2, "2 tab-separated columns"),
    (b"a\tb\nx\ty\tz\n", 2, "got 3"),
    (b"a\tb\n\nc\td\n", 2, "empty line"),
    (b"a\tb\nc\td\n   \n", 3, "empty line"),
    (b"a\tb\nc\xff\td\n", 2, "UTF-8"),
    (b"\tb\n", 1, "empty source"),
    (b"a\t\n", 1, "empty target"),
])
def test_read_tsv_errors_name_file_and_line(tmp_path, content, line, what):
    p = _write(tmp_path, "bad.tsv", content)
    with pytest.raises(D.DataError, match=what) as e:
        D.read_tsv(p)
    assert str(e.value).startswith(f"{p}:{line}:")


def test_read_tsv_missing_and_empty(tmp_path):
    with pytest.raises(D.DataError, match="nope.tsv"):
        D.read_tsv(str(tmp_path / "nope.tsv"))
    with pytest.raises(D.DataError, match="empty"):
        D.read_tsv(_write(tmp_path, "empty.tsv", b""))


def test_load_task_from_files(tmp_path):
    lines = "".join(f"{i:03d}\t{str(i)[::-1]}\n" for i in range(200)).encode()
    train = _write(tmp_path, "train.tsv", lines)
    t = D.load_task(train_file=train, seed=0)
    assert t.valid and len(t.train) + len(t.valid) == 200
    assert not set(t.train) & set(t.valid)
    assert t == D.load_task(train_file=train, seed=0)
    valid = _write(tmp_path, "valid.tsv", b"123\t321\n")
    t2 = D.load_task(train_file=train, valid_file=valid)
    assert t2.valid == [("123", "321")] and len(t2.train) == 200
    with pytest.raises(ValueError, match="--train"):
        D.load_task(valid_file=valid)


# ------------------------------------------------------------------------------------------ batches
def test_collate_shapes_and_padding():
    v = D.Vocab("abcxyz")
    b = D.collate([("ab", "xyz"), ("abca", "x")], v)
    assert b.src.shape == (2, 4) and b.src.dtype == torch.long
    assert b.src_lengths.tolist() == [2, 4]
    assert b.src[0, 2:].tolist() == [D.PAD, D.PAD]
    assert b.tgt.shape == (2, 5)  # BOS + 3 chars + EOS
    assert b.tgt[0].tolist() == [D.BOS] + v.encode("xyz") + [D.EOS]
    assert b.tgt[1].tolist() == [D.BOS, v.stoi["x"], D.EOS, D.PAD, D.PAD]
    with pytest.raises(ValueError, match="empty"):
        D.collate([("", "x")], v)
    with pytest.raises(ValueError, match="zero"):
        D.collate([], v)
