"""On-policy self-distillation for math reasoning: OPSD, DASD, ATESD (and GRPO / SFT baselines), step by step.

Papers:
  OPSD  "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs"                  arXiv 2601.18734
  DASD  "Tailoring Teaching to Aptitude: Direction-Adaptive Self-Distillation"            arXiv 2605.22263
  ATESD "Adaptive Teacher Exposure for Self-Distillation in LLM Reasoning"                arXiv 2605.11458

One step of the algorithm (OPSD family), in the order main() calls it; each step is a banner below:
  1. sample_batch         the student samples y ~ p_S(. | x) for a batch of problems x    (rollout.py)
  2. add_teacher_context  the exposure schedule's alpha; the teacher sees x + reveal(y*, alpha)
                                                                                    (exposure.py, teacher.py)
  3. microbatch_loss      teacher forward (no grad) and student forward on the same tokens y; per-token loss
                          D(p_T || p_S) (OPSD) or entropy-routed pull/push (DASD)     (losses.py, chunked_loss.py)
  4. train_on_batch       the token mean over the global batch; backward, clip, one optimizer step
  5. sync_weights         mark the rollout engine stale (prepare_engine loads the new weights right before the
                          next rollout, waking a sleeping engine first) and move the EMA teacher
  6. observe_controller   tell the exposure controller how the loss moved (its reward arrives L steps later),
                          with teacher_answer_logprob (its guard) and the step's record (plumbing.step_record)
  GRPO adds group advantages between 1 and 2 (add_advantages); SFT replaces 1 by the reference solutions; the
  teacher-free control skips the teacher in 2 and 3.

Run:
  python train.py                                          # embedded SmolLM2-135M + embedded data, CPU
  python train.py --method opsd --exposure full --steps 20 # plain OPSD
  torchrun --nproc_per_node=8 train.py --model Qwen/Qwen3-1.7B ...   # GPUs: README.md has the full commands

Where this file departs from the textbook algorithms: full fine-tuning, fp32 master weights under bf16 autocast
(docs/choices.md, choice 11); one optimizer step per rollout batch (docs/choices.md, choice 26); the token mean over
the global batch (docs/choices.md, choice 4); rollouts re-seeded every step (docs/choices.md, choice 27); one
exposure controller per rank, no broadcast (docs/choices.md, choice 28).
"""

import contextlib
import math
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch

import chunked_loss
import entropy
import grader
import lora
import losses
import plumbing
import teacher as teacherlib

# -----------------------------------------------------------------------------------------------
# Config: one flat dataclass; every field's docstring is its --help text.


