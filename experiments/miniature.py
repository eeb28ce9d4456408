"""A miniature reproduction: every method side by side on the embedded model and dataset.

Each method trains the same start point under the same budget (steps, prompts per step, samples per
prompt, max new tokens, learning rate, dtype) and is evaluated on the embedded test split, for several seeds.
The start point is the demo's *format warm start* (docs/choices.md, choice 13: SmolLM2-135M-Instruct after 30 SFT
steps on training-split solutions, cached; Avg@4 ~39 on the test split), so that gains and losses both
show; --model embedded starts from SmolLM2-135M-Instruct itself, which scores ~0.

    base        no training (the start point)
    sft         NLL of the reference solutions (no teacher, no rollouts needed)
    grpo        outcome reward, group-normalized advantages (no teacher)
    opsd        OPSD, full exposure: the teacher sees the whole reference solution
    opsd_fixed  OPSD with the best fixed exposure alpha (chosen on the validation slice, or --fixed_alpha)
    dasd        DASD, KL form: low-entropy tokens pulled toward the teacher, high-entropy pushed away
    dasd_adv    DASD, token-advantage form
    atesd       OPSD loss with the learned Beta-policy exposure controller
    dasd_atesd  DASD (KL form) with the learned exposure
    opsd_random OPSD with alpha drawn uniformly and held as long as ATESD holds its own: ATESD without the policy
    controls (does the teacher teach?):
    no_reference     OPSD whose teacher's prompt holds no privileged text (no step, no answer: alpha 0, answer hidden)
    wrong_reference  OPSD whose teacher reads another training problem's reference
    teacher_free     no teacher: a fixed negative advantage on each response's least likely sampled tokens
    dasd_pull        DASD's pull alone (--push_weight 0);  dasd_push: its push alone (--pull_weight 0)

The learning rate is chosen once, for OPSD, on a validation slice held out of the training data
(never the test split), and reused by every method; then, with that learning rate, the fixed exposure
of opsd_fixed is chosen the same way from --alpha_grid. Selection rule: highest validation Avg@k, then
Pass@k, then the lowest no-answer rate (at this scale accuracy is often 0 for all candidates, and a
model that writes a final answer is the precursor of one that writes the right one).

Each method's Avg@k is compared problem by problem with the start point and with OPSD: the per-problem
accuracy is averaged over a method's seeds, and evaluate.paired_bootstrap gives the mean difference and
its 95% interval over problems (the "vs start" and "vs OPSD" columns). Pass@k is reported for k = 1, 2,
4, ..., --k (16 by default).

The validation slice holds training-split rows (never test rows); the warm start's SFT drew its 480
solutions from the whole training split, so it may have seen some of them. That can only bias the
learning-rate and exposure choices, not the test numbers.

Everything runs through train.py and evaluate.py as subprocesses, one at a time (two CPU cores do
not profit from two concurrent runs). Per run the layout is
    <out>/runs/<unit>/seed<s>/train/   metrics.jsonl, train.log (ckpt/ and final/ while needed)
    <out>/runs/<unit>/seed<s>/eval/    report.json, samples.jsonl, eval.log
The start model is cached per machine and rebuilt on a new one, and two builds of one recipe need not be
bitwise equal (see weights_fingerprint). Each unit records its build in start.json; before training from a
build that has not been evaluated yet, its start point is evaluated into <out>/runs/start_builds/<build>/seed<s>/,
and "vs start" pairs every unit with the start point of its own build.
A run whose eval/report.json exists is done and skipped; a run interrupted while training resumes
from its checkpoint (train.py --resume). Models are deleted once evaluated (--keep_models keeps
them): 17 models and their optimizer states would take tens of GB.

Results are never overwritten silently: <out>/config.json records the budget, and running again
into the same folder with a different budget is refused; summary.json, table.md and the figures
are rebuilt from the finished runs, and an older summary.json that differs is first kept as
summary.<time>.json.

Run (from the repository root):
    python experiments/miniature.py                          # all of it, in the foreground
    nohup python experiments/miniature.py > miniature.log 2>&1 &   # in the background; rerun to resume
    python experiments/miniature.py --report_only            # tables and figures from finished runs
    python experiments/miniature.py --seeds 0 1 2 3          # a fourth seed into the same folder
Output: <out>/summary.json, table.md, pass_at_k.png, train_curves.png, lr_selection.json,
alpha_selection.json.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import demo  # noqa: E402  (experiments/demo.py: the cached format warm start)
import evaluate  # noqa: E402
import runner  # noqa: E402  (experiments/runner.py)

# method -> the train.py flags that make it (everything else is the shared budget)
METHODS = {
    "sft": ["--method", "sft"],
    "grpo": ["--method", "grpo"],
    "opsd": ["--method", "opsd", "--exposure", "full"],
    "opsd_fixed": ["--method", "opsd", "--exposure", "fixed"],  # + --alpha from --fixed_alpha
    "dasd": ["--method", "dasd", "--exposure", "full"],
    "dasd_adv": ["--method", "dasd_adv", "--exposure", "full"],
    "atesd": ["--method", "opsd", "--exposure", "atesd"],
    "dasd_atesd": ["--method", "dasd", "--exposure", "atesd"],
    "opsd_random": ["--method", "opsd", "--exposure", "random"],  # ATESD's ablation: same hold, no policy
    # controls: does the teacher teach? (docs/choices.md, choice 25)
    "no_reference": ["--method", "opsd", "--exposure", "fixed", "--alpha", "0", "--teacher_show_answer", "false"],
    "wrong_reference": ["--method", "opsd", "--exposure", "full", "--teacher_context", "wrong"],
    "teacher_free": ["--method", "teacher_free"],
    "dasd_pull": ["--method", "dasd", "--exposure", "full", "--push_weight", "0"],
    "dasd_push": ["--method", "dasd", "--exposure", "full", "--pull_weight", "0"],
}
ORDER = ["base"] + list(METHODS)
WARM_STARTS = {"warmstart": "format", "reader": "reader"}  # --model -> demo.warm_start_recipe's kind
# evaluations of later builds of the start model, one folder per build: runs/start_builds/<sha256 prefix>/seed<s>
START_BUILDS = "start_builds"
# one colour and line style per method, the same in every panel and figure
STYLE = {m: {"color": f"C{i}", "linestyle": "--" if "atesd" in m or m == "base" else "-"} for i, m in enumerate(ORDER)}
# training curves drawn per method (mean over seeds)
CURVES = ("loss/total", "entropy/student", "entropy/teacher", "kl/teacher_student", "dasd/frac_pushed", "exposure/alpha_used",
          "rollout/response_len")
# each method's Avg@k is compared, problem by problem, with these (mean over seeds per problem)
PAIRED_AGAINST = ("base", "opsd")
# further paired differences, (a, b) read as "a minus b", printed under the table: what the learned exposure adds
# over its random ablation, and what each half of DASD + ATESD adds to the other
CONTRASTS = (("atesd", "opsd_random"), ("dasd_atesd", "atesd"), ("dasd_atesd", "dasd"))
HEALTH = ("length", "truncation_rate", "no_box_rate", "no_answer_rate", "entropy", "revisions_per_1k_tokens",
          "rep4")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_argument_group("budget (the same for every method)")
    g.add_argument("--model", default="warmstart",
                   help="start point of every run and the 'base' row: 'warmstart' (the demo's cached format warm "
                        "start, built once; docs/choices.md, choice 13), 'reader' (the cached reader warm start, whose "
                        "teacher reads its reference; docs/choices.md, choice 24), 'embedded' (SmolLM2-135M-Instruct "
                        "itself), or a model folder")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="one dtype for every run of the folder and its warm start; auto: the faster matmul of this "
                        "CPU, measured once at the start and recorded in budget.json (a folder keeps one dtype)")
    g.add_argument("--start_dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype the warm start is built in (default: --dtype); a folder whose start was built in one "
                        "dtype and trained and evaluated in the other crosses the two numerics (results/numerics)")
    g.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    g.add_argument("--prompts_per_step", type=int, default=8)
    g.add_argument("--samples_per_prompt", type=int, default=2, help="rollouts per prompt (GRPO needs >= 2)")
    g.add_argument("--micro_batch", type=int, default=8, help="sequences per forward/backward")
    g.add_argument("--max_new_tokens", type=int, default=96, help="rollout length cap in training")
    g.add_argument("--lr", type=float, default=None, help="skip the OPSD learning-rate search and use this")
    g.add_argument("--lr_grid", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4],
                   help="learning rates tried for OPSD (seed 0) on the validation slice")
    g.add_argument("--fixed_alpha", type=float, default=None,
                   help="exposure of opsd_fixed; default: the best of --alpha_grid on the validation slice")
    g.add_argument("--alpha_grid", type=float, nargs="+", default=[0.0, 0.25, 0.5],
                   help="fixed exposures tried for OPSD (seed 0, chosen LR) on the validation slice; the "
                        "embedded solutions have at most 3 steps, so 0.75 reveals what 1.0 (= opsd) reveals")
    g.add_argument("--atesd", nargs=3, type=int, default=[1, 2, 2], metavar=("HOLD", "LOOKAHEAD", "BATCH"),
                   help="controller hold / lookahead / batch_decisions, scaled down so that a short run "
                        "completes a few REINFORCE updates; opsd_random holds its draws for HOLD steps too")
    g.add_argument("--distill_args", default="",
                   help="train.py flags added to every method with a teacher (all but sft and grpo), e.g. "
                        "'--distill_mask_answer true --clip none' (results/miniature_leak)")
    g.add_argument("--save_every", type=int, default=4, help="checkpoint period (resume granularity)")
    e = ap.add_argument_group("evaluation")
    e.add_argument("--n_problems", type=int, default=100, help="first N embedded test problems (levels 1-3 interleaved)")
    e.add_argument("--n_val", type=int, default=30, help="validation problems held out of the training data")
    e.add_argument("--k", type=int, default=16, help="samples per problem (Pass@k is reported up to this k)")
    e.add_argument("--eval_max_new_tokens", type=int, default=96)
    e.add_argument("--no_entropy", action="store_true",
                   help="skip the evaluation's entropy pass (a teacher-forced forward over every sample): Avg@k and "
                        "Pass@k only, the entropy health column left empty")
    e.add_argument("--eval_rollout", default="vllm", choices=["hf", "vllm"],
                   help="generation backend of evaluate.py (vLLM batches the 120 sequences better)")
    r = ap.add_argument_group("runs")
    r.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", default="results/miniature_testbed")
    r.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: all cores)")
    r.add_argument("--keep_models", action="store_true", help="keep final/ and ckpt/ after evaluation")
    r.add_argument("--report_only", action="store_true", help="only rebuild the report from finished runs")
    r.add_argument("--combine", nargs="+", metavar="FOLDER",
                   help="no runs: read these folders' summary.json (arms of one design, e.g. results/numerics/*/) "
                        "and write --out/summary.json and table.md: each arm's per-seed differences from its start, "
                        "the pooled paired CI, and the contrasts of the gains between arms that differ in one dtype")
    return ap


# ---------------------------------------------------------------------------------------------
# bookkeeping: data files, the budget guard, atomic JSON
# ---------------------------------------------------------------------------------------------


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def budget(args):
    """The settings that make results comparable; a folder holds results of one budget only."""
    keys = ("model", "dtype", "steps", "prompts_per_step", "samples_per_prompt", "micro_batch", "max_new_tokens",
            "lr", "lr_grid", "fixed_alpha", "alpha_grid", "atesd", "n_problems", "n_val", "k", "eval_max_new_tokens",
            "eval_rollout")
    out = {k: getattr(args, k) for k in keys}
    if args.distill_args:  # recorded only when set: the folders written before the flag existed keep their budget
        out["distill_args"] = args.distill_args
    if args.model in WARM_STARTS:  # another recipe is another start point
        out["warm_start_recipe"] = demo.warm_start_recipe(args.start_dtype or args.dtype, WARM_STARTS[args.model])
    return out


def start_model(args):
    """The model folder (or 'embedded') every run starts from and the 'base' row evaluates."""
    if args.model in WARM_STARTS:
        return demo.warm_start_dir(demo.warm_start_recipe(args.start_dtype or args.dtype, WARM_STARTS[args.model]))
    return args.model


def check_budget(args):
    path = os.path.join(args.out, "config.json")
    mine = budget(args)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            lines = ", ".join(f"--{k} was {a} now {b}" for k, (a, b) in diff.items())
            sys.exit(f"{path}: this folder holds results of another budget ({lines}); "
                     "use --out for a new folder, or delete the old one")
    else:
        os.makedirs(args.out, exist_ok=True)
        write_json(path, mine)


def prepare_data(args):
    """Split the embedded train set into training rows and a validation slice (for the LR choice).

    The validation rows are every (3000 // n_val)-th training row, so they mix the three levels; they
    are written to data/val.jsonl and removed from data/train.jsonl, which every run trains on.
    """
    folder = os.path.join(args.out, "data")
    train_path, val_path = os.path.join(folder, "train.jsonl"), os.path.join(folder, "val.jsonl")
    rows = data.embedded_split("train")
    stride = len(rows) // args.n_val
    val_ids = set(range(0, stride * args.n_val, stride))
    parts = {train_path: [r for i, r in enumerate(rows) if i not in val_ids],
             val_path: [r for i, r in enumerate(rows) if i in val_ids]}
    os.makedirs(folder, exist_ok=True)
    for path, part in parts.items():
        text = "".join(json.dumps(r) + "\n" for r in part)
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        elif open(path).read() != text:
            sys.exit(f"{path}: differs from the embedded split it should hold; delete it to rebuild")
    return train_path, val_path


# ---------------------------------------------------------------------------------------------
# one run: train (resumable), then evaluate
# ---------------------------------------------------------------------------------------------


def train_cmd(args, method, seed, lr, train_data, out_dir, alpha=None):
    cmd = [sys.executable, "train.py", *METHODS[method], "--model", start_model(args), "--dtype", args.dtype,
           "--data", train_data, "--seed", str(seed), "--lr", str(lr),
           "--steps", str(args.steps), "--prompts_per_step", str(args.prompts_per_step),
           "--samples_per_prompt", str(args.samples_per_prompt), "--micro_batch", str(args.micro_batch),
           "--max_new_tokens", str(args.max_new_tokens),
           "--save_every", str(args.save_every), "--out_dir", out_dir, "--rollout", "auto",  # vLLM where installed
           # the loss path, optimizer, micro-batches and attention of every unit, pinned so units stay comparable
           # (docs/choices.md, choice 17)
           *runner.PINNED]
    if method == "opsd_fixed":
        cmd += ["--alpha", str(args.fixed_alpha if alpha is None else alpha)]
    if method not in ("sft", "grpo"):
        cmd += args.distill_args.split()
    if "atesd" in METHODS[method]:
        hold, lookahead, batch = args.atesd
        cmd += ["--hold", str(hold), "--lookahead", str(lookahead), "--batch_decisions", str(batch)]
    if "random" in METHODS[method]:
        cmd += ["--hold", str(args.atesd[0])]  # one draw per ATESD decision
    if os.path.isdir(os.path.join(out_dir, "ckpt")):
        cmd.append("--resume")
    return cmd


def eval_cmd(args, model_path, seed, bench, out_dir, n_problems):
    return [sys.executable, "evaluate.py", "--model", model_path, "--dtype", args.dtype, "--data", bench,
            "--seed", str(seed),
            "--k", str(args.k), "--n_problems", str(n_problems), "--max_new_tokens", str(args.eval_max_new_tokens),
            "--rollout", args.eval_rollout, "--batch_problems", str(n_problems), "--out", out_dir,
            *(["--no_entropy"] if args.no_entropy else [])]


def weights_fingerprint(model_dir):
    """The first 12 hex digits of the sha256 of a model folder's weight files. The warm start is cached per machine
    and rebuilt on a new one; two builds of one recipe on different CPUs can differ in the last bits, and with them
    the samples, so each unit records which build it started from."""
    if model_dir == "embedded":
        model_dir = demo.modellib.embedded_model_dir()
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:12]


def run_unit(args, unit, method, seed, lr, train_data, bench, n_problems, env, alpha=None):
    """Train (unless base) and evaluate one (method, seed); skipped when its report exists."""
    folder = os.path.join(args.out, "runs", unit, f"seed{seed}")
    report = os.path.join(folder, "eval", "report.json")
    if os.path.exists(report):
        return report
    os.makedirs(folder, exist_ok=True)
    model_path = start_model(args)
    start_json = os.path.join(folder, "start.json")
    if not os.path.exists(start_json):
        write_json(start_json, {"start": model_path, "weights_sha256": weights_fingerprint(model_path)})
    if method != "base":
        tdir = os.path.join(folder, "train")
        final = os.path.join(tdir, "final")
        if not os.path.isdir(final):
            os.makedirs(tdir, exist_ok=True)
            runner.run(train_cmd(args, method, seed, lr, train_data, tdir, alpha), os.path.join(tdir, "train.log"),
                       env=env, echo=False)
        model_path = final
    tmp = os.path.join(folder, "eval.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    runner.run(eval_cmd(args, model_path, seed, bench, tmp, n_problems), os.path.join(tmp, "eval.log"), env=env,
               echo=False)
    shutil.rmtree(os.path.join(folder, "eval"), ignore_errors=True)
    os.replace(tmp, os.path.join(folder, "eval"))  # the report appears only when the evaluation is whole
    if method != "base" and not args.keep_models:
        for sub in ("final", "ckpt"):
            shutil.rmtree(os.path.join(folder, "train", sub), ignore_errors=True)
    return report


def ensure_start_eval(args, seed, env):
    """Before training from this machine's build of the start model: make sure that build has been evaluated on the
    test problems (the 'base' unit when it is from this build, otherwise runs/start_builds/<build>/seed<seed>), so
    that 'vs start' compares each unit with the weights it started from."""
    if "base" in args.methods:  # the 'base' unit of this seed first (the loop then finds it done)
        run_unit(args, "base", "base", seed, None, None, "embedded:test", args.n_problems, env)
    build = weights_fingerprint(start_model(args))
    if build not in start_evals(os.path.join(args.out, "runs")):
        print(f"[+] the start point of build {build} (this machine's), seed {seed}", flush=True)
        run_unit(args, f"{START_BUILDS}/{build}", "base", seed, None, None, "embedded:test", args.n_problems, env)


def bench_result(report_path):
    """The single (model, benchmark) entry of an evaluate.py report."""
    with open(report_path) as f:
        rep = json.load(f)
    (per_bench,) = rep["results"].values()
    (res,) = per_bench.values()
    return res


def select(args, what, grid, unit, run, path, progress):
    """Run each candidate (seed 0) on the validation slice; keep the best by the documented rule."""
    rows = []
    for value in grid:
        progress(f"{what} search: {unit.format(value)}")
        res = bench_result(run(value))
        h = res["health"]  # the health columns ride along (not in the rule): entropy, repetition, truncation
        rows.append({what: value, "avg_at_k": res["avg_at_k"], "pass_at_k": res["pass_at_k"][str(args.k)],
                     "no_answer_rate": h["no_answer_rate"], "entropy": h.get("entropy"), "rep4": h.get("rep4"),
                     "truncation_rate": h.get("truncation_rate")})
    best = max(rows, key=lambda r: (r["avg_at_k"], r["pass_at_k"], -r["no_answer_rate"]))  # first wins ties
    write_json(path, {"rule": "max validation avg@k, then pass@k, then min no-answer rate; first of a tie",
                      "candidates": rows, "chosen": best[what]})
    return best[what]


def select_lr(args, train_data, val_data, env, progress):
    """The learning rate, found once for OPSD (full exposure) and reused by every method."""
    unit = "opsd_lr{:g}"
    return select(args, "lr", args.lr_grid, unit,
                  lambda lr: run_unit(args, "search/" + unit.format(lr), "opsd", 0, lr, train_data, val_data,
                                      args.n_val, env),
                  os.path.join(args.out, "lr_selection.json"), progress)


def select_alpha(args, lr, train_data, val_data, env, progress):
    """The fixed exposure of opsd_fixed, with the chosen learning rate."""
    unit = "opsd_fixed_alpha{:g}"
    return select(args, "alpha", args.alpha_grid, unit,
                  lambda a: run_unit(args, "search/" + unit.format(a), "opsd_fixed", 0, lr, train_data, val_data,
                                     args.n_val, env, alpha=a),
                  os.path.join(args.out, "alpha_selection.json"), progress)


# ---------------------------------------------------------------------------------------------
# the report: mean and spread over seeds, a table, two figures
# ---------------------------------------------------------------------------------------------


def mean_sd(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def metric_of(res, key):
    h = res["health"]
    return {"avg_at_k": res["avg_at_k"], "maj_at_k": res["maj_at_k"], "length": h["length"]["mean"],
            **{f"pass@{k}": v for k, v in res["pass_at_k"].items()}}.get(key, h.get(key))


def read_curve(path, key):
    """{step: value} of one metric from a train.py metrics.jsonl (missing file: empty)."""
    rows = evaluate.read_metrics(path) if os.path.exists(path) else []
    return {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}


def summarize(args):
    runs_dir = os.path.join(args.out, "runs")
    summary = {"budget": budget(args), "methods": {}}
    for what, flag in (("lr", "lr"), ("alpha", "fixed_alpha")):
        path = os.path.join(args.out, f"{what}_selection.json")
        if os.path.exists(path):
            with open(path) as f:
                summary[f"{what}_selection"] = json.load(f)
            if summary["budget"][flag] is None:  # the value the runs used
                summary["budget"][flag] = summary[f"{what}_selection"]["chosen"]
    for m in ORDER:
        seeds = sorted(int(s[4:]) for s in os.listdir(os.path.join(runs_dir, m))
                       if os.path.exists(os.path.join(runs_dir, m, s, "eval", "report.json"))) \
            if os.path.isdir(os.path.join(runs_dir, m)) else []
        if not seeds:
            continue
        res = {s: bench_result(os.path.join(runs_dir, m, f"seed{s}", "eval", "report.json")) for s in seeds}
        keys = ["avg_at_k", *[f"pass@{k}" for k in res[seeds[0]]["pass_at_k"]], "maj_at_k", *HEALTH]
        entry = {"seeds": seeds, "per_seed": {}, "mean": {}, "sd": {}}
        for key in keys:
            vals = [metric_of(res[s], key) for s in seeds]
            entry["per_seed"][key] = vals
            entry["mean"][key], entry["sd"][key] = mean_sd(vals)
        curves = {}
        for key in CURVES:
            if key == "exposure/alpha_used" and m in ("sft", "grpo", "teacher_free"):
                continue  # no teacher: the logged alpha means nothing
            per = [read_curve(os.path.join(runs_dir, m, f"seed{s}", "train", "metrics.jsonl"), key) for s in seeds]
            steps = sorted(set.intersection(*(set(c) for c in per))) if all(per) else []
            if steps:
                curves[key] = {"steps": steps, "mean": [sum(c[t] for c in per) / len(per) for t in steps]}
        entry["curves"] = curves
        entry["start_builds"] = [start_build(os.path.join(runs_dir, m, f"seed{s}")) for s in seeds]
        entry["per_problem"] = per_problem([res[s] for s in seeds])
        summary["methods"][m] = entry
    starts = start_evals(runs_dir)
    summary["start_points"] = {b or "not recorded": {"seeds": [s for s, _, _ in v], "avg_at_k": [a for _, a, _ in v]}
                               for b, v in starts.items()}
    for m, entry in summary["methods"].items():
        entry["paired"] = {}
        for ref in PAIRED_AGAINST:
            if ref == m or (ref != "base" and ref not in summary["methods"]):
                continue
            if ref == "base":  # each unit against the start model it was trained from (its build), whether that
                # start was evaluated as the 'base' unit or only under runs/start_builds/
                ref_rows = start_reference(starts, entry["start_builds"])
            else:
                ref_rows = summary["methods"][ref]["per_problem"]
            entry["paired"][ref] = runner.paired(ref_rows, entry["per_problem"])
    summary["contrasts"] = {f"{a} - {b}": runner.paired(summary["methods"][b]["per_problem"],
                                                         summary["methods"][a]["per_problem"])
                            for a, b in CONTRASTS if a in summary["methods"] and b in summary["methods"]}
    return summary


def start_evals(runs_dir):
    """{build: [(seed, avg_at_k, per-problem accuracy), ...]}: every evaluation of the start model, the 'base' units
    and the extra ones of later builds (runs/start_builds/<build>/seed<s>), grouped by the weights they evaluated."""
    found = {}
    folders = sorted(glob.glob(os.path.join(runs_dir, "base", "seed*"))) + \
        sorted(glob.glob(os.path.join(runs_dir, START_BUILDS, "*", "seed*")))
    for folder in folders:  # the 'base' units first: an extra evaluation of a (build, seed) they hold is left out
        report = os.path.join(folder, "eval", "report.json")
        seed, build = int(os.path.basename(folder)[4:]), start_build(folder)
        if os.path.exists(report) and seed not in [s for s, _, _ in found.get(build, [])]:
            res = bench_result(report)
            found.setdefault(build, []).append((seed, res["avg_at_k"], res.get("accuracy_per_problem")))
    return found


def start_reference(starts, builds):
    """The start point's per-problem accuracy that a method's units are paired with: for each unit, the mean over
    the evaluations of the build it started from, then the mean over the units (so with a single build it is the
    'base' row's per-problem mean). None when a unit's build was never evaluated or a report lacks per-problem data."""
    per_unit = []
    for b in builds:
        rows = [pp for _, _, pp in starts.get(b, [])]
        if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
            return None
        per_unit.append([sum(col) / len(col) for col in zip(*rows)])
    if not per_unit or len({len(r) for r in per_unit}) != 1:
        return None
    return [sum(col) / len(col) for col in zip(*per_unit)]


def start_build(folder):
    """The start model's weights fingerprint a unit recorded (start.json), or None for a unit that predates it."""
    path = os.path.join(folder, "start.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["weights_sha256"]


def per_problem(results):
    """(P,) accuracy per problem, averaged over the seeds' reports (each c_i / k); None if a report lacks it."""
    rows = [r.get("accuracy_per_problem") for r in results]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return [sum(col) / len(col) for col in zip(*rows)]


def fmt(m, sd, scale=1.0, digits=1):
    if m is None:
        return "-"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def fmt_paired(p):
    return "-" if p is None else f"{p['diff']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]"


def table(summary, k):
    head = (f"| method | seeds | Avg@{k} | vs start [95% CI] | vs OPSD [95% CI] | Pass@1 | Pass@{k} | maj@{k} | "
            f"length | truncated % | no answer % | entropy | revisions /1k | rep-4 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, e in summary["methods"].items():
        mu, sd = e["mean"], e["sd"]
        lines.append("| " + " | ".join([
            m, str(len(e["seeds"])), fmt(mu["avg_at_k"], sd["avg_at_k"]),
            *[fmt_paired(e["paired"].get(ref)) for ref in PAIRED_AGAINST], fmt(mu["pass@1"], sd["pass@1"]),
            fmt(mu[f"pass@{k}"], sd[f"pass@{k}"]), fmt(mu["maj_at_k"], sd["maj_at_k"]),
            fmt(mu["length"], sd["length"], digits=0), fmt(mu["truncation_rate"], sd["truncation_rate"], 100),
            fmt(mu["no_answer_rate"], sd["no_answer_rate"], 100), fmt(mu["entropy"], sd["entropy"], digits=2),
            fmt(mu["revisions_per_1k_tokens"], sd["revisions_per_1k_tokens"], digits=2),
            fmt(mu["rep4"], sd["rep4"], digits=3)]) + " |")
    if summary.get("contrasts"):
        lines.append("\nPaired differences over problems [95% CI]: " + "; ".join(
            f"{name}: {fmt_paired(p)}" for name, p in summary["contrasts"].items()) + ".")
    builds = {}
    for m, e in summary["methods"].items():
        for seed, b in zip(e["seeds"], e.get("start_builds", [None] * len(e["seeds"]))):
            builds.setdefault(b or "not recorded", []).append(f"{m}/seed{seed}")
    if len(builds) > 1 or len(summary.get("start_points", {})) > 1 or \
            ("base" not in summary["methods"] and summary.get("start_points")):  # no 'base' row: name the start
        # units started from different builds of the start model (see weights_fingerprint)
        lines.append("\nStart-model builds (sha256 of the weights): " + "; ".join(
            f"{b}: {', '.join(units)}" for b, units in sorted(builds.items())) + ".")
        lines.append("Each build's start point, Avg@k per evaluation (seed: value): " + "; ".join(
            f"{b}: " + ", ".join(f"{s}: {a:.1f}" for s, a in zip(v["seeds"], v["avg_at_k"]))
            for b, v in sorted(summary["start_points"].items())) + ". 'vs start' pairs each unit with its own build.")
    return "\n".join(lines) + "\n"


def plot(summary, out, k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ks = [2 ** i for i in range(int(math.log2(k)) + 1)]
    for m, e in methods.items():
        mu = [e["mean"].get(f"pass@{j}") for j in ks]
        sd = [e["sd"].get(f"pass@{j}") for j in ks]
        if None in mu:
            continue
        ax.errorbar(ks, mu, yerr=sd, marker="o", capsize=3, label=f"{m} (n={len(e['seeds'])})", **STYLE[m])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(j) for j in ks])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k (%), mean ± sd over seeds")
    ax.set_title("embedded test split")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pass_at_k.png"), dpi=120)
    plt.close(fig)

    keys = [c for c in CURVES if any(c in e["curves"] for e in methods.values())]
    if not keys:
        return
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(13, 3.3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for m, e in methods.items():
            c = e["curves"].get(key)
            if c:
                ax.plot(c["steps"], c["mean"], marker=".", label=m, **STYLE[m])
        if key == "loss/total":  # objectives differ in scale (SFT's NLL ~1, distillation ~0.01)
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"{key} (mean over seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(os.path.join(out, "train_curves.png"), dpi=120)
    plt.close(fig)


def write_report(args):
    summary = summarize(args)
    if not summary["methods"]:
        print("no finished runs yet")
        return summary
    path = os.path.join(args.out, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(summary)):  # keep what it said before, under its own time
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
            kept, i = os.path.join(args.out, f"summary.{stamp}.json"), 1
            while os.path.exists(kept):
                kept, i = os.path.join(args.out, f"summary.{stamp}-{i}.json"), i + 1
            os.replace(path, kept)
            print(f"kept the previous summary as {os.path.basename(kept)}")
    write_json(path, summary)
    text = table(summary, args.k)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    plot(summary, args.out, args.k)
    print(text)
    print(f"wrote {path}, table.md, pass_at_k.png, train_curves.png")
    return summary


def arm_gains(folder):
    """One arm (a miniature folder) of a crossed design: per trained method, its start and trained Avg@k per seed (the
    start of the unit's own build and sampling seed), their differences, the pooled paired CI against the start, and
    the per-problem gain (trained minus start, means over seeds) that combine() contrasts between arms."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    recipe = summary["budget"].get("warm_start_recipe") or []
    starts = start_evals(os.path.join(folder, "runs"))
    arm = {"folder": os.path.relpath(folder, ROOT), "start_dtype": demo.recipe_value(recipe, "--dtype"),
           "dtype": summary["budget"]["dtype"], "distill_args": summary["budget"].get("distill_args", ""), "methods": {}}
    start_of = {(b, s): a for b, v in starts.items() for s, a, _ in v}
    gains = {}
    for m, e in summary["methods"].items():
        if m == "base":
            continue
        start = [start_of.get((b, s)) for s, b in zip(e["seeds"], e["start_builds"])]
        trained = e["per_seed"]["avg_at_k"]
        ref = start_reference(starts, e["start_builds"])
        arm["methods"][m] = {"seeds": e["seeds"], "start_avg_at_k": start, "trained_avg_at_k": trained,
                             "diff_per_seed": [None if a is None else t - a for t, a in zip(trained, start)],
                             "paired_vs_start": e["paired"].get("base")}
        if ref is not None:
            gains[m] = [t - r for t, r in zip(e["per_problem"], ref)]
    return arm, gains


def combine(folders, out):
    """The crossed design's summary (results/numerics): arm_gains per folder, and the difference of two arms' gains over
    the start, paired problem by problem (runner.paired), for every two arms that differ in exactly one of (start dtype,
    training dtype) with the same distill flags (the arm with float32 in that place minus the other), and for every two
    arms with the same dtypes whose distill flags differ by added flags (the arm with the added flags minus the other:
    masked OPSD minus plain)."""
    arms, gains = {}, {}
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        arms[name], gains[name] = arm_gains(folder)
    contrasts = {}
    for a, A in arms.items():
        for b, B in arms.items():
            differ = [k for k in ("start_dtype", "dtype") if A[k] != B[k]]
            one_dtype = len(differ) == 1 and A[differ[0]] == "float32" and A["distill_args"] == B["distill_args"]
            added_flags = not differ and set(A["distill_args"].split()) > set(B["distill_args"].split())
            if not (one_dtype or added_flags):
                continue
            for m in sorted(set(gains[a]) & set(gains[b])):
                contrasts[f"{m}: {a} - {b}"] = runner.paired(gains[b][m], gains[a][m])
    summary = {"arms": arms, "contrasts": contrasts}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), summary)
    lines = ["| arm | start | train | method | seeds | start Avg@k | trained Avg@k | per-seed diff | pooled vs start |",
             "|---|---|---|---|---|---|---|---|---|"]
    num = lambda xs: ", ".join("-" if x is None else f"{x:.2f}" for x in xs)
    for name, arm in arms.items():
        for m, e in arm["methods"].items():
            lines.append(f"| {name} | {arm['start_dtype']} | {arm['dtype']} | {m} | {len(e['seeds'])} | "
                         f"{num(e['start_avg_at_k'])} | {num(e['trained_avg_at_k'])} | {num(e['diff_per_seed'])} | "
                         f"{fmt_paired(e['paired_vs_start'])} |")
    lines += ["", "Differences of the gains over the start, paired over problems (first arm minus second):", ""]
    lines += [f"- {k}: {fmt_paired(v)}" for k, v in contrasts.items()] or ["- none (no two arms differ in one dtype)"]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = os.path.abspath(args.out)
    if args.combine:
        combine([os.path.abspath(f) for f in args.combine], args.out)
        return
    args.dtype = demo.resolve_dtype(args.dtype)  # measured once: every run of the folder gets the same dtype
    args.start_dtype = args.dtype if args.start_dtype is None else args.start_dtype
    if args.k & (args.k - 1):
        sys.exit(f"--k {args.k}: use a power of two (the Pass@k figure is drawn at k = 1, 2, 4, ...)")
    check_budget(args)
    if args.report_only:
        write_report(args)
        return
    train_data, val_data = prepare_data(args)
    if args.model in WARM_STARTS:  # built once, then reused
        demo.ensure_warm_start(sys.executable, demo.warm_start_recipe(args.start_dtype, WARM_STARTS[args.model]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    trained = [m for m in args.methods if m != "base"]
    search_alpha = args.fixed_alpha is None and "opsd_fixed" in args.methods
    n_units = (len(args.seeds) * len(args.methods) + (len(args.lr_grid) if args.lr is None and trained else 0)
               + (len(args.alpha_grid) if search_alpha else 0))
    done = [0]

    def progress(what):
        done[0] += 1
        print(f"[{done[0]}/{n_units}] {what}  ({(time.time() - t0) / 60:.1f} min so far)", flush=True)

    lr = args.lr
    if lr is None and trained:
        lr = select_lr(args, train_data, val_data, env, progress)
        print(f"learning rate for every method: {lr:g} (lr_selection.json)", flush=True)
    if search_alpha:
        args.fixed_alpha = select_alpha(args, lr, train_data, val_data, env, progress)
        print(f"fixed exposure of opsd_fixed: {args.fixed_alpha:g} (alpha_selection.json)", flush=True)
    for seed in args.seeds:  # seed-major: a partial run already compares every method
        if any(not os.path.exists(os.path.join(args.out, "runs", m, f"seed{seed}", "eval", "report.json"))
               for m in trained):
            ensure_start_eval(args, seed, env)
        for m in args.methods:
            progress(f"{m} seed {seed}")
            run_unit(args, m, m, seed, lr, train_data, "embedded:test", args.n_problems, env)
        write_report(args)
    print(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
