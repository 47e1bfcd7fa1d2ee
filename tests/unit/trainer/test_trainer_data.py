import json

import pytest

from server.core.examples import DataError, parse_row, read_rows
from server.trainer.data import curate, in_eval, load


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chars(example):
    return len(example.text())


def test_three_formats(tmp_path):
    f = write_rows(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}]},
        {"prompt": "Q2", "completion": "A2"},
        {"instruction": "Do it", "input": "with this", "output": "A3"},
        {"instruction": "Just this", "output": "A4"},
    ])
    examples, files = read_rows([f])
    assert [e.completion for e in examples] == ["A1", "A2", "A3", "A4"]
    assert examples[0].messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    assert examples[2].prompt == (("user", "Do it\n\nwith this"),)
    assert examples[3].prompt == (("user", "Just this"),)
    assert files[0]["rows"] == 4 and len(files[0]["sha256"]) == 64


@pytest.mark.parametrize("line,reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"text": "hello"}', "unknown row format"),
    ('{"prompt": "Q"}', "'completion' must be a string"),
    ('{"prompt": 3, "completion": "A"}', "'prompt' must be a string"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "Q"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "wizard", "content": "Q"}, {"role": "assistant", "content": "A"}]}', "messages[0]"),
    ('{"messages": [{"role": "assistant", "content": "A"}]}', "at least one message before"),
    ('{"instruction": "I"}', "'output' must be a string"),
])
def test_bad_row_names_file_and_line(tmp_path, line, reason):
    f = write_rows(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}, "", line])
    with pytest.raises(DataError) as e:
        read_rows([f])
    assert str(e.value).startswith(f"{f}:3: ") and reason in str(e.value)


def test_curation_removes_planted_rows(tmp_path):
    def words(i, n):
        return " ".join(f"w{i}x{k}" for k in range(n))

    base = [{"prompt": words(i, 25), "completion": words(i + 100, 15)} for i in range(30)]
    planted = [
        {"prompt": "   ", "completion": "an answer to nothing"},
        {"prompt": "a question", "completion": ""},
        dict(base[3]),  # exact duplicate
        {"prompt": base[5]["prompt"].upper() + "  ", "completion": base[5]["completion"]},  # same once normalized
        {"prompt": base[7]["prompt"].replace("w7x12", "changed"), "completion": base[7]["completion"]},  # near
        {"prompt": "long " * 500, "completion": "too long"},
    ]
    examples, _ = read_rows([write_rows(tmp_path / "d.jsonl", base + planted)])
    kept, counts = curate(examples, chars, max_seq_len=1000, near_threshold=0.8, log=lambda *_: None)
    assert counts == {"read": 36, "after_empty": 34, "after_exact_duplicates": 32, "after_near_duplicates": 31,
                      "after_length": 30}
    assert [e.completion for e in kept] == [r["completion"] for r in base]


def test_split_is_stable_and_close_to_the_fraction():
    rows = [parse_row({"prompt": f"question {i}", "completion": f"answer {i}"}, f"x:{i}") for i in range(2000)]
    held = [r for r in rows if in_eval(r, 0.1)]
    assert 150 < len(held) < 250
    assert [r for r in rows[:100] if in_eval(r, 0.1)] == [r for r in held if int(r.where[2:]) < 100]


def test_load_needs_rows_on_both_sides(tmp_path):
    f = write_rows(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match="both must be at least 1"):
        load([f], chars, 1000, 0.8, 0.1, log=lambda *_: None)
