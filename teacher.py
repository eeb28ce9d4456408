"""The privileged self-teacher: the same network as the student, shown (part of) the reference solution.

Papers: "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs" (arXiv 2601.18734) and
"Adaptive Teacher Exposure for Self-Distillation in LLM Reasoning" (arXiv 2605.11458).

What this file computes, per problem x with reference solution y* = (s_1..s_m) (m steps) and answer a:

    student prompt   = chat(x + "reason step by step, answer in \\boxed{}")
    c(alpha)         = s_1 .. s_k  +  "Answer: \\boxed{a}",      k = ceil(alpha * m)
    teacher prompt   = chat(x + "here is a reference solution" + c(alpha) + "now solve it yourself")

    teacher scoring of the student's own response y = (y_1..y_T), teacher-forced:
        logits_T[t] = f_theta_T([teacher prompt | y_<t])      t = 1..T   (the row that predicts y_t)
    the same function gives the student's logits with the student prompt (and with grad).

    teacher weights theta_T:  frozen = theta_0 (default),  live = theta,
                              ema:  theta_T <- decay * theta_T + (1 - decay) * theta
    under LoRA (theta = W + s B A, W frozen):  frozen = W (adapter off),  live = the adapter on,
                              ema:  (A_T, B_T) <- decay * (A_T, B_T) + (1 - decay) * (A, B)

    answer guard (ATESD reward):  g = (1/|a'|) * sum_j log p_T(a'_j | teacher prompt, "The final
                                   answer is \\boxed{", a'_<j),   a' = tokens of "a}"

Where the papers are silent: what a step is and how many are revealed (docs/choices.md, choice 5); the
teacher's prompt, one user turn (docs/choices.md, choice 35); thinking mode and the teacher's first token
(docs/choices.md, choice 22); padded batches that equal unpadded forwards (docs/choices.md, choice 36); the answer
guard, scored with or without the answer shown (docs/choices.md, choice 8); the EMA copies buffers too
(docs/choices.md, choice 37); a LoRA student's teacher is its own network (docs/choices.md, choice 38); the frozen
copy's linear weights in bf16 (docs/choices.md, choice 39).

Example:
    python teacher.py        # prints prompts at several exposures and a teacher-scoring demo
"""

import contextlib
import copy
import math
import re

import torch

import lora

# ---------------------------------------------------------------------------------------------
# exposure: which part of the reference the teacher sees

# a segment that only states the final answer, e.g. "Answer: \boxed{7}" or "The answer is $\boxed{7}$."
ANSWER_LINE = re.compile(r"^\W*((final\s+)?answer|the\s+(final\s+)?answer\s+is|so\s+the\s+answer\s+is)?\W*"
                         r"\$*\\boxed\{.*\}\$*\W*$", re.IGNORECASE | re.DOTALL)


def split_steps(solution):
    """The reasoning steps of a solution: blank-line paragraphs if there are any, else lines.
    Empty segments and a trailing bare answer line are dropped."""
    text = solution.strip()
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.split("\n")
    steps = [p.strip() for p in parts if p.strip()]
    if steps and ANSWER_LINE.match(steps[-1]):
        steps = steps[:-1]
    return steps


