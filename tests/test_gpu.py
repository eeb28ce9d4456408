"""GPU checks (`make gpu-check`): the CUDA paths that CI, on CPU, cannot run. Every test here skips cleanly
without a GPU (and the vLLM ones without vllm installed), so the suite stays green on CPU.

They train a small random Llama built here (hidden 128, 4 layers) with a word-level tokenizer over Qwen3's
vocabulary (bench/gpu_check.py), so nothing is downloaded or read from a cache: a GPU machine may have only the
repository. tests/test_gpu_rehearsal.py builds it on a CPU under the GPU machine's conditions.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPU == 0, reason="no CUDA GPU")]
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
needs_2_gpus = pytest.mark.skipif(N_GPU < 2, reason="needs 2 GPUs")


def build_small_model(out):
    """A small random Llama (hidden 128, 4 blocks) with bench/gpu_check.py's word-level tokenizer: Qwen3's full
    151,936-entry vocabulary, its special tokens at their ids, a ChatML template. Built from nothing: no hub, no
    cache, no embedded model (a GPU machine has none of them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check

    vocab = 151936
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=gpu_check.QWEN3_SPECIAL["<|endoftext|>"],
                      eos_token_id=gpu_check.QWEN3_SPECIAL["<|im_end|>"],
                      pad_token_id=gpu_check.QWEN3_SPECIAL["<|endoftext|>"])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    gpu_check.build_tokenizer(vocab, out)
    return str(out)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("small_llama"))


def run_train(out_dir, *args, nproc=None, timeout=900):
    """train.py alone (nproc None) or under torchrun with nproc processes."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "train.py"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    p = subprocess.run(cmd + ["--out_dir", str(out_dir), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


SMALL = ["--steps", "2", "--prompts_per_step", "4", "--max_new_tokens", "16", "--micro_batch", "2",
         "--dtype", "bfloat16", "--lr", "1e-4"]


def check_run(metrics, out_dir):
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(r["train/skipped_steps"] == 0 for r in metrics)
    assert all(r["loss/total"] == r["loss/total"] for r in metrics)  # not NaN
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "final"))  # a plain folder, loads as it is


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", ["opsd", "dasd"])
def test_cuda_train_hf_rollout(tmp_path, small_model_dir, method, lora):
    extra = ["--lora_r", "8"] if lora else []
    m = run_train(tmp_path, "--model", small_model_dir, "--method", method, "--exposure", "atesd",
                  "--rollout", "hf", "--chunk_size", "8", *SMALL, *extra)
    check_run(m, tmp_path)


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cuda_train_vllm_rollout(tmp_path, small_model_dir, lora):
    extra = ["--lora_r", "8"] if lora else []
    m = run_train(tmp_path, "--model", small_model_dir, "--method", "dasd", "--exposure", "atesd",
                  "--rollout", "vllm", "--vllm_gpu_memory_utilization", "0.2", *SMALL, *extra)
    check_run(m, tmp_path)
    assert m[1]["time/sync"] > 0.0


@needs_vllm
def test_cuda_vllm_sleep_wake(tmp_path, small_model_dir):
    m = run_train(tmp_path, "--model", small_model_dir, "--method", "opsd", "--exposure", "full",
                  "--rollout", "vllm", "--vllm_sleep", "--vllm_gpu_memory_utilization", "0.2", *SMALL)
    check_run(m, tmp_path)


@needs_vllm
@needs_2_gpus
def test_cuda_vllm_external_launcher_two_ranks(tmp_path, small_model_dir):
    # one colocated engine per rank (vLLM's external_launcher), weights synced after every step
    m = run_train(tmp_path, "--model", small_model_dir, "--method", "dasd", "--exposure", "atesd",
                  "--rollout", "vllm", "--vllm_gpu_memory_utilization", "0.2", *SMALL, nproc=2)
    check_run(m, tmp_path)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cuda_fsdp2_resume(tmp_path, small_model_dir, lora):
    # FSDP2 over every available GPU (one process per GPU, at most 2): 4 steps straight, against 2 steps,
    # a checkpoint, and 2 more steps after --resume
    nproc = min(N_GPU, 2)
    extra = ["--lora_r", "8"] if lora else []
    args = ["--model", small_model_dir, "--method", "opsd", "--exposure", "full", "--rollout", "hf", "--fsdp",
            "--dtype", "float32", "--steps", "4", "--prompts_per_step", "4", "--max_new_tokens", "16",
            "--save_every", "2", "--lr", "1e-4", *extra]
    ref = run_train(tmp_path / "ref", *args, nproc=nproc)
    first = [a if a != "4" or i != args.index("--steps") + 1 else "2" for i, a in enumerate(args)]
    run_train(tmp_path / "cut", *first, nproc=nproc)
    got = run_train(tmp_path / "cut", *args, "--resume", nproc=nproc)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r_ref, r_got in zip(ref[2:], got[2:]):
        assert r_ref["loss/total"] == pytest.approx(r_got["loss/total"], rel=1e-4, abs=1e-6)
