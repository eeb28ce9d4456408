"""Where do the student and its teacher disagree? Per-token forward KL(p_T || p_S) on the student's own samples.

No training. For evaluation samples of a model (evaluate.py's samples.jsonl), each response is scored twice by
the same network: as the student (problem only) and as the teacher (problem + the reference solution shown up
to --alpha, teacher.teacher_prompt_ids). It prints the share of the total KL on digit tokens and on the rest,
the mean per-token KL of correct and of wrong samples, and, for a few wrong samples, the tokens with the largest
KL with the student's token and the teacher's preferred one. This is the signal every distillation loss here
is built from: where it sits says what the student is pulled toward.

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
import model as modellib  # noqa: E402
import teacher  # noqa: E402


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def box_follows_chain(text):
    """(boxed answer, the chain's last number before the box, whether they agree) of one response; None when there
    is no box or no number before it. Agreement compares the numbers' values (2 and 2.0 agree)."""
    boxed = data.last_boxed(text)
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
    those agree, and how many end their chain at the correct answer while the box holds something else."""
    n = agree = cut_loose = 0
    for s in samples:
        r = box_follows_chain(s["response"])
        if r is None:
            continue
        n += 1
        agree += r[2]
        cut_loose += (not r[2]) and str(r[1]) == str(s["gold"]).strip()
    return {"with_box_and_chain": n, "box_equals_chain": agree, "chain_right_box_not": cut_loose}


def token_kl(m, tok, row, response, alpha):
    """(T,) forward KL per response token, and the (T, V) student and teacher log-probs."""
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sp = teacher.student_prompt_ids(tok, row["problem"])
    tp = teacher.teacher_prompt_ids(tok, row["problem"], row["solution"], row["answer"], alpha=alpha)
    with torch.no_grad():
        ls, _ = teacher.response_forward(m, [sp], [resp])  # (1, T, V)
        lt, _ = teacher.response_forward(m, [tp], [resp])
    lps, lpt = torch.log_softmax(ls[0].float(), -1), torch.log_softmax(lt[0].float(), -1)  # (T, V)
    kl = (lpt.exp() * (lpt - lps)).sum(-1)  # (T,)
    return resp, kl, lps, lpt


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
    args = ap.parse_args(argv)

    if args.consistency_only:
        for path in args.samples:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            for label in dict.fromkeys(s["model"] for s in lines):
                c = consistency([s for s in lines if s["model"] == label])
                print(f"{path} [{label}]: box = chain's last number in {c['box_equals_chain']}/"
                      f"{c['with_box_and_chain']}; chain ends at the gold answer, box elsewhere: "
                      f"{c['chain_right_box_not']}")
        return
    m, tok = modellib.load(args.model, dtype=torch.float32)
    m.eval()
    rows = {r["id"]: r for r in data.embedded_split("test")}
    with open(args.samples[0]) as f:
        samples = [json.loads(line) for line in f]
    label = args.label or samples[0]["model"]
    samples = [s for s in samples if s["model"] == label][: args.n]

    kl_sum, n_tok = collections.Counter(), collections.Counter()
    per_sample = {True: [], False: []}
    shown = 0
    for s in samples:
        row = rows[s["problem_id"]]
        resp, kl, lps, lpt = token_kl(m, tok, row, s["response"], args.alpha)
        per_sample[bool(s["correct"])].append(kl.mean().item())
        span = teacher.answer_span_start(tok, resp)
        for t, tid in enumerate(resp):
            kind = "eos" if tid == tok.eos_token_id else "answer span" if t >= span else \
                "digit" if tok.decode([tid]).strip().isdigit() else "other"
            kl_sum[kind] += kl[t].item()
            n_tok[kind] += 1
        if shown < args.show and not s["correct"]:
            shown += 1
            print(f"--- {row['problem'][:100]}  (gold {row['answer']})")
            print("    student: " + s["response"][:200].replace("\n", " | "))
            for t in sorted(torch.topk(kl, min(3, len(resp))).indices.tolist()):
                before = tok.decode(resp[max(0, t - 6):t]).replace("\n", " | ")
                mine, best = tok.decode([resp[t]]), tok.decode([lpt[t].argmax().item()]).replace("\n", "\\n")
                print(f"    KL {kl[t]:5.2f} after '{before}': student wrote '{mine}' (p_S {lps[t, resp[t]].exp():.2f},"
                      f" p_T {lpt[t, resp[t]].exp():.2f}); teacher's top '{best}' (p_T {lpt[t].max().exp():.2f})")
    total = sum(kl_sum.values())
    print(f"\n{len(samples)} samples of {label}, teacher exposure alpha = {args.alpha}")
    for kind in ("answer span", "digit", "other", "eos"):
        if n_tok[kind]:
            print(f"  {kind:11s}: {n_tok[kind]:5d} tokens, mean KL {kl_sum[kind] / n_tok[kind]:.3f} nats, "
                  f"{100 * kl_sum[kind] / total:.0f}% of the total KL")
    for ok in (True, False):
        if per_sample[ok]:
            print(f"  mean per-token KL of {'correct' if ok else 'wrong'} samples: "
                  f"{sum(per_sample[ok]) / len(per_sample[ok]):.3f} ({len(per_sample[ok])} samples)")
    c = consistency(samples)
    print(f"  box = the chain's last number in {c['box_equals_chain']}/{c['with_box_and_chain']} samples; chain ends at "
          f"the gold answer while the box holds something else: {c['chain_right_box_not']}")


if __name__ == "__main__":
    main()