def reveal(solution, answer, alpha, *, show_answer=True):
    """The first ceil(alpha * m) of the m steps, then the final answer (always, unless show_answer=False).
    alpha=0: the answer alone (a hint); alpha=1: the whole solution."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    steps = split_steps(solution)
    k = math.ceil(alpha * len(steps) - 1e-9)  # the epsilon absorbs float noise (docs/choices.md, choice 5)
    shown = steps[:k]
    if show_answer and not (shown and "\\boxed{" in shown[-1]):  # don't repeat an answer already shown
        shown = shown + [f"Answer: \\boxed{{{answer}}}"]
    return "\n".join(shown)


# ---------------------------------------------------------------------------------------------
# prompts (plain message lists, then token ids through the chat template)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TRANSITION = ("Now that you have seen the reference, solve the problem yourself, in your own words. "
              + INSTRUCTION)


def answer_span_start(tokenizer, response_ids, marker="\\boxed"):
    """Index of the response token where its final-answer span begins: the token holding the start of the last
    `marker` in the decoded response; len(response_ids) when it has none. Token boundaries do not follow characters,
    so the span starts at the first token whose decoded prefix reaches the marker's first character (a binary
    search over prefixes: O(T log T) decodes)."""
    c = tokenizer.decode(response_ids).rfind(marker)
    if c < 0:
        return len(response_ids)
    lo, hi = 0, len(response_ids) - 1
    while lo < hi:  # the smallest i whose prefix response_ids[: i + 1] decodes past character c
        mid = (lo + hi) // 2
        if len(tokenizer.decode(response_ids[: mid + 1])) > c:
            hi = mid
        else:
            lo = mid + 1
    return lo


def student_messages(problem):
    """The student sees the problem only."""
    return [{"role": "user", "content": f"{problem}\n\n{INSTRUCTION}"}]


def teacher_messages(problem, solution, answer, *, alpha=1.0, show_answer=True):
    """The teacher sees the problem, the exposed part of the reference (and the answer), then a transition."""
    steps = split_steps(solution)
    k = math.ceil(alpha * len(steps) - 1e-9)
    context = reveal(solution, answer, alpha, show_answer=show_answer)
    if k >= len(steps) and steps:
        header = "Here is a reference solution to this problem:"
    elif k > 0:
        header = ("Here is the beginning of a reference solution to this problem"
                  + (", followed by its final answer:" if show_answer else ":"))
    else:
        header = "Here is the final answer to this problem:" if show_answer else "No reference is given."
    return [{"role": "user", "content": f"{problem}\n\n{header}\n{context}\n\n{TRANSITION}".replace("\n\n\n", "\n\n")}]


def chat_ids(tokenizer, messages, *, enable_thinking=None):
    """Token ids of messages + the assistant generation prompt, straight from the chat template
    (never decode-and-retokenize: that can drop or merge the template's special tokens)."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False, **kwargs)
    return list(ids)


def student_prompt_ids(tokenizer, problem, *, enable_thinking=None):
    return chat_ids(tokenizer, student_messages(problem), enable_thinking=enable_thinking)


def generation_prompt_ids(tokenizer, messages, *, enable_thinking=None):
    """The ids the template appends after `messages` to open the assistant's turn (Qwen3 with
    enable_thinking=False: "<|im_start|>assistant\n<think>\n\n</think>\n\n"): chat_ids minus the same
    messages rendered without a generation prompt."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    body = list(tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                              return_dict=False, **kwargs))
    full = chat_ids(tokenizer, messages, enable_thinking=enable_thinking)
    if full[: len(body)] != body:
        raise ValueError("the chat template's generation prompt does not extend the conversation's token ids")
    return full[len(body):]


def teacher_prompt_ids(tokenizer, problem, solution, answer, *, alpha=1.0, enable_thinking=None, show_answer=True,
                       closed_think=False):
    """closed_think: open the teacher's turn with the template's non-thinking generation prompt (Qwen3: an empty
    think block) in place of its own, so the teacher scores the response where a non-thinking student generated it
    (docs/choices.md, choice 22). The conversation part keeps enable_thinking; a template without thinking is
    unaffected."""
    messages = teacher_messages(problem, solution, answer, alpha=alpha, show_answer=show_answer)
    ids = chat_ids(tokenizer, messages, enable_thinking=enable_thinking)
    if closed_think:
        own = generation_prompt_ids(tokenizer, messages, enable_thinking=enable_thinking)
        ids = ids[: len(ids) - len(own)] + generation_prompt_ids(tokenizer, messages, enable_thinking=False)
    return ids


# ---------------------------------------------------------------------------------------------
# scoring a response: the logits (or hidden states) at exactly the rows that predict it


def response_forward(model, prompt_ids, response_ids, *, hidden=False, pad_id=0):
    """Forward B sequences [prompt_b | response_b]; return (out, mask).

    out:  (B, T, V) logits, or with hidden=True the (B, T, H) final hidden states (after the final
          norm, so out @ lm_head.weight.T == logits), where row t predicts response token t.
    mask: (B, T) bool, True at real response tokens.
    Grad flows if enabled; `model` may be wrapped (DistributedDataParallel, FSDP2): we only call model(...),
    so the wrapper's hooks run; hidden=True reads the inner decoder's output through a forward hook.
    """
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(len(r) for r in response_ids)
    assert min(len(p) for p in prompt_ids) > 0, "every prompt needs at least one token to predict the response from"
    device = next(model.parameters()).device
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)  # (B, P+T)
    attn = torch.zeros((B, P + T), dtype=torch.long)  # (B, P+T)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        # left-pad the prompt so the response starts at column P; right-pad the response
        input_ids[b, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
        input_ids[b, P : P + len(r)] = torch.as_tensor(r, dtype=torch.long)
        attn[b, P - len(p) : P + len(r)] = 1
    # positions count real tokens only, so a left-padded row sees the same positions (0, 1, ...) as
    # the unpadded sequence would; pads get position 0 (they are masked out anyway)
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B, P+T)
    mask = torch.arange(T)[None, :] < torch.tensor([len(r) for r in response_ids])[:, None]  # (B, T)
    # the logit at column j predicts the token at column j+1: response token t sits at P+t
    keep = torch.arange(P - 1, P - 1 + T, device=device)  # (T,)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
    if hidden:
        # the decoder's output (after its final norm) is the last hidden state: a hook takes it there.
        # output_hidden_states would keep every layer's hidden state until the forward returns; an empty
        # logits_to_keep computes no logits
        last = []
        hook = decoder(model).register_forward_hook(lambda mod, args, out: last.append(out.last_hidden_state))
        try:
            model(**kwargs, output_hidden_states=False, logits_to_keep=keep[:0])
        finally:
            hook.remove()
        return last[0][:, keep, :], mask.to(device)  # (B, T, H)
    out = model(**kwargs, logits_to_keep=keep)
    return out.logits, mask.to(device)  # (B, T, V)


def teacher_logits(teacher_model, prompt_ids, response_ids, *, hidden=False, pad_id=0):
    """The teacher's scores of the student's response. no_grad: the teacher is a fixed target of the
    distillation loss; gradients must reach the student only, and not storing the teacher's
    activations halves the memory of a step (in live mode the teacher IS the student, and without
    no_grad the loss would also pull the target toward the student)."""
    with torch.no_grad():
        return response_forward(teacher_model, prompt_ids, response_ids, hidden=hidden, pad_id=pad_id)


# ---------------------------------------------------------------------------------------------
# teacher weights: frozen / live / EMA


def unwrap(model):
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def decoder(model):
    """The causal LM's decoder (transformers' get_decoder(): embeddings, blocks, final norm; no lm_head) inside
    DistributedDataParallel (.module), a LoraTeacher (.net) and peft (get_base_model()); FSDP2 keeps the class."""
    model = unwrap(model)
    model = model.net if isinstance(model, LoraTeacher) else model
    return (model.get_base_model() if lora.is_lora(model) else model).get_decoder()


def make_teacher(student, mode="frozen", linear_dtype=None):
    """frozen: a copy of the initial student, never updated (default);
    live: the student itself (no copy, same weights at every step);
    ema: a copy that ema_update() moves toward the student after each optimizer step.
    A LoRA student (lora.py) gets no copy: frozen and ema are a LoraTeacher over its own network
    (docs/choices.md, choice 38). linear_dtype (frozen copy only): the dtype of its nn.Linear weights, e.g.
    torch.bfloat16 (docs/choices.md, choice 39); the embeddings, a tied lm_head and everything else keep the
    student's dtype. None: an exact copy."""
    if mode == "live":
        return student
    if mode not in ("frozen", "ema"):
        raise ValueError(f"teacher mode must be frozen, live or ema, got {mode!r}")
    if lora.is_lora(unwrap(student)):
        return LoraTeacher(unwrap(student), mode)
    memo = linear_weight_copies(unwrap(student), linear_dtype) if mode == "frozen" and linear_dtype else {}
    teacher = copy.deepcopy(unwrap(student), memo)  # deepcopy keeps tied embeddings tied
    teacher.requires_grad_(False)
    return teacher.eval()


