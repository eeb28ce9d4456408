"""The ATESD guard g on the embedded model: the teacher's mean log-probability of the reference answer, per exposure,
with the answer shown in the teacher's prompt and withheld (docs/choices.md, choice 8).

    python experiments/answer_probe.py            # 24 embedded test problems, alpha 0 / 0.5 / 1
    python experiments/answer_probe.py --n 16 --alphas 0 0.25 0.5 0.75 1
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import model as modellib  # noqa: E402
import teacher  # noqa: E402


def answer_probe(n=24, alphas=(0.0, 0.5, 1.0)):
    """{(show_answer, alpha): (B,) g} over the first n embedded test problems, printed as it goes."""
    net, tok = modellib.load(dtype=torch.float32)
    rows = data.embedded_split("test")[:n]
    out = {}
    for show in (True, False):
        for alpha in alphas:
            prompts = [teacher.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"], alpha=alpha,
                                                  show_answer=show) for r in rows]
            g = teacher.answer_logprob(net, tok, prompts, [r["answer"] for r in rows])
            out[(show, alpha)] = g
            print(f"show_answer={show!s:5} alpha={alpha:.2f}: mean g = {g.mean():.3f}  "
                  f"(min {g.min():.3f}, max {g.max():.3f})")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="first N embedded test problems")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    a = ap.parse_args()
    answer_probe(a.n, tuple(a.alphas))
