"""Tests for teacher.py: prompts, exposure truncation, exact response alignment, teacher weights."""

import math
import os

import pytest
import torch

import teacher

SOLUTION = ("Mia gets 7 more apples: 12 + 7 = 19.\n"
            "Mia has 5 fewer apples: 19 - 5 = 14.\n"
            "The number of apples doubles: 14 * 2 = 28.\n"
            "Mia keeps half of the apples: 28 / 2 = 14.\n"
            "Answer: \\boxed{14}")
STEPS = SOLUTION.split("\n")[:4]

# a Qwen3-like template written for these tests: ChatML, and with enable_thinking=false an empty
# think block right after the assistant generation prompt (as Qwen3's own template does)
QWEN3_STYLE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def chatml_tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def qwen3_tok(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = QWEN3_STYLE
    return tok


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ steps and exposure


def test_split_steps_lines_paragraphs_and_answer_line():
    assert teacher.split_steps(SOLUTION) == STEPS
    assert teacher.split_steps("a = 1\n\nb = 2\nstill b\n\n\\boxed{3}") == ["a = 1", "b = 2\nstill b"]
    assert teacher.split_steps("  x = 1 \n\n\n") == ["x = 1"]
    assert teacher.split_steps("\\boxed{3}") == []
    # a last step that computes and boxes at once is a step, not a bare answer line
    assert teacher.split_steps("x = 1\nso 1 + 2 = \\boxed{3}") == ["x = 1", "so 1 + 2 = \\boxed{3}"]


@pytest.mark.parametrize("alpha, k", [(0.0, 0), (0.01, 1), (0.1, 1), (0.25, 1), (0.5, 2), (0.51, 3), (0.75, 3), (1.0, 4)])
def test_reveal_shows_ceil_alpha_m_steps_and_the_answer(alpha, k):
    expected = "\n".join(STEPS[:k] + ["Answer: \\boxed{14}"])
    assert teacher.reveal(SOLUTION, "14", alpha) == expected


def test_reveal_alpha_zero_half_one():
    assert teacher.reveal(SOLUTION, "14", 0.0) == "Answer: \\boxed{14}"  # a pure hint
    assert teacher.reveal(SOLUTION, "14", 0.5) == "\n".join(STEPS[:2]) + "\nAnswer: \\boxed{14}"
    assert teacher.reveal(SOLUTION, "14", 1.0) == SOLUTION  # the whole solution, unchanged
    assert teacher.reveal(SOLUTION, "14", 0.5, show_answer=False) == "\n".join(STEPS[:2])


def test_reveal_one_step_solution():
    one = "Tom gets 4 more pens: 3 + 4 = 7.\nAnswer: \\boxed{7}"
    assert teacher.reveal(one, "7", 0.0) == "Answer: \\boxed{7}"
    assert teacher.reveal(one, "7", 0.01) == one  # ceil(0.01 * 1) = 1
    assert teacher.reveal(one, "7", 0.5) == one
    assert teacher.reveal(one, "7", 1.0) == one


def test_reveal_float_noise_and_boxed_last_step():
    many = "\n".join(f"step {i}" for i in range(25))
    assert 0.28 * 25 > 7  # the float noise the epsilon must absorb: 7.000000000000001
    assert teacher.reveal(many, "9", 0.28) == "\n".join(f"step {i}" for i in range(7)) + "\nAnswer: \\boxed{9}"
    boxed_last = "x = 1\nso 1 + 2 = \\boxed{3}"
    assert teacher.reveal(boxed_last, "3", 1.0) == boxed_last  # the answer is not repeated
    with pytest.raises(ValueError):
        teacher.reveal(SOLUTION, "14", 1.5)


# ------------------------------------------------------------------ prompts through chat templates


def test_chatml_student_and_teacher_prompts(chatml_tok):
    problem = "Mia has 12 apples. How many now?"
    ids = teacher.student_prompt_ids(chatml_tok, problem)
    text = (SMOL_SYSTEM + f"<|im_start|>user\n{problem}\n\n{teacher.INSTRUCTION}<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == encode(chatml_tok, text)
    assert ids[-4:] == encode(chatml_tok, "<|im_start|>assistant\n")

    t_ids = teacher.teacher_prompt_ids(chatml_tok, problem, SOLUTION, "14", alpha=0.5)
    content = teacher.teacher_messages(problem, SOLUTION, "14", alpha=0.5)[0]["content"]
    assert t_ids == encode(chatml_tok, SMOL_SYSTEM + f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
    assert content.startswith(problem + "\n\n")
    assert "\n".join(STEPS[:2]) + "\nAnswer: \\boxed{14}" in content
    assert STEPS[2] not in content
    assert content.endswith(teacher.TRANSITION)
    # alpha = 0: the answer only; alpha = 1: every step
    hint = teacher.teacher_messages(problem, SOLUTION, "14", alpha=0.0)[0]["content"]
    assert "\\boxed{14}" in hint and not any(s in hint for s in STEPS)
    full = teacher.teacher_messages(problem, SOLUTION, "14", alpha=1.0)[0]["content"]
    assert SOLUTION in full
    withheld = teacher.teacher_messages(problem, SOLUTION, "14", alpha=1.0, show_answer=False)[0]["content"]
    assert "\\boxed{14}" not in withheld.replace(teacher.INSTRUCTION, "")


def test_qwen3_style_thinking_on_and_off(qwen3_tok):
    problem = "What is 2 + 3?"
    user = f"<|im_start|>user\n{problem}\n\n{teacher.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    off = teacher.student_prompt_ids(qwen3_tok, problem, enable_thinking=False)
    on = teacher.student_prompt_ids(qwen3_tok, problem, enable_thinking=True)
    default = teacher.student_prompt_ids(qwen3_tok, problem)
    assert off == encode(qwen3_tok, user + "<think>\n\n</think>\n\n")
    assert on == encode(qwen3_tok, user)
    assert default == on  # enable_thinking is not passed at all when None
    # a non-thinking student next to a thinking teacher
    t_on = teacher.teacher_prompt_ids(qwen3_tok, problem, "2 + 3 = 5\n\\boxed{5}", "5", enable_thinking=True)
    t_off = teacher.teacher_prompt_ids(qwen3_tok, problem, "2 + 3 = 5\n\\boxed{5}", "5", enable_thinking=False)
    assert t_off == t_on + encode(qwen3_tok, "<think>\n\n</think>\n\n")


# ------------------------------------------------------------------ Qwen3's real chat template

# Qwen3's own chat template, read from the file trl ships: trl/chat_templates/qwen3.jinja, which trl's
# scripts/check_chat_templates.py keeps byte-identical to the chat_template of Qwen/Qwen3-8B's tokenizer_config.json.
# The digest pins the text these tests were checked against: a trl release that changes it is to be looked at again.
QWEN3_TEMPLATE_SHA256 = "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8"
THINK_OFF = "<think>\n\n</think>\n\n"  # what Qwen3's generation prompt adds with enable_thinking=False
PROBLEM, SOLUTION_2_3 = "What is 2 + 3?", "2 + 3 = 5\n\\boxed{5}"


def qwen3_template():
    import hashlib
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("trl")  # its file only: importing trl is slow and not needed
    assert spec is not None, "trl (requirements.txt) ships Qwen3's chat template"
    path = pathlib.Path(spec.submodule_search_locations[0]) / "chat_templates" / "qwen3.jinja"
    text = path.read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == QWEN3_TEMPLATE_SHA256, path
    return text


@pytest.fixture(scope="module")
def qwen3_real_tok(embedded_dir):
    """The embedded tokenizer with Qwen3's real chat template and Qwen3's think tags: <think> and </think> are
    added, non-special tokens, as in Qwen3's tokenizer; <|im_start|> and <|im_end|> the embedded one already has."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    assert tok.add_tokens(["<think>", "</think>"]) == 2
    tok.chat_template = qwen3_template()
    return tok


def test_qwen3_template_student_and_teacher_prompts(qwen3_real_tok):
    """Non-thinking student, thinking teacher: the rendered text, and the ids teacher.py takes from it."""
    tok = qwen3_real_tok
    s_text = tok.apply_chat_template(teacher.student_messages(PROBLEM), add_generation_prompt=True, tokenize=False,
                                     enable_thinking=False)
    assert s_text == (f"<|im_start|>user\n{PROBLEM}\n\n{teacher.INSTRUCTION}<|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    content = teacher.teacher_messages(PROBLEM, SOLUTION_2_3, "5")[0]["content"]
    t_text = tok.apply_chat_template(teacher.teacher_messages(PROBLEM, SOLUTION_2_3, "5"), add_generation_prompt=True,
                                     tokenize=False, enable_thinking=True)
    assert t_text == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"  # no system turn, no think tag

    s_ids = teacher.student_prompt_ids(tok, PROBLEM, enable_thinking=False)
    t_ids = teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=True)
    assert s_ids == encode(tok, s_text) and t_ids == encode(tok, t_text)
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert s_ids[-4:] == [think] + encode(tok, "\n\n") + [end_think] + encode(tok, "\n\n")  # each tag one token
    assert think not in t_ids and end_think not in t_ids
    # the template's default is thinking: enable_thinking=None (not passed) gives the thinking prompts
    assert teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5") == t_ids
    assert teacher.student_prompt_ids(tok, PROBLEM) == encode(tok, s_text[: -len(THINK_OFF)])
    assert teacher.student_prompt_ids(tok, PROBLEM, enable_thinking=True) == encode(tok, s_text[: -len(THINK_OFF)])


def test_qwen3_template_response_rows_follow_the_same_response_prefix(qwen3_real_tok):
    """The two prompts differ in length and in how they end, yet row t of the student's forward and row t of the
    teacher's (batched as train.py does: student and teacher apart, problems of different lengths together) each
    equal the row of a bare, unpadded forward of [that prompt | response] that has seen exactly prompt + response[:t]:
    both predict response token t from their own generation prompt followed by the same t response tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen3_real_tok
    torch.manual_seed(2)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg).double().eval()
    rows = [(PROBLEM, SOLUTION_2_3, "5", "2 + 3 = 5, so \\boxed{5}."),
            ("Mia has 12 apples. How many now?", SOLUTION, "14", "Mia ends with \\boxed{14} apples.")]
    s_prompts = [teacher.student_prompt_ids(tok, p, enable_thinking=False) for p, _, _, _ in rows]
    t_prompts = [teacher.teacher_prompt_ids(tok, p, s, a, enable_thinking=True) for p, s, a, _ in rows]
    responses = [encode(tok, r) + [tok.convert_tokens_to_ids("<|im_end|>")] for _, _, _, r in rows]
    assert len(responses[0]) != len(responses[1]) and len({len(p) for p in s_prompts + t_prompts}) == 4
    s_out, s_mask = teacher.response_forward(model, s_prompts, responses)
    t_out, t_mask = teacher.teacher_logits(model, t_prompts, responses)
    assert torch.equal(s_mask, t_mask)
    student_end = encode(tok, "<|im_start|>assistant\n" + THINK_OFF)
    teacher_end = encode(tok, "<|im_start|>assistant\n")
    with torch.no_grad():
        for prompts, out, end in ((s_prompts, s_out, student_end), (t_prompts, t_out, teacher_end)):
            for b, resp in enumerate(responses):
                assert prompts[b][-len(end):] == end  # the generation prompt is what comes right before the response
                # one bare forward of [prompt | response]: its row len(prompt) - 1 + t has seen prompt + response[:t]
                bare = model(torch.tensor([prompts[b] + resp])).logits[0]
                P = len(prompts[b])
                torch.testing.assert_close(out[b, : len(resp)], bare[P - 1 : P - 1 + len(resp)], rtol=0, atol=1e-10)
                # the first response token: a forward of the prompt alone, nothing of the response in it
                first = model(torch.tensor([prompts[b]]), logits_to_keep=1).logits[0, -1]
                torch.testing.assert_close(out[b, 0], first, rtol=0, atol=1e-10)


def test_qwen3_closed_think_teacher_opens_like_the_student(qwen3_real_tok, chatml_tok, qwen3_tok):
    tok = qwen3_real_tok
    msgs = teacher.teacher_messages(PROBLEM, SOLUTION_2_3, "5")
    assert teacher.generation_prompt_ids(tok, msgs, enable_thinking=True) == encode(tok, "<|im_start|>assistant\n")
    assert teacher.generation_prompt_ids(tok, msgs, enable_thinking=False) == encode(
        tok, "<|im_start|>assistant\n" + THINK_OFF)
    s_ids = teacher.student_prompt_ids(tok, PROBLEM, enable_thinking=False)
    t_on = teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=True)
    closed = teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=True, closed_think=True)
    suffix = encode(tok, "<|im_start|>assistant\n" + THINK_OFF)
    assert s_ids[-len(suffix):] == suffix and closed[-len(suffix):] == suffix  # the student's suffix
    assert closed == t_on + encode(tok, THINK_OFF)
    assert tok.decode(closed) == tok.decode(t_on) + THINK_OFF
    # Qwen3's template reads enable_thinking in the generation prompt only: a closed thinking teacher is, token for
    # token, the non-thinking teacher; the template default (None) is thinking; a closed prompt stays as it is
    assert closed == teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=False)
    assert closed == teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", closed_think=True)
    assert closed == teacher.teacher_prompt_ids(tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=False,
                                                closed_think=True)
    # the hand-written Qwen3-like template agrees
    assert teacher.teacher_prompt_ids(qwen3_tok, PROBLEM, SOLUTION_2_3, "5", closed_think=True) == (
        teacher.teacher_prompt_ids(qwen3_tok, PROBLEM, SOLUTION_2_3, "5") + encode(qwen3_tok, THINK_OFF))
    # a template without thinking (the embedded SmolLM2's): the same ids, whatever the flags
    plain = teacher.teacher_prompt_ids(chatml_tok, PROBLEM, SOLUTION_2_3, "5", alpha=0.5)
    for kw in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        assert plain == teacher.teacher_prompt_ids(chatml_tok, PROBLEM, SOLUTION_2_3, "5", alpha=0.5,
                                                   closed_think=True, **kw)


