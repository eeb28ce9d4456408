"""train.py's plumbing: flags, set-up, process groups, the auto choices and their resume rules, logs, checkpoints.

Nothing here is part of the algorithm (train.py reads as the algorithm and calls these by name, plumbing.<name>).
In the order of this file:
  - parse_flags / field_docs / check_config: Config's fields as flags, each docstring its --help text; flag
    combinations that make no sense are refused before any work. plan: train.py --plan.
  - init_distributed / all_reduce_sum: one process (python train.py) or torchrun's DDP / FSDP2 group.
  - setup: data, student, teacher, optimizer, exposure schedule and rollout engine (train.Run's fields), resumed
    from a checkpoint with --resume; load_rows / check_lengths / load_student_and_teacher / add_lora are its
    loading steps, with errors that name the flag, file or row at fault.
  - choose_*: what --dtype, --attn, --chunk_size and --gradient_checkpointing "auto" become on this machine; a
    resumed run keeps the arithmetic it started with (dtype, attention kernel, loss path), and check_resume_config
    refuses the flags a checkpoint cannot continue under (RESUME_FIXED).
  - micro_batches: a step's sequences in forward/backward passes, grouped by length.
  - open_log / step_record / log_step: the step's global token means, to metrics.jsonl on rank 0 (plus
    TensorBoard or W&B when asked).
  - maybe_checkpoint ... finish: checkpoints written aside and renamed (an interrupted write leaves a complete one),
    under LoRA the merged model plus the adapter; FSDP2 states gathered to full tensors, so any world size resumes.
"""

import dataclasses
import json
import os
import random
import shutil
import sys
import typing

import numpy as np
import torch
import torch.distributed as dist

import data
import exposure
import lora
import model as modellib
import rollout
import teacher as teacherlib


# -----------------------------------------------------------------------------------------------
# Flags: each Config field's docstring is its --help text; combinations that make no sense are errors.


def parse_flags(cls, argv=None, description=None):
    """Dataclass -> argparse flags -> an instance of cls. Booleans accept --flag, --flag true/false; Optional[x]
    accepts none; each field's docstring is its --help text."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(cls)

    def to_bool(s):
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

    for f in dataclasses.fields(cls):
        tp = f.type
        optional = typing.get_origin(tp) is typing.Union
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
        conv = to_bool if base is bool else base
        if optional:
            conv = (lambda c: (lambda s: None if s.lower() in ("none", "") else c(s)))(conv)
        kw = dict(default=f.default, help=f"{docs.get(f.name, '')} (default: {f.default})")
        if base is bool:
            kw.update(nargs="?", const=True)
        p.add_argument(f"--{f.name}", type=conv, **kw)
    return cls(**vars(p.parse_args(argv)))


def field_docs(cls):
    """The string literal under each dataclass field is its documentation (as in cleanrl)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


TEACHERLESS = ("grpo", "sft", "teacher_free")  # the methods that build no teacher and run no teacher forward


def check_config(cfg):
    """Flag combinations and values that make no sense are errors before any work starts: every one found, one line
    each, in one SystemExit. Resolves --exposure auto and --lora_alpha none on the way."""
    if cfg.exposure == "auto":
        cfg.exposure = "full" if cfg.method in TEACHERLESS else "atesd"
    errors = method_errors(cfg) + sampling_and_system_errors(cfg) + optimization_errors(cfg)
    if cfg.lora_r and cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora_r  # computed at run time (and recorded in config.json)
    if errors:
        raise SystemExit("train.py: " + "\n  ".join(["invalid flags:"] + errors))


INF = float("inf")  # the range checks are written so that nan fails them too


def method_errors(cfg):
    """The method, its teacher and exposure, and the loss's own values."""
    errors = []
    if cfg.method not in ("opsd", "dasd", "dasd_adv", "grpo", "sft", "teacher_free"):
        errors.append(f"--method {cfg.method!r}: choose opsd, dasd, dasd_adv, grpo, sft or teacher_free")
    if cfg.teacher_context not in ("reference", "wrong"):
        errors.append(f"--teacher_context {cfg.teacher_context!r}: choose reference or wrong")
    if cfg.teacher_context != "reference" and cfg.method in TEACHERLESS:
        errors.append(f"--teacher_context {cfg.teacher_context}: --method {cfg.method} has no teacher")
    if cfg.exposure not in ("full", "fixed", "random", "atesd"):
        errors.append(f"--exposure {cfg.exposure!r}: choose full, fixed, random or atesd")
    if cfg.teacher not in ("frozen", "live", "ema"):
        errors.append(f"--teacher {cfg.teacher!r}: choose frozen, live or ema")
    if cfg.method == "grpo" and cfg.samples_per_prompt < 2:
        errors.append("--method grpo needs --samples_per_prompt >= 2 (advantages are relative to the group)")
    if cfg.distill_mask_answer and cfg.method not in ("opsd", "dasd", "dasd_adv", "teacher_free"):
        errors.append(f"--distill_mask_answer applies to the losses on the student's samples (opsd, dasd, dasd_adv, "
                      f"teacher_free), not --method {cfg.method}")
    if not cfg.teacher_show_answer and cfg.method in TEACHERLESS:
        errors.append(f"--teacher_show_answer false: --method {cfg.method} has no teacher")
    if cfg.method in TEACHERLESS and cfg.exposure != "full":
        errors.append(f"--method {cfg.method} uses no teacher, so --exposure must stay 'full' (got {cfg.exposure!r})")
    if not 0.0 <= cfg.alpha <= 1.0:
        errors.append(f"--alpha {cfg.alpha} must be in [0, 1]")
    if not 0.0 <= cfg.beta <= 1.0:
        errors.append(f"--beta {cfg.beta} must be in [0, 1]")
    if not 0.0 < cfg.push_fraction < 1.0:
        errors.append(f"--push_fraction {cfg.push_fraction} must be in (0, 1)")
    return errors


