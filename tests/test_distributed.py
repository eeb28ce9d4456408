"""Distributed training on the CPU (gloo, 2 processes): gradient checkpointing under DDP and FSDP2, with and without
LoRA, and a launch over two "nodes" (two torchrun agents on this machine, one process each, c10d rendezvous).

Every run trains conftest's tiny random Llama (2 layers, hidden 64) on a 16-row slice of the embedded training split:
2 steps, 4 prompts per step (2 per rank, one per micro-batch, so DDP's no_sync accumulation runs too), HF rollouts
of 12 tokens, float32, plain SGD. The eight checkpointing runs share one torchrun launch: this file is also the
worker script, which calls train.main once per run (python tests/test_distributed.py SPEC.json under torchrun).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytestmark = pytest.mark.e2e

# SGD (the update is -lr * gradient, linear in it) with a learning rate that moves the tiny model's weights by ~3% in
# one step (LoRA's merged weights by ~0.2%): a difference in the gradients shows in the final weights far above their
# float32 rounding, and the second step's loss and gradient norm depend on the first step's update
LR = "10"
PARALLEL = ("ddp", "fsdp")
ADAPTER = ("full", "lora")


def flags(model_dir, data_path):
    return ["--model", model_dir, "--data", data_path, "--method", "opsd", "--exposure", "full", "--steps", "2",
            "--prompts_per_step", "4", "--micro_batch", "1", "--max_new_tokens", "12", "--optimizer", "sgd",
            "--lr", LR, "--grad_clip", "0", "--dtype", "float32", "--rollout", "hf"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmds, logs, timeout):
    """Start every command (each in its own process group), wait for all of them; on a timeout kill every group
    (the torchrun agents and their workers) and fail. Output goes to the files in logs."""
    from test_train import train_env

    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=train_env(2), stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)  # one deadline for the lot: the launches run side by side
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(p.returncode != 0 for p in procs):
        tails = []
        for p, log in zip(procs, logs):
            with open(log) as f:
                tails.append(f"--- {log} (exit {p.returncode}):\n{f.read()[-4000:]}")
        raise AssertionError(f"a launch failed or ran past {timeout} s:\n" + "\n".join(tails))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """16 rows of the embedded training split as a JSONL file: setup tokenizes every row of --data, and the full
    split costs seconds per run."""
    import data

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    with open(path, "w") as f:
        for r in data.embedded_split("train")[:16]:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def checkpointing_runs(tiny_model_dir, data_path, tmp_path_factory):
    """The eight runs (DDP / FSDP2) x (full / LoRA r 4) x (plain / gradient checkpointing), one torchrun launch of 2
    processes. Returns (run name -> out_dir, run name -> the number of transformer-block forwards rank 0 ran with
    grad enabled). ddp-full-plain runs first, in torchrun's own rendezvous, as a fresh `torchrun train.py` would."""
    tmp = tmp_path_factory.mktemp("checkpointing")
    runs = []
    for parallel in PARALLEL:
        for adapter in ADAPTER:
            for gc in ("plain", "ckpt"):
                name = f"{parallel}-{adapter}-{gc}"
                runs.append({"name": name, "argv": ["--out_dir", str(tmp / name), *flags(tiny_model_dir, data_path),
                                                    "--gradient_checkpointing", "true" if gc == "ckpt" else "false",
                                                    *(["--fsdp"] if parallel == "fsdp" else []),
                                                    *(["--lora_r", "4"] if adapter == "lora" else [])]})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "calls": str(tmp / "block_calls.json")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(spec)]
    launch([cmd], [tmp / "launch.log"], timeout=600)
    with open(tmp / "block_calls.json") as f:
        calls = json.load(f)
    return {r["name"]: tmp / r["name"] for r in runs}, calls


def update_error(w0, a, b):
    """Relative L2 difference of two runs' updates a - w0 and b - w0 (their final weights a, b), over every tensor."""
    num = sum((a[k].double() - b[k].double()).square().sum().item() for k in a)
    den = sum((a[k].double() - w0[k].double()).square().sum().item() for k in a)
    return (num / den) ** 0.5, den ** 0.5