def test_train_passes_teacher_closed_think(qwen3_real_tok):
    import types

    import train

    assert train.parse_config([]).teacher_closed_think is False
    cfg = train.parse_config(["--teacher_thinking", "true", "--teacher_closed_think"])
    assert cfg.teacher_closed_think is True
    row = {"problem": PROBLEM, "solution": SOLUTION_2_3, "answer": "5"}
    student = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))
    run = types.SimpleNamespace(cfg=cfg, tok=qwen3_real_tok, teacher_model=object(), student=student)
    batch = [{"row": row, "response": [5, 6, 7]}]
    train.add_teacher_context(run, batch, 1.0)
    assert batch[0]["teacher_prompt"] == teacher.teacher_prompt_ids(
        qwen3_real_tok, PROBLEM, SOLUTION_2_3, "5", enable_thinking=True, closed_think=True)
    assert batch[0]["teacher_prompt"][-4:] == encode(qwen3_real_tok, THINK_OFF)


# ------------------------------------------------------------------ exact response alignment


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
RESPONSES = [[20, 21, 22], [30, 31, 32, 33, 34], [40]]


def unpadded_rows(model, prompt, response):
    """Logit rows predicting each response token, from one forward on the bare sequence."""
    out = model(torch.tensor([prompt + response]))
    return out.logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]  # (T_b, V)