@dataclass
class Config:
    # --- what to train
    model: typing.Optional[str] = None
    """Hugging Face name or local folder. Default: the embedded SmolLM2-135M-Instruct (see model.py)."""
    data: str = "embedded"
    """Training problems: "embedded" (generated, see data.py), a JSONL/JSON/Parquet file, or a hub name."""
    problem_field: typing.Optional[str] = None
    """Field holding the problem text in --data (default: guessed from problem/question/prompt)."""
    solution_field: typing.Optional[str] = None
    """Field holding the reference solution in --data (default: guessed from solution/answer/...)."""
    answer_field: typing.Optional[str] = None
    """Field holding the final answer (default: answer, else the last \\boxed{} of the solution)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows of --data instead of stopping with an error."""
    method: str = "dasd"
    """opsd | dasd (entropy-routed pull/push KL) | dasd_adv (token-advantage form) | grpo | sft | teacher_free (a
    control with no teacher: a fixed negative advantage on each response's least likely sampled tokens)."""
    exposure: str = "auto"
    """How much of the reference the teacher sees: full (OPSD) | fixed (--alpha) | random | atesd (learned);
    auto = atesd for the distillation methods, full for grpo, sft and teacher_free (they have no teacher)."""
    alpha: float = 0.5
    """Exposure for --exposure fixed: the teacher sees the first ceil(alpha*m) of m solution steps."""
    teacher: str = "frozen"
    """Teacher weights: frozen (initial policy) | live (current student) | ema (EMA of the student)."""
    ema_decay: float = 0.99
    """Decay of the EMA teacher (--teacher ema)."""
    student_thinking: typing.Optional[bool] = None
    """enable_thinking for the student's chat template (Qwen3); None leaves the template's default."""
    teacher_thinking: typing.Optional[bool] = None
    """enable_thinking for the teacher's chat template (Qwen3); None leaves the template's default."""
    teacher_closed_think: bool = False
    """Open the teacher's turn like a non-thinking student's (Qwen3: an empty think block). Off: a thinking teacher
    scores the first token where it would write <think>, as OPSD's code does (docs/choices.md, choice 22)."""
    teacher_context: str = "reference"
    """Whose reference the teacher reads: reference (the problem's own) | wrong (another training problem's, at the
    same exposure: a control, docs/choices.md, choice 25)."""
    teacher_show_answer: bool = True
    """The teacher's context ends with the reference's answer line, as in the papers; false: the revealed steps only,
    a teacher that cannot copy the answer into the student's box (docs/choices.md, choice 23)."""
    distill_mask_answer: bool = False
    """opsd/dasd/dasd_adv: leave the final-answer span (from the response's last \\boxed on) out of the loss and its
    token mean, where a teacher that sees the answer pulls the box toward it (docs/choices.md, choice 23)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: loading a model must not execute foreign code."""

    # --- LoRA (lora.py; off by default: full fine-tuning)
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning. OPSD's runs use 64. The base weights stay frozen; only A and B train."""
    lora_alpha: typing.Optional[float] = None
    """LoRA scale numerator, update = (lora_alpha / lora_r) B A; None = 2 * lora_r, as OPSD's runs (r 64, alpha 128)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input. 0: with dropout the training forward is not the sampling policy."""
    lora_targets: str = ",".join(lora.TARGETS)
    """Comma-separated module names that get an adapter: every linear projection of the transformer blocks, as
    OPSD's runs (never lm_head or the embeddings)."""

    # --- batch and sampling
    steps: int = 20
    """Number of optimizer steps."""
    prompts_per_step: int = 8
    """Problems per step across all ranks (the global batch, in prompts)."""
    samples_per_prompt: int = 1
    """G, rollouts per problem (OPSD uses 1; GRPO needs >= 2)."""
    micro_batch: int = 8
    """Sequences per forward/backward on one rank (gradient accumulation above this)."""
    group_by_length: bool = True
    """With more than one micro-batch, fill them in order of response length (then prompt length), so each pads
    to lengths close to its own; the loss is a token mean over the whole batch, so only rounding changes."""
    max_new_tokens: int = 128
    """Response length cap; longer responses are cut and marked truncated."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; the loss divides both sides' logits by it too (OPSD)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1.0 = off: exact on-policy samples)."""
    top_k: int = -1
    """Top-k sampling for rollouts (-1 = off)."""

    # --- losses (see losses.py for the equations)
    beta: float = 0.0
    """Generalized JSD mix: 0 = KL(p_T||p_S) (forward, OPSD's best), 1 = KL(p_S||p_T) (reverse)."""
    clip: typing.Optional[float] = 0.05
    """OPSD per-vocabulary-entry clip tau of the divergence summands (None/0 disables)."""
    push_fraction: float = 0.2
    """DASD: the top push_fraction of each response's tokens by student entropy are pushed away. teacher_free: the
    share of each response's tokens, least likely first, that get its negative advantage."""
    hard_gate: bool = False
    """DASD: use the sign gate instead of the soft tanh gate."""
    push_weight: float = 1.0
    """DASD: weight of the push (away-from-teacher) term; 0 leaves the pull alone. teacher_free: the size of its fixed
    negative advantage."""
    pull_weight: float = 1.0
    """DASD: weight of the pull (toward-teacher) term; 0 leaves the push alone."""
    push_margin: typing.Optional[float] = None
    """DASD: cap of the bounded push divergence (None = the default in losses.py)."""
    adv_coef: float = 1.0
    """dasd_adv: coefficient of the entropy-routed teacher shaping term in the token advantage."""
    topk: typing.Optional[int] = None
    """opsd/dasd: the divergence on the teacher's top-k vocabulary entries, both sides renormalized over
    them (OPSD's top_k_loss); None = the full vocabulary. DASD's router keeps the full-vocabulary entropy."""
    chunk_size: int = -1
    """opsd/dasd/sft: >0 computes the loss from hidden states in chunks of this many tokens, never the full (T, V)
    logits (chunked_loss.py); 0 = the plain loss; -1 (auto, without --fsdp) = 256 on a CPU (faster there), 512 on a
    GPU for vocabularies of 64k+ entries (memory), 0 elsewhere (docs/choices.md, choice 16). A resume keeps it."""

    # --- exposure controller (ATESD; defaults in exposure.py, their reasons in docs/choices.md, choice 6)
    hold: typing.Optional[int] = None
    """ATESD: student updates each sampled alpha is held for (None = exposure.py default)."""
    lookahead: typing.Optional[int] = None
    """ATESD: steps after a decision over which its learning progress is summed."""
    gamma: typing.Optional[float] = None
    """ATESD: discount of the learning-progress reward."""
    lambda_gt: typing.Optional[float] = None
    """ATESD: weight of the teacher-grounded guard term (teacher log-prob of the reference answer)."""
    batch_decisions: typing.Optional[int] = None
    """ATESD: completed decisions per REINFORCE update of the controller."""
    controller_lr: typing.Optional[float] = None
    """ATESD: controller learning rate."""

    # --- optimization
    optimizer: str = "adamw"
    """adamw | sgd (plain SGD, no momentum: the update is exactly -lr * gradient, easy to check)."""
    lr: float = 2e-6
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (constant afterwards)."""
    grad_clip: float = 1.0
    """Clip of the global gradient norm (0 disables)."""
    fused_adamw: bool = True
    """AdamW's fused kernel (4.5x faster than torch's per-parameter loop on a CPU, bench/step_time.py); the same
    update to rounding; off under --fsdp."""

    # --- systems
    rollout: str = "auto"
    """Rollout backend: auto (vllm wherever it is installed, GPU or CPU; else hf) | vllm | hf."""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM: fraction of GPU memory for the colocated engine (weights + KV cache)."""
    vllm_tensor_parallel_size: int = 1
    """vLLM: tensor parallel size of each engine."""
    vllm_sleep: bool = False
    """vLLM (GPU): put the engine to sleep during the training phase to free its memory."""
    dtype: str = "auto"
    """bfloat16 (autocast, fp32 master weights) | float32 | auto (bfloat16 on GPU; on CPU the one whose
    matmuls are faster on this machine, measured at start; recorded in config.json)."""
    attn: str = "auto"
    """Attention kernel (transformers' attn_implementation): sdpa | eager | auto (eager on a CPU, measured faster
    there, docs/choices.md, choice 18; sdpa on a GPU). The same math to rounding; a resume keeps it."""
    gradient_checkpointing: typing.Optional[bool] = None
    """Recompute each block's activations in the backward instead of storing them (Qwen3-1.7B: 8 instead of 138 KiB
    per token and block, bench/gpu_memory.py). None (auto) = on with a GPU, off on a CPU. Same gradients."""
    fsdp: bool = False
    """Shard the student with FSDP2 (fully_shard) instead of DDP, for models that do not fit one device."""
    seed: int = 0
    """Seed of data order, rollouts and the controller (rollouts are offset by rank and step)."""

    # --- output
    out_dir: str = "runs/default"
    """Folder for metrics.jsonl, checkpoints (ckpt/) and the final model (final/)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end; -1: never, and no final/: a dry run that writes only logs)."""
    resume: bool = False
    """Continue from out_dir/ckpt exactly where it stopped."""
    tensorboard: bool = False
    """Also log to TensorBoard (out_dir/tb) if it is installed."""
    wandb: typing.Optional[str] = None
    """Also log to this W&B project if wandb is installed."""
    plan: bool = False
    """Print the resolved configuration, the data's row count and longest student and teacher sequences, and the
    per-GPU memory plan (bench/gpu_memory.py), then exit without training: non-zero if a row or the step does not
    fit. Append it to the command you would launch (under torchrun only rank 0 prints; the world size is torchrun's)."""
    plan_gpu_gb: typing.Optional[float] = None
    """--plan: the card's memory in GB (default: the visible GPU's, else 80)."""