def linear_weight_copies(model, dtype):
    """{id(weight): its dtype copy} for every nn.Linear weight of model except one tied to the input embeddings:
    a deepcopy memo, so the copy is made in dtype directly (no transient full-precision copy of those weights)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    out = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not emb_weight and m.weight.dtype != dtype:
            out[id(m.weight)] = torch.nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
    return out


class LoraTeacher(torch.nn.Module):
    """The frozen or EMA teacher of a LoRA student, without a second copy of the weights: the student's own peft
    network, run with its adapter off (frozen) or with the EMA adapter put in (ema) for the duration of one forward
    (docs/choices.md, choice 38). The student is a registered submodule, so parameters() are the student's tensors."""

    def __init__(self, student, mode):
        super().__init__()
        self.net, self.mode = student, mode  # the bare peft model: the teacher never runs through DDP's forward
        # (A_T, B_T): whole tensors, not parameters, so no optimizer, DDP or FSDP ever sees them
        self.ema = {}
        if mode == "ema":
            self.ema = {n: lora.full(p.detach()).clone() for n, p in lora.adapter_params(student).items()}

    def forward(self, **kwargs):
        with torch.no_grad(), self.teacher_weights():
            return self.net(**kwargs)

    @contextlib.contextmanager
    def teacher_weights(self):
        if self.mode == "frozen":
            with self.net.disable_adapter():  # every adapted layer computes W x alone
                yield
            return
        params = lora.adapter_params(self.net)
        student = {n: p.detach().clone() for n, p in params.items()}
        # written through .data: the parameter objects, their storage and requires_grad stay as DDP / FSDP
        # registered them, and autograd records nothing (the student's values are back before any backward)
        for n, p in params.items():
            p.data.copy_(lora.shard_like(self.ema[n], p))
        try:
            yield
        finally:
            for n, p in params.items():
                p.data.copy_(student[n])

    def get_output_embeddings(self):
        return self.net.get_output_embeddings()  # lm_head has no adapter: the student's and the teacher's are one

    def train(self, mode=True):
        return self  # the network is the student's: eval() or train() on the teacher must not switch the student