# train.py --attn: transformers' sdpa kernel and eager attention (the CPU default) must both mask the padding.
# Eager runs in float32 here: transformers' eager softmax casts the scores to float32, which turns float64's
# mask value into -inf and a fully padded query row into NaN (train.py only runs float32 weights). Tolerances:
# float64 to 1e-10; float32 to the rounding of 2 layers of width 32.
ATTN = ["sdpa", "eager"]
DTYPE_TOL = {"sdpa": (torch.float64, 1e-10), "eager": (torch.float32, 1e-5)}


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_response_logits_match_unpadded_forwards(arch, attn, tiny_llama):
    dtype, tol = DTYPE_TOL[attn]
    model = (tiny_llama if arch == "llama" else tiny_qwen3()).to(dtype)
    model.set_attn_implementation(attn)
    out, mask = teacher.teacher_logits(model, PROMPTS, RESPONSES)
    assert out.shape == (3, 5, 64) and out.dtype == dtype
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    with torch.no_grad():
        for b in range(3):
            ref = unpadded_rows(model, PROMPTS[b], RESPONSES[b])
            torch.testing.assert_close(out[b, : len(RESPONSES[b])], ref, rtol=0, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hidden_states_are_post_norm(arch, tiny_llama):
    model = (tiny_llama if arch == "llama" else tiny_qwen3()).double()
    h, mask = teacher.teacher_logits(model, PROMPTS, RESPONSES, hidden=True)
    logits, mask2 = teacher.teacher_logits(model, PROMPTS, RESPONSES)
    assert h.shape == (3, 5, 32) and torch.equal(mask, mask2)
    torch.testing.assert_close(h @ model.lm_head.weight.T, logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["frozen", "live", "lora frozen", "lora ema", "lora live"])
def test_hidden_path_keeps_only_the_last_hidden_state(kind, tiny_llama, tiny_lora):
    """hidden=True calls the model without output_hidden_states, no block's output outlives the forward, and
    the values are bit for bit those of the direct method: hidden_states[-1] of a forward with output_hidden_states."""
    import weakref

    student = tiny_lora if kind.startswith("lora") else tiny_llama
    t = teacher.make_teacher(student, kind.split()[-1])
    layers = teacher.decoder(t).layers
    calls, outputs, alive = [], [], []

    def at_end(mod, args, kwargs, out):  # the end of the top-level forward: count the blocks' outputs still alive
        calls.append(kwargs)
        alive.append(sum(r() is not None for r in outputs))

    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(weakref.ref(out))) for m in layers]
    hooks.append(t.register_forward_hook(at_end, with_kwargs=True))
    try:
        h, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES, hidden=True)
    finally:
        for x in hooks:
            x.remove()
    assert len(calls) == 1 and calls[0]["output_hidden_states"] is False
    assert len(outputs) == len(layers) and alive == [0]
    P, T = max(map(len, PROMPTS)), max(map(len, RESPONSES))
    with torch.no_grad():  # the direct method, on the same inputs
        ref = t(**dict(calls[0], output_hidden_states=True)).hidden_states[-1][:, P - 1 : P - 1 + T]
    assert h.shape == (3, 5, 32) and torch.equal(h, ref)
    # the student's side: the same path with grad
    h_s, _ = teacher.response_forward(student, PROMPTS, RESPONSES, hidden=True)
    assert h_s.requires_grad
    if kind.endswith("live"):
        assert torch.equal(h_s.detach(), h)