def sampling_and_system_errors(cfg):
    """Batch sizes and sampling; dtype, attention, loss path, optimizer, rollout engine, parallelism, LoRA's shape."""
    errors = []
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "micro_batch", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} {getattr(cfg, name)} must be >= 1")
    if not 0.0 < cfg.temperature < INF:
        errors.append(f"--temperature {cfg.temperature} must be a finite number > 0 (on-policy distillation needs "
                      f"sampled rollouts)")
    if not 0.0 < cfg.top_p <= 1.0:
        errors.append(f"--top_p {cfg.top_p} must be in (0, 1] (1: off)")
    if cfg.top_k == 0 or cfg.top_k < -1:
        errors.append(f"--top_k {cfg.top_k}: use k >= 1 or -1 (off)")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        errors.append(f"--dtype {cfg.dtype!r}: choose auto, bfloat16 or float32")
    if cfg.attn not in ("auto", "sdpa", "eager"):
        errors.append(f"--attn {cfg.attn!r}: choose auto, sdpa or eager")
    if cfg.chunk_size < -1:
        errors.append(f"--chunk_size {cfg.chunk_size}: use a positive chunk, 0 (plain loss) or -1 (auto)")
    if cfg.topk is not None and cfg.topk < 1:
        errors.append(f"--topk {cfg.topk} must be >= 1 (none: the full vocabulary)")
    if cfg.optimizer not in ("adamw", "sgd"):
        errors.append(f"--optimizer {cfg.optimizer!r}: choose adamw or sgd")
    if cfg.rollout not in ("auto", "hf", "vllm"):
        errors.append(f"--rollout {cfg.rollout!r}: choose auto, hf or vllm")
    if cfg.fsdp and cfg.chunk_size > 0:
        errors.append(f"--fsdp with --chunk_size {cfg.chunk_size}: FSDP2 shards the lm_head the chunked loss multiplies "
                      f"by; use --chunk_size 0 or -1 (auto: 0 under --fsdp)")
    if cfg.vllm_tensor_parallel_size < 1:
        errors.append(f"--vllm_tensor_parallel_size {cfg.vllm_tensor_parallel_size} must be >= 1")
    if cfg.save_every < -1:
        errors.append(f"--save_every {cfg.save_every}: use N > 0 (every N steps), 0 (at the end) or -1 (never)")
    if cfg.lora_r < 0 or not 0.0 <= cfg.lora_dropout < 1.0:
        errors.append("--lora_r must be >= 0 and --lora_dropout in [0, 1)")
    return errors


