"""LoRA for the student: a trained low-rank update of every linear projection, the base weights frozen.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685. OPSD (arXiv 2601.18734) trains
LoRA r 64, alpha 128 on q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (its scripts/run_opsd.sh);
`python train.py --lora_r 64` does the same (off by default: --lora_r 0 is full fine-tuning).

One adapted projection, weight W (d_out, d_in), rank r, input x (.., d_in):

    adapter on:   h = W x + s * B (A x),     A: (r, d_in), B: (d_out, r),  s = alpha / r
    adapter off:  h = W x                                              (the base model, bit for bit)
    init:         A ~ Kaiming-uniform, B = 0, so the adapted model starts as exactly the base model
    merged:       W' = W + s * B A   (d_out, d_in): one dense matrix, what an inference engine loads

Who uses what:
  train.py    add_lora() right after loading the student; the optimizer and the gradient clip see only A and B
              (the parameters with requires_grad); checkpoints hold the adapter in peft's format (ckpt/adapter/,
              for --resume) and the merged model (ckpt/model/, then final/), a plain folder that transformers
              and vLLM load without peft.
  teacher.py  frozen = the student's own network with the adapter off (the base model IS the initial policy,
              so no copy of the weights); live = the adapter on; ema = an EMA of A and B only, put into the
              adapter for the teacher's forward.
  rollout.py  vLLM receives merged_weights() under the base model's parameter names; transformers' generate
              runs the adapted model itself.

Choices (the OPSD paper says only "LoRA, rank 64"; the reasons are in docs/choices.md):
  - alpha defaults to 2 r, as in OPSD's runs (docs/choices.md, choice 40).
  - No dropout on the adapter's input: the data stays exactly on-policy (docs/choices.md, choice 41).
  - Targets: the projections of the transformer blocks, never lm_head or the embeddings (docs/choices.md, choice 42).
  - Merged weights are new tensors, one layer at a time; never merged in place (docs/choices.md, choice 43).

Example:
    python lora.py      # a tiny Llama: adapter on/off, merged weights reproduce the adapted forward
"""

import collections
import os
import sys

import torch

# every linear projection of a Llama / Qwen-style block (docs/choices.md, choice 42)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, *, r, alpha, dropout=0.0, targets=TARGETS):
    """Wrap a transformers causal LM in a peft model with one LoRA adapter ("default") on `targets`.
    A and B are trainable, every other parameter is frozen (requires_grad False); B = 0, so the output is
    unchanged until the first update."""
    from peft import LoraConfig, get_peft_model

    bad = [t for t in targets if "lm_head" in t or "embed" in t]
    if bad:
        raise ValueError(f"LoRA targets {bad}: only the projections of the transformer blocks "
                         "(docs/choices.md, choice 42)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model):
    """True for a peft-wrapped model. peft is imported only when LoRA is on, so without it nothing is one
    (and a full fine-tuning run never imports it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def lora_layers(model):
    """{name: layer} of the LoRA layers inside model (a peft model, or the transformers model it wraps)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def adapter_params(model):
    """{name: parameter} of the adapter's A and B matrices: what the optimizer trains, the EMA teacher averages."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def full(t):
    """The whole tensor: an FSDP2 DTensor shard is gathered (a collective, every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(t, p):
    """The whole tensor t laid out like the parameter p: under FSDP2 this rank's shard of it, sliced locally
    (src_data_rank=None: no communication, every rank holds t); otherwise t itself."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)


@torch.no_grad()
def merged_weights(model):
    """Stream (name, tensor) over the base model's parameters with every adapted weight merged, W + s * B A, under
    the base model's own names ("model.layers.0.self_attn.q_proj.weight"); A and B themselves are not yielded.

    One layer at a time, into new tensors: the training module keeps its adapter separate
    (docs/choices.md, choice 43). A tied output layer comes out as its own entry, lm_head.weight (named_parameters
    with remove_duplicate=False), the very tensor yielded for the embeddings (gathered once; save_pretrained then
    stores it once)."""
    net = model.get_base_model() if is_lora(model) else model
    layers = lora_layers(net)
    named = list(net.named_parameters(remove_duplicate=False))
    n_names = collections.Counter(id(p) for _, p in named)
    tied = {}  # a tied parameter is gathered once and yielded under each of its names, as one tensor
    for name, p in named:
        if ".lora_A." in name or ".lora_B." in name:
            continue  # folded into the base weight below
        owner, sep, leaf = name.partition(".base_layer.")  # "...q_proj" . "base_layer" . "weight"
        if id(p) in tied:
            yield (f"{owner}.{leaf}" if sep else name), tied[id(p)]
            continue
        t = full(p.detach())
        if sep:
            layer = layers[owner]
            if leaf == "weight" and not layer.disable_adapters:
                assert not layer.merged, ("the training module must never be merged in place "
                                          "(docs/choices.md, choice 43)")
                for a in layer.active_adapters:
                    t = t + full(layer.get_delta_weight(a))  # get_delta_weight(a) = s * B A, (d_out, d_in)
            name = f"{owner}.{leaf}"
        if n_names[id(p)] > 1:
            tied[id(p)] = t
        yield name, t


def save_adapter(model, folder, state_dict=None):
    """The adapter in peft's format (adapter_config.json + adapter_model.safetensors), A and B only.
    state_dict: the adapter's (or the whole model's) tensors under their parameter names, already gathered
    (FSDP2); None reads the model's own."""
    model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)


def load_adapter(model, folder):
    """Put the A and B written by save_adapter(folder) back into the model's adapter (for --resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if ".lora_A." in k or ".lora_B." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter in {folder} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


if __name__ == "__main__":
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    student = add_lora(copy.deepcopy(base), r=4, alpha=8)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in student.parameters())
    print(f"trainable (A, B): {n_train:,} of {n_all:,} parameters")
    ids = torch.tensor([[1, 5, 9, 11, 3, 7]])
    with torch.no_grad():
        print("B = 0: adapted == base exactly:", torch.equal(student(input_ids=ids).logits, base(ids).logits))
        for name, p in adapter_params(student).items():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # as if trained: B = 0 would make the adapter a no-op
        on = student(input_ids=ids).logits
        with student.disable_adapter():
            off = student(input_ids=ids).logits
        merged = copy.deepcopy(base)
        merged.load_state_dict(dict(merged_weights(student)))
        print("random B: adapter off == base exactly:", torch.equal(off, base(ids).logits))
        print(f"          max |adapter on - base| = {(on - off).abs().max():.3f}")
        print(f"          max |adapter on - merged model| = {(on - merged(ids).logits).abs().max():.2e}")