@torch.no_grad()  # an in-place update of the target; it must not enter any autograd graph
def ema_update(teacher, student, decay):
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, parameter by parameter (buffers copied).
    Under LoRA the adapter alone: A_T <- decay * A_T + (1 - decay) * A_S, and the same for B."""
    student = unwrap(student)
    if isinstance(teacher, LoraTeacher):
        for name, p in lora.adapter_params(student).items():
            teacher.ema[name].mul_(decay).add_(lora.full(p.detach()), alpha=1.0 - decay)
        return
    params_s = dict(student.named_parameters())
    for name, p_t in teacher.named_parameters():
        p_t.mul_(decay).add_(params_s[name].detach().to(p_t.dtype), alpha=1.0 - decay)
    buffers_s = dict(student.named_buffers())
    for name, b_t in teacher.named_buffers():
        b_t.copy_(buffers_s[name])


def ema_state(teacher):
    """What a checkpoint keeps of an EMA teacher, on CPU: its weights, or under LoRA its EMA adapter alone."""
    sd = teacher.ema if isinstance(teacher, LoraTeacher) else teacher.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items()}


def load_ema_state(teacher, state):
    """The inverse of ema_state (for --resume)."""
    if not isinstance(teacher, LoraTeacher):
        teacher.load_state_dict(state)
        return
    if set(state) != set(teacher.ema):
        raise ValueError("the EMA adapter in the checkpoint does not fit the model's adapter")
    for k, v in state.items():
        teacher.ema[k].copy_(v)


# ---------------------------------------------------------------------------------------------
# answer guard for the exposure controller

ANSWER_LEAD = "The final answer is \\boxed{"


def answer_logprob(model, tokenizer, teacher_prompt_ids, answers, *, lead=ANSWER_LEAD):
    """(B,) mean per-token log-probability of "answer}" after teacher prompt + `lead`, the answer guard
    (docs/choices.md, choice 8). The lead and the scored part are tokenized separately, so the scored tokens are
    exactly the answer's and the closing brace's, whatever the tokenizer would merge across the boundary."""
    lead_ids = tokenizer(lead, add_special_tokens=False)["input_ids"]
    prompts = [list(p) + lead_ids for p in teacher_prompt_ids]
    targets = [tokenizer(f"{a}}}", add_special_tokens=False)["input_ids"] for a in answers]
    logits, mask = teacher_logits(model, prompts, targets)  # (B, T, V), (B, T)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    T = logits.shape[1]
    y = torch.tensor([t + [0] * (T - len(t)) for t in targets], device=logits.device)  # (B, T)
    logp_y = logp.gather(-1, y[..., None]).squeeze(-1)  # (B, T)
    m = mask.float()
    return (logp_y * m).sum(1) / m.sum(1).clamp(min=1)  # (B,)


if __name__ == "__main__":
    from transformers import LlamaConfig, LlamaForCausalLM

    solution = "Mia gets 7 more apples: 12 + 7 = 19.\nMia has 5 fewer apples: 19 - 5 = 14.\nAnswer: \\boxed{14}"
    print("steps:", split_steps(solution))
    for alpha in (0.0, 0.5, 1.0):
        print(f"\nreveal(alpha={alpha}):\n{reveal(solution, '14', alpha)}")
    print("\nteacher message at alpha=0.5:\n" + teacher_messages("Mia has 12 apples...", solution, "14", alpha=0.5)[0]["content"])

    # a tiny random model: batched teacher scoring equals the unpadded forward row by row
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    net = LlamaForCausalLM(cfg).eval()
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [30]]
    logits, mask = teacher_logits(net, prompts, responses)
    print("\nlogits", tuple(logits.shape), "mask", mask.tolist())
    with torch.no_grad():
        ref = net(torch.tensor([prompts[1] + responses[1]])).logits[0, len(prompts[1]) - 1]
    print("row 1, t=0: batched vs unpadded max |diff| =", (logits[1, 0] - ref).abs().max().item())