@pytest.mark.parametrize("attn", ATTN)
def test_student_gradients_match_unpadded(attn, tiny_llama):
    """With grad, the batched forward gives the same parameter gradients as the bare sequences,
    and left-padding rows produce no NaN."""
    dtype, tol = DTYPE_TOL[attn]
    model = tiny_llama.to(dtype)
    model.set_attn_implementation(attn)
    w = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    out, mask = teacher.response_forward(model, PROMPTS, RESPONSES)
    ((out * w) * mask[..., None]).sum().backward()
    g_batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b in range(3):
        ref = unpadded_rows(model, PROMPTS[b], RESPONSES[b])
        (ref * w[b, : len(RESPONSES[b])]).sum().backward()
    for n, p in model.named_parameters():
        assert torch.isfinite(g_batched[n]).all(), n
        torch.testing.assert_close(g_batched[n], p.grad, rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=tol)


DDP_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, sys.argv[1])
import teacher
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).float().eval()
prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
ddp = DistributedDataParallel(model)
out, mask = teacher.response_forward(ddp, prompts, responses)
ref, _ = teacher.teacher_logits(model, prompts, responses)
torch.testing.assert_close(out.detach(), ref)
(out * mask[..., None]).sum().backward()
assert all(p.grad is not None for p in model.parameters())
with torch.no_grad():  # the hidden path's hook sits on the decoder inside DDP
    h, _ = teacher.response_forward(ddp, prompts, responses, hidden=True)