def parse_config(argv=None):
    """Config from command-line flags: --<field> for every field, its docstring as the --help text."""
    return plumbing.parse_flags(Config, argv, description=__doc__.split("\n")[0])


# -----------------------------------------------------------------------------------------------
# Set-up: data, student, teacher, optimizer, exposure schedule and rollout engine, built once.


@dataclass
class Run:
    """What every step reads, built once by plumbing.setup (a record, not an object with behaviour)."""
    cfg: Config                      # the configuration that runs: the flags with their auto choices resolved
    asked: Config                    # the flags as given
    ddp: bool
    rank: int
    world: int
    device: torch.device
    rows: list                       # training problems: dicts with problem, solution, answer
    tok: typing.Any                  # the tokenizer
    student: torch.nn.Module         # the trained parameters (optimizer, checkpoints, weight sync)
    train_model: torch.nn.Module     # what the loss calls: the student or its DDP / FSDP wrapper
    teacher_model: typing.Optional[torch.nn.Module]  # None for grpo, sft and teacher_free (no teacher)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    expo: typing.Any                 # exposure schedule / ATESD controller (exposure.py)
    engine: typing.Any               # rollout engine (rollout.py); None for sft
    start_step: int
    n_skipped: int                   # steps skipped by the non-finite guard so far
    ckpt_dir: str
    engine_stale: bool = False       # the policy changed since the engine's weights were loaded

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """bf16 matmuls over fp32 master weights (docs/choices.md, choice 11); a no-op with --dtype float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")


# -----------------------------------------------------------------------------------------------
# Step 1. Rollout: this step's problems (a function of seed and step only, so resuming needs nothing
# but the step), and the student's own answers to them.


def step_rows(rows, cfg, step, rank, world):
    """The problems of this step for this rank: a seeded permutation per epoch, sharded by rank."""
    n, start = len(rows), step * cfg.prompts_per_step
    picked = []
    for i in range(start, start + cfg.prompts_per_step):
        epoch, pos = divmod(i, n)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        picked.append(rows[perm[pos]])
    return picked[rank::world]


def sampler_rank(run):
    """The rank's index among the rollout engines. The ranks of one vLLM tensor-parallel group run one engine
    together and must submit identical requests with identical seeds (rollout.py gathers their prompts), so
    they share a seed: rank // tensor_parallel_size. Elsewhere every rank samples its own prompts."""
    tp = run.cfg.vllm_tensor_parallel_size if run.engine is not None and run.engine.backend == "vllm" else 1
    return run.rank // tp