def optimization_errors(cfg):
    """The optimizer, the losses' weights, the exposure controller, memory fractions."""
    errors = []
    if cfg.lora_alpha is not None and not 0.0 < cfg.lora_alpha < INF:
        errors.append(f"--lora_alpha {cfg.lora_alpha} must be a finite number > 0 (none: 2 * --lora_r)")
    if not 0.0 <= cfg.lr < INF:  # 0: the weights never move (a control, experiments/entropy_climb.py)
        errors.append(f"--lr {cfg.lr} must be a finite number >= 0")
    if not 0.0 <= cfg.weight_decay < INF:
        errors.append(f"--weight_decay {cfg.weight_decay} must be a finite number >= 0")
    if not cfg.grad_clip >= 0.0:
        errors.append(f"--grad_clip {cfg.grad_clip} must be >= 0 (0: no clipping)")
    if cfg.warmup_steps < 0:
        errors.append(f"--warmup_steps {cfg.warmup_steps} must be >= 0 (0: no warm-up)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        errors.append(f"--ema_decay {cfg.ema_decay} must be in [0, 1)")
    if cfg.clip is not None and not cfg.clip >= 0.0:
        errors.append(f"--clip {cfg.clip} must be >= 0 (0 or none: no clip)")
    for name in ("push_weight", "pull_weight"):
        if not 0.0 <= getattr(cfg, name) < INF:
            errors.append(f"--{name} {getattr(cfg, name)} must be a finite number >= 0")
    if cfg.push_margin is not None and not cfg.push_margin > 0.0:
        errors.append(f"--push_margin {cfg.push_margin} must be > 0 (none: the default in losses.py)")
    if not -INF < cfg.adv_coef < INF:
        errors.append(f"--adv_coef {cfg.adv_coef} must be a finite number")
    for name, low in (("hold", 1), ("lookahead", 1), ("batch_decisions", 2)):
        if getattr(cfg, name) is not None and getattr(cfg, name) < low:
            errors.append(f"--{name} {getattr(cfg, name)} must be >= {low} (none: the default in exposure.py)")
    if cfg.gamma is not None and not 0.0 <= cfg.gamma <= 1.0:
        errors.append(f"--gamma {cfg.gamma} must be in [0, 1] (none: the default in exposure.py)")
    if cfg.lambda_gt is not None and not -INF < cfg.lambda_gt < INF:
        errors.append(f"--lambda_gt {cfg.lambda_gt} must be a finite number (none: the default in exposure.py)")
    if cfg.controller_lr is not None and not 0.0 < cfg.controller_lr < INF:
        errors.append(f"--controller_lr {cfg.controller_lr} must be a finite number > 0 "
                      f"(none: the default in exposure.py)")
    if not 0.0 < cfg.vllm_gpu_memory_utilization <= 1.0:
        errors.append(f"--vllm_gpu_memory_utilization {cfg.vllm_gpu_memory_utilization} must be in (0, 1]")
    if cfg.plan_gpu_gb is not None and not 0.0 < cfg.plan_gpu_gb < INF:
        errors.append(f"--plan_gpu_gb {cfg.plan_gpu_gb} must be a finite number > 0 (none: the visible GPU's)")
    return errors


def plan(cfg):
    """train.py --plan: the configuration as it would run on a GPU, the data's lengths, and the per-GPU memory plan
    of bench/gpu_memory.py for this world size, without loading a model's weights. Returns the exit code: 0 if the
    step fits the card, 1 if not (a row beyond the context exits with check_lengths' message)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 speaks for all
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
    import gpu_memory

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gb = cfg.plan_gpu_gb
    if gb is None and torch.cuda.is_available():
        gb = torch.cuda.get_device_properties(0).total_memory / (0.99 * 2**30)  # gpu_memory takes 0.99 GiB per GB
    gb = gb or 80.0
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    print("configuration (flags other than their defaults): " + ", ".join(
        f"--{k} {v}" for k, v in dataclasses.asdict(cfg).items() if v != defaults[k] and k != "plan"))
    rows, _, _, longest = load_rows_and_tokenizer(cfg)
    (ps, i_s), (pt, i_t) = longest["student"], longest["teacher"] or (0, None)
    print(f"data: {cfg.data}, {len(rows)} rows; longest student prompt {ps} tokens (row {i_s}), sequence "
          f"{ps + cfg.max_new_tokens}" + (f"; longest teacher prompt {pt} tokens (row {i_t}, widest exposure), "
                                          f"sequence {pt + cfg.max_new_tokens}" if i_t is not None else "")
          + f"; context {longest['context']}")
    flags = [x for f in dataclasses.fields(cfg) if f.name not in ("plan", "plan_gpu_gb")
             for x in (f"--{f.name}", "none" if getattr(cfg, f.name) is None else str(getattr(cfg, f.name)))]
    setup, _ = gpu_memory.make_setup(flags + ["--nproc", str(world), "--gpu_gb", str(gb), "--prompt_tokens", str(ps),
                                             "--teacher_prompt_tokens", str(pt)])
    pred = gpu_memory.predict(setup)
    text, fits = gpu_memory.report(pred, f"per-GPU memory plan: {world} process(es) on {gb:.0f} GB cards (the "
                                         f"auto choices as on a GPU: 'per rank' line)")
    print(text)
    return 0 if fits else 1


# -----------------------------------------------------------------------------------------------
# Compute init: the same file runs alone (python train.py) or under torchrun (RANK is set).


def init_distributed(fsdp=False):
    """(distributed, rank, world, device). A process group exists under torchrun with 2+ processes, and
    with --fsdp also for one process (FSDP2's sharding mesh needs a group even of size 1)."""
    ddp = "RANK" in os.environ and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp)
    if not ddp:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return False, 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")  # NCCL needs GPUs; gloo does the same collectives on CPU
    return True, rank, world, device


def all_reduce_sum(values, device, ddp):
    """Sum a dict of floats over ranks (one collective for all of them)."""
    if not ddp:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


# -----------------------------------------------------------------------------------------------
# Set-up: everything a step reads, built once.


def setup(cfg):
    """Data, student, teacher, optimizer, exposure schedule and rollout engine, built once (resumed from the
    checkpoint with --resume): the fields of train.Run, as a dict. The user's cfg (after check_config, which resolves
    --exposure auto and --lora_alpha) stays as given (Run.asked); Run.cfg is a copy with the machine's auto choices
    resolved (dtype, attention, chunk size, checkpointing)."""
    asked, cfg = cfg, dataclasses.replace(cfg)
    if cfg.fsdp and "RANK" not in os.environ:
        raise SystemExit("train.py: --fsdp runs under torchrun, also for one process: "
                         "torchrun --nproc_per_node=N train.py --fsdp ...")
    ddp, rank, world, device = init_distributed(fsdp=cfg.fsdp)
    if world % cfg.vllm_tensor_parallel_size:
        raise SystemExit(f"train.py: --vllm_tensor_parallel_size {cfg.vllm_tensor_parallel_size} must divide the "
                         f"number of processes ({world}): each tensor-parallel group of ranks runs one vLLM engine")
    if cfg.prompts_per_step % world:
        raise SystemExit(f"train.py: --prompts_per_step {cfg.prompts_per_step} must be a multiple of the "
                         f"number of processes ({world}) so that every rank gets the same number of prompts")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    rows, tok, start_path, longest = load_rows_and_tokenizer(cfg)

    resume_state = None
    if cfg.resume:
        if not os.path.isdir(ckpt_dir) and os.path.isdir(ckpt_dir + ".old"):
            ckpt_dir = ckpt_dir + ".old"  # the rename of a newer checkpoint was interrupted
        if not os.path.isdir(ckpt_dir):
            raise SystemExit(f"train.py: --resume but no checkpoint in {ckpt_dir}")
        resume_state = load_checkpoint(ckpt_dir)
        check_resume_config(cfg, resume_state["config"], ckpt_dir)
    cfg.dtype = choose_dtype(cfg, device, ddp, resume_state)
    cfg.attn = choose_attn(cfg, device, resume_state)
    student, teacher_model = load_student_and_teacher(cfg, start_path, tok, device, resume_state, ckpt_dir)
    vocab = student.get_output_embeddings().weight.shape[0]
    cfg.chunk_size = choose_chunk_size(cfg, device, resume_state, vocab)
    cfg.gradient_checkpointing = choose_gradient_checkpointing(cfg, device)
    if cfg.gradient_checkpointing:  # after the teacher's copy was made: the copy never recomputes
        enable_gradient_checkpointing(student)
    train_model = wrap_for_parallel(cfg, student, ddp, device)
    if cfg.teacher == "live" and teacher_model is not None:
        teacher_model = student  # the same parameters, called outside DDP's forward (no grad anyway)

    opt, sched, expo = make_optimizer_and_exposure(cfg, student)

    start_step, n_skipped = 0, 0
    if resume_state is not None:
        load_optimizer_state(cfg, train_model, opt, resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        expo.load_state_dict(resume_state["exposure"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        random.setstate(resume_state["rng"]["python"])
        start_step, n_skipped = resume_state["step"], resume_state["n_skipped"]

    engine = make_engine(cfg, student, start_path, tok, rank, longest["student"][0] + cfg.max_new_tokens)
    # a resumed engine starts from the start model's weights: it loads the checkpoint's before it first samples
    return dict(cfg=cfg, asked=asked, ddp=ddp, rank=rank, world=world, device=device, rows=rows, tok=tok, student=student,
                train_model=train_model, teacher_model=teacher_model, opt=opt, sched=sched, expo=expo, engine=engine,
                start_step=start_step, n_skipped=n_skipped, ckpt_dir=ckpt_dir,
                engine_stale=engine is not None and resume_state is not None)


def load_rows_and_tokenizer(cfg):
    """The training rows (under --teacher_context wrong, each with another row's reference), the tokenizer, the start
    model's path, and the data's longest prompts: every row checked against the model's context, on every rank,
    before any collective, so a row beyond it stops all ranks with one message."""
    rows = load_rows(cfg)
    if cfg.teacher_context == "wrong":  # the control: each problem's teacher reads another problem's reference
        try:
            rows = data.swap_references(rows, seed=cfg.seed)
        except ValueError as e:
            raise SystemExit(f"train.py: --data {cfg.data}: {e}") from e
    start_path = modellib.resolve(cfg.model)
    try:
        tok, model_config = modellib.load_tokenizer_and_config(start_path, trust_remote_code=cfg.trust_remote_code)
    except FileNotFoundError as e:
        raise SystemExit(f"train.py: {e}") from e
    rows, longest = check_lengths(cfg, rows, tok, getattr(model_config, "max_position_embeddings", None))
    return rows, tok, start_path, longest


def make_optimizer_and_exposure(cfg, student):
    """The optimizer over the trained parameters (every one, or LoRA's A and B), its warm-up schedule, and the
    exposure schedule (the ATESD controller's defaults live in exposure.py)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                fused=(cfg.fused_adamw and not cfg.fsdp) or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    expo_kw = {k: getattr(cfg, k) for k in ("hold", "lookahead", "gamma", "lambda_gt", "batch_decisions")
               if getattr(cfg, k) is not None}
    if cfg.controller_lr is not None:
        expo_kw["lr"] = cfg.controller_lr
    expo = exposure.make_exposure(cfg.exposure, alpha=cfg.alpha, total_steps=cfg.steps, seed=cfg.seed, **expo_kw)
    return opt, sched, expo


def make_engine(cfg, student, start_path, tok, rank, max_model_len):
    """One rollout engine per rank (None for sft); seeds differ per rank and per step (docs/choices.md, choice 27)."""
    if cfg.method == "sft":
        return None
    backend = rollout.default_backend() if cfg.rollout == "auto" else cfg.rollout
    return rollout.make_rollout(
        backend, model=student, model_path=start_path, tokenizer=tok,
        seed=cfg.seed + (rank // cfg.vllm_tensor_parallel_size if backend == "vllm" else rank),
        dtype=cfg.dtype, max_model_len=max_model_len,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        tensor_parallel_size=cfg.vllm_tensor_parallel_size, enable_sleep_mode=cfg.vllm_sleep,
        # vLLM's log lines go to the run folder, not the console (OPSD_VERBOSE=1 keeps them there)
        log_file=os.path.join(cfg.out_dir, "engine.log" if rank == 0 else f"engine.rank{rank}.log"))


# -----------------------------------------------------------------------------------------------
# Set-up's loading steps: training rows and their lengths against the context, the student and its teacher, LoRA.


MARGIN = 16  # tokens: how far the chat template's wrapper may vary in length between rows (a merge at each edge)


def longest_exposures(cfg, row):
    """The exposures at which this row's teacher prompt can be longest: --alpha under --exposure fixed; else the
    whole reference (alpha 1), the longest partial one (m - 1 of m steps, whose header is longer and which always
    appends the answer line) and the answer alone (alpha 0). Every other exposure reveals a prefix of a partial one."""
    if cfg.exposure == "fixed":
        return (cfg.alpha,)
    m = len(teacherlib.split_steps(row.get("reference", (row["solution"],))[0]))
    return (1.0, (m - 1) / m, 0.0) if m > 1 else (1.0, 0.0)


def prompt_builders(cfg, tok):
    """{side: (row -> the texts the row can put in the prompt, row -> the longest of its prompts in exact tokens)}
    for the student (an SFT reader row: the teacher's prompt at its reader_alpha, as train.sample_batch builds it) and,
    for a method with a teacher, the teacher at each of longest_exposures."""
    def student_text(r):
        if "reader_alpha" in r:
            return teacherlib.teacher_messages(r["problem"], r["solution"], r["answer"], alpha=r["reader_alpha"])
        return teacherlib.student_messages(r["problem"])

    def student_len(r):
        if "reader_alpha" in r:
            return len(teacherlib.teacher_prompt_ids(
                tok, r["problem"], r["solution"], r["answer"], alpha=r["reader_alpha"],
                enable_thinking=cfg.teacher_thinking, closed_think=cfg.teacher_closed_think))
        return len(teacherlib.student_prompt_ids(tok, r["problem"], enable_thinking=cfg.student_thinking))

    sides = {"student": (lambda r: [student_text(r)[0]["content"]], student_len)}
    if cfg.method not in TEACHERLESS:
        show = cfg.teacher_show_answer
        ref = lambda r: r.get("reference", (r["solution"], r["answer"]))  # --teacher_context wrong: another row's
        sides["teacher"] = (
            lambda r: [teacherlib.teacher_messages(r["problem"], *ref(r), alpha=a, show_answer=show)[0]["content"]
                       for a in longest_exposures(cfg, r)],
            lambda r: max(len(teacherlib.teacher_prompt_ids(tok, r["problem"], *ref(r), alpha=a, show_answer=show,
                                                            enable_thinking=cfg.teacher_thinking,
                                                            closed_think=cfg.teacher_closed_think))
                          for a in longest_exposures(cfg, r)))
    return sides


def check_lengths(cfg, rows, tok, limit):
    """The data's longest prompts, exactly, and every row's sequences (prompt + --max_new_tokens) checked against
    the model's context (limit: max_position_embeddings; None = no limit). Every rank runs this on the same rows
    before any collective, so a row that does not fit stops all of them at once with the same message, naming the
    row; --skip_bad_rows drops such rows instead (counted).

    The prompts' texts are tokenized in one batched call per side; the chat template, a near-constant wrapper, is
    rendered exactly only for the rows within MARGIN tokens of the longest or of the limit.
    Returns (rows, {"student": (tokens, row index), "teacher": (tokens, row index) or None, "context": limit})."""
    longest, too_long = {"teacher": None, "context": limit}, {}
    for side, (texts, exact) in prompt_builders(cfg, tok).items():
        per_row = [texts(r) for r in rows]
        flat = tok([t for ts in per_row for t in ts], add_special_tokens=False)["input_ids"]
        est, k = [], 0
        for ts in per_row:  # each row's longest text
            est.append(max(len(x) for x in flat[k:k + len(ts)]))
            k += len(ts)
        top = max(est)
        lens = {i: exact(rows[i]) for i, e in enumerate(est) if e >= top - MARGIN}
        i_max = max(lens, key=lens.get)
        longest[side] = (lens[i_max], i_max)
        wrapper = lens[i_max] - est[i_max]  # the template's tokens around the text, measured on the longest row
        for i, e in enumerate(est):
            if limit is not None and e + wrapper + cfg.max_new_tokens > limit - MARGIN:
                n = lens.get(i) or exact(rows[i])
                if n + cfg.max_new_tokens > limit:
                    too_long.setdefault(i, (side, n))
    if too_long and not cfg.skip_bad_rows:
        i, (side, n) = min(too_long.items())
        raise SystemExit(
            f"train.py: --data {cfg.data} row {i} ({rows[i].get('id', i)}): its {side} prompt ({n} tokens) plus "
            f"--max_new_tokens {cfg.max_new_tokens} is {n + cfg.max_new_tokens} tokens, beyond the model's context "
            f"(max_position_embeddings {limit}); {len(too_long)} row(s) too long: lower --max_new_tokens, skip them "
            f"with --skip_bad_rows, or remove them from --data")
    if too_long:
        kept = [r for i, r in enumerate(rows) if i not in too_long]
        if not kept:
            raise SystemExit(f"train.py: --data {cfg.data}: no row fits the model's context ({limit} tokens)")
        if is_rank0():
            print(f"[data] {cfg.data}: skipped {len(too_long)} rows longer than the context ({limit} tokens)")
        return check_lengths(cfg, kept, tok, limit)
    return rows, longest


def load_rows(cfg):
    try:
        rows = data.load_dataset(cfg.data, split="train", problem_field=cfg.problem_field,
                                 solution_field=cfg.solution_field, answer_field=cfg.answer_field,
                                 skip_bad_rows=cfg.skip_bad_rows)
    except (data.DataError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: {e}") from e
    if cfg.method != "sft" and any("reader_alpha" in r for r in rows):
        raise SystemExit(f"train.py: {cfg.data}: rows carry 'reader_alpha' (SFT trained from the teacher's prompt); "
                         f"they train only under --method sft, not {cfg.method}")
    return rows


def load_student_and_teacher(cfg, start_path, tok, device, resume_state, ckpt_dir):
    """The student (trained) and the teacher (a frozen copy, an EMA copy, or None for the methods without one).
    Under LoRA the student is the peft-wrapped model and the frozen / EMA teacher a view of its own network."""
    try:
        # fp32 master weights (docs/choices.md, choice 11); bf16 matmuls come from autocast
        student, _ = modellib.load(start_path, dtype=torch.float32, device=device, tokenizer=tok,
                                   trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn)
    except FileNotFoundError as e:
        raise SystemExit(f"train.py: {e}") from e
    if cfg.lora_r:
        student = add_lora(cfg, student)
    # the frozen teacher is the *initial* policy, so it is built before resumed weights are loaded
    teacher_model = None
    if cfg.method not in TEACHERLESS:
        # under --dtype bfloat16 the frozen copy's linear weights are bf16: bit for bit the same teacher under
        # autocast, 2 bytes per weight instead of 4 (docs/choices.md, choice 39)
        teacher_model = teacherlib.make_teacher(student, mode=cfg.teacher,
                                                linear_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
        if resume_state is not None and cfg.teacher == "ema":
            teacherlib.load_ema_state(teacher_model, resume_state["ema_teacher"])
    if resume_state is not None and cfg.lora_r:
        try:
            lora.load_adapter(student, os.path.join(ckpt_dir, "adapter"))  # the base weights never change
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: --lora_r {cfg.lora_r} --resume: {e}") from e
    elif resume_state is not None:
        import glob

        from safetensors.torch import load_file

        sd = {}
        for f in sorted(glob.glob(os.path.join(ckpt_dir, "model", "*.safetensors"))):
            sd.update(load_file(f))
        missing, _ = student.load_state_dict(sd, strict=False)
        if [k for k in missing if k != "lm_head.weight"]:  # a tied lm_head is not stored separately
            raise SystemExit(f"train.py: checkpoint {ckpt_dir} lacks weights: {missing[:5]}")
        if getattr(student.config, "tie_word_embeddings", False):
            student.tie_weights()
    student.train()
    return student, teacher_model


def add_lora(cfg, student):
    """The student wrapped in a LoRA adapter (lora.py): the base weights frozen, A and B trained."""
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    try:
        student = lora.add_lora(student, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"train.py: --lora_r {cfg.lora_r}: {e}") from e
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in student.parameters())
    if is_rank0():
        print(f"LoRA r {cfg.lora_r}, alpha {cfg.lora_alpha:g} on {','.join(targets)}: "
              f"{n_train:,} of {n_all:,} parameters trained ({100 * n_train / n_all:.2f}%)")
    return student


# -----------------------------------------------------------------------------------------------
# Auto choices (dtype, attention, chunked loss, gradient checkpointing) and the flags a resume may not change.


# the flags that define the trained network and its optimizer state: a resume must not change them
RESUME_FIXED = ("model", "method", "teacher", "lora_r", "lora_alpha", "lora_targets")

def check_resume_config(cfg, saved, ckpt_dir):
    """Refuse --resume with a flag that the checkpoint was trained under another value of, naming both."""
    diff = [f"--{k} {getattr(cfg, k)} (checkpoint: {saved[k]})" for k in RESUME_FIXED
            if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"train.py: --resume from {ckpt_dir}: " + ", ".join(diff)
                         + "; resume with the checkpoint's values, or start a new --out_dir")


LARGE_VOCAB = 65536  # --chunk_size auto on a GPU: the chunked loss from this vocabulary size up

def choose_chunk_size(cfg, device, resume_state, vocab_size=None):
    """--chunk_size -1 (auto) -> for opsd/dasd/sft without FSDP: 256 on a CPU; on a GPU 512 when vocab_size >=
    LARGE_VOCAB, else 0; 0 for the other methods and under FSDP (it shards the lm_head the chunked loss multiplies
    by). On a CPU the chunked path computes the logits' gradient by hand (chunked_loss.py) and skips autograd's
    (B, T, V) graph, which there costs more than the model's own backward. On a GPU it is for memory: the plain
    loss holds several (B, T, V) fp32 tensors (bench/gpu_memory.py counts them), 5 GB each at B = 4, T = 2048 and
    Qwen3's V = 151,936, more than the whole student with gradient checkpointing; from 64k entries on, one fp32
    logits row (256 KiB) outweighs a token's checkpointed activations of a 2k-wide, 28-block model (28 x 8 KiB).
    512 rows keep the lm_head matmuls wide (C x V bf16 logits: 148 MiB at Qwen3's V). A resumed run keeps the
    path it was started with: the two agree to rounding, not bit for bit."""
    if cfg.chunk_size >= 0:
        return cfg.chunk_size
    if resume_state is not None and resume_state["config"].get("chunk_size", -1) >= 0:
        return resume_state["config"]["chunk_size"]
    if cfg.method not in ("opsd", "dasd", "sft") or cfg.fsdp:
        return 0
    if device.type == "cpu":
        return 256
    return 512 if vocab_size is not None and vocab_size >= LARGE_VOCAB else 0


def choose_gradient_checkpointing(cfg, device):
    """--gradient_checkpointing auto (None) -> on with a GPU, off on a CPU. Unlike the dtype or the chunk size it
    is not carried over by a resume: it changes memory and time, never the arithmetic of the loss."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return device.type == "cuda"


def enable_gradient_checkpointing(student):
    """Every transformer block of the student recomputes its activations in the backward pass (transformers'
    gradient_checkpointing_enable with torch's non-reentrant checkpoint).
      - Non-reentrant: gradients reach LoRA's A and B although the input of the first block, the frozen embeddings'
        output, does not require grad (the reentrant form would return no gradient without
        enable_input_require_grads). transformers registers that hook on the embeddings anyway; it only marks their
        output as requiring grad, which changes no value.
      - A block recomputes only in training mode with grad enabled: the frozen and EMA teacher copies are made
        before this call and run in eval mode; a live or LoRA teacher runs the student under no_grad, where the
        checkpoint stores nothing and runs the block once.
      - HF rollouts (rollout.HFRollout) put the model in eval mode for generate, so its KV cache works as before.
        config.use_cache is left as it is: response_forward passes use_cache=False itself, and a saved model's
        config.json must not change."""
    net = student.get_base_model() if lora.is_lora(student) else student
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def choose_attn(cfg, device, resume_state):
    """--attn auto -> eager on a CPU, sdpa elsewhere; a resumed run keeps the kernel it was started with (the two
    agree to rounding, not bit for bit)."""
    if cfg.attn != "auto":
        return cfg.attn
    if resume_state is not None:  # a checkpoint from before this flag existed ran transformers' default, sdpa
        return resume_state["config"].get("attn", "sdpa")
    return "eager" if device.type == "cpu" else "sdpa"


def choose_dtype(cfg, device, ddp, resume_state):
    """--dtype auto -> bfloat16 or float32 (model.pick_dtype). A resumed run keeps the dtype it was started
    with, and every rank takes rank 0's measurement, so the arithmetic never changes within a run."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if resume_state is not None:
        return resume_state["config"]["dtype"]
    bf16 = torch.tensor([float(modellib.pick_dtype("auto", device) == "bfloat16")], device=device)
    if ddp:
        dist.broadcast(bf16, src=0)
    return "bfloat16" if bf16.item() else "float32"


def wrap_for_parallel(cfg, student, ddp, device):
    """FSDP2 shards the student in place; DDP wraps it; one process uses it as it is."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        # under LoRA the transformers model inside the peft wrapper is the root: generate() calls it directly,
        # and its root-level weights (embeddings, final norm) must be gathered then too. Frozen and trainable
        # parameters share each layer's group (FSDP2 allows both in one group).
        net = student.get_base_model() if lora.is_lora(student) else student
        for layer in net.model.layers:
            fully_shard(layer)
        fully_shard(net)
        return student
    if ddp:
        # gradient_as_bucket_view: each .grad is a view into DDP's all-reduce buckets, not a second copy beside
        # them (one model-sized fp32 buffer less at the end of the backward and in the optimizer step)
        return torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return student


# -----------------------------------------------------------------------------------------------
# Micro-batches


def chunks(xs, n):
    return [xs[i: i + n] for i in range(0, len(xs), n)]


def micro_batches(batch, size, group_by_length):
    """The batch split into forward/backward passes of at most `size` sequences. A pass pads every row to its
    longest prompt plus its longest response (teacher.response_forward), so grouping similar lengths cuts the
    padding's compute; one pass (len(batch) <= size) is left in the batch's own order."""
    if group_by_length and len(batch) > size:
        batch = sorted(batch, key=lambda b: (len(b["response"]), len(b["student_prompt"])))
    return chunks(batch, size)


# -----------------------------------------------------------------------------------------------
# Logging: metrics.jsonl on rank 0 (plus TensorBoard / W&B if asked); only rank 0 prints.


def open_log(run):
    """metrics.jsonl (a resumed run keeps the lines up to its checkpoint), config.json, optional loggers."""
    cfg = run.cfg
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if run.master:
        keep = []
        if cfg.resume and os.path.exists(log_path):
            with open(log_path) as f:  # drop lines from steps after the checkpoint: they are redone
                keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= run.start_step]
        with open(log_path, "w") as f:
            f.writelines(keep)
        asked = dataclasses.asdict(run.asked)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:  # what ran, and the flags resolved from "auto"
            json.dump({**dataclasses.asdict(cfg), "asked": {k: v for k, v in asked.items() if v != getattr(cfg, k)}},
                      f, indent=2)
    tb, wb = open_loggers(cfg, run.master)
    return log_path, tb, wb


def open_loggers(cfg, master):
    tb = wb = None
    if master and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
        except ImportError:
            print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
    if master and cfg.wandb:
        try:
            import wandb

            wb = wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))
        except ImportError:
            print("wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
    return tb, wb


def step_record(run, batch, rewards, sums, n_local, answer_logprob=None):
    """The step's record: loss metrics as token means over the global batch, rollout statistics, and
    for ATESD the teacher's log-prob of the reference answer (answer_logprob: this rank's sum over sequences)."""
    alp = 0.0 if answer_logprob is None else answer_logprob
    n_resp = float(sum(len(b["response"]) for b in batch))  # n_local: the loss's tokens, fewer under --distill_mask_answer
    glob = all_reduce_sum({**sums, "n_tok": n_local, "n_resp": n_resp, "n_seq": float(len(batch)),
                                    "answer_logprob": alp, "correct": float(sum(rewards)),
                                    "n_rollouts": float(len(rewards)),
                                    "truncated": float(sum(b.get("truncated", False) for b in batch))},
                                   run.device, run.ddp)
    rec = {}
    for k, v in glob.items():
        if "/" in k:
            rec[k] = v / max(glob["n_tok"], 1.0)  # token-weighted means
    if answer_logprob is not None:
        rec["teacher/answer_logprob"] = glob["answer_logprob"] / max(glob["n_seq"], 1.0)
    rec.update({
        "rollout/accuracy": glob["correct"] / max(glob["n_rollouts"], 1.0) if glob["n_rollouts"] else None,
        "rollout/truncated": glob["truncated"] / max(glob["n_seq"], 1.0),
        "rollout/response_len": glob["n_resp"] / max(glob["n_seq"], 1.0),
    })
    if run.cfg.distill_mask_answer:
        rec["loss/token_share"] = glob["n_tok"] / max(glob["n_resp"], 1.0)  # response tokens the loss covers
    return rec, glob["n_resp"]


def log_step(run, log, rec):
    log_path, tb, wb = log
    if not run.master:
        return
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    nums = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
    if tb is not None:
        for k, v in nums.items():
            tb.add_scalar(k, v, rec["step"])
    if wb is not None:
        wb.log(nums, step=rec["step"])


# -----------------------------------------------------------------------------------------------
# Checkpoints: model as a save_pretrained folder (under LoRA merged, plus the adapter for --resume), the rest in
# trainer.pt; written aside, then renamed.


def maybe_checkpoint(run, done):
    """Every --save_every steps and at the end. Under FSDP the full model, adapter and optimizer states are
    gathered by collectives that every rank joins; rank 0 writes."""
    cfg = run.cfg
    if cfg.save_every < 0 or not ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
        return
    if run.master or cfg.fsdp:
        model_sd = inference_state_dict(run.train_model)
        # the adapter for --resume: under FSDP its A and B gathered (every rank joins); unsharded, peft reads its own
        adapter_sd = None
        if cfg.lora_r and cfg.fsdp:
            adapter_sd = {n: lora.full(p.detach()).cpu() for n, p in lora.adapter_params(unwrap(run.student)).items()}
        opt_sd = optimizer_state_dict(cfg, run.train_model, run.opt)
    if run.master:
        save_checkpoint(cfg, done, model_sd, adapter_sd, opt_sd, run, run.ckpt_dir)
    if run.ddp:
        dist.barrier()


TRAIN_CONFIG = "train_config.json"  # the run's flags, saved inside every model folder it writes (ckpt/model, final/)


def save_checkpoint(cfg, step, model_sd, adapter_sd, opt_sd, run, out):
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # a plain save_pretrained folder that transformers and vLLM load, whatever wraps the student; under LoRA
    # the merged weights under the base model's names, so that loading it needs no peft
    module = unwrap(run.student)
    base = module.get_base_model() if lora.is_lora(module) else module
    base.save_pretrained(os.path.join(tmp, "model"), state_dict=model_sd, safe_serialization=True)
    run.tok.save_pretrained(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", TRAIN_CONFIG), "w") as f:  # evaluate.py reads the thinking mode from it
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    if cfg.lora_r:
        lora.save_adapter(module, os.path.join(tmp, "adapter"), state_dict=adapter_sd)  # what --resume reads
    state = {
        "step": step, "n_skipped": run.n_skipped, "optimizer": opt_sd, "scheduler": run.sched.state_dict(),
        "exposure": run.expo.state_dict(), "config": dataclasses.asdict(cfg),
        # data order and rollout seeds are functions of (seed, step); these cover everything else
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    if cfg.teacher == "ema":
        state["ema_teacher"] = teacherlib.ema_state(run.teacher_model)  # under LoRA: the EMA adapter only
    torch.save(state, os.path.join(tmp, "trainer.pt"))
    # an interrupted write leaves either the old checkpoint (renamed to .old) or the new one complete
    if os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def inference_state_dict(student):
    """The weights of model/: the student's own, or under LoRA the merged W + s B A (FSDP2: every rank joins
    each gather)."""
    module = unwrap(student)
    if lora.is_lora(module):
        keep = is_rank0()  # every rank runs the generator (its gathers); only rank 0, which writes, keeps tensors
        return {k: v.cpu() for k, v in lora.merged_weights(module) if keep}
    return full_state_dict(student)


def full_state_dict(student):
    if any(hasattr(p, "full_tensor") for p in student.parameters()):  # FSDP2: gather shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(student).state_dict().items()}


def optimizer_state_dict(cfg, model, opt):
    """The optimizer state to save. Under FSDP each rank holds a shard of it: gather the full, unsharded
    state (keyed by parameter name), so that a resumed run can shard it again, on any number of ranks."""
    if not cfg.fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(cfg, model, opt, state):
    if not cfg.fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # every rank read the full state from trainer.pt; each keeps its own shard of it
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def unwrap(m):
    return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def load_checkpoint(path):
    f = os.path.join(path, "trainer.pt")
    try:
        # weights_only: a checkpoint is data, never code
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"train.py: cannot read checkpoint {f}: {e}") from e


def finish(run):
    """Free the rollout engine, copy the last checkpoint's model to final/, tear down the process group."""
    if run.engine is not None and hasattr(run.engine, "shutdown"):
        run.engine.shutdown()  # frees the vLLM engine (and only a process group that vLLM itself created)
    if run.master:
        final = os.path.join(run.cfg.out_dir, "final")
        if run.cfg.save_every >= 0:
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(os.path.join(run.cfg.out_dir, "ckpt", "model"), final)
            print(f"final model: {final}")
        print(f"metrics:     {os.path.join(run.cfg.out_dir, 'metrics.jsonl')}")
    if run.ddp:
        dist.barrier()
        run.train_model = None  # DDP's reducer holds the process group: release it before destroying the group
        dist.destroy_process_group()


def cuda_peak_gib(device):
    """On a GPU: the peak of torch's allocated memory since the last call, in GiB (then the peak is reset);
    None on a CPU. Memory that vLLM takes through its own pool (sleep mode) is not counted."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak
