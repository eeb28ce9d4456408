"""Where do the student and its teacher disagree? Per-token forward KL(p_T || p_S) on the student's own samples.

No training. For evaluation samples of a model (evaluate.py's samples.jsonl), each response is scored twice by
the same network: as the student (problem only) and as the teacher (problem + the reference solution shown up
to --alpha, teacher.teacher_prompt_ids). It prints the share of the total KL on digit tokens and on the rest,
the mean per-token KL of correct and of wrong samples, and, for a few wrong samples, the tokens with the largest
KL with the student's token and the teacher's preferred one. This is the signal every distillation loss here
is built from: where it sits says what the student is pulled toward.

Token kinds (token_kinds): the final-answer span, "result digits" (a number the chain writes right after '=', derived
from its own earlier numbers), "other digits" (operands), "words" and the end-of-sequence token. Per kind: the share
of the tokens, of the KL, and of each loss's gradient at the student's logits (logit_grad_norms: opsd's forward KL,
whose gradient per token is p_S - p_T, and dasd's pull/push form).

The answer leak. A teacher that sees the reference's answer puts its mass on that number inside \\boxed{} after
any chain of work, right or wrong; the student, which cannot see it, is pulled toward a box that does not follow
from its own work. Two measurements of it:
  - the share of the KL in the final-answer span (from the response's last \\boxed on, teacher.answer_span_start:
    what train.py --distill_mask_answer leaves out of the loss) against the chain before it;
  - box/chain consistency of the samples (box_follows_chain): the boxed answer equals the chain's last number
    before the box. Read from any samples.jsonl, before and after training (--consistency_only).

    python experiments/disagreement.py --model runs/demo/warmstart --samples runs/demo/eval/samples.jsonl
    python experiments/disagreement.py --consistency_only --samples runs/a/samples.jsonl runs/b/samples.jsonl
"""

import argparse
import collections
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
import grader  # noqa: E402
import losses  # noqa: E402
import model as modellib  # noqa: E402
import teacher  # noqa: E402


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def box_follows_chain(text):
    """(boxed answer, the chain's last number before the box, whether they agree) of one response; None when there
    is no box or no number before it. Agreement compares the numbers' values (2 and 2.0 agree)."""
    boxed = grader.last_boxed(text)
    if boxed is None:
        return None
    nums = NUMBER.findall(text[: text.rfind("\\boxed")])
    if not nums:
        return None

    def value(x):
        try:
            a, _, b = x.partition("/")
            return float(a) / float(b) if b else float(a)
        except (ValueError, ZeroDivisionError):
            return None

    v_box, v_chain = value(boxed.strip().replace(",", "")), value(nums[-1])
    return boxed, nums[-1], v_box is not None and v_chain is not None and abs(v_box - v_chain) < 1e-9


def consistency(samples):
    """Over samples (evaluate.py samples.jsonl lines): how many have a box after a chain with a number, how many of
    those agree, how many end their chain at the correct answer whatever the box holds (the accuracy a box that
    followed its chain would have), and how many of those box something else."""
    n = agree = chain_right = cut_loose = 0
    for s in samples:
        r = box_follows_chain(s["response"])
        if r is None:
            continue
        n += 1
        agree += r[2]
        right = str(r[1]) == str(s["gold"]).strip()
        chain_right += right
        cut_loose += (not r[2]) and right
    return {"with_box_and_chain": n, "box_equals_chain": agree, "chain_right": chain_right,
            "chain_right_box_not": cut_loose}


def token_kl(m, tok, row, response, alpha, *, show_answer=True):
    """(T,) forward KL per response token, and the (T, V) student and teacher log-probs."""
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sp = teacher.student_prompt_ids(tok, row["problem"])
    tp = teacher.teacher_prompt_ids(tok, row["problem"], row["solution"], row["answer"], alpha=alpha,
                                    show_answer=show_answer)
    with torch.no_grad():
        ls, _ = teacher.response_forward(m, [sp], [resp])  # (1, T, V)
        lt, _ = teacher.response_forward(m, [tp], [resp])
    lps, lpt = torch.log_softmax(ls[0].float(), -1), torch.log_softmax(lt[0].float(), -1)  # (T, V)
    kl = (lpt.exp() * (lpt - lps)).sum(-1)  # (T,)
    return resp, kl, lps, lpt


def logit_grad_norms(lps, lpt, method):
    """(T,) the norm of d loss / d student logits per token, for the loss of `method` on one response (opsd:
    forward KL; dasd: the entropy-routed pull/push form with its defaults; no clipping), times T so that it does
    not depend on the token mean. For opsd it equals ||p_S - p_T||. The DASD gate ranks the entropies of this one
    response, not of a training batch."""
    z = lps.detach().clone().requires_grad_(True)  # log-probs are logits up to a constant per row
    t = lpt[None]
    mask = torch.ones(1, z.shape[0])
    if method == "opsd":
        loss, _ = losses.opsd_loss(z[None], t, mask, clip=None)
    else:
        loss, _ = losses.dasd_loss(z[None], t, mask, clip=None)
    (g,) = torch.autograd.grad(loss, z)
    return g.norm(dim=-1) * z.shape[0]


def teacher_accuracy(m, tok, rows, *, alphas=(0.0, 1.0), max_new_tokens=96, seed=0, show_answer=True):
    """Does the teacher read its context? The share of `rows` answered correctly by one sample (temperature 1) from
    the student's prompt ("student") and from the teacher's prompt at each alpha: a model that reads the reference it
    is shown scores near 100 from the teacher's prompt, one that ignores it scores what its student does."""
    import rollout

    engine = rollout.HFRollout(m, tok, seed=seed)
    prompts = {"student": [teacher.student_prompt_ids(tok, r["problem"]) for r in rows]}
    for a in alphas:
        prompts[f"teacher alpha={a:g}"] = [
            teacher.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"], alpha=a, show_answer=show_answer)
            for r in rows]
    out = {}
    for name, ps in prompts.items():
        samples = engine.generate(ps, n=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
        ok = [grader.check_answer(tok.decode(s.token_ids, skip_special_tokens=True), rows[s.prompt_index]["answer"])
              for s in samples]
        out[name] = 100.0 * sum(ok) / len(ok)
    return out


DIGITS = set("0123456789")


def token_kinds(tok, resp, span):
    """One label per response token: "answer span" (from the last \\boxed on), "result digits" (a number the
    chain writes right after '=': derived from its own earlier numbers), "other digits" (operands), "words"
    (everything else), "eos"."""
    kinds = []
    for t, tid in enumerate(resp):
        if tid == tok.eos_token_id:
            kinds.append("eos")
        elif t >= span:
            kinds.append("answer span")
        elif DIGITS & set(tok.decode([tid])):
            before = tok.decode(resp[:t]).rstrip("0123456789.,/ ")
            kinds.append("result digits" if before.endswith("=") else "other digits")
        else:
            kinds.append("words")
    return kinds


KINDS = ("answer span", "result digits", "other digits", "words", "eos")


def shares(m, tok, rows, samples, *, alpha=1.0, show_answer=True, methods=("opsd", "dasd")):
    """Per token kind: the number of tokens, the mean KL, the share of the total KL and, per method, the share of
    the loss's gradient at the logits, over `samples` scored by model `m` as student and as teacher."""
    n_tok, kl_sum = collections.Counter(), collections.Counter()
    g_sum = {meth: collections.Counter() for meth in methods}
    for s in samples:
        row = rows[s["problem_id"]]
        resp, kl, lps, lpt = token_kl(m, tok, row, s["response"], alpha, show_answer=show_answer)
        kinds = token_kinds(tok, resp, teacher.answer_span_start(tok, resp))
        grads = {meth: logit_grad_norms(lps, lpt, meth) for meth in methods}
        for t, kind in enumerate(kinds):
            n_tok[kind] += 1
            kl_sum[kind] += kl[t].item()
            for meth in methods:
                g_sum[meth][kind] += grads[meth][t].item()
    total_kl = sum(kl_sum.values()) or 1.0
    out = {}
    for kind in KINDS:
        if n_tok[kind]:
            out[kind] = {"tokens": n_tok[kind], "token_share": n_tok[kind] / sum(n_tok.values()),
                         "mean_kl": kl_sum[kind] / n_tok[kind], "kl_share": kl_sum[kind] / total_kl,
                         **{f"grad_share_{meth}": g_sum[meth][kind] / (sum(g_sum[meth].values()) or 1.0)
                            for meth in methods}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--samples", required=True, nargs="+", help="evaluate.py samples.jsonl of this model on "
                    "embedded:test (--consistency_only: one or more files, each model in them)")
    ap.add_argument("--consistency_only", action="store_true", help="only box/chain consistency, no model")
    ap.add_argument("--label", default=None, help="the model label inside samples.jsonl (default: the first)")
    ap.add_argument("--n", type=int, default=96, help="samples scored")
    ap.add_argument("--alpha", type=float, default=1.0, help="exposure of the teacher")
    ap.add_argument("--show", type=int, default=4, help="wrong samples printed token by token")
    ap.add_argument("--show_answer", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                    help="false: the teacher's context without the reference's answer line (train.py's flag)")
    ap.add_argument("--teacher_accuracy", type=int, default=0, metavar="N",
                    help="also sample once from the student's and the teacher's prompts (alpha 0 and 1) on the first N "
                         "test problems and print the accuracies: does the teacher read its reference?")
    ap.add_argument("--json", default=None, help="also write the table and the consistency counts here")
    args = ap.parse_args(argv)

    if args.consistency_only:
        for path in args.samples:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            for label in dict.fromkeys(s["model"] for s in lines):
                c = consistency([s for s in lines if s["model"] == label])
                print(f"{path} [{label}]: box = chain's last number in {c['box_equals_chain']}/"
                      f"{c['with_box_and_chain']}; chain ends at the gold answer: {c['chain_right']}, "
                      f"with something else boxed: {c['chain_right_box_not']}")
        return
    m, tok = modellib.load(args.model, dtype=torch.float32)
    m.eval()
    rows = {r["id"]: r for r in data.embedded_split("test")}
    with open(args.samples[0]) as f:
        samples = [json.loads(line) for line in f]
    label = args.label or samples[0]["model"]
    samples = [s for s in samples if s["model"] == label][: args.n]

    shown = 0
    for s in samples:
        if shown < args.show and not s["correct"]:
            shown += 1
            row = rows[s["problem_id"]]
            resp, kl, lps, lpt = token_kl(m, tok, row, s["response"], args.alpha, show_answer=args.show_answer)
            print(f"--- {row['problem'][:100]}  (gold {row['answer']})")
            print("    student: " + s["response"][:200].replace("\n", " | "))
            for t in sorted(torch.topk(kl, min(3, len(resp))).indices.tolist()):
                before = tok.decode(resp[max(0, t - 6):t]).replace("\n", " | ")
                mine, best = tok.decode([resp[t]]), tok.decode([lpt[t].argmax().item()]).replace("\n", "\\n")
                print(f"    KL {kl[t]:5.2f} after '{before}': student wrote '{mine}' (p_S {lps[t, resp[t]].exp():.2f},"
                      f" p_T {lpt[t, resp[t]].exp():.2f}); teacher's top '{best}' (p_T {lpt[t].max().exp():.2f})")
    table = shares(m, tok, rows, samples, alpha=args.alpha, show_answer=args.show_answer)
    print(f"\n{len(samples)} samples of {label}, teacher exposure alpha = {args.alpha}"
          + ("" if args.show_answer else ", answer line hidden"))
    print(f"  {'tokens':13s} {'n':>6s} {'share':>6s} {'mean KL':>8s} {'KL share':>9s} "
          f"{'grad opsd':>10s} {'grad dasd':>10s}")
    for kind, r in table.items():
        print(f"  {kind:13s} {r['tokens']:6d} {100 * r['token_share']:5.1f}% {r['mean_kl']:8.3f} "
              f"{100 * r['kl_share']:8.1f}% {100 * r['grad_share_opsd']:9.1f}% {100 * r['grad_share_dasd']:9.1f}%")
    c = consistency(samples)
    reads = None
    if args.teacher_accuracy:
        reads = teacher_accuracy(m, tok, data.embedded_split("test")[: args.teacher_accuracy],
                                 show_answer=args.show_answer)
        print(f"  accuracy of one sample on {args.teacher_accuracy} test problems: "
              + ", ".join(f"{k} {v:.1f}" for k, v in reads.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "samples": args.samples[0], "label": label, "n": len(samples),
                       "alpha": args.alpha, "show_answer": args.show_answer, "shares": table, "consistency": c,
                       "teacher_accuracy": reads},
                      f, indent=2)
    print(f"  box = the chain's last number in {c['box_equals_chain']}/{c['with_box_and_chain']} samples; chain ends at "
          f"the gold answer: {c['chain_right']}, with something else boxed: {c['chain_right_box_not']}")


if __name__ == "__main__":
    main()