assert torch.equal(h, teacher.teacher_logits(model, prompts, responses, hidden=True)[0])
del ddp  # the reducer holds the process group: release it before the group is destroyed
dist.destroy_process_group()
print("ok")
"""


def test_response_forward_through_ddp(tmp_path):
    """The student may be wrapped in DistributedDataParallel: only model(...) is called. Run in a
    fresh process, so the process group cannot interact with groups other tests created."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", DDP_SCRIPT, root, str(tmp_path / "rdv")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# ------------------------------------------------------------------ teacher weights


def sgd_step(model, lr=0.1):
    out, mask = teacher.response_forward(model, PROMPTS, RESPONSES)
    (out.pow(2) * mask[..., None]).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    model.zero_grad()


def test_frozen_teacher_is_a_fixed_copy(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    t = teacher.make_teacher(tiny_llama)  # frozen is the default
    assert t is not tiny_llama and not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert all(p.requires_grad for p in tiny_llama.parameters())  # the student is untouched
    assert t.lm_head.weight is t.model.embed_tokens.weight  # tying survives the copy
    sgd_step(tiny_llama)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    assert not torch.equal(tiny_llama.model.embed_tokens.weight, before["model.embed_tokens.weight"])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_frozen_teacher_with_bf16_linears_is_bit_identical_under_autocast(tied):
    """The frozen copy's linear weights in bf16 give exactly the fp32 copy's logits and hidden states under bf16
    autocast (and the chunked loss's lm_head matmul the same product), at half the bytes of those weights
    (docs/choices.md, choice 39)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import chunked_loss

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    student = Qwen3ForCausalLM(cfg).float().train()
    ref = teacher.make_teacher(student)
    half = teacher.make_teacher(student, linear_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in half.named_parameters()}
    linear = {f"{m}.weight" for m, mod in half.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == linear - {"model.embed_tokens.weight"} - (
        {"lm_head.weight"} if tied else set())
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.float32
    assert (half.lm_head.weight is half.model.embed_tokens.weight) == tied
    assert all(not p.requires_grad for p in half.parameters()) and not half.training
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the student is untouched
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [30]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for hidden in (False, True):
            a, _ = teacher.teacher_logits(ref, prompts, responses, hidden=hidden)
            b, _ = teacher.teacher_logits(half, prompts, responses, hidden=hidden)
            assert a.dtype == b.dtype and torch.equal(a, b)
    # the chunked loss multiplies by the teacher's lm_head itself, in bf16 (train.py under --dtype bfloat16)
    h_s = torch.randn(2, 3, 32, requires_grad=True)
    h_t = torch.randn(2, 3, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    W = student.lm_head.weight
    la, _ = chunked_loss.chunked_distill_loss(h_s, W, h_t, ref.lm_head.weight, mask, chunk_size=4,
                                              matmul_dtype=torch.bfloat16)
    lb, _ = chunked_loss.chunked_distill_loss(h_s, W, h_t, half.lm_head.weight, mask, chunk_size=4,
                                              matmul_dtype=torch.bfloat16)
    assert torch.equal(la, lb)
    # the EMA copy keeps fp32 whatever is asked: bf16 would round its small updates away
    ema = teacher.make_teacher(student, "ema", linear_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in ema.parameters())


def test_live_teacher_is_the_student(tiny_llama):
    t = teacher.make_teacher(tiny_llama, "live")
    assert t is tiny_llama
    sgd_step(tiny_llama)
    a, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)
    b, _ = teacher.response_forward(tiny_llama, PROMPTS, RESPONSES)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        teacher.make_teacher(tiny_llama, "average")


def test_ema_update_formula(tiny_llama):
    t = teacher.make_teacher(tiny_llama, "ema")
    old = {n: p.detach().clone() for n, p in t.named_parameters()}
    sgd_step(tiny_llama)
    teacher.ema_update(t, tiny_llama, decay=0.9)
    for n, p in t.named_parameters():
        s = dict(tiny_llama.named_parameters())[n].detach()
        torch.testing.assert_close(p, 0.9 * old[n] + 0.1 * s)
        assert not p.requires_grad
    teacher.ema_update(t, tiny_llama, decay=1.0)  # decay 1: unchanged
    teacher.ema_update(t, tiny_llama, decay=0.0)  # decay 0: the student
    for n, p in t.named_parameters():
        torch.testing.assert_close(p, dict(tiny_llama.named_parameters())[n].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["frozen", "live", "ema"])
def test_teacher_forward_never_changes_student_gradients(mode, tiny_llama):
    model = tiny_llama.double()
    t = teacher.make_teacher(model, mode)
    # reference: target computed on an independent copy, loss backward on the student
    import copy

    target, _ = teacher.teacher_logits(copy.deepcopy(t), PROMPTS, RESPONSES)
    s, mask = teacher.response_forward(model, PROMPTS, RESPONSES)
    ((s - target).pow(2) * mask[..., None]).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # the same loss with the target coming from the teacher itself, interleaved with the student
    s, mask = teacher.response_forward(model, PROMPTS, RESPONSES)
    logits_t, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)
    assert not logits_t.requires_grad
    ((s - logits_t).pow(2) * mask[..., None]).sum().backward()
    teacher.teacher_logits(t, PROMPTS, RESPONSES)  # a teacher forward after backward changes nothing
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=0, atol=0)
    if mode != "live":
        assert all(p.grad is None for p in t.parameters())


# ------------------------------------------------------------------ teacher weights under LoRA (lora.py)


def storage(module):
    """data_ptr() of every parameter and buffer of module: where its tensors live."""
    return {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def test_lora_frozen_teacher_is_the_base_model_without_a_copy(tiny_llama, tiny_lora):
    base, student = tiny_llama, tiny_lora  # base: a separate copy of the weights, the reference
    t = teacher.make_teacher(student, "frozen")
    logits_t, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)
    logits_base, _ = teacher.teacher_logits(base, PROMPTS, RESPONSES)
    logits_s, mask = teacher.response_forward(student, PROMPTS, RESPONSES)
    assert torch.equal(logits_t, logits_base)  # the adapter off is the base model, bit for bit
    assert ((logits_t - logits_s).abs() * mask[..., None]).max() > 1e-2  # and the student is not
    # the chunked loss's path: the teacher's hidden states times the lm_head it exposes
    h_t, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES, hidden=True)
    torch.testing.assert_close(h_t @ t.get_output_embeddings().weight.T, logits_base)
    # no second copy: every tensor the teacher holds is the student's, its base weights among them
    base_weights = {p.data_ptr() for n, p in student.named_parameters() if ".lora_" not in n}
    assert storage(t) <= storage(student) and base_weights <= storage(t)
    # after the teacher's forward the adapter is on again, trainable, and the student's output unchanged
    assert torch.equal(teacher.response_forward(student, PROMPTS, RESPONSES)[0], logits_s)
    assert all(p.requires_grad == (".lora_" in n) for n, p in student.named_parameters())
    student.train()
    t.eval()  # must not switch the student: they are one network
    assert all(m.training for m in student.modules())
    assert teacher.make_teacher(student, "live") is student


def test_lora_ema_teacher_is_the_ema_of_the_adapter(tiny_llama, tiny_lora):
    import lora

    student = tiny_lora
    t = teacher.make_teacher(student, "ema")
    assert set(t.ema) == set(lora.adapter_params(student))  # A and B only: no copy of the base weights
    assert storage(t) <= storage(student)
    old = {n: p.detach().clone() for n, p in lora.adapter_params(student).items()}
    with torch.no_grad():  # an update of the student's adapter, A and B both moved
        for p in lora.adapter_params(student).values():
            p.add_(0.05 * torch.randn_like(p))
    new = {n: p.detach().clone() for n, p in lora.adapter_params(student).items()}
    teacher.ema_update(t, student, decay=0.9)

    # reference: an independent adapted model whose adapter holds the EMA computed by hand
    ref = lora.add_lora(tiny_llama, r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.adapter_params(ref).items():
            p.copy_(0.9 * old[n] + 0.1 * new[n])
    logits_s, mask = teacher.response_forward(student, PROMPTS, RESPONSES)
    logits_t, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)
    logits_ref, _ = teacher.teacher_logits(ref, PROMPTS, RESPONSES)
    torch.testing.assert_close(logits_t, logits_ref, rtol=1e-6, atol=1e-6)
    assert ((logits_t - logits_s).abs() * mask[..., None]).max() > 1e-3
    # the teacher's forward leaves the student's adapter (and so the student) exactly as it was
    for n, p in lora.adapter_params(student).items():
        assert torch.equal(p, new[n]) and p.requires_grad
    assert torch.equal(teacher.response_forward(student, PROMPTS, RESPONSES)[0], logits_s)
    # decay 0: the teacher is the student, exactly
    teacher.ema_update(t, student, decay=0.0)
    assert torch.equal(teacher.teacher_logits(t, PROMPTS, RESPONSES)[0], logits_s.detach())
    # a checkpoint round trip of the EMA adapter
    state = teacher.ema_state(t)
    t2 = teacher.make_teacher(student, "ema")
    teacher.load_ema_state(t2, state)
    assert all(torch.equal(t2.ema[n], t.ema[n]) for n in t.ema)


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_lora_teacher_forward_never_changes_student_gradients(mode, tiny_lora):
    """A teacher forward between the student's forward and its backward (the adapter switched off, or the EMA
    put in and taken out) leaves the student's gradients exactly as without it."""
    import lora

    student = tiny_lora.double()
    t = teacher.make_teacher(student, mode)
    if mode == "ema":  # an EMA different from the student's adapter, so the swap is visible
        for e in t.ema.values():
            e.add_(0.05 * torch.randn_like(e))
    target, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)
    s, mask = teacher.response_forward(student, PROMPTS, RESPONSES)
    ((s - target).pow(2) * mask[..., None]).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in lora.adapter_params(student).items()}
    student.zero_grad()
    s, mask = teacher.response_forward(student, PROMPTS, RESPONSES)
    logits_t, _ = teacher.teacher_logits(t, PROMPTS, RESPONSES)  # in between
    assert torch.equal(logits_t, target) and not logits_t.requires_grad
    ((s - logits_t).pow(2) * mask[..., None]).sum().backward()
    for n, p in student.named_parameters():
        if n in g_ref:
            assert torch.equal(p.grad, g_ref[n]), n
        else:
            assert p.grad is None, n  # the base weights are frozen


