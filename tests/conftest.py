"""Shared fixtures: the repository root on sys.path, the embedded model folder, a tiny in-memory Llama
(plain, and with a LoRA adapter)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted once, then cached)."""
    import model

    return model.embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_dir, tmp_path_factory):
    """A model folder train.py loads with --model: a random 2-layer Llama (hidden 64) with the embedded model's
    tokenizer and vocabulary, so that a dtype's code path runs end to end at a tiny cost on any CPU."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ref = AutoConfig.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ref.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
                      pad_token_id=ref.pad_token_id)
    out = str(tmp_path_factory.mktemp("tiny_model"))
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(out)
    return out


@pytest.fixture
def tiny_llama():
    """A tiny random Llama (vocab 64, 2 layers, hidden 32) in float32, built in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture
def tiny_lora(tiny_llama):
    """A copy of tiny_llama wrapped in a LoRA adapter (r 4, alpha 8, lora.py) with a random B: peft starts B
    at 0, which makes the adapter a no-op and every comparison with the base model vacuous. tiny_llama itself
    stays the plain base model, the reference."""
    import copy

    import lora

    student = lora.add_lora(copy.deepcopy(tiny_llama), r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.adapter_params(student).items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return student


# End-to-end runs write checkpoints (model + AdamW state, about 1.5 GB each): a passing test's
# tmp_path is deleted as soon as it passes, so the suite's disk use stays that of one run at a time
# (pytest would otherwise keep every folder until the session ends). A failing test keeps its folder.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(autouse=True)
def _free_tmp_path_on_success(request):
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    rep = getattr(request.node, "rep_call", None)
    if tmp is not None and rep is not None and rep.passed:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
