"""Peak memory per GPU of a train.py configuration: predicted from the model's shapes, checked against a measured step.

    python bench/gpu_memory.py --model Qwen/Qwen3-1.7B --nproc 8 --method dasd --chunk_size 512 ...  # one configuration
    python bench/gpu_memory.py --readme      # every `torchrun ... train.py ...` command of README.md on 80 GB GPUs
    python bench/gpu_memory.py --validate    # prediction vs a measured CPU step at reduced depth

Flags: every train.py flag (parsed by train.parse_config, so a README command's flags work as they are), plus
  --nproc N                 processes (GPUs); --readme takes each command's --nproc_per_node
  --gpu_gb 80               the card's nominal size; its usable memory is 0.99 of that in GiB (what torch reports as
                            total_memory for 80 GB A100/H100 cards: 79.2-79.3 GiB), vLLM's share a fraction of that
  --prompt_tokens 256       student prompt length assumed (chat template + problem)
  --teacher_prompt_tokens 2048   teacher prompt length assumed (+ the revealed reference solution)
  --runtime_gb 1.5          CUDA context, cuBLAS workspaces and NCCL buffers per process (a typical figure)
  --model_config FILE       the model's config.json (default: bench/configs/<name>.json for the Qwen3 names kept
                            there, else the model folder's own config.json)
Responses are taken at their cap (--max_new_tokens): the longest micro-batch is the one that must fit.

What is counted, per GPU (c = 2 bytes under bf16 autocast, 4 in fp32):
  weights      fp32 master weights, 4 B/parameter (FSDP: / world, plus the gathered root weights (embeddings,
               lm_head) and two gathered blocks, the one computing and the one prefetched)
  teacher      frozen copy: 4 B/parameter, under --dtype bfloat16 2 B per linear-layer weight (docs/choices.md, choice 39);
               EMA copy: 4 B/parameter (fp32 running average); live: none; LoRA frozen: none (the adapter switched
               off), LoRA EMA: 4 B per adapter parameter. FSDP does not shard it: each rank holds a whole copy.
  gradients    fp32, one per trained parameter: DDP keeps them in its all-reduce buckets for the whole run
               (gradient_as_bucket_view: the .grad are views of them); one process allocates them during the
               backward (counted at its end); FSDP: / world. Several micro-batches per step add a second set
               under DDP's no_sync (the .grad of the micro-batches before the last are not bucket views).
  optimizer    AdamW: fp32 m and v, 8 B per trained parameter (LoRA: the adapter only; FSDP: / world); SGD: none
  vLLM         gpu_memory_utilization x the card while the engine is awake; with --vllm_sleep only during the rollout
               (its wake-up empties PyTorch's cache first, so the training step's freed blocks do not count twice)
  runtime      --runtime_gb, and allocator slack: 10% of the step's dynamic memory (PyTorch's caching allocator
               cannot always reuse freed blocks of other sizes)
The step's dynamic memory is the largest of these moments (B sequences per micro-batch and rank, N_s = B (P_s + T)
student tokens, N_t = B (P_t + T) teacher tokens, N_r = B T response rows, X = N_r V logits):
  teacher fwd  no_grad: one block's working set at N_t tokens (about N_t (3 c I + 16 H) bytes) and its attention
               mask, or at the lm_head the decoder's output (the last hidden state, N_t H 4; no other layer's is
               kept), the teacher's output (logits N_r V c, or hidden states N_r H 4 when chunked) and, under bf16,
               the bf16 copy autocast makes of an fp32 lm_head (2 V H)
  student fwd  the end of the student's forward, inside autocast: its saved activations, its final norm's, both
               sides' outputs, and under bf16 autocast's cached bf16 copies of every weight that requires grad (2 B
               per linear weight and 2 V H for the lm_head, also with checkpointing: autocast keeps them until its
               region ends; LoRA's frozen base is not cached)
  loss         the loss, after autocast: the saved activations (and, without checkpointing, each block's bf16 weight
               copies, saved for the backward, and the plain path's lm_head copy) plus the loss's own peak:
                 plain    (2 c + k) X bytes: both sides' logits (c each) plus the float32 tensors the loss code holds
                          at its peak (losses.opsd_loss: log p_S, log p_T, p_T, the clip mask (1 B), the summands,
                          and 13 bytes/entry of transients while it logs entropy and KL: k = 30; dasd_loss adds the
                          push rows' JSD: k = 33)
                 chunked  2 C V m logits buffers (m: matmul dtype), five 16 x V float32 work rows, bf16 copies of
                          the lm_head(s) (2 V H each, under bf16 only), and the lm_head's gradient, computed during
                          the forward: 4 V H (+ a 2 V H bf16 product buffer); with ATESD then the state features,
                          C rows of logits at a time beside that gradient
  recompute    with gradient checkpointing, the backward of the top block: every block's input (4 H N_s), one
               block's activations and bf16 weight copies recomputed, its backward's temporaries (about
               N_s (8 H + 3 c I)), and the lm_head's gradient waiting for the embeddings' (tied)
  end          the end of the backward: every gradient (one process), and for a tied lm_head the embeddings'
               gradient added to the lm_head's, which autograd holds until then: in place when the latter came from
               the chunked loss or from autocast's cast, into a third tensor after an fp32 nn.Linear (measured:
               3 x 4 V H above the other gradients then, 2 x otherwise, 1 x untied); under DDP the gradients are in
               the buckets, and only these transients come on top
  rollout      HF generate: the KV cache, L x 2 x kv_heads x head_dim per token (keys fp32 after the rotary, values
               in c) for all of the rank's sequences at P_s + T; vLLM with --vllm_sleep: its share
Saved activations per token and block (derived from transformers' Qwen3/Llama modules, RMSNorm in fp32 on the fp32
residual stream; H hidden, Q = heads x head_dim, K = kv_heads x head_dim, I intermediate, n heads, S sequence):
  each RMSNorm on the residual stream saves its input and its normalized input (8 H); its output feeds the
  projections, which save it (fp32: one shared 4 H) or each its own bf16 cast (autocast: 2 H per projection);
  q/k norms (Qwen3) save their input and normalized input (fp32: 8 Q and 8 K; autocast: a fp32 copy and a bf16
  cast, 6 Q and 6 K); the attention kernel saves q (c Q after the autocast cast, fp32 4 Q), k and v (repeated to
  all heads, c Q each, whenever an attention mask is given: left padding always gives one), sdpa its output (c Q)
  and log-sum-exp (4 n), eager the softmax (4 n S, autocast also its bf16 cast, 2 n S); o_proj its input (c Q);
  the MLP 4 c I. Qwen3-1.7B in bf16 with sdpa: 26 H + 16 Q + 6 K + 8 I + 4 n = 138 KiB; checkpointed: the block's
  input, 4 H = 8 KiB. LoRA adds, per adapted projection, the bf16 cast of its input for lora_A (autocast).

--validate checks this arithmetic on this CPU: the real Qwen3-1.7B width and vocabulary at 2 and 4 blocks (random
weights, built from bench/configs/qwen3-1.7b.json, nothing downloaded), float32, eager attention (train.py's CPU
defaults), one train_on_batch of train.py (teacher forward, student forward and backward, the loss, the clip, one
AdamW step whose state exists already) for B = 2 sequences of a 64-token prompt (128 for the teacher) and 256
response tokens, with and without gradient checkpointing, plain OPSD and chunked DASD/ATESD losses; and three bf16
autocast runs at 2 blocks (plain OPSD; chunked DASD/ATESD with checkpointing; chunked OPSD, LoRA r64, with
checkpointing: README's two recipes). Each configuration runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536,
so that glibc maps every allocation above 64 KiB on its own and returns it to the system when it is freed: the
resident set then follows torch's live tensors (torch's CPU allocator caches nothing) instead of keeping a heap's
high-water mark. After imports and a warm-up step of a tiny model of the same kind (libraries, kernels, thread
pools), the process reads its resident set (baseline), builds student, teacher and optimizer state and runs the
step, resetting the kernel's peak counter (echo 5 > /proc/self/clear_refs) where each phase starts and reading VmHWM
where it ends: teacher forward (train.py calls teacher.teacher_logits), student forward and loss (to the end of
train.microbatch_loss), backward and optimizer step. Each phase's measured peak minus the baseline is compared with
the static memory plus its moment(s) (the same prediction as for a GPU, without the vLLM, runtime and slack terms);
the command exits non-zero if any phase or the step's peak is off by more than 15%.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GiB = 2**30
CONFIGS = os.path.join(ROOT, "bench", "configs")
EXTRA = {  # this script's own flags: (type, default, help)
    "nproc": (int, 1, "processes (GPUs) of the run"),
    "gpu_gb": (float, 80.0, "nominal GPU memory in GB; usable: 0.99 x that in GiB"),
    "prompt_tokens": (int, 256, "student prompt length assumed"),
    "teacher_prompt_tokens": (int, 2048, "teacher prompt length assumed"),
    "runtime_gb": (float, 1.5, "CUDA context, cuBLAS and NCCL buffers per process, GiB"),
    "model_config": (str, None, "config.json of the model (default: bench/configs/<name>.json or the model folder's)"),
}


# ------------------------------------------------------------------------------------------------ model shapes


@dataclasses.dataclass
class Shape:
    """What the memory depends on, from a transformers config.json (Llama / Qwen2 / Qwen3 families)."""
    H: int        # hidden size
    L: int        # transformer blocks
    nh: int       # attention heads
    nkv: int      # key/value heads
    hd: int       # head dim
    I: int        # MLP intermediate size
    V: int        # vocabulary
    tied: bool    # lm_head is the input embedding matrix
    qk_norm: bool  # Qwen3's per-head RMSNorm on q and k
    qkv_bias: bool

    @classmethod
    def from_config(cls, c):
        nh = c["num_attention_heads"]
        return cls(H=c["hidden_size"], L=c["num_hidden_layers"], nh=nh, nkv=c.get("num_key_value_heads") or nh,
                   hd=c.get("head_dim") or c["hidden_size"] // nh, I=c["intermediate_size"], V=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)), qk_norm=c.get("model_type") == "qwen3",
                   qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")))

    @property
    def Q(self):
        return self.nh * self.hd

    @property
    def K(self):
        return self.nkv * self.hd

    def projections(self):
        """(name, d_in, d_out) of a block's linear layers."""
        H, Q, K, I = self.H, self.Q, self.K, self.I
        return [("q_proj", H, Q), ("k_proj", H, K), ("v_proj", H, K), ("o_proj", Q, H),
                ("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]

    def block_linear_params(self):
        return sum(i * o for _, i, o in self.projections())

    def block_params(self):
        bias = (self.Q + 2 * self.K) if self.qkv_bias else 0
        return self.block_linear_params() + bias + 2 * self.H + (2 * self.hd if self.qk_norm else 0)

    def params(self):
        """Every parameter: embeddings, blocks, final norm, and an untied lm_head."""
        return self.V * self.H * (1 if self.tied else 2) + self.L * self.block_params() + self.H

    def linear_params(self):
        """Weights of nn.Linear layers other than a tied lm_head (what a bf16 frozen teacher holds in 2 bytes)."""
        return self.L * self.block_linear_params() + (0 if self.tied else self.V * self.H)

    def lora_params(self, r, targets):
        return self.L * sum(r * (i + o) for name, i, o in self.projections() if name in targets)


def load_model_config(cfg, path=None):
    """config.json of --model: --model_config, else bench/configs/<lowercased name>.json, else the model's folder."""
    if path is None:
        name = cfg.model
        if name is None:
            import model as modellib

            name = modellib.resolve(None)
        guess = os.path.join(CONFIGS, os.path.basename(name.rstrip("/")).lower() + ".json")
        path = guess if os.path.exists(guess) else os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"gpu_memory.py: no config.json for --model {cfg.model} ({path}); pass --model_config FILE")
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ the prediction


@dataclasses.dataclass
class Setup:
    """A train.py configuration resolved as plumbing.setup() resolves it on the given device."""
    cfg: object
    shape: Shape
    world: int
    device: str          # "cuda" or "cpu"
    gpu_bytes: float     # usable device memory (cuda)
    prompt: int          # student prompt tokens P_s
    teacher_prompt: int  # teacher prompt tokens P_t
    runtime_bytes: float


def resolve(cfg, device):
    """train.py's automatic choices for a run on `device` (cuda: no measurement needed; a CPU run must name --dtype)."""
    import torch

    import plumbing

    plumbing.check_config(cfg)
    dev = torch.device(device)
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if device == "cuda" else "float32"
    cfg.attn = plumbing.choose_attn(cfg, dev, None)
    return dev


def predict(s, earlier=False):
    """{"static": {component: bytes}, "moments": {moment: {part: bytes}}, "peak_moment", "total", ...} for one rank.
    earlier: the same run without the memory savings of train.py's GPU defaults (no gradient checkpointing,
    the plain loss on a GPU unless --chunk_size says otherwise, an fp32 teacher copy, the .grad tensors beside DDP's
    buckets), to show what those savings are worth."""
    import copy

    import plumbing

    cfg, sh, world = copy.deepcopy(s.cfg), s.shape, s.world
    dev = resolve(cfg, s.device)
    if earlier and cfg.chunk_size < 0 and s.device == "cuda":
        cfg.chunk_size = 0
    cfg.chunk_size = plumbing.choose_chunk_size(cfg, dev, None, sh.V)
    ckpt = plumbing.choose_gradient_checkpointing(cfg, dev) if not earlier else bool(cfg.gradient_checkpointing)
    cuda = s.device == "cuda"
    bf16 = cfg.dtype == "bfloat16"
    c = 2 if bf16 else 4
    H, I, V, Q, K, nh, L = sh.H, sh.I, sh.V, sh.Q, sh.K, sh.nh, sh.L
    fsdp = cfg.fsdp
    ddp = world > 1 and not fsdp
    lora_on = cfg.lora_r > 0
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    P = sh.params()
    P_train = sh.lora_params(cfg.lora_r, targets) if lora_on else P
    teacher_on = cfg.method not in plumbing.TEACHERLESS
    trains_head = not lora_on  # LoRA never adapts lm_head or the embeddings

    seqs = cfg.prompts_per_step * cfg.samples_per_prompt // world  # sequences per rank and step
    B = min(cfg.micro_batch, seqs)
    n_micro = math.ceil(seqs / cfg.micro_batch)
    T, Ps, Pt = cfg.max_new_tokens, s.prompt, s.teacher_prompt
    Ls, Lt = Ps + T, Pt + T
    Ns, Nt, Nr = B * Ls, B * Lt, B * T
    X = Nr * V

    # ---- static: held through the whole step
    static = {}
    static["weights (fp32 master)"] = 4 * P / world if fsdp else 4 * P
    if fsdp:  # gathered while computing: the root's weights (embeddings, lm_head, final norm) and two blocks
        static["weights gathered (FSDP)"] = 4 * (V * H * (1 if sh.tied else 2) + H) + 2 * 4 * sh.block_params()
    if not teacher_on or cfg.teacher == "live":
        teacher = 0
    elif lora_on:
        teacher = 4 * P_train if cfg.teacher == "ema" else 0
    elif cfg.teacher == "frozen" and bf16 and not earlier:
        teacher = 2 * sh.linear_params() + 4 * (P - sh.linear_params())
    else:
        teacher = 4 * P
    static["teacher copy"] = teacher
    if ddp:
        static["gradients (DDP buckets)"] = 4 * P_train
    elif fsdp:
        static["gradients (FSDP shard)"] = 4 * P_train / world
    opt = 8 * P_train if cfg.optimizer == "adamw" else 0
    static["optimizer (AdamW m, v)"] = opt / world if fsdp else opt
    backend = cfg.rollout if cfg.rollout != "auto" else ("vllm" if cuda else "hf")
    vllm = cfg.vllm_gpu_memory_utilization * s.gpu_bytes if (cuda and backend == "vllm" and cfg.method != "sft") else 0
    static["vLLM engine"] = 0 if cfg.vllm_sleep else vllm
    static["runtime (CUDA, NCCL)"] = s.runtime_bytes if cuda else 0

    # ---- per-token, per-block saved activations of the student
    repeat = sh.nkv < nh  # with an attention mask (left padding) transformers repeats k and v to every head
    eager = cfg.attn == "eager"

    def block_bytes(S):
        """Bytes saved per token by one block for the backward (see the module docstring); S = sequence length."""
        b = 2 * 8 * H + ((3 + 2) * 2 * H if bf16 else 2 * 4 * H)  # two RMSNorms, their outputs as saved by the linears
        if sh.qk_norm:
            b += (6 if bf16 else 8) * (Q + K)
        b += (2 if bf16 else 4) * Q                                # q as the attention kernel saves it
        b += ((2 if bf16 else 4) * Q if repeat else (2 if bf16 else 4) * K)  # k
        b += c * (Q if repeat else K)                              # v
        b += (4 + (2 if bf16 else 0)) * nh * S if eager else c * Q + 4 * nh  # softmax / sdpa output + lse
        b += c * Q                                                  # o_proj input (the attention output made contiguous)
        b += 4 * c * I                                              # MLP: gate, silu(gate), up, their product
        if lora_on and bf16:  # lora_A saves its own bf16 cast of its input
            b += sum(2 * i for name, i, _ in sh.projections() if name in targets)
        if lora_on:
            b += sum(2 * c * cfg.lora_r for name, _, _ in sh.projections() if name in targets)
        return b

    def mask_bytes(S):  # the (B, 1, S, S) attention mask: bool for sdpa, float32 (added to the scores) for eager
        return B * S * S * (4 if eager else 1)

    def working_set(S, N):
        """Transient bytes of one block's forward without a graph (teacher, HF prefill)."""
        return N * (3 * c * I + 16 * H) + (2 * 4 * nh * S * N if eager else 0)

    def backward_set(S, N):
        """Temporaries of one block's backward: gradients of the residual stream and of the MLP's intermediates."""
        return N * (8 * H + 3 * c * I) + (2 * 4 * nh * S * N if eager else 0)

    acts_all = L * Ns * block_bytes(Ls)
    acts_ckpt = L * Ns * 4 * H
    head_saved = Ns * 8 * H + (Nr * H * (2 if bf16 else 4) if cfg.chunk_size <= 0 else 0)
    chunked = cfg.chunk_size > 0 and cfg.method in ("opsd", "dasd", "sft")

    # ---- the loss
    m = 2 if bf16 else 4
    if chunked:
        C = min(cfg.chunk_size, Nr)
        if cfg.method == "sft":
            bufs = C * V * (m + 4)
        else:
            bufs = 2 * C * V * m + 5 * min(16, Nr) * V * 4
        copies = 0
        if bf16:
            copies += 2 * V * H  # the student's lm_head in bf16 for the matmuls
            head_fp32 = sh.tied or lora_on or cfg.teacher == "ema"  # a bf16 frozen teacher's untied lm_head is bf16
            if teacher_on and cfg.teacher != "live" and not lora_on and head_fp32:
                copies += 2 * V * H  # the teacher's
        grad_w = (4 * V * H + (2 * V * H if bf16 else 0)) if trains_head else 0
        rows = 4 * Nr * H * 4  # row copies of both hidden states, their gradient, the scattered gradient
        hidden = (Nr * H * 4 if teacher_on else 0) + Nr * H * 4  # the loss's inputs: both sides' hidden states
        loss_peak = bufs + copies + grad_w + rows + hidden
        loss_saved = (4 * V * H if trains_head else 0) + Nr * H * 4
        if cfg.exposure == "atesd" and cfg.method != "sft":
            # then chunked_loss.student_confidence: chunk_size rows of logits at a time (the logits, the tempered float32
            # copy, the log-probs), the lm_head's gradient still held, the lm_head in bf16 once more
            R = min(cfg.chunk_size, Nr)
            conf = R * V * (m + 8) + loss_saved + hidden + (2 * V * H if bf16 else 0)
            loss_peak = max(loss_peak, conf)
    else:
        if cfg.method in ("opsd", "dasd"):
            loss_peak = (2 * c + (30 if cfg.method == "opsd" else 33)) * X
            loss_saved = 13 * X
        elif cfg.method == "sft":
            loss_peak, loss_saved = (c + (4 if bf16 else 0) + 4 + 4) * X, 4 * X
        else:  # grpo, dasd_adv: log_softmax of the student (saved), casts; dasd_adv also the teacher's and an entropy
            loss_peak = (c + 4 + (4 if bf16 else 0) + (4 if cfg.temperature != 1.0 else 0)) * X
            if cfg.method == "dasd_adv":
                loss_peak += (c + 16) * X
            loss_saved = 4 * X
        if cfg.exposure == "atesd":  # student_confidence before the loss: 256 rows at a time beside both logits
            loss_peak = max(loss_peak, 2 * c * X + 3 * min(256, Nr) * V * 4)
    teacher_out = (Nr * H * 4 if chunked else Nr * V * c) if teacher_on else 0

    # ---- gradients outside the static part
    grads_before = 0  # gradients of the micro-batches before the last one
    if n_micro > 1 and not fsdp:
        grads_before = 4 * P_train
    head_grad = 4 * V * H if trains_head else 0
    embed_grad = 4 * V * H if trains_head else 0

    # bf16 autocast multiplies bf16 copies of the fp32 weights. Copies of weights that require grad are cached until
    # the autocast region ends (the student's forward, or a live teacher's); a layer whose input requires grad saves
    # its copy for the backward (without checkpointing every block's, LoRA's frozen base included; the plain path's
    # lm_head too); a frozen weight's copy is otherwise made and freed op by op, the largest the lm_head's (2 V H).
    lin_blocks = L * sh.block_linear_params()
    casts_saved = ((2 * lin_blocks if not ckpt else 0) + (0 if chunked else 2 * V * H)) if bf16 else 0
    casts_forward = (2 * V * H + (2 * lin_blocks if not (lora_on and ckpt) else 0)) if bf16 else 0
    if not bf16 or not teacher_on:
        teacher_casts = 0
    elif cfg.teacher == "live" and not lora_on:
        teacher_casts = 2 * lin_blocks + 2 * V * H  # the student's own weights, cached
    elif cfg.teacher == "frozen" and not lora_on and not earlier:
        teacher_casts = 2 * V * H if sh.tied else 0  # bf16 linear weights; a tied lm_head stays fp32
    else:
        teacher_casts = 2 * V * H

    moments = {}
    if teacher_on:
        moments["teacher forward"] = {
            "earlier micro-batches' gradients": grads_before,
            "attention mask": mask_bytes(Lt),
            "one block's working set / at the lm_head: last hidden state, bf16 copy, output": max(
                working_set(Lt, Nt), 4 * Nt * H + teacher_casts + teacher_out),
        }
    moments["student forward"] = {
        "earlier micro-batches' gradients": grads_before,
        "attention mask": mask_bytes(Ls),
        "student activations": acts_ckpt if ckpt else acts_all,
        "final norm, lm_head input": head_saved,
        "logits or hidden states, both sides": teacher_out + (Nr * H * 4 if chunked else Nr * V * c),
        "bf16 weight copies (autocast)": casts_forward,
    }
    moments["loss"] = {
        "earlier micro-batches' gradients": grads_before,
        "attention mask": mask_bytes(Ls),
        "student activations": acts_ckpt if ckpt else acts_all,
        "final norm, lm_head input": head_saved,
        "bf16 weight copies (autocast)": casts_saved,
        "loss (logits or chunk buffers)": loss_peak,
    }
    if ckpt:
        moments["recompute"] = {
            "earlier micro-batches' gradients": grads_before,
            "attention mask": mask_bytes(Ls),
            "block inputs (checkpoints)": acts_ckpt,
            "one block recomputed + its backward": Ns * block_bytes(Ls) + backward_set(Ls, Ns)
            + (2 * sh.block_linear_params() if bf16 else 0),
            "lm_head gradient waiting (tied)": head_grad if sh.tied else 0,
        }
    # a tied matrix's two gradients meet at the end of the backward: the embeddings' (4 V H) is added to the
    # lm_head's, held since the loss's backward. Measured on CPU: in place when the lm_head's came from the chunked
    # loss or from autocast's cast (bf16), into a third tensor when it came from an fp32 nn.Linear (3 x 4 V H above
    # the other gradients then, 2 x otherwise, 1 x untied)
    end = {}
    tied_sum = (2 if not chunked and not bf16 else 1) * embed_grad if sh.tied else 0
    if not ddp and not fsdp:
        end["gradients"] = 4 * P_train
        end["embedding gradient and the sum (tied)"] = tied_sum
    elif ddp:
        end["embedding gradient (tied: + lm_head's, their sum)"] = (embed_grad + tied_sum) if sh.tied else embed_grad
        end["earlier micro-batches' gradients"] = grads_before
        if earlier:
            end["the .grad beside the buckets"] = 4 * P_train
    else:
        end["unsharded gradients (root, one block)"] = 4 * (V * H * (1 if sh.tied else 2) + sh.block_params()) \
            if trains_head else 4 * sh.lora_params(cfg.lora_r, targets) / L
    moments["end of backward"] = end
    if backend == "hf" and cfg.method != "sft":
        moments["rollout (HF generate)"] = {  # keys leave the rotary in fp32 (fp32 cos/sin), values in c
            "KV cache": seqs * Ls * L * sh.K * (4 + c),
            "prefill working set": working_set(Ps, seqs * Ps),
        }
    elif vllm and cfg.vllm_sleep:
        moments["rollout (vLLM awake)"] = {"vLLM engine": vllm}

    sums = {k: sum(v.values()) for k, v in moments.items()}
    # the allocator slack applies to PyTorch's allocations, not to vLLM's own pool (its wake-up empties the cache)
    slacks = {k: (0.10 * v if cuda and k != "rollout (vLLM awake)" else 0.0) for k, v in sums.items()}
    peak_moment = max(sums, key=lambda k: sums[k] + slacks[k])
    dynamic, slack = sums[peak_moment], slacks[peak_moment]
    total = sum(static.values()) + dynamic + slack
    return {"static": static, "moments": moments, "peak_moment": peak_moment, "dynamic": dynamic, "slack": slack,
            "total": total, "capacity": s.gpu_bytes, "B": B, "n_micro": n_micro, "chunk_size": cfg.chunk_size,
            "gradient_checkpointing": ckpt, "dtype": cfg.dtype, "attn": cfg.attn, "world": world,
            "params": P, "trained": P_train, "backend": backend}


def make_setup(argv, device="cuda"):
    """(Setup, extra args) from train.py flags plus this script's own."""
    import train

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for k, (tp, default, _) in EXTRA.items():
        p.add_argument(f"--{k}", type=tp, default=default)
    extra, rest = p.parse_known_args(argv)
    cfg = train.parse_config(rest)
    shape = Shape.from_config(load_model_config(cfg, extra.model_config))
    gpu = extra.gpu_gb * 0.99 * GiB
    return Setup(cfg, shape, extra.nproc, device, gpu, extra.prompt_tokens, extra.teacher_prompt_tokens,
                 extra.runtime_gb * GiB), extra


def gib(x):
    return f"{x / GiB:7.2f}"


def report(pred, title=""):
    lines = [title] if title else []
    lines.append(f"  per rank: B = {pred['B']} sequences x {pred['n_micro']} micro-batch(es), dtype {pred['dtype']}, "
                 f"attn {pred['attn']}, chunk_size {pred['chunk_size']}, gradient_checkpointing "
                 f"{pred['gradient_checkpointing']}, {pred['params'] / 1e9:.3f}B parameters "
                 f"({pred['trained'] / 1e6:.1f}M trained), world {pred['world']}, rollout {pred['backend']}")
    for k, v in pred["static"].items():
        lines.append(f"  {k:44s} {gib(v)} GiB")
    lines.append(f"  {'step peak: ' + pred['peak_moment']:44s} {gib(pred['dynamic'])} GiB")
    for k, v in pred["moments"][pred["peak_moment"]].items():
        if v:
            lines.append(f"    {k:42s} {gib(v)}")
    if pred["slack"]:
        lines.append(f"  {'allocator slack (10% of the step)':44s} {gib(pred['slack'])} GiB")
    fits = pred["total"] <= pred["capacity"]
    lines.append(f"  {'TOTAL':44s} {gib(pred['total'])} GiB of {pred['capacity'] / GiB:.1f}: "
                 f"{'fits' if fits else 'DOES NOT FIT'}")
    others = ", ".join(f"{k} {sum(v.values()) / GiB:.2f}" for k, v in pred["moments"].items())
    lines.append(f"  (step moments, GiB: {others})")
    return "\n".join(lines), fits


# ------------------------------------------------------------------------------------------------ --readme


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """[(line number, nproc, train.py argv)] of every command line starting with torchrun that runs train.py."""
    with open(path) as f:
        raw = f.read().split("\n")
    out, i = [], 0
    while i < len(raw):
        line, start = raw[i].strip(), i + 1
        while line.endswith("\\") and i + 1 < len(raw):
            i += 1
            line = line[:-1] + " " + raw[i].strip()
        i += 1
        if not line.startswith("torchrun"):
            continue
        toks = shlex.split(line)
        if "train.py" not in toks:
            continue
        at = toks.index("train.py")
        nproc, launcher = 1, " ".join(toks[:at])
        m = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", launcher)
        if m:
            nproc = int(m.group(1))
        out.append((start, nproc, toks[at + 1:]))
    return out


def what_fits(argv, nproc, extra_argv):
    """The smallest changes of flags (one at a time, then pairs) that make a configuration fit."""
    # --fsdp with the plain loss: train.py's automatic choice under FSDP (the chunked loss multiplies by the lm_head
    # outside the sharded forward)
    tries = [["--vllm_sleep", "true"], ["--gradient_checkpointing", "true"], ["--micro_batch", "2"],
             ["--micro_batch", "1"], ["--chunk_size", "512"], ["--fsdp", "true", "--chunk_size", "0"],
             ["--lora_r", "64"]]
    fits = []
    for t in tries:
        s, _ = make_setup(argv + t + ["--nproc", str(nproc)] + extra_argv)
        pred = predict(s)
        if pred["total"] <= pred["capacity"]:
            fits.append((" ".join(t), pred["total"]))
    if not fits:
        for a in range(len(tries)):
            for b in range(a + 1, len(tries)):
                s, _ = make_setup(argv + tries[a] + tries[b] + ["--nproc", str(nproc)] + extra_argv)
                pred = predict(s)
                if pred["total"] <= pred["capacity"]:
                    fits.append((" ".join(tries[a] + tries[b]), pred["total"]))
    return fits


def run_readme(extra_argv):
    """Every README command: its breakdown, then one table (a column per command). 1 if one does not fit."""
    cmds = readme_commands()
    if not cmds:
        raise SystemExit("gpu_memory.py: no torchrun ... train.py command in README.md")
    cols, ok = [], True
    for line, nproc, argv in cmds:
        s, _ = make_setup(argv + ["--nproc", str(nproc)] + extra_argv)
        pred = predict(s)
        text, fits = report(pred, f"README.md line {line}: torchrun --nproc_per_node={nproc} train.py "
                                  + " ".join(argv))
        print(text)
        s0, _ = make_setup(argv + ["--nproc", str(nproc), "--gradient_checkpointing", "false"] + extra_argv)
        no_ckpt = predict(s0)["total"]
        earlier = predict(s, earlier=True)["total"]
        print(f"  without gradient checkpointing: {no_ckpt / GiB:.2f} GiB; with the earlier defaults (no "
              f"checkpointing, fp32 teacher copy, .grad beside DDP's buckets): {earlier / GiB:.2f} GiB")
        changes = []
        if not fits:
            ok = False
            changes = what_fits(argv, nproc, extra_argv)
            print("  flag changes that make it fit: " + ("; ".join(f"{c} ({t / GiB:.1f} GiB)" for c, t in changes)
                                                         if changes else "none of those tried"))
        print()
        cols.append((f"line {line}", pred, fits, no_ckpt, earlier, changes))

    rows = list(dict.fromkeys(k for _, p, *_ in cols for k in p["static"]))
    w = 14
    print(f"per GPU, GiB, on {cols[0][1]['capacity'] / GiB:.1f} GiB (80 GB) cards")
    print(f"{'README.md command':44s}" + "".join(f"{c[0]:>{w}s}" for c in cols))
    for k in rows:
        print(f"{k:44s}" + "".join(f"{p['static'].get(k, 0) / GiB:>{w}.2f}" for _, p, *_ in cols))
    print(f"{'step peak':44s}" + "".join(f"{p['dynamic'] / GiB:>{w}.2f}" for _, p, *_ in cols))
    print(f"{'  at':44s}" + "".join(f"{p['peak_moment'][:w - 1]:>{w}s}" for _, p, *_ in cols))
    print(f"{'allocator slack':44s}" + "".join(f"{p['slack'] / GiB:>{w}.2f}" for _, p, *_ in cols))
    print(f"{'TOTAL':44s}" + "".join(f"{p['total'] / GiB:>{w}.2f}" for _, p, *_ in cols))
    print(f"{'fits':44s}" + "".join(f"{'yes' if f else 'NO':>{w}s}" for _, _, f, *_ in cols))
    print(f"{'total without gradient checkpointing':44s}" + "".join(f"{c[3] / GiB:>{w}.2f}" for c in cols))
    print(f"{'total with the earlier defaults':44s}" + "".join(f"{c[4] / GiB:>{w}.2f}" for c in cols))
    print("\nall README commands fit" if ok else "\nNOT every README command fits")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ --validate

VALIDATE_B, VALIDATE_T, VALIDATE_PS, VALIDATE_PT = 2, 256, 64, 128
VALIDATE = [  # (name, blocks, train.py flags)
    (f"{n}L {name}", n, flags) for n in (2, 4) for name, flags in [
        ("plain opsd", ["--method", "opsd", "--exposure", "full", "--chunk_size", "0"]),
        ("plain opsd + ckpt", ["--method", "opsd", "--exposure", "full", "--chunk_size", "0",
                               "--gradient_checkpointing", "true"]),
        ("chunked dasd atesd", ["--method", "dasd", "--exposure", "atesd", "--chunk_size", "512"]),
        ("chunked dasd atesd + ckpt", ["--method", "dasd", "--exposure", "atesd", "--chunk_size", "512",
                                       "--gradient_checkpointing", "true"]),
    ]] + [  # under bf16 autocast, as on a GPU (README's two recipes at reduced depth); eager attention still
    ("2L plain opsd bf16", 2, ["--method", "opsd", "--exposure", "full", "--chunk_size", "0", "--dtype", "bfloat16"]),
    ("2L chunked dasd atesd bf16 + ckpt", 2, ["--method", "dasd", "--exposure", "atesd", "--chunk_size", "512",
                                             "--gradient_checkpointing", "true", "--dtype", "bfloat16"]),
    ("2L chunked opsd LoRA64 bf16 + ckpt", 2, ["--method", "opsd", "--exposure", "full", "--chunk_size", "512",
                                              "--lora_r", "64", "--gradient_checkpointing", "true",
                                              "--dtype", "bfloat16"]),
]
VALIDATE_COMMON = ["--dtype", "float32", "--prompts_per_step", str(VALIDATE_B), "--micro_batch", str(VALIDATE_B),
                   "--max_new_tokens", str(VALIDATE_T), "--temperature", "1.1", "--rollout", "hf", "--lr", "1e-6"]


def proc_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def build_run(cfg, model_cfg):
    """student, teacher and optimizer as plumbing.setup() builds them (no checkpoint, one process), around a model
    made from model_cfg with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import teacher as teacherlib
    import plumbing
    import train

    conf = AutoConfig.for_model(**{k: v for k, v in model_cfg.items() if k != "architectures"})
    conf._attn_implementation = cfg.attn
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    if cfg.lora_r:
        student = plumbing.add_lora(cfg, student)
    teacher = None
    if cfg.method not in plumbing.TEACHERLESS:
        teacher = teacherlib.make_teacher(student, mode=cfg.teacher,
                                          linear_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
    student.train()
    if cfg.gradient_checkpointing:
        plumbing.enable_gradient_checkpointing(student)
    if cfg.teacher == "live" and teacher is not None:
        teacher = student
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused_adamw or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = train.Run(cfg=cfg, asked=cfg, ddp=False, rank=0, world=1, device=torch.device("cpu"), rows=[], tok=None,
                    student=student, train_model=student, teacher_model=teacher, opt=opt, sched=sched, expo=None,
                    engine=None, start_step=0, n_skipped=0, ckpt_dir="")
    return run


def fake_batch(B, T, Ps, Pt, V, seed=0):
    import random

    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, V) for _ in range(n)]
    return [{"student_prompt": tok(Ps), "teacher_prompt": tok(Pt), "response": tok(T), "loss_len": T, "answer": "0"}
            for _ in range(B)]


def validate_worker(name, blocks, flags):
    """One configuration in this (fresh) process: prints a JSON line with measured and predicted bytes."""
    import gc

    import torch

    import teacher as teacherlib
    import plumbing
    import train

    cfg = train.parse_config(VALIDATE_COMMON + flags)
    resolve(cfg, "cpu")
    cfg.chunk_size = plumbing.choose_chunk_size(cfg, torch.device("cpu"), None, 151936)
    cfg.gradient_checkpointing = plumbing.choose_gradient_checkpointing(cfg, torch.device("cpu"))
    base = load_model_config(cfg, os.path.join(CONFIGS, "qwen3-1.7b.json"))

    # warm-up: the same step on a tiny model of the same kind loads every library, kernel and thread pool
    tiny = dict(base, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=512)
    run = build_run(cfg, tiny)
    train.train_on_batch(run, fake_batch(VALIDATE_B, 16, 8, 12, 512))
    del run
    gc.collect()

    rss0 = proc_kb("VmRSS") * 1024
    model_cfg = dict(base, num_hidden_layers=blocks)
    run = build_run(cfg, model_cfg)
    params = [p for p in run.student.parameters() if p.requires_grad]
    for p in params:  # the AdamW state of a run past its first step (a zero gradient changes no weight: wd = 0)
        p.grad = torch.zeros_like(p)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    batch = fake_batch(VALIDATE_B, VALIDATE_T, VALIDATE_PS, VALIDATE_PT, 151936)
    gc.collect()
    rss_pre = proc_kb("VmRSS") * 1024

    # the peak of each phase: the counter is reset where a phase starts and read where it ends
    phases = {}

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            phases[label] = proc_kb("VmHWM") * 1024 - rss0
            reset()  # the next phase starts here
            return out
        return wrapper

    teacher_logits, microbatch_loss = teacherlib.teacher_logits, train.microbatch_loss
    teacherlib.teacher_logits = timed(teacher_logits, "teacher forward")
    train.microbatch_loss = timed(microbatch_loss, "loss")
    reset()
    try:
        sums, n_local, gnorm, finite = train.train_on_batch(run, batch)
    finally:
        teacherlib.teacher_logits, train.microbatch_loss = teacher_logits, microbatch_loss
    phases["backward, optimizer"] = proc_kb("VmHWM") * 1024 - rss0
    hwm = rss0 + max(phases.values())
    assert finite, "the validation step was not finite"

    s = Setup(train.parse_config(VALIDATE_COMMON + flags), Shape.from_config(model_cfg), 1, "cpu", 0.0,
              VALIDATE_PS, VALIDATE_PT, 0.0)
    pred = predict(s)
    print(json.dumps({"name": name, "measured": hwm - rss0, "measured_static": rss_pre - rss0,
                      "measured_step": hwm - rss_pre, "predicted": pred["total"],
                      "predicted_static": sum(pred["static"].values()), "predicted_step": pred["dynamic"],
                      "peak_moment": pred["peak_moment"], "phases": phases,
                      "moments": {k: sum(v.values()) for k, v in pred["moments"].items()},
                      "loss": sums.get("loss/total")}))


PHASES = {"teacher forward": ["teacher forward"], "loss": ["student forward", "loss"],
          "backward, optimizer": ["recompute", "end of backward"]}


def run_validate(only=None, tolerance=0.15):
    print(f"Qwen3-1.7B width and vocabulary (bench/configs/qwen3-1.7b.json) at 2 and 4 blocks, random weights, "
          f"float32, eager attention, CPU; B = {VALIDATE_B}, prompt {VALIDATE_PS} (teacher {VALIDATE_PT}) + "
          f"{VALIDATE_T} response tokens; one train.py train_on_batch with the AdamW state in place.\n"
          f"MiB above the process before the model was built; each phase's peak (static memory included) is "
          f"predicted by its moment(s): teacher forward; loss = the student's forward and the loss; backward = "
          f"max(recompute, end of backward).\n")
    head = f"{'configuration':36s} {'static p / m':>13s}"
    for ph in PHASES:
        head += f" | {ph[:9] + ' p / m':>16s} {'ratio':>5s}"
    print(head + f" | {'PEAK p / m':>15s} {'ratio':>5s}")
    bad = 0
    for name, blocks, flags in VALIDATE:
        if only and not any(o in name for o in only):
            continue
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--validate-one", name], capture_output=True,
                           text=True, cwd=ROOT, env=env)
        if p.returncode != 0:
            print(f"{name:36s} FAILED (exit {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
            bad += 1
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        mb = lambda x: f"{x / 2**20:6.0f}"
        row = f"{name:36s} {mb(r['predicted_static'])} /{mb(r['measured_static'])}"
        off = []
        steps = []
        for ph, moments in PHASES.items():
            pred = r["predicted_static"] + max(r["moments"].get(mo, 0) for mo in moments)
            meas = r["phases"][ph]
            ratio = pred / meas
            row += f" | {mb(pred)} /{mb(meas)} {ratio:5.2f}"
            if abs(ratio - 1) > tolerance:
                off.append(ph)
            steps.append(f"{ph.split(',')[0]} {mb(pred - r['predicted_static']).strip()} / "
                         f"{mb(meas - r['measured_static']).strip()}")
        ratio = r["predicted"] / r["measured"]
        if abs(ratio - 1) > tolerance:
            off.append("peak")
        row += f" | {mb(r['predicted'])} /{mb(r['measured'])} {ratio:5.2f}"
        bad += bool(off)
        print(row + (f"   OFF: {', '.join(off)}" if off else ""), flush=True)
        print(f"{'':36s} above the static memory, p / m: " + ", ".join(steps), flush=True)
    print(f"\n{'every phase of every configuration within' if not bad else f'{bad} configuration(s) off by more than'} "
          f"{tolerance:.0%} (p = predicted, m = measured)")
    return 1 if bad else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--validate-one" in argv:
        name = argv[argv.index("--validate-one") + 1]
        _, blocks, flags = next(v for v in VALIDATE if v[0] == name)
        validate_worker(name, blocks, flags)
        return 0
    if "--validate" in argv:
        rest = [a for a in argv if a != "--validate"]
        only = rest[rest.index("--only") + 1:] if "--only" in rest else None
        return run_validate(only)
    if "--readme" in argv:
        return run_readme([a for a in argv if a != "--readme"])
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    s, extra = make_setup(argv)
    pred = predict(s)
    text, fits = report(pred, f"{s.cfg.model or 'embedded model'} on {extra.nproc} x {extra.gpu_gb:g} GB")
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
