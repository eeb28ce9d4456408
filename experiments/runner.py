"""What the experiment scripts share: train.py and evaluate.py run as logged subprocesses, the flags that pin the
committed runs' arithmetic, and the paired comparison of two evaluations on the same problems."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import evaluate  # noqa: E402

# The loss path, optimizer, micro-batches and attention these experiments run under, pinned so their numbers
# reproduce: the plain loss on full logits, the per-parameter AdamW, micro-batches in the batch's order, sdpa
# attention (docs/choices.md, choice 17). An experiment that must stay comparable with its committed results (or a
# warm start that must keep its cache key's meaning) passes these, whatever train.py's speed defaults.
PINNED = ["--chunk_size", "0", "--fused_adamw", "false", "--group_by_length", "false", "--attn", "sdpa"]


def run(cmd, log, *, env=None, echo=True):
    """Run `cmd` from the repository root, its output appended to the file `log` (and teed to stdout with echo).
    On failure, exit naming the log and its last lines."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if echo:
            print("$ " + " ".join(cmd), flush=True)
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 bufsize=1)
            for line in p.stdout:
                f.write(line)
                sys.stdout.write(line)
            rc = p.wait()
        else:
            rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-25:])
        raise SystemExit(f"{os.path.basename(cmd[1])} failed (exit {rc}); log: {log}\n{tail}")


def paired(base, new):
    """The paired Avg@k difference new - base over problems, in percentage points, with its 95% bootstrap interval
    (evaluate.paired_bootstrap), from two lists of per-problem accuracies c_i / k in the same problem order; None
    when either is missing or they differ in length."""
    if base is None or new is None or len(base) != len(new):
        return None
    diff, (lo, hi) = evaluate.paired_bootstrap(base, new)
    return {"diff": 100 * diff, "ci95": [100 * lo, 100 * hi], "n_problems": len(new)}