def prepare_engine(run):
    """Before sampling: the engine holds the policy's current weights and is awake. The order matters with
    --vllm_sleep: wake the weights, load the new ones into them, then wake the KV cache. Loading into a
    sleeping engine would write into released memory, and the wake-up would restore the stale copy."""
    if run.engine is None or run.cfg.method == "sft":
        return
    if run.cfg.vllm_sleep:
        run.engine.wake_up(tags=["weights"])
    if run.engine_stale:
        run.engine.sync_weights(run.student)
        run.engine_stale = False
    if run.cfg.vllm_sleep:
        run.engine.wake_up(tags=["kv_cache"])


def sample_batch(run, my_rows, step):
    """Token ids in, token ids out (never decoded and re-tokenized prompts). Returns (batch, rewards):
    batch holds one dict per sequence (student_prompt, response, loss_len, answer, row, truncated); rewards are
    1.0 / 0.0 per rollout by grader.check_answer, which evaluate.py grades with too. SFT's "rollouts" are the
    reference solutions."""
    cfg, tok = run.cfg, run.tok
    s_prompt_ids = [teacherlib.student_prompt_ids(tok, r["problem"], enable_thinking=cfg.student_thinking)
                    for r in my_rows]
    batch, rewards = [], []
    if cfg.method == "sft":
        for r, p in zip(my_rows, s_prompt_ids):
            resp = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if "reader_alpha" in r:  # a reader row (data.py): the teacher's prompt, the reference revealed
                p = teacherlib.teacher_prompt_ids(
                    tok, r["problem"], r["solution"], r["answer"], alpha=r["reader_alpha"],
                    enable_thinking=cfg.teacher_thinking, closed_think=cfg.teacher_closed_think)
            resp = resp[: cfg.max_new_tokens]
            batch.append({"student_prompt": p, "response": resp, "loss_len": len(resp), "answer": r["answer"]})
        return batch, rewards  # never empty: at least the end-of-sequence token
    # the hf backend samples from the live fp32 model (bf16 matmuls under autocast, as training); vLLM holds its own
    # weights in --dtype and needs no autocast
    hf = run.engine.backend == "hf"
    with run.autocast() if hf else contextlib.nullcontext():
        samples = run.engine.generate(s_prompt_ids, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                      seed=cfg.seed + 1_000_003 * step + 7919 * sampler_rank(run))
    if cfg.vllm_sleep:
        run.engine.sleep()  # frees the KV cache and offloads the weights while the training step runs
    for smp in samples:
        r = my_rows[smp.prompt_index]
        text = tok.decode(smp.token_ids, skip_special_tokens=True)
        rewards.append(float(grader.check_answer(text, r["answer"])))
        response = list(smp.token_ids)
        # the tokens the loss covers: the whole response, or under --distill_mask_answer the part before its
        # final-answer span (docs/choices.md, choice 23)
        n_loss = teacherlib.answer_span_start(tok, response) if cfg.distill_mask_answer else len(response)
        batch.append({"student_prompt": s_prompt_ids[smp.prompt_index], "response": response, "loss_len": n_loss,
                      "answer": r["answer"], "row": r, "truncated": smp.truncated})
    return [b for b in batch if len(b["response"]) > 0], rewards


