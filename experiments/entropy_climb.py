"""Why does the student's entropy climb under self-distillation from the base model? One ingredient at a time.

Seen on the embedded base model (SmolLM2-135M-Instruct, no warm start): over a dozen OPSD/DASD steps the
student's mean token entropy on its own rollouts rose from ~1.8 to ~3 nats/token. Three candidate causes:
    the forward KL   KL(p_T || p_S) is mass-covering: a student sharper than its teacher is spread out;
    the learning rate;
    DASD's push     away from the teacher on the highest-entropy tokens.
Each run below changes one of them against the first (OPSD, forward KL, full solution, lr 1e-5, no clip), from
the same model, same prompts (seed 0), 8 steps x 8 prompts x 96 new tokens. No evaluation: the question is
about the training trajectory, read from metrics.jsonl (`entropy/student`, `entropy/teacher`: the teacher's
entropy on the same tokens, `kl/teacher_student`).

    python experiments/entropy_climb.py                  # runs what is missing (resumable), then the report
    python experiments/entropy_climb.py --report_only
Output: results/entropy_climb/<run>/{config.json,metrics.jsonl} (and train.log, not committed), table.md,
entropy_climb.png.
"""

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import runner  # noqa: E402  (experiments/runner.py)

BASE = ["--model", "embedded", "--steps", "8", "--prompts_per_step", "8", "--micro_batch", "8",
        "--max_new_tokens", "96", "--rollout", "vllm", "--seed", "0", "--clip", "none",
        # the loss path, the optimizer, the micro-batches and the attention kernel the committed runs used
        *runner.PINNED]
# run -> (what it changes against the first, its flags)
RUNS = {
    "opsd_fkl_lr1e-5": ("reference: OPSD, forward KL", ["--method", "opsd", "--exposure", "full", "--beta", "0",
                                                       "--lr", "1e-5"]),
    "opsd_rkl_lr1e-5": ("the divergence: reverse KL (mode-seeking)", ["--method", "opsd", "--exposure", "full",
                                                                      "--beta", "1", "--lr", "1e-5"]),
    "opsd_fkl_lr3e-5": ("the learning rate: 3x", ["--method", "opsd", "--exposure", "full", "--beta", "0",
                                                  "--lr", "3e-5"]),
    "dasd_lr1e-5": ("the push: DASD (20% of tokens pushed)", ["--method", "dasd", "--exposure", "full", "--lr", "1e-5"]),
    "opsd_fkl_a0_lr1e-5": ("the teacher: shown the answer only", ["--method", "opsd", "--exposure", "fixed",
                                                                  "--alpha", "0", "--beta", "0", "--lr", "1e-5"]),
    # the control: no update at all (lr 0), so the step-to-step variation of the prompts alone
    "opsd_fkl_lr0": ("control: no update (lr 0)", ["--method", "opsd", "--exposure", "full", "--beta", "0",
                                                   "--lr", "0"]),
}
STEPS = 8


def metrics(folder):
    path = os.path.join(folder, "metrics.jsonl")
    return evaluate.read_metrics(path) if os.path.exists(path) else []


def run(out, name):
    folder = os.path.join(out, name)
    if len(metrics(folder)) >= STEPS:
        return
    cmd = [sys.executable, "train.py", *BASE, *RUNS[name][1], "--out_dir", folder]
    if os.path.isdir(os.path.join(folder, "ckpt")):
        cmd.append("--resume")
    os.makedirs(folder, exist_ok=True)
    runner.run(cmd, os.path.join(folder, "train.log"))
    for sub in ("final", "ckpt"):  # only the trajectory is kept
        shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)


def report(out):
    rows, curves = [], {}
    # the prompts change every step (the same ones in every run: seed 0), and some steps' prompts are calmer than
    # others, so the table gives step 1 and the mean of the last four steps, not step 8 alone
    head = ("| run | changes | student entropy, step 1 -> mean of 5-8 | teacher entropy, step 1 -> mean of 5-8 | "
            "KL(p_T \\|\\| p_S), step 1 -> mean of 5-8 | response length, step 1 -> mean of 5-8 |")
    rows += [head, "|" + "---|" * 6]
    for name, (what, _) in RUNS.items():
        m = metrics(os.path.join(out, name))
        if len(m) < STEPS:
            continue
        late = m[STEPS // 2:STEPS]

        def pair(key, digits=2):
            return f"{m[0][key]:.{digits}f} -> {sum(r[key] for r in late) / len(late):.{digits}f}"

        rows.append(f"| {name} | {what} | {pair('entropy/student')} | {pair('entropy/teacher')} | "
                    f"{pair('kl/teacher_student', 3)} | {pair('rollout/response_len', 0)} |")
        curves[name] = m[:STEPS]
    if not curves:
        print("no finished runs yet")
        return
    text = "\n".join(rows) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, m) in enumerate(curves.items()):
        steps = [r["step"] for r in m]
        ax.plot(steps, [r["entropy/student"] for r in m], marker="o", color=f"C{i}", label=f"{name}: student")
        ax.plot(steps, [r["entropy/teacher"] for r in m], linestyle="--", color=f"C{i}", label=f"{name}: teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token entropy on the student's rollouts (nats)")
    ax.set_title("entropy under self-distillation, base model")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "entropy_climb.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {out}/table.md and entropy_climb.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "entropy_climb"))
    ap.add_argument("--report_only", action="store_true")
    args = ap.parse_args(argv)
    if not args.report_only:
        for name in RUNS:
            run(args.out, name)
    report(args.out)


if __name__ == "__main__":
    main()