@pytest.mark.parametrize("adapter", ADAPTER)
@pytest.mark.parametrize("parallel", PARALLEL)
def test_gradient_checkpointing_gives_the_same_losses_and_weights(checkpointing_runs, tiny_model_dir, parallel,
                                                                  adapter):
    """2 gloo processes, DDP or FSDP2, full fine-tuning or LoRA: with --gradient_checkpointing true the logged
    losses and gradient norms of both steps and the final weights (under LoRA the merged model) are those of the
    run without it, and every transformer block really ran twice per training forward (once more in the backward).

    Tolerance 1e-5 relative (the weights: of the update, final minus start): recomputing a block repeats its forward
    on the same inputs with the same kernels, so the runs agree bit for bit here, and at most to float32 rounding
    (2^-24 ~ 6e-8 per operation, ~1e-6 after the sums of a forward and backward) where a kernel split its sums
    differently; a gradient that misses a path or reaches a parameter twice is off by far more (LoRA's A left
    without its gradient: 3e-3 on the step-2 gradient norm, 2e-3 on the update)."""
    from test_train import read_metrics, weights

    outs, calls = checkpointing_runs
    plain, ckpt = outs[f"{parallel}-{adapter}-plain"], outs[f"{parallel}-{adapter}-ckpt"]
    for out, on in ((plain, False), (ckpt, True)):
        with open(out / "config.json") as f:
            cfg = json.load(f)
        assert cfg["gradient_checkpointing"] is on and cfg["fsdp"] is (parallel == "fsdp")
        assert cfg["lora_r"] == (4 if adapter == "lora" else 0)
    # rank 0's block forwards with grad: 2 steps x 2 micro-batches x 2 blocks; the teacher's and generate's run
    # without grad and are not counted
    n_plain, n_ckpt = calls[f"{parallel}-{adapter}-plain"], calls[f"{parallel}-{adapter}-ckpt"]
    assert n_plain == 2 * 2 * 2 and n_ckpt == 2 * n_plain, (n_plain, n_ckpt)

    ma, mb = read_metrics(plain), read_metrics(ckpt)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb):
        assert ra["rollout/response_len"] == rb["rollout/response_len"]  # the same samples
        for k in ("loss/total", "train/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-12), (k, ra["step"], ra[k], rb[k])
    assert ma[0]["train/grad_norm"] > 0 and ma[1]["loss/total"] != ma[0]["loss/total"]

    w0, wa, wb = weights(tiny_model_dir), weights(plain / "final"), weights(ckpt / "final")
    assert set(wa) == set(wb) and set(w0) <= set(wa)
    w0 = {k: w0.get(k, wa[k]) for k in wa}  # a tied lm_head saved separately: its start is the embedding's
    err, moved = update_error(w0, wb, wa)
    assert moved > 0 and err < 1e-5, (err, moved)


def test_two_nodes_equal_one_node(checkpointing_runs, tiny_model_dir, data_path, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d, started twice on this machine (two "nodes" of
    one process each; the rendezvous assigns the node ranks): the same metrics and final weights as the one-node
    launch with 2 processes (--standalone --nproc_per_node 2, the fixture's ddp-full-plain run) with the same flags.
    Only global rank 0 writes, so exactly one of the two out_dirs holds metrics.jsonl and final/."""
    from test_train import read_metrics, weights

    one_node = checkpointing_runs[0]["ddp-full-plain"]
    port, rdzv_id = free_port(), f"two-nodes-{uuid.uuid4().hex[:8]}"
    cmds, logs = [], []
    for node in ("a", "b"):
        cmds.append([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id,
                     "train.py", "--out_dir", str(tmp_path / node), *flags(tiny_model_dir, data_path),
                     "--gradient_checkpointing", "false"])
        logs.append(tmp_path / f"{node}.log")
    launch(cmds, logs, timeout=300)
    writers = [n for n in ("a", "b") if os.path.exists(tmp_path / n / "metrics.jsonl")]
    assert len(writers) == 1, writers
    out, other = tmp_path / writers[0], tmp_path / ({"a", "b"} - set(writers)).pop()
    assert not os.path.exists(other / "final") and not os.path.exists(other / "ckpt")

    ref, got = read_metrics(one_node), read_metrics(out)
    assert [r["step"] for r in got] == [1, 2]
    for r_ref, r_got in zip(ref, got):
        for k in ("loss/total", "train/grad_norm", "rollout/response_len", "rollout/accuracy", "kl/teacher_student"):
            # the same two processes' arithmetic, only launched otherwise: equal up to float noise at most
            assert r_got[k] == pytest.approx(r_ref[k], rel=1e-6, abs=1e-12), (k, r_ref["step"], r_ref[k], r_got[k])
    wa, wb = weights(one_node / "final"), weights(out / "final")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-9, msg=k)


# -----------------------------------------------------------------------------------------------
# The worker: under torchrun, several train.main runs in one process.


def fresh_rendezvous(agent, i, rank):
    """Point the next process group at a new store of its own (rank 0 hosts it on a free port, published through
    torchrun's agent store). Re-creating a gloo group in the agent store hangs when the ranks arrive at different
    times: the previous group's rendezvous keys are still there under the same names, and a rank that comes first
    reads the other's stale address."""
    if rank == 0:
        agent.set(f"fresh_rendezvous/{i}", str(free_port()))
    os.environ["MASTER_PORT"] = agent.get(f"fresh_rendezvous/{i}").decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def worker(spec_path):
    import torch.distributed as dist

    import train

    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ["RANK"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    # a checkpointed block runs its forward again in the backward, with grad (torch's global module hooks do not see
    # that call, so the class's forward is wrapped); FSDP2's FSDPLlamaDecoderLayer inherits it, peft keeps the class
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    count, forward = [0], LlamaDecoderLayer.forward

    def counted_forward(self, *args, **kwargs):
        count[0] += torch.is_grad_enabled()
        return forward(self, *args, **kwargs)

    LlamaDecoderLayer.forward = counted_forward
    calls = {}
    for i, run in enumerate(spec["runs"]):
        if i:
            fresh_rendezvous(agent, i, rank)
        count[0] = 0
        train.main(run["argv"])
        calls[run["name"]] = count[0]
    if rank == 0:
        with open(spec["calls"], "w") as f:
            json.dump(calls, f)


if __name__ == "__main__":
    worker(sys.argv[1])