# -----------------------------------------------------------------------------------------------
# Step 2. Rewards -> group advantages (GRPO and the token-advantage form), and the teacher's context.


def add_advantages(run, batch, rewards):
    cfg = run.cfg
    if (cfg.method == "grpo" or (cfg.method == "dasd_adv" and cfg.samples_per_prompt > 1)) and rewards:
        adv = losses.grpo_advantages(torch.tensor(rewards), cfg.samples_per_prompt).tolist()
        for b, a in zip(batch, adv):
            b["adv"] = a


def add_teacher_context(run, batch, alpha):
    """The teacher sees the problem plus the revealed part of the reference: the first ceil(alpha*m)
    of its m steps and the final answer (exposure.py, teacher.py). Every row fits the model's context at any alpha
    (plumbing.check_lengths checked each row at its longest exposures at set-up, on every rank)."""
    if run.teacher_model is None:
        return
    for b in batch:
        r = b["row"]
        solution, answer = r.get("reference", (r["solution"], r["answer"]))  # --teacher_context wrong: another's
        b["teacher_prompt"] = teacherlib.teacher_prompt_ids(
            run.tok, r["problem"], solution, answer, alpha=alpha, enable_thinking=run.cfg.teacher_thinking,
            closed_think=run.cfg.teacher_closed_think, show_answer=run.cfg.teacher_show_answer)


# -----------------------------------------------------------------------------------------------
# Step 3. The loss of one micro-batch. The algorithm lives here; everything else is plumbing.


def microbatch_loss(cfg, student, teacher_model, lm_head, mb, autocast):
    """Returns (loss as a token mean over this micro-batch, n valid tokens, metrics). The forwards here, the loss
    in one function per family: sft_loss (no teacher), distill_loss (opsd, dasd), advantage_loss (grpo,
    dasd_adv, teacher_free). With --chunk_size the forwards return (B,T,H) hidden states, else (B,T,V) logits."""
    s_prompts = [b["student_prompt"] for b in mb]
    responses = [b["response"] for b in mb]
    hidden = cfg.chunk_size > 0
    if cfg.method == "sft":  # baseline: NLL of the reference solution, no teacher
        with autocast():
            out, mask = teacherlib.response_forward(student, s_prompts, responses, hidden=hidden)  # mask (B,T)
        loss, metrics = sft_loss(cfg, out, mask, responses, lm_head)
        return loss, mask.sum().item(), metrics

    t_out = None  # teacher: the same network (or its frozen/EMA copy) shown x + the revealed part of y*
    if teacher_model is not None:
        with autocast():
            # no_grad inside teacher_logits: the teacher is a constant target, and a live teacher
            # (the student itself) must not receive a second gradient path through its own targets
            t_out, _ = teacherlib.teacher_logits(teacher_model, [b["teacher_prompt"] for b in mb], responses,
                                                 hidden=hidden)
    with autocast():
        s_out, mask = teacherlib.response_forward(student, s_prompts, responses, hidden=hidden)
    if cfg.distill_mask_answer:  # (B,T): tokens from each response's final-answer span on leave the loss
        mask = mask * (torch.arange(mask.shape[1], device=mask.device)[None, :]
                       < torch.tensor([b["loss_len"] for b in mb], device=mask.device)[:, None])
    if cfg.method in ("opsd", "dasd"):
        loss, metrics = distill_loss(cfg, s_out, t_out, mask, responses, lm_head, teacher_model)
    else:
        loss, metrics = advantage_loss(cfg, s_out, t_out, mask, mb, lm_head)
    return loss, mask.sum().item(), metrics


