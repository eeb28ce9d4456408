"""bench/gpu_memory.py: its parameter counts against transformers' and peft's own models, its byte arithmetic
against a hand computation, its README parsing. Models are built on the meta device (shapes only, no memory)."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_memory  # noqa: E402

GiB = 2**30


def config(name):
    with open(os.path.join(ROOT, "bench", "configs", name + ".json")) as f:
        return json.load(f)


def meta_model(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def unique_params(model):
    return {id(p): p for p in model.parameters()}.values()  # a tied matrix once


@pytest.mark.parametrize("name", ["qwen3-1.7b", "qwen3-4b", "qwen3-8b"])
def test_parameter_counts_equal_the_transformers_models(name):
    cfg = config(name)
    model = meta_model(cfg)
    shape = gpu_memory.Shape.from_config(cfg)
    assert shape.params() == sum(p.numel() for p in unique_params(model))
    emb = model.get_input_embeddings().weight
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not emb)
    assert shape.linear_params() == linear
    assert (model.get_output_embeddings().weight is emb) == shape.tied == (name != "qwen3-8b")
    # the public model cards' sizes: 1.7B (1.4B without embeddings), 4.0B (3.6B), 8.2B (6.95B)
    card = {"qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95)}[name]
    non_emb = shape.params() - shape.V * shape.H * (1 if shape.tied else 2)
    assert shape.params() / 1e9 == pytest.approx(card[0], abs=0.05)
    assert non_emb / 1e9 == pytest.approx(card[1], abs=0.05)


@pytest.mark.parametrize("targets", [None, "q_proj,v_proj"])
def test_lora_parameter_count_equals_peft(targets):
    import lora

    cfg = dict(config("qwen3-1.7b"), hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_hidden_layers=3, vocab_size=300)
    model = meta_model(cfg).to_empty(device="cpu")
    names = lora.TARGETS if targets is None else targets.split(",")
    adapted = lora.add_lora(model, r=8, alpha=16, targets=names)
    trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert gpu_memory.Shape.from_config(cfg).lora_params(8, names) == trained


def predict(*flags, nproc=8, model="qwen3-1.7b"):
    s, _ = gpu_memory.make_setup(["--model_config", os.path.join(ROOT, "bench", "configs", model + ".json"),
                                  "--nproc", str(nproc), "--rollout", "vllm", *flags])
    return gpu_memory.predict(s), s


def test_static_bytes_by_hand():
    """Weights, gradients, AdamW state and the teacher, from the parameter count alone."""
    cfg = config("qwen3-1.7b")
    P = sum(p.numel() for p in unique_params(meta_model(cfg)))
    emb = 151936 * 2048
    linear = P - emb - 28 * (2 * 2048 + 2 * 128) - 2048  # everything but the embeddings and the norms

    pred, _ = predict("--dtype", "bfloat16", "--vllm_gpu_memory_utilization", "0.3")
    st = pred["static"]
    assert st["weights (fp32 master)"] == 4 * P
    assert st["gradients (DDP buckets)"] == 4 * P
    assert st["optimizer (AdamW m, v)"] == 8 * P
    assert st["teacher copy"] == 2 * linear + 4 * (P - linear)  # bf16 linear layers, fp32 embeddings and norms
    assert st["vLLM engine"] == pytest.approx(0.3 * 80 * 0.99 * GiB)

    pred, _ = predict("--dtype", "float32", "--teacher", "ema")
    assert pred["static"]["teacher copy"] == 4 * P  # fp32 copy: the EMA must accumulate small updates
    pred, _ = predict("--teacher", "live", "--optimizer", "sgd", "--vllm_sleep")
    assert pred["static"]["teacher copy"] == pred["static"]["optimizer (AdamW m, v)"] == 0
    assert pred["static"]["vLLM engine"] == 0 and "rollout (vLLM awake)" in pred["moments"]

    r = 64  # LoRA on every projection: r (d_in + d_out) per projection and block
    per_block = r * ((2048 + 2048) + 2 * (2048 + 1024) + (2048 + 2048) + 2 * (2048 + 6144) + (6144 + 2048))
    pred, _ = predict("--lora_r", "64")
    assert pred["trained"] == 28 * per_block
    assert pred["static"]["optimizer (AdamW m, v)"] == 8 * 28 * per_block
    assert pred["static"]["gradients (DDP buckets)"] == 4 * 28 * per_block
    assert pred["static"]["teacher copy"] == 0  # the adapter switched off: no copy

    pred, _ = predict("--fsdp", nproc=4)
    assert pred["static"]["weights (fp32 master)"] == 4 * P / 4
    assert pred["static"]["optimizer (AdamW m, v)"] == 8 * P / 4


def test_activation_bytes_per_token_by_hand():
    """Qwen3-1.7B under bf16 autocast with sdpa: 26 H + 16 Q + 6 K + 8 I + 4 n bytes per token and block (the module
    docstring's derivation), 4 H with gradient checkpointing; in fp32 with eager attention 24 H + 24 Q + 8 K + 16 I +
    4 n S."""
    H, Q, K, I, n = 2048, 2048, 1024, 6144, 16
    pred, s = predict("--dtype", "bfloat16", "--max_new_tokens", "2048", "--prompts_per_step", "32")
    assert pred["gradient_checkpointing"] and pred["chunk_size"] == 512  # the GPU defaults
    Ns = 4 * (256 + 2048)  # 4 sequences per rank, prompt 256 + response 2048
    assert pred["moments"]["loss"]["student activations"] == 28 * Ns * 4 * H
    pred, _ = predict("--dtype", "bfloat16", "--max_new_tokens", "2048", "--prompts_per_step", "32",
                      "--gradient_checkpointing", "false")
    assert pred["moments"]["loss"]["student activations"] == 28 * Ns * (26 * H + 16 * Q + 6 * K + 8 * I + 4 * n)
    assert 26 * H + 16 * Q + 6 * K + 8 * I + 4 * n == 141376  # 138 KiB, as the docstrings say

    S = 256 + 64
    pred, _ = predict("--dtype", "float32", "--attn", "eager", "--max_new_tokens", "64", "--prompts_per_step", "8",
                      "--gradient_checkpointing", "false", nproc=1)
    assert pred["moments"]["loss"]["student activations"] == 28 * 8 * S * (24 * H + 24 * Q + 8 * K + 16 * I + 4 * n * S)


def test_plain_loss_holds_several_full_logits_and_the_chunked_loss_does_not():
    X = 4 * 2048 * 151936  # B T V
    plain, _ = predict("--dtype", "bfloat16", "--max_new_tokens", "2048", "--prompts_per_step", "32", "--method",
                       "opsd", "--exposure", "full", "--chunk_size", "0")
    assert plain["moments"]["loss"]["loss (logits or chunk buffers)"] == (2 * 2 + 30) * X  # 34 B per logit, 39 GiB
    chunked, _ = predict("--dtype", "bfloat16", "--max_new_tokens", "2048", "--prompts_per_step", "32", "--method",
                         "opsd", "--exposure", "full")
    assert chunked["chunk_size"] == 512
    assert chunked["moments"]["loss"]["loss (logits or chunk buffers)"] < 4 * GiB


def test_readme_commands_are_parsed_with_their_continuation_lines(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text\n```\ntorchrun --nproc_per_node=4 train.py --model Qwen/Qwen3-1.7B \\\n"
                      "    --method opsd --lora_r 64 \\\n    --max_new_tokens 1024\npython evaluate.py --x 1\n```\n"
                      "train.py      one file: python train.py, or torchrun --nproc_per_node=N train.py\n"
                      "torchrun --nproc_per_node 2 other.py --a 1\n")
    cmds = gpu_memory.readme_commands(str(readme))
    assert cmds == [(3, 4, ["--model", "Qwen/Qwen3-1.7B", "--method", "opsd", "--lora_r", "64",
                            "--max_new_tokens", "1024"])]


def test_the_repository_readme_commands_fit_80_gb():
    assert gpu_memory.run_readme([]) == 0
