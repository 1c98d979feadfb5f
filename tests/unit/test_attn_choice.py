"""Attention kernel choice: flash-attn only when installed and on CUDA, else SDPA."""
import pytest

from mgpt4_dist.models import llm


def test_auto_falls_back_to_sdpa_on_cpu():
    assert llm.choose_attn_impl("auto", "cpu") == "sdpa"


def test_auto_picks_flash_when_present_on_cuda(monkeypatch):
    monkeypatch.setattr(llm, "flash_attn_available", lambda: True)
    assert llm.choose_attn_impl("auto", "cuda") == "flash_attention_2"
    monkeypatch.setattr(llm, "flash_attn_available", lambda: False)
    assert llm.choose_attn_impl("auto", "cuda") == "sdpa"


def test_flash_requested_without_cuda_or_package_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        llm.choose_attn_impl("flash", "cpu")
    monkeypatch.setattr(llm, "flash_attn_available", lambda: False)
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        llm.choose_attn_impl("flash", "cuda")


def test_explicit_choices_pass_through():
    assert llm.choose_attn_impl("sdpa", "cuda") == "sdpa"
    assert llm.choose_attn_impl("eager", "cpu") == "eager"


def test_flash_attn_detection_matches_import():
    import importlib.util

    assert llm.flash_attn_available() == (importlib.util.find_spec("flash_attn") is not None)
