import json

import pytest
import torch

from llmcourse.core.data import calibration_windows, default_documents, load_text, load_texts, split_of
from llmcourse.core.errors import UserError


def test_default_splits_are_fixed_and_disjoint():
    docs = default_documents()
    assert len(docs) > 10_000
    titles = {s: {d["title"] for i, d in enumerate(docs) if split_of(i) == s} for s in ("eval", "calibration", "train")}
    assert not titles["eval"] & titles["calibration"]
    assert not titles["eval"] & titles["train"]
    assert not titles["calibration"] & titles["train"]
    assert sum(map(len, titles.values())) == len(docs)
    assert load_texts("default", "eval") == load_texts("default", "eval")
    assert len(load_texts("default", "eval")) == len(titles["eval"])


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert load_texts(str(tmp_path / "a.jsonl")) == ["x y", "z"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "q"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl"), field="body") == ["q"]
    (tmp_path / "a.csv").write_text("id,text\n1,hello there\n2,bye\n")
    assert load_text(str(tmp_path / "a.csv")) == "hello there\n\nbye"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", "p2"]}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.parquet"), field="content") == ["p1", "p2"]


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
    ("nofield.jsonl", '{"x": 1}\n', "no field 'text'"),
    ("empty.txt", "\n\n   \n", "no text found"),
    ("data.xml", "<a/>", "unknown data format"),
    ("nocol.csv", "a,b\n1,2\n", "no column 'text'"),
    ("bad.parquet", "not parquet", "not a readable Parquet"),
])
def test_bad_data_is_a_clean_error(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        load_texts(str(p))


def test_missing_data_file():
    with pytest.raises(UserError, match="does not exist"):
        load_texts("/nonexistent/file.txt")


class CharTokenizer:
    def __call__(self, text, return_tensors="pt"):
        class R:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])

        return R()


def test_calibration_windows_are_seeded_and_shaped():
    tok = CharTokenizer()
    a = calibration_windows(tok, 8, 64, seed=3)
    b = calibration_windows(tok, 8, 64, seed=3)
    c = calibration_windows(tok, 8, 64, seed=4)
    assert a.shape == (8, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    stream = torch.tensor([ord(ch) % 256 for ch in load_text("default", "calibration")])
    # every window is a contiguous slice of the calibration stream
    w = a[0]
    starts = (stream[: len(stream) - 63] == w[0]).nonzero()[:, 0]
    assert any(torch.equal(stream[s:s + 64], w) for s in starts.tolist())


def test_calibration_rejects_impossible(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny")
    with pytest.raises(UserError, match="fewer than seq_len"):
        calibration_windows(CharTokenizer(), 2, 64, data=str(p))
    with pytest.raises(UserError):
        calibration_windows(CharTokenizer(), 0, 64)