DDP_LORA_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, sys.argv[1])
import lora, teacher
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
student = lora.add_lora(LlamaForCausalLM(cfg), r=4, alpha=8)
with torch.no_grad():
    for n, p in lora.adapter_params(student).items():
        if ".lora_B." in n:
            p.normal_(0, 0.1)
t = teacher.make_teacher(student, "frozen")
ddp = DistributedDataParallel(student)
prompts = [[[5, 6, 7], [8, 9]], [[3, 4], [10, 11, 12]]][rank]
responses = [[[10, 11], [12, 13, 14]], [[20], [21, 22]]][rank]

def two_steps(model):  # teacher forward (adapter off), then the student's forward and backward, twice
    for _ in range(2):
        target, _ = teacher.teacher_logits(t, prompts, responses)
        s, mask = teacher.response_forward(model, prompts, responses)
        ((s - target).pow(2) * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in lora.adapter_params(student).items()}
    student.zero_grad()
    return grads

g_ddp = two_steps(ddp)
g_local = two_steps(student)
both = [None, None]
dist.all_gather_object(both, g_local)
err = max((g_ddp[n] - (both[0][n] + both[1][n]) / 2).abs().max().item() for n in g_ddp)
spread = max((both[0][n] - both[1][n]).abs().max().item() for n in g_ddp)
assert err < 1e-5 and spread > 1e-2, (err, spread)
del ddp
dist.destroy_process_group()
print("ok")
"""


def test_lora_frozen_teacher_under_ddp(tmp_path):
    """peft's disable_adapter() switches the adapter's requires_grad off and back on around the teacher's
    forward. DDP registered those parameters once, at wrapping: its all-reduce must still fire, so every rank
    holds the mean of the ranks' gradients (2 processes, gloo)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp_lora.py"
    script.write_text(DDP_LORA_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), root], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.count("ok") == 2, p.stdout[-2000:] + p.stderr[-3000:]