def matmul_dtype(cfg):
    """lm_head matmuls of the chunked losses in bf16 under --dtype bfloat16, as autocast runs every other matmul
    (the chunked losses are called outside autocast, on the fp32 master weight)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else None


def sft_loss(cfg, out, mask, responses, lm_head):
    """SFT: the token mean of the NLL of the reference solution's tokens. Returns (loss, metrics)."""
    tgt = response_targets(responses, out.shape[1], out.device)
    if cfg.chunk_size > 0:
        loss = chunked_loss.chunked_nll_loss(out.float(), lm_head.weight, tgt, mask, chunk_size=cfg.chunk_size,
                                             matmul_dtype=matmul_dtype(cfg))
    else:
        loss = losses.nll_loss(out, tgt, mask)
    return loss, {"loss/sft_nll": loss.item()}


def distill_loss(cfg, s_out, t_out, mask, responses, lm_head, teacher_model):
    """OPSD or DASD (losses.py) on the logits, or with --chunk_size on the hidden states (chunked_loss.py: the same
    loss, at most chunk_size x V logits alive at a time). Returns (loss, metrics)."""
    n = max(mask.sum().item(), 1.0)
    kw = dict(beta=cfg.beta, clip=cfg.clip or None, temperature=cfg.temperature, topk=cfg.topk,
              **(dasd_kwargs(cfg) if cfg.method == "dasd" else {}))
    # the ATESD controller's state features need the sampled tokens; no other loss here does
    tgt = response_targets(responses, s_out.shape[1], s_out.device) if cfg.exposure == "atesd" else None
    extra = {}
    if cfg.chunk_size > 0:
        mm = matmul_dtype(cfg)
        t_head = teacher_model.get_output_embeddings().weight.detach()  # the teacher's own lm_head
        loss, metrics = chunked_loss.chunked_distill_loss(s_out.float(), lm_head.weight, t_out.float(), t_head, mask,
                                                          method=cfg.method, chunk_size=cfg.chunk_size,
                                                          matmul_dtype=mm, **kw)
        if cfg.exposure == "atesd":  # the controller's state features, from the hidden states chunk by chunk
            extra = chunked_loss.student_confidence(s_out.float(), tgt, mask, cfg.temperature,
                                                    lm_head.weight.detach().to(mm or lm_head.weight.dtype),
                                                    rows_per_pass=cfg.chunk_size)
    else:
        # the ATESD controller's state features; an extra (B,T,V) softmax, so only when a controller reads them
        if cfg.exposure == "atesd":
            extra = chunked_loss.student_confidence(s_out, tgt, mask, cfg.temperature)
        loss, metrics = (losses.opsd_loss if cfg.method == "opsd" else losses.dasd_loss)(s_out, t_out, mask, **kw)
    # metrics are token means of this micro-batch; the extra sums are divided by n here to match
    metrics.update({k: v / n for k, v in extra.items()})
    return loss, metrics


def advantage_loss(cfg, s_out, t_out, mask, mb, lm_head):
    """GRPO, DASD's token-advantage form and the teacher-free control: the on-policy policy-gradient surrogate on the
    sampled tokens, with the group advantage (grpo), the entropy-routed token advantage (dasd_adv) or a fixed
    negative one on the least likely tokens (teacher_free). Returns (loss, metrics)."""
    responses = [b["response"] for b in mb]
    s_logits = s_out if cfg.chunk_size == 0 else s_out @ lm_head.weight.T
    tgt = response_targets(responses, s_logits.shape[1], s_logits.device)
    extra = chunked_loss.student_confidence(s_logits, tgt, mask, cfg.temperature) if cfg.exposure == "atesd" else {}
    logp_s = losses.sampled_logprobs(s_logits, tgt, temperature=cfg.temperature)  # (B,T)
    seq_adv = torch.tensor([b.get("adv", 0.0) for b in mb], dtype=torch.float32, device=logp_s.device)  # (B,)
    metrics = {}
    if cfg.method == "grpo":
        adv = seq_adv[:, None].expand_as(logp_s) * mask  # (B,T)
    elif cfg.method == "teacher_free":  # no teacher: the student's own least likely tokens are pushed down
        adv, metrics = losses.teacher_free_advantages(logp_s.detach(), mask, fraction=cfg.push_fraction,
                                                      magnitude=cfg.push_weight)
    else:
        with torch.no_grad():
            logp_t = losses.sampled_logprobs(t_out, tgt, temperature=cfg.temperature)  # (B,T)
            ent = entropy.token_entropy(s_logits.detach(), temperature=cfg.temperature)
        group_adv = seq_adv[:, None].expand_as(logp_s) if cfg.samples_per_prompt > 1 else None
        adv, metrics = losses.dasd_token_advantages(
            logp_s.detach(), logp_t, ent, mask, push_fraction=cfg.push_fraction, soft=not cfg.hard_gate,
            coef=cfg.adv_coef, group_adv=group_adv)
    loss, pg_metrics = losses.policy_gradient_loss(logp_s, adv.detach(), mask)
    metrics.update(pg_metrics)
    metrics.update({k: v / max(mask.sum().item(), 1.0) for k, v in extra.items()})
    return loss, metrics


