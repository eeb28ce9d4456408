"""The controls that ask whether the teacher teaches: each one's defining property, against an independent computation.
  no_reference     --exposure fixed --alpha 0 --teacher_show_answer false: the teacher's prompt holds no reference
  wrong_reference  --teacher_context wrong: another problem's reference, never the problem's own (nor its answer)
  teacher_free     --method teacher_free: no teacher at all; -magnitude on each response's least likely tokens
  pull / push      --pull_weight 0 or --push_weight 0: DASD's router with one of its two terms
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import chunked_loss
import data
import losses
import teacher as teacherlib
import train


def test_wrong_reference_never_pairs_a_problem_with_its_own_solution_or_answer():
    rows = data.embedded_split("train")
    for seed in (0, 1, 2):
        swapped = data.swap_references(rows, seed=seed)
        assert [r["problem"] for r in swapped] == [r["problem"] for r in rows]  # the problems stay in place
        for r in swapped:
            solution, answer = r["reference"]
            assert solution != r["solution"] and answer != r["answer"]
        assert data.swap_references(rows, seed=seed) == swapped  # a function of (rows, seed): every rank agrees
    a, b = (data.swap_references(rows, seed=s) for s in (0, 1))
    assert sum(x["reference"] != y["reference"] for x, y in zip(a, b)) > len(rows) // 2
    same = [{"problem": "p", "solution": "s", "answer": "1"}] * 3
    with pytest.raises(ValueError, match="no other row"):
        data.swap_references(same)
    # a small set: every seed finds the one valid partner of each row, wherever the shift starts
    small = [{"problem": f"p{i}", "solution": f"s{i}", "answer": str(i)} for i in range(3)]
    small.append({"problem": "p3", "solution": "s0", "answer": "0"})  # row 3 may only take rows 1 or 2
    for seed in range(5):
        for r in data.swap_references(small, seed=seed):
            assert r["reference"][0] != r["solution"] and r["reference"][1] != r["answer"]


class WordTok:
    """A stand-in tokenizer whose chat template is the messages' text, so a prompt's content can be read back."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kw):
        text = "".join(m["content"] for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [ord(c) for c in text]


def teacher_prompt_text(rows, *flags):
    cfg = train.parse_config(["--method", "opsd", *flags])
    run = SimpleNamespace(cfg=cfg, tok=WordTok(), teacher_model=object())
    batch = [{"row": r, "student_prompt": teacherlib.student_prompt_ids(run.tok, r["problem"])} for r in rows]
    alpha = cfg.alpha if "fixed" in flags else 1.0
    train.add_teacher_context(run, batch, alpha=alpha)
    return [("".join(map(chr, b["teacher_prompt"])), b) for b in batch]


def test_each_teacher_context_shows_what_it_says():
    rows = data.embedded_split("train")[:50]
    for text, b in teacher_prompt_text(rows, "--exposure", "full"):
        assert b["row"]["solution"].split("\n")[0] in text and f"\\boxed{{{b['row']['answer']}}}" in text
    # no_reference: the teacher's prompt, with no step of the reference and no answer
    for text, b in teacher_prompt_text(rows, "--exposure", "fixed", "--alpha", "0", "--teacher_show_answer", "false"):
        steps = teacherlib.split_steps(b["row"]["solution"])
        assert not any(step in text for step in steps) and "\\boxed" not in text.split("\\boxed{}")[0]
        assert "No reference is given." in text
    for text, b in teacher_prompt_text(data.swap_references(rows), "--exposure", "full", "--teacher_context", "wrong"):
        own, (other, other_answer) = b["row"]["solution"], b["row"]["reference"]
        assert other.split("\n")[0] in text and f"\\boxed{{{other_answer}}}" in text
        assert own.split("\n")[0] not in text and f"\\boxed{{{b['row']['answer']}}}" not in text


def test_teacher_free_advantages_match_a_per_response_sort():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 11, generator=g) * 4  # distinct values: no ties at the threshold
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 1:] = False  # one token: never pushed (the calmest token of a response always stays)
    adv, m = losses.teacher_free_advantages(logp, mask, fraction=0.2, magnitude=0.5)
    for b in range(3):
        n = int(mask[b].sum())
        k = min(int(0.2 * n + 0.5), n - 1)  # round(fraction * n), at most n - 1
        lowest = set(logp[b, :n].argsort()[:k].tolist())  # the k least likely sampled tokens
        want = [-0.5 if t in lowest else 0.0 for t in range(11)]
        assert adv[b].tolist() == want, (b, adv[b].tolist(), want)


