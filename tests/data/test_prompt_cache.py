"""The prompt cache on the tiny offline SD3 pipeline: build, reopen, gather, refuse, sample, train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.models.test_sd3_adapter import T5_TOKENS, TOKENS, _pipeline

from dmdr_fast.conditions import cat_conds
from dmdr_fast.data.prompt_cache import (
    CachedPromptSampler,
    PromptCache,
    PromptCacheMismatchError,
    build_prompt_cache,
    install_null_condition,
)
from dmdr_fast.data.prompts import PromptBatch, PromptSampler
from dmdr_fast.models.sd3 import SD3Adapter, SD3Condition

# Short: the tiny byte-level CLIP tokenizer keeps 6 characters (8 tokens with BOS/EOS).
PROMPTS = ["a cat", "dog", "red", "sky", "a b", "tree", "sun"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    return _pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture
def adapter(pipe) -> SD3Adapter:
    return SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)


def _assert_equal(a: SD3Condition, b: SD3Condition) -> None:
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled_projections, b.pooled_projections, rtol=0, atol=0)


def _one_by_one(adapter: SD3Adapter, prompts: list[str]) -> SD3Condition:
    # Batch-size-1 encodings: what a batch_size=1 build stores, bit for bit (batched matmuls may
    # round differently for different batch sizes).
    return cat_conds([adapter.encode_condition([p]) for p in prompts])


def test_build_layout_and_metadata(adapter: SD3Adapter, tmp_path: Path):
    out = build_prompt_cache(adapter, PROMPTS, tmp_path / "c", shard_size=3, progress=False, model_id="m/sd3")
    assert out == tmp_path / "c"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "cache.json",
        "null.safetensors",
        "prompts.jsonl",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    assert not (tmp_path / "c.tmp").exists()
    meta = json.loads((out / "cache.json").read_text())
    assert meta["version"] == 1 and meta["count"] == 7 and meta["model_id"] == "m/sd3"
    assert meta["fingerprint"] == adapter.text_fingerprint()
    assert meta["condition_class"] == {"module": "dmdr_fast.models.sd3", "qualname": "SD3Condition"}
    assert meta["fields"] == {
        "prompt_embeds": {"shape": [TOKENS + T5_TOKENS, 16], "dtype": "float32"},
        "pooled_projections": {"shape": [8], "dtype": "float32"},
    }
    assert [s["count"] for s in meta["shards"]] == [3, 3, 1]
    lines = (out / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == PROMPTS


def test_reopened_conditions_equal_encode_condition(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False)  # one batch of 7
    cache = PromptCache.open(tmp_path / "c", adapter)
    assert len(cache) == 7 and cache.prompts == PROMPTS and cache.condition_class is SD3Condition
    cond = cache.condition(list(range(7)))
    assert isinstance(cond, SD3Condition) and cond.prompt_embeds.device.type == "cpu"
    reference = adapter.encode_condition(PROMPTS)
    _assert_equal(cond, reference)
    # Without an adapter the condition class is imported by name.
    plain = PromptCache.open(tmp_path / "c")
    assert plain.condition_class is SD3Condition
    expected = SD3Condition(reference.prompt_embeds[[4, 1]], reference.pooled_projections[[4, 1]])
    _assert_equal(plain.condition(torch.tensor([4, 1])), expected)


def test_multi_shard_gather(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", shard_size=3, batch_size=1, progress=False)
    cache = PromptCache.open(tmp_path / "c", adapter)
    reference = _one_by_one(adapter, PROMPTS)
    for indices in ([6, 0, 3, 3, 5, 0, 2], [2, 3], [6], list(range(7))):
        expected = SD3Condition(reference.prompt_embeds[indices], reference.pooled_projections[indices])
        _assert_equal(cache.condition(indices), expected)
        _assert_equal(cache.condition(torch.tensor(indices)), expected)
    empty = cache.condition([])
    assert empty.prompt_embeds.shape == (0, TOKENS + T5_TOKENS, 16) and empty.pooled_projections.shape == (
        0,
        8,
    )
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        cache.condition([0, 7])
    with pytest.raises(IndexError):
        cache.condition([-1])


def test_bf16_storage(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", dtype="bfloat16", shard_size=4, progress=False)
    cache = PromptCache.open(tmp_path / "c", adapter)
    assert cache.fields["prompt_embeds"]["dtype"] == "bfloat16"
    cond = cache.condition([5, 1])
    assert cond.prompt_embeds.dtype == cond.pooled_projections.dtype == torch.bfloat16
    reference = adapter.encode_condition(PROMPTS)
    torch.testing.assert_close(
        cond.prompt_embeds.float(), reference.prompt_embeds[[5, 1]], rtol=1e-2, atol=1e-2
    )
    assert cache.null_condition().prompt_embeds.dtype == torch.bfloat16
    # The stored dtype is part of the cache identity: the fp32 request is not a no-op.
    with pytest.raises(PromptCacheMismatchError, match="storage_dtype"):
        build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="floating"):
        build_prompt_cache(adapter, PROMPTS, tmp_path / "d", dtype=torch.int8, progress=False)


def test_null_condition(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False)
    null = PromptCache.open(tmp_path / "c", adapter).null_condition()
    assert null.prompt_embeds.shape == (1, TOKENS + T5_TOKENS, 16)
    _assert_equal(null, adapter.null_condition(1))


def test_fingerprint_mismatch_names_the_key(adapter: SD3Adapter, pipe, tmp_path: Path, monkeypatch):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False, model_id="a")
    longer = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS + 1)
    with pytest.raises(PromptCacheMismatchError, match=r"'max_sequence_length': stored 3 vs model 4") as info:
        PromptCache.open(tmp_path / "c", longer)
    assert isinstance(info.value, ValueError) and "dmdr-fast cache-prompts" in str(info.value)
    fingerprint = {**adapter.text_fingerprint(), "text_encoder_2": "CLIPTextModel:0000"}
    monkeypatch.setattr(adapter, "text_fingerprint", lambda: fingerprint)
    with pytest.raises(PromptCacheMismatchError, match="'text_encoder_2'") as info:
        PromptCache.open(tmp_path / "c", adapter)
    assert "max_sequence_length" not in str(info.value)  # only the differing keys are named
    monkeypatch.undo()
    with pytest.raises(PromptCacheMismatchError, match="'model_id': stored 'a' vs model 'b'"):
        PromptCache.open(tmp_path / "c", adapter, model_id="b")
    PromptCache.open(tmp_path / "c", adapter, model_id="a")
    with pytest.raises(PromptCacheMismatchError, match=r"'max_sequence_length': stored 3 vs model 4"):
        build_prompt_cache(longer, PROMPTS, tmp_path / "c", progress=False, model_id="a")


def test_condition_class_mismatch(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False)

    class Other:  # duck-typed adapter: same fingerprint, another condition class
        condition_class = PromptBatch

        def text_fingerprint(self):
            return adapter.text_fingerprint()

    with pytest.raises(PromptCacheMismatchError, match="condition_class"):
        PromptCache.open(tmp_path / "c", Other())


def test_interrupted_build_leaves_no_complete_cache_and_continues(
    adapter: SD3Adapter, tmp_path: Path, monkeypatch
):
    calls = []
    encode = adapter.encode_condition

    def failing(prompts):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise RuntimeError("killed mid-build")
        return encode(prompts)

    monkeypatch.setattr(adapter, "encode_condition", failing)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_prompt_cache(adapter, PROMPTS, tmp_path / "c", batch_size=2, shard_size=2, progress=False)
    assert not (tmp_path / "c").exists() and (tmp_path / "c.tmp" / "progress.json").is_file()
    with pytest.raises(ValueError, match="not a complete prompt cache"):
        PromptCache.open(tmp_path / "c")
    with pytest.raises(ValueError, match="not a complete prompt cache"):
        PromptCache.open(tmp_path / "c.tmp")  # the partial build has no cache.json
    # The same build again continues after the one complete shard: only the rest is encoded, and
    # the result equals an uninterrupted build.
    calls.clear()
    monkeypatch.setattr(
        adapter, "encode_condition", lambda prompts: calls.append(list(prompts)) or encode(prompts)
    )
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", batch_size=2, shard_size=2, progress=False)
    encoded = [p for c in calls for p in c if p]  # ("" is the null condition's encoding)
    assert encoded == PROMPTS[2:] and not (tmp_path / "c.tmp").exists()
    monkeypatch.undo()
    build_prompt_cache(adapter, PROMPTS, tmp_path / "clean", batch_size=2, shard_size=2, progress=False)
    resumed, clean = PromptCache.open(tmp_path / "c", adapter), PromptCache.open(tmp_path / "clean", adapter)
    assert resumed.prompts == clean.prompts == PROMPTS
    _assert_equal(resumed.condition(torch.arange(7)), clean.condition(torch.arange(7)))
    # Leftovers of another build (other sizes, or no progress at all) are replaced, not continued.
    (tmp_path / "d.tmp").mkdir()
    (tmp_path / "d.tmp" / "shard_00000.safetensors").write_bytes(b"partial")
    build_prompt_cache(adapter, PROMPTS, tmp_path / "d", progress=False)
    assert len(PromptCache.open(tmp_path / "d", adapter)) == 7 and not (tmp_path / "d.tmp").exists()
    # A failing overwrite keeps the old complete cache.
    monkeypatch.setattr(adapter, "encode_condition", lambda prompts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_prompt_cache(adapter, PROMPTS[:3], tmp_path / "d", overwrite=True, progress=False)
    monkeypatch.undo()
    assert PromptCache.open(tmp_path / "d", adapter).prompts == PROMPTS


def test_rerun_is_a_noop_and_a_different_build_needs_overwrite(
    adapter: SD3Adapter, tmp_path: Path, monkeypatch, capsys
):
    out = build_prompt_cache(adapter, PROMPTS, tmp_path / "c", progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(adapter, "encode_condition", lambda prompts: pytest.fail("re-encoded"))
    assert build_prompt_cache(adapter, PROMPTS, out, shard_size=2) == out
    assert "up to date" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    monkeypatch.undo()
    with pytest.raises(PromptCacheMismatchError, match="prompts_sha256"):
        build_prompt_cache(adapter, PROMPTS[:4], out, progress=False)
    build_prompt_cache(adapter, PROMPTS[:4], out, overwrite=True, progress=False)
    assert PromptCache.open(out, adapter).prompts == PROMPTS[:4]
    assert not (tmp_path / "c.old").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a complete prompt cache"):
        build_prompt_cache(adapter, PROMPTS, tmp_path / "other", progress=False)


def test_cached_sampler_is_deterministic(adapter: SD3Adapter, tmp_path: Path):
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", shard_size=3, progress=False)
    cache = PromptCache.open(tmp_path / "c", adapter)
    sampler = CachedPromptSampler(cache, device="cpu")
    assert len(sampler) == 7
    batch = sampler.sample(5, torch.Generator().manual_seed(7))
    again = sampler.sample(5, torch.Generator().manual_seed(7))
    assert isinstance(batch, PromptBatch) and len(batch) == 5
    assert batch.prompts == again.prompts
    _assert_equal(batch.condition, again.condition)
    # Same draws as the raw-prompt sampler, and the condition belongs to the drawn prompts.
    assert batch.prompts == PromptSampler(PROMPTS).sample(5, torch.Generator().manual_seed(7))
    _assert_equal(batch.condition, cache.condition([PROMPTS.index(p) for p in batch.prompts]))
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0, torch.Generator())


def test_training_without_text_encoders(tmp_path: Path):
    pipe = _pipeline(tmp_path / "sd3")  # its own pipeline: dropping the encoders mutates it
    adapter = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    build_prompt_cache(adapter, PROMPTS, tmp_path / "c", dtype=torch.bfloat16, progress=False)
    cache = PromptCache.open(tmp_path / "c", adapter)
    adapter.drop_text_encoders()
    assert not adapter.can_encode and pipe.text_encoder is None
    with pytest.raises(ValueError, match="dropped"):
        adapter.encode_condition(["a cat"])
    batch = CachedPromptSampler(cache).sample(2, torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = adapter.velocity(x, torch.tensor([0.3, 0.7]), batch.condition)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    PromptCache.open(tmp_path / "c", adapter)  # the fingerprint survives dropping the encoders
    install_null_condition(adapter, cache)
    null = adapter.null_condition(2)
    assert null.prompt_embeds.shape == (2, TOKENS + T5_TOKENS, 16)
    assert null.prompt_embeds.dtype == torch.bfloat16  # the cache's, not the one encoded before the drop
    torch.testing.assert_close(
        null.pooled_projections, cache.null_condition().pooled_projections.expand(2, -1)
    )
    with torch.no_grad():
        v_null = adapter.velocity(x, torch.tensor([0.3, 0.7]), null)
    assert torch.isfinite(v_null).all() and not torch.equal(v, v_null)
