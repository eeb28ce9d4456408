"""train.py's plumbing: process groups, the auto choices and their resume rules, logging, checkpoints.

Nothing here is part of the algorithm (train.py reads as the algorithm and calls these by name, plumbing.<name>).
  - init_distributed / all_reduce_sum: one process (python train.py) or torchrun's DDP / FSDP2 group.
  - choose_*: what --dtype, --attn, --chunk_size and --gradient_checkpointing "auto" become on this machine; a
    resumed run keeps the arithmetic it started with (dtype, attention kernel, loss path), and check_resume_config
    refuses the flags a checkpoint cannot continue under (RESUME_FIXED).
  - open_log / log_step: metrics.jsonl on rank 0 (plus TensorBoard or W&B when asked).
  - maybe_checkpoint ... finish: checkpoints written aside and renamed (an interrupted write leaves a complete one),
    under LoRA the merged model plus the adapter; FSDP2 states gathered to full tensors, so any world size resumes.
"""

import dataclasses
import json
import os
import random
import shutil
import sys

import torch
import torch.distributed as dist

import lora
import model as modellib
import teacher as teacherlib


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
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
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
    if not ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
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
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(os.path.join(run.cfg.out_dir, "ckpt", "model"), final)
        print(f"final model: {final}\nmetrics:     {os.path.join(run.cfg.out_dir, 'metrics.jsonl')}")
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
