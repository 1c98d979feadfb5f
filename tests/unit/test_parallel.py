"""parallel/ without processes: activation checkpointing, the FSDP loss scaler, the backend and
precision refusals of build_engine (multi-process engine runs: tests/distributed/)."""
import pytest
import torch

from helpers import TINY_STAGE1


def test_activation_checkpointing_gives_the_same_gradients(tiny_assets):
    """Checkpointed LLM layers, eager and compiled inside the checkpoint (parallel.activation_checkpointing
    with train.compile): the plain model's gradients, and the compiled layers really run compiled."""
    from torch._dynamo.utils import counters

    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder
    from mgpt4_dist.parallel import apply_ac

    cfg = load_config(TINY_STAGE1, list(tiny_assets["overrides"]))
    tok = load_tokenizer(cfg.model.llm_path)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed, compiled in ((False, False), (True, False), (True, True)):
        model = build_minigpt4(cfg.model, seed=0)
        if checkpointed:
            assert apply_ac(model.llm, compile_layers=compiled) == len(model.llm.model.layers)
        text = SequenceBuilder(tok, model.num_image_tokens, 32, "\n", 3800)(["a red cube", "two blue balls on grass"])
        graphs_before = counters["stats"]["unique_graphs"]
        model(images, text).backward()
        # the two LLM layer classes (padding-free, tail) each give a graph
        assert counters["stats"]["unique_graphs"] - graphs_before >= (2 if compiled else 0)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for got in grads[1:]:
        for key in grads[0]:
            torch.testing.assert_close(got[key], grads[0][key], rtol=1e-6, atol=1e-7)


def test_dynamic_loss_scaler_halves_on_overflow_and_grows_after_a_window():
    from mgpt4_dist.parallel.fsdp_engine import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=1024.0, window=3, min_scale=1.0)
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 1024.0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 1024.0


def test_unknown_backend_names_the_choices():
    from mgpt4_dist.config import JobConfig
    from mgpt4_dist.parallel import build_engine

    cfg = JobConfig()
    cfg.parallel.backend = "ddp"
    with pytest.raises(ValueError, match="deepspeed or fsdp"):
        build_engine(cfg, torch.nn.Linear(1, 1), 1, 1)


def test_precision_check_gives_deepspeeds_answer_on_this_machine():
    """The check refuses exactly what DeepSpeed's accelerator refuses, whichever kind of CPU runs this."""
    from deepspeed.accelerator import get_accelerator

    from mgpt4_dist.parallel.base import precision_problem

    accelerator = get_accelerator()
    device = torch.device("cpu" if accelerator.device_name() == "cpu" else accelerator.device_name(0))
    assert (precision_problem("fp16", device) is None) == bool(accelerator.is_fp16_supported())
    assert (precision_problem("bf16", device) is None) == bool(accelerator.is_bf16_supported())
    assert precision_problem("fp32", device) is None


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_fp16_on_a_cpu_without_onednn_fp16_is_refused_before_the_backend(backend, monkeypatch):
    from mgpt4_dist.config import ConfigError, JobConfig
    from mgpt4_dist.errors import UserError
    from mgpt4_dist.parallel import base, build_engine

    cfg = JobConfig()
    cfg.parallel.backend, cfg.train.precision = backend, "fp16"
    monkeypatch.setattr(base, "_cpu_has_onednn_fp16", lambda: False)
    with pytest.raises(ConfigError) as e:  # a UserError: mgpt4-train prints it as one line and exits 2
        build_engine(cfg, torch.nn.Linear(1, 1), 1, 1)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith("train.precision=fp16 is not supported on this CPU (no oneDNN fp16")
    assert str(e.value).endswith("use train.precision=bf16 or fp32, or run on a GPU")
    monkeypatch.setattr(base, "_cpu_has_onednn_fp16", lambda: True)
    assert base.precision_problem("fp16", torch.device("cpu")) is None
    assert base.precision_problem("bf16", torch.device("cpu")) is None  # DeepSpeed's CPU accelerator: always
