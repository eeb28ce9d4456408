"""What train.py checks before it trains: every row's sequences against the model's context (on every rank, so an
error stops all ranks at once), flag combinations that cannot run, --plan, and --save_every -1 (no writes)."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import plumbing
import train
from test_train import ROOT, TINY, run_train, train_env


def long_row(n_words):
    return {"problem": "Add the numbers.", "solution": " + ".join(str(i % 10) for i in range(n_words)) + " = 1",
            "answer": "1", "id": "long"}


def test_check_lengths_finds_the_longest_prompts_exactly_and_names_a_row_beyond_the_context(embedded_dir):
    from transformers import AutoTokenizer

    import data
    import teacher

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    rows = data.load_dataset("embedded", split="train")[:300] + [long_row(300)]
    cfg = train.parse_config(["--max_new_tokens", "100", "--method", "opsd", "--exposure", "full"])
    plumbing.check_config(cfg)
    brute_s = [len(teacher.student_prompt_ids(tok, r["problem"])) for r in rows]  # every prompt rendered
    def every_exposure(r):  # k of m steps revealed, for every k: the longest teacher prompt the schedule can build
        m = len(teacher.split_steps(r["solution"]))
        return max(len(teacher.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"], alpha=k / max(m, 1)))
                   for k in range(m + 1))

    brute_t = [every_exposure(r) for r in rows]
    kept, longest = plumbing.check_lengths(cfg, rows, tok, 8192)
    assert kept == rows
    assert longest["student"][0] == max(brute_s) and longest["teacher"] == (max(brute_t), 300)

    limit = max(brute_t) + 99  # only the long row's teacher sequence (prompt + 100) is beyond it
    with pytest.raises(SystemExit, match=rf"row 300 \(long\): its teacher prompt \({max(brute_t)} tokens\) plus "
                                         rf"--max_new_tokens 100 is {max(brute_t) + 100} tokens.*1 row\(s\) too long"):
        plumbing.check_lengths(cfg, rows, tok, limit)
    cfg.skip_bad_rows = True
    kept, longest = plumbing.check_lengths(cfg, rows, tok, limit)
    assert kept == rows[:300] and longest["teacher"][0] == max(brute_t[:300])
    # grpo and sft have no teacher: only the student's prompt counts
    sft = train.parse_config(["--method", "sft", "--max_new_tokens", "100"])
    plumbing.check_config(sft)
    assert plumbing.check_lengths(sft, rows, tok, limit) == (rows, {"student": longest["student"], "teacher": None,
                                                                    "context": limit})


@pytest.mark.e2e
def test_a_row_beyond_the_context_stops_every_rank_at_once_with_one_message(tmp_path, tiny_model_dir):
    # the long row lands on rank 1 in step 0 (rows are dealt rank::world); rank 0's rows all fit
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\nAnswer: \\boxed{{{2 * i}}}"}
            for i in range(3)]
    rows.insert(1, long_row(1500))  # ~3000 teacher tokens, beyond the tiny model's 2048
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--model", tiny_model_dir, "--data", str(path), "--method", "opsd", "--exposure", "full",
           "--rollout", "hf", "--dtype", "float32", "--out_dir", str(tmp_path / "run"), *TINY]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=train_env(2), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.startswith("train.py: --data")]
    # each rank checks every row itself and exits with the same line; the first to exit makes torchrun SIGTERM the
    # other, which on busy cores may not have printed yet: one line or two, never two different ones
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, p.stderr[-4000:]
    assert "row 1 (long): its teacher prompt" in lines[0], lines[0]
    assert "beyond the model's context (max_position_embeddings 2048)" in lines[0]
    print(f"both ranks exited in {time.time() - t0:.1f} s")  # within seconds, no collective timeout


def test_flags_that_cannot_run_are_refused_before_any_work():
    for argv, msg in [(["--fsdp", "--chunk_size", "256"], "--fsdp with --chunk_size 256"),
                      (["--save_every", "-2"], "--save_every -2"),
                      (["--vllm_tensor_parallel_size", "0"], "--vllm_tensor_parallel_size 0 must be >= 1")]:
        with pytest.raises(SystemExit, match=msg):
            plumbing.check_config(train.parse_config(argv))
    plumbing.check_config(train.parse_config(["--fsdp", "--chunk_size", "0"]))  # the plain loss is fine
    # a world size the tensor-parallel size does not divide: one process, two engines' worth of ranks
    with pytest.raises(SystemExit, match=r"--vllm_tensor_parallel_size 2 must divide the number of processes \(1\)"):
        plumbing.setup(train.parse_config(["--vllm_tensor_parallel_size", "2"]))


@pytest.mark.e2e
def test_save_every_minus_one_writes_no_checkpoint_and_no_final_model(tmp_path, tiny_model_dir):
    run_train(tmp_path, "--model", tiny_model_dir, "--method", "opsd", "--exposure", "full", "--save_every", "-1",
              *TINY)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.jsonl"]


def test_plan_prints_lengths_and_the_memory_plan_and_fails_when_it_does_not_fit(tiny_model_dir, capsys):
    argv = ["--model", tiny_model_dir, "--method", "opsd", "--exposure", "full", "--max_new_tokens", "1024",
            "--prompts_per_step", "8", "--plan"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "--max_new_tokens 1024" in out  # the flags as asked
    assert "data: embedded, 3000 rows; longest student prompt" in out and "longest teacher prompt" in out
    assert "per rank: B = 8 sequences" in out and "dtype bfloat16" in out  # resolved as on a GPU
    assert "fits" in out
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--plan_gpu_gb", "0.5"])
    assert e.value.code == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_the_longest_teacher_prompt_can_be_a_partial_exposure(embedded_dir):
    # a reference whose last step holds the box: the whole of it adds no answer line, while any partial exposure
    # appends one under a longer header, so a partial teacher prompt is the longest one the schedule can build
    from transformers import AutoTokenizer

    import teacher

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    row = {"problem": "What is 3 + 4?", "solution": "Three plus four.\n\nSo it is \\boxed{7}.", "answer": "7", "id": "r"}
    cfg = train.parse_config(["--method", "opsd", "--exposure", "atesd", "--max_new_tokens", "8"])
    plumbing.check_config(cfg)
    full = len(teacher.teacher_prompt_ids(tok, row["problem"], row["solution"], row["answer"], alpha=1.0))
    half = len(teacher.teacher_prompt_ids(tok, row["problem"], row["solution"], row["answer"], alpha=0.5))
    assert half > full
    _, longest = plumbing.check_lengths(cfg, [row], tok, None)
    assert longest["teacher"] == (half, 0)
    with pytest.raises(SystemExit, match="its teacher prompt"):  # fits at alpha 1, not at alpha 0.5
        plumbing.check_lengths(cfg, [row], tok, full + 8)
