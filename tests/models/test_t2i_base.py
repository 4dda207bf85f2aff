"""TextToImageAdapter base features on the tiny SD3 pipeline: tiny VAE, memory savers, fingerprints.

The pipeline is the library's tiny SD3 one without T5 (``build_random_pipeline(..., t5=False)``, as
in ``test_sd3_adapter.py``); the tiny VAE is :func:`dmdr_fast.models.random_parts.tiny_autoencoder`.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderTiny

from dmdr_fast.models.random_parts import tiny_autoencoder
from dmdr_fast.models.sd3 import SD3Adapter
from dmdr_fast.pipelines.random import build_random_pipeline

T5_TOKENS = 3  # zero T5 tokens appended by encode_prompt when text_encoder_3 is None


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    pipe = build_random_pipeline("sd3", "tiny", tmp_path_factory.mktemp("sd3"), t5=False)
    assert pipe.text_encoder_3 is None
    return pipe


def _tiny_autoencoder() -> AutoencoderTiny:
    """A tiny ``AutoencoderTiny`` with SD3's latent scaling and shift (the pipeline VAE's)."""
    return tiny_autoencoder(0, scaling=1.5305, shift=0.0609)


def test_tiny_vae_decodes_differentiably_and_can_be_removed(pipe, tmp_path):
    adapter = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    x = torch.randn(2, *adapter.sample_shape, requires_grad=True)
    full = adapter.decode(x)
    tiny = _tiny_autoencoder()
    tiny.save_pretrained(tmp_path / "taesd")
    adapter.use_tiny_vae(str(tmp_path / "taesd"))  # a local folder, as model.tiny_vae gives it
    images = adapter.decode(x)
    assert images.shape == full.shape and images.min() >= 0 and images.max() <= 1
    assert not torch.allclose(images, full)
    images.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in adapter.tiny_vae.parameters())
    adapter.use_tiny_vae(None)
    torch.testing.assert_close(adapter.decode(x), full)


def test_vae_slicing_and_tiling_keep_the_decode(pipe):
    adapter = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    x = torch.randn(3, *adapter.sample_shape)
    with torch.no_grad():
        want = adapter.decode(x)
        adapter.enable_memory_savers(vae_slicing=True)
        torch.testing.assert_close(adapter.decode(x), want, rtol=1e-5, atol=1e-5)
    pipe.vae.disable_slicing()


def test_gradient_checkpointing_keeps_outputs_and_gradients(pipe):
    adapter = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    cond = adapter.encode_condition(["a cat", "a dog"])
    x, t = torch.randn(2, *adapter.sample_shape), torch.tensor([0.3, 0.8])

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        adapter.network.zero_grad(set_to_none=True)
        adapter.network.requires_grad_(True)
        adapter.network.train()
        out = adapter.velocity(x, t, cond)
        out.square().mean().backward()
        grad = adapter.network.pos_embed.proj.weight.grad.clone()
        adapter.network.requires_grad_(False)
        return out.detach(), grad

    out, grad = run()
    adapter.enable_memory_savers(gradient_checkpointing=True)
    assert adapter.network.gradient_checkpointing
    out2, grad2 = run()
    adapter.network.disable_gradient_checkpointing()
    adapter.network.eval()
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-6)


def test_fingerprint_tracks_what_changes_the_conditions(pipe):
    a = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    b = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS + 1)
    fa, fb = a.text_fingerprint(), b.text_fingerprint()
    assert fa["family"] == "sd3" and {"text_encoder", "text_encoder_2", "tokenizer"} <= set(fa)
    assert fa != fb and fa["max_sequence_length"] == T5_TOKENS
    assert fa == SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS).text_fingerprint()


def test_null_condition_follows_the_adapter(pipe):
    adapter = SD3Adapter.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    null = adapter.null_condition(1)
    installed = type(null)(**{k: v.clone().to(torch.float64) for k, v in vars(null).items()})
    adapter.set_null_condition(installed)
    with pytest.raises(ValueError, match="batch size 1"):
        adapter.set_null_condition(adapter.encode_condition(["a", "b"]))
    with pytest.raises(ValueError, match="SD3Condition"):
        adapter.set_null_condition(torch.zeros(1))
    assert adapter.null_condition(3).prompt_embeds.shape[0] == 3
    assert adapter.null_condition(3).prompt_embeds.dtype == torch.float64  # the installed one