def test_teacher_free_runs_no_teacher_forward(tiny_llama, tiny_model_dir, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("teacher_free must not call the teacher")

    monkeypatch.setattr(teacherlib, "teacher_logits", no_teacher)
    g = torch.Generator().manual_seed(0)
    mb = [{"student_prompt": torch.randint(3, 64, (n,), generator=g).tolist(),
           "response": torch.randint(3, 64, (t,), generator=g).tolist(), "loss_len": t} for n, t in [(5, 9), (7, 6)]]
    cfg = train.parse_config(["--method", "teacher_free", "--chunk_size", "0", "--push_fraction", "0.25",
                              "--push_weight", "2"])
    loss, n, metrics = train.microbatch_loss(cfg, tiny_llama, None, tiny_llama.get_output_embeddings(), mb,
                                             contextlib.nullcontext)
    # the same surrogate by hand: -A_t log p(y_t), A_t = -2 on each response's least likely quarter
    with torch.no_grad():
        z, mask = teacherlib.response_forward(tiny_llama, [b["student_prompt"] for b in mb], [b["response"] for b in mb])
    tgt = train.response_targets([b["response"] for b in mb], z.shape[1], z.device)
    logp = torch.log_softmax(z.float(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    total = 0.0
    for b in range(2):
        lp = logp[b, : len(mb[b]["response"])]
        k = min(int(0.25 * lp.numel() + 0.5), lp.numel() - 1)
        total += 2.0 * lp.sort().values[:k].sum().item()
    assert n == 15 and loss.item() == pytest.approx(total / 15, rel=1e-5)
    assert metrics["adv/frac_negative"] == pytest.approx((2 + 2) / 15)  # round(0.25 * 9) + round(0.25 * 6)
    # and set-up builds none: the student alone, on the same loader train.py uses
    import plumbing

    plumbing.check_config(cfg)
    cfg.attn = "eager"
    student, teacher = plumbing.load_student_and_teacher(cfg, tiny_model_dir, None, torch.device("cpu"), None, None)
    assert cfg.exposure == "full" and teacher is None and student is not None


def one_term(pull_weight, push_weight, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2, 9, 13, generator=g, dtype=dtype) * torch.linspace(0.3, 3, 9, dtype=dtype)[:, None]
    zt = zs + torch.randn(2, 9, 13, generator=g, dtype=dtype)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    return zs, zt, mask, dict(push_fraction=0.3, soft=True, clip=None, push_margin=0.2, pull_weight=pull_weight,
                              push_weight=push_weight)


@pytest.mark.parametrize("term", ["push", "pull"])
def test_dasd_with_one_term_is_that_term_alone_by_hand(term):
    pull_w, push_w = (0.0, 1.0) if term == "push" else (1.0, 0.0)
    zs, zt, mask, kw = one_term(pull_w, push_w)
    zs.requires_grad_(True)
    loss, m = losses.dasd_loss(zs, zt, mask, **kw)
    # by hand: the router, then each token's term from the divergences of losses.divergence
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    gate = losses.entropy_gate(-(ls.exp() * ls).sum(-1).detach(), mask, push_fraction=0.3)
    total, n = 0.0, mask.sum()
    for b in range(2):
        for t in range(9):
            if not mask[b, t]:
                continue
            if term == "pull" and gate[b, t] > 0:
                total = total + gate[b, t] * losses.divergence(zs[b, t], zt[b, t], beta=0.0)
            if term == "push" and gate[b, t] < 0:
                jsd = losses.divergence(zs[b, t], zt[b, t], beta=0.5)
                total = total - (-gate[b, t]) * jsd.clamp(max=0.2)
    torch.testing.assert_close(loss, total / n, rtol=1e-12, atol=1e-12)
    assert (m["loss/pull"] if term == "push" else m["loss/push"]) == 0  # the other term is absent
    grad = torch.autograd.grad(loss, zs)[0]
    other = (gate > 0) if term == "push" else (gate < 0)
    assert grad[other].abs().max() == 0  # no gradient at all on the other term's tokens
    assert grad[~other & mask.bool()].abs().max() > 0
    # the chunked path agrees (float64, to rounding)
    H = 13
    W = torch.eye(H, dtype=torch.float64)
    lc, _ = chunked_loss.chunked_distill_loss(zs.detach(), W, zt, W, mask, method="dasd", chunk_size=4, **kw)
    torch.testing.assert_close(lc, loss.detach(), rtol=1e-12, atol=1e-12)