def dasd_kwargs(cfg):
    kw = dict(push_fraction=cfg.push_fraction, soft=not cfg.hard_gate, push_weight=cfg.push_weight,
              pull_weight=cfg.pull_weight)
    if cfg.push_margin is not None:
        kw["push_margin"] = cfg.push_margin
    return kw


def response_targets(responses, T, device):
    """(B, T) token ids of the responses, right-padded with 0 (masked out by the loss)."""
    tgt = torch.zeros(len(responses), T, dtype=torch.long, device=device)
    for i, r in enumerate(responses):
        tgt[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return tgt


# -----------------------------------------------------------------------------------------------
# Step 4. Update: gradient of the global-batch token mean, clip, non-finite guard, one optimizer step.


def train_on_batch(run, batch):
    """Returns (token sums of the loss metrics, local token count, grad norm, whether the step was taken).

    The token mean is over every rank's valid tokens (docs/choices.md, choice 4): each micro-batch's mean is
    weighted by its share n_mb / n_global of the global batch. Exactly one optimizer step per rollout batch
    (docs/choices.md, choice 26). A non-finite loss or gradient on any rank skips the step on all of them, so NaN is
    never written into the weights."""
    cfg, student = run.cfg, run.student
    lm_head = student.get_output_embeddings()  # the matrix the chunked loss multiplies by
    n_local = float(sum(b["loss_len"] for b in batch))
    n_global = plumbing.all_reduce_sum({"n": n_local}, run.device, run.ddp)["n"]
    run.opt.zero_grad(set_to_none=True)
    sums = {}
    mbs = plumbing.micro_batches(batch, cfg.micro_batch, cfg.group_by_length)
    for i, mb in enumerate(mbs):
        # DDP all-reduces gradients on the last backward only
        sync = (not run.ddp) or cfg.fsdp or i == len(mbs) - 1
        ctx = run.train_model.no_sync() if (run.ddp and not cfg.fsdp and not sync) else contextlib.nullcontext()
        with ctx:
            loss, n_mb, m = microbatch_loss(cfg, run.train_model, run.teacher_model, lm_head, mb, run.autocast)
            # DDP averages gradients over ranks, hence the factor world: sum over ranks of
            # (local token sum / global count) is the global token mean
            (loss * (n_mb / max(n_global, 1.0)) * run.world).backward()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n_mb
        sums["loss/total"] = sums.get("loss/total", 0.0) + loss.item() * n_mb

    params = [p for p in student.parameters() if p.requires_grad]  # every parameter, or LoRA's A and B
    grads = [p.grad for p in params if p.grad is not None]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    finite = math.isfinite(float(gnorm)) and all(math.isfinite(v) for v in sums.values())
    finite = plumbing.all_reduce_sum({"ok": float(finite)}, run.device, run.ddp)["ok"] == run.world
    if finite and grads:
        run.opt.step()
    else:
        run.n_skipped += 1  # never write NaN weights: the step is skipped, the weights are untouched
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return sums, n_local, float(gnorm), finite


# -----------------------------------------------------------------------------------------------
# Step 5. Sync: keep the rollout engine on-policy and the EMA teacher moving.


def sync_weights(run, finite):
    """The rollout engine is marked stale and reloaded right before it samples next (prepare_engine): under
    --vllm_sleep it is asleep now and must be woken first. The EMA teacher moves now."""
    if not finite:
        return  # the step was skipped: nothing changed
    run.engine_stale = run.engine is not None
    if run.cfg.teacher == "ema" and run.teacher_model is not None:
        teacherlib.ema_update(run.teacher_model, plumbing.unwrap(run.student), run.cfg.ema_decay)


# -----------------------------------------------------------------------------------------------
# Step 6. The exposure controller: the teacher's guard signal, and the step's record (plumbing.step_record:
# all-reduced token sums -> global token means).


@torch.no_grad()
def teacher_answer_logprob(run, batch, alpha):
    """Sum over sequences of the teacher's mean log-prob of the reference answer (ATESD's guard signal)."""
    total = 0.0
    for mb in plumbing.chunks(batch, run.cfg.micro_batch):
        with run.autocast():
            # the guard prompt withholds the answer: with it shown, the teacher just copies it and g is
            # flat in alpha; without it, g measures how strongly the revealed steps lead to the answer
            refs = [b["row"].get("reference", (b["row"]["solution"], b["answer"])) for b in mb]  # what the teacher read
            guard = [teacherlib.teacher_prompt_ids(run.tok, b["row"]["problem"], solution, answer, alpha=alpha,
                                                   show_answer=False, enable_thinking=False)
                     for b, (solution, answer) in zip(mb, refs)]
            alp = teacherlib.answer_logprob(run.teacher_model, run.tok, guard, [a for _, a in refs])  # (B,)
        total += alp.float().sum().item()
    return total


def observe_controller(run, step, rec):
    """The controller sees this step; the decision that chose alpha is rewarded L steps later.
    l = the method's own loss (what the student is learning to lower), mismatch = unclipped
    KL(p_T || p_S), probe = the student's NLL of its own samples (docs/choices.md, choice 7)."""
    run.expo.report(step, loss=rec.get("loss/total", 0.0), answer_logprob=rec.get("teacher/answer_logprob", 0.0),
                    mismatch=rec.get("kl/teacher_student", 0.0), probe_nll=rec.get("student/nll", 0.0),
                    confidence=rec.get("student/confidence", 0.0))


# -----------------------------------------------------------------------------------------------
# Main: the algorithm, one step per iteration, steps 1-6 of the module docstring.


def main(argv=None):
    cfg = parse_config(argv)
    plumbing.check_config(cfg)
    if cfg.plan:
        raise SystemExit(plumbing.plan(cfg))
    run = Run(**plumbing.setup(cfg))
    cfg = run.cfg  # what runs: dtype, attention, chunk size and checkpointing resolved
    log = plumbing.open_log(run)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not run.master, desc=f"{cfg.method}/{cfg.exposure}",
               dynamic_ncols=True)
    for step in range(run.start_step, cfg.steps):
        t_step, timings = time.time(), {}
        alpha = run.expo.alpha_for_step(step)  # how much of the reference the teacher sees

        t0 = time.time()
        prepare_engine(run)  # the last update's weights into the engine (woken first under --vllm_sleep)
        timings["sync"] = time.time() - t0

        t0 = time.time()
        batch, rewards = sample_batch(run, step_rows(run.rows, cfg, step, run.rank, run.world), step)
        timings["rollout"] = time.time() - t0

        add_advantages(run, batch, rewards)
        add_teacher_context(run, batch, alpha)

        t0, peak = time.time(), {"rollout": plumbing.cuda_peak_gib(run.device)}
        sums, n_local, gnorm, finite = train_on_batch(run, batch)
        timings["train"], peak["train"] = time.time() - t0, plumbing.cuda_peak_gib(run.device)

        sync_weights(run, finite)

        t0 = time.time()
        guard = cfg.exposure == "atesd" and run.teacher_model is not None  # the controller's guard signal g
        alp = teacher_answer_logprob(run, batch, alpha) if guard else None
        rec, n_tok = plumbing.step_record(run, batch, rewards, sums, n_local, alp)
        observe_controller(run, step, rec)
        timings["controller"] = time.time() - t0

        dt = time.time() - t_step
        rec = {"step": step + 1, **rec, "train/grad_norm": gnorm, "train/lr": run.sched.get_last_lr()[0],
               "train/skipped_steps": run.n_skipped, "train/tokens_per_s": n_tok / dt, "exposure/alpha_used": alpha,
               **{f"time/{k}": v for k, v in timings.items()}, "time/step": dt, **run.expo.metrics(),
               **{f"memory/{k}_peak_gib": v for k, v in peak.items() if v is not None}}
        plumbing.log_step(run, log, rec)
        bar.set_postfix({"loss": f"{rec.get('loss/total', 0):.4f}", "acc": rec["rollout/accuracy"],
                         "alpha": f"{alpha:.2f}"}, refresh=False)
        bar.update(1)
        plumbing.maybe_checkpoint(run, step + 1)
    bar.close()
    plumbing.finish(run)


if __name__ == "__main__":
    main()