# ------------------------------------------------------------------ answer log-probability


def test_answer_logprob_matches_a_hand_loop(chatml_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(chatml_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).double().eval()
    rows = [("What is 2 + 3?", "2 + 3 = 5\nAnswer: \\boxed{5}", "5"),
            ("Mia has 12 apples. How many now?", SOLUTION, "14"),
            ("What is 1/2 of 3?", "1/2 * 3 = 3/2\n\\boxed{\\frac{3}{2}}", "\\frac{3}{2}")]
    prompts = [teacher.teacher_prompt_ids(chatml_tok, p, s, a, alpha=0.5) for p, s, a in rows]
    g = teacher.answer_logprob(model, chatml_tok, prompts, [a for _, _, a in rows])
    assert g.shape == (3,)
    lead = encode(chatml_tok, "The final answer is \\boxed{")
    for b, (_, _, a) in enumerate(rows):
        target = encode(chatml_tok, a + "}")
        seq = prompts[b] + lead + target
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        start = len(prompts[b]) + len(lead)
        hand = sum(logp[start - 1 + j, tok].item() for j, tok in enumerate(target)) / len(target)
        assert math.isclose(g[b].item(), hand, rel_tol=1e-6, abs_tol=1e-6)


def test_answer_span_starts_at_the_token_holding_the_last_boxed(embedded_dir):
    # an independent check from the other end: the span's suffix decodes to a text holding the last \boxed, and the
    # suffix one token shorter no longer holds all of it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    for text in ["9 - 7 = 2.\nAnswer: \\boxed{1.33}", "So \\boxed{3} or maybe 4 + 1 = 5, so \\boxed{5}.", "x\\boxed{7}",
                 "\\boxed{12}"]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        k = teacher.answer_span_start(tok, ids)
        tail = text[text.rfind("\\boxed"):]
        assert tail in tok.decode(ids[k:]) and tail not in tok.decode(ids[k + 1:])
    ids = tok("no box here: 12", add_special_tokens=False)["input_ids"]
    assert teacher.answer_span_start(tok, ids) == len(ids)
