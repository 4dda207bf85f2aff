"""Prompt files (.txt, .jsonl, .csv, .tsv), their errors, and the deterministic prompt sampler."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dmdr_fast.data.prompts import PromptBatch, PromptSampler, load_prompts


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_txt_skips_blank_lines_and_comments(tmp_path: Path):
    path = _write(tmp_path / "p.txt", "# header\na cat\n\n   \n  the dog  \n  # indented comment\nsky #1\n")
    assert load_prompts(path) == ["a cat", "the dog", "sky #1"]


def test_jsonl_default_column_order(tmp_path: Path):
    rows = [{"id": 1, "caption": "c1", "text": "t1"}, {"id": 2, "caption": "c2", "text": "t2"}]
    assert load_prompts(_jsonl(tmp_path / "a.jsonl", rows)) == ["c1", "c2"]  # caption before text
    rows = [{"text": "t1", "prompt": "p1", "caption": "c1"}]
    assert load_prompts(_jsonl(tmp_path / "b.jsonl", rows)) == ["p1"]  # prompt first of all
    rows = [{"text": "t1"}, {"text": "t2"}]
    assert load_prompts(_jsonl(tmp_path / "c.jsonl", rows)) == ["t1", "t2"]


def test_jsonl_explicit_column_and_bare_strings(tmp_path: Path):
    rows = [{"prompt": "p1", "alt": "a1"}, {"prompt": "p2", "alt": "a2"}]
    assert load_prompts(_jsonl(tmp_path / "a.jsonl", rows), column="alt") == ["a1", "a2"]
    path = _write(tmp_path / "b.jsonl", '"a cat"\n\n"the \\"dog\\""\n')
    assert load_prompts(path) == ["a cat", 'the "dog"']


def test_jsonl_errors(tmp_path: Path):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match="malformed JSON on line 3"):
        load_prompts(path)
    path = _jsonl(tmp_path / "nocol.jsonl", [{"id": 1, "url": "x"}])
    with pytest.raises(ValueError, match=r"available: \['id', 'url'\]"):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"'alt' not found.*available: \['prompt'\]"):
        load_prompts(_jsonl(tmp_path / "a.jsonl", [{"prompt": "p"}]), column="alt")
    with pytest.raises(ValueError, match=r"not found in .*:2; available: \['text'\]"):
        load_prompts(_jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}, {"text": "t"}]))
    with pytest.raises(ValueError, match=r"line 2 .* not a string"):
        load_prompts(_jsonl(tmp_path / "c.jsonl", [{"prompt": "p"}, {"prompt": 3}]))


def test_csv_and_tsv(tmp_path: Path):
    path = _write(tmp_path / "p.csv", 'id,caption,text\n1,"a cat, sitting",t1\n2,the dog,t2\n')
    assert load_prompts(path) == ["a cat, sitting", "the dog"]
    assert load_prompts(path, column="text") == ["t1", "t2"]
    path = _write(tmp_path / "p.tsv", "prompt\tscore\na cat\t1\nthe dog, barking\t2\n")
    assert load_prompts(path) == ["a cat", "the dog, barking"]
    path = _write(tmp_path / "P.TSV", "prompt\tscore\nx\t1\n")  # extensions are case-insensitive
    assert load_prompts(path) == ["x"]


def test_csv_missing_column_lists_available(tmp_path: Path):
    path = _write(tmp_path / "p.csv", "id,url\n1,x\n")
    with pytest.raises(ValueError, match=r"available: \['id', 'url'\]"):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"'caption' not found.*available: \['id', 'url'\]"):
        load_prompts(path, column="caption")
    with pytest.raises(ValueError, match="no header"):
        load_prompts(_write(tmp_path / "empty.csv", ""))


def test_file_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"unknown prompt file extension '\.json'"):
        load_prompts(_write(tmp_path / "p.json", '["a"]'))
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(_write(tmp_path / "empty.txt", "# only a comment\n\n"))
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(_write(tmp_path / "blank.csv", "prompt\n\n  \n"))
    with pytest.raises(ValueError, match="limit"):
        load_prompts(_write(tmp_path / "p.txt", "a\n"), limit=0)


def test_dedupe_then_limit(tmp_path: Path):
    path = _write(tmp_path / "p.txt", "a\nb\na\nc\nb\nd\n")
    assert load_prompts(path) == ["a", "b", "a", "c", "b", "d"]
    assert load_prompts(path, dedupe=True) == ["a", "b", "c", "d"]
    assert load_prompts(path, dedupe=True, limit=3) == ["a", "b", "c"]
    assert load_prompts(path, limit=3) == ["a", "b", "a"]
    assert load_prompts(path, limit=100) == ["a", "b", "a", "c", "b", "d"]


def test_sampler_is_deterministic_given_the_generator():
    sampler = PromptSampler(["a", "b", "c", "d", "e"])
    assert isinstance(sampler.prompts, tuple) and len(sampler) == 5
    first = sampler.sample(16, torch.Generator().manual_seed(3))
    again = sampler.sample(16, torch.Generator().manual_seed(3))
    other = sampler.sample(16, torch.Generator().manual_seed(4))
    assert first == again and first != other and len(first) == 16
    expected = torch.randint(5, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    assert first == [sampler.prompts[i] for i in expected]  # exactly one randint draw per batch
    gen = torch.Generator().manual_seed(3)
    assert sampler.sample(16, gen) == first
    assert sampler.sample(16, gen) != first  # the generator advances: the next batch differs
    draws = sampler.sample(2000, torch.Generator().manual_seed(0))
    assert set(draws) == set(sampler.prompts)  # with replacement, all covered
    assert max(draws.count(p) for p in sampler.prompts) < 500  # roughly uniform (expected 400)


def test_sampler_validation_and_from_file(tmp_path: Path):
    with pytest.raises(ValueError, match="at least one"):
        PromptSampler(())
    with pytest.raises(ValueError, match="strings"):
        PromptSampler(("a", 3))
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(("a",)).sample(0, torch.Generator())
    with pytest.raises(dataclasses.FrozenInstanceError):
        PromptSampler(("a",)).prompts = ("b",)
    sampler = PromptSampler.from_file(_write(tmp_path / "p.txt", "a\nb\na\n"), dedupe=True)
    assert sampler.prompts == ("a", "b")


def test_prompt_batch():
    batch = PromptBatch(prompts=["a", "b"], condition=torch.zeros(2, 3))
    assert len(batch) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.prompts = []
