"""In-process unit tests of train.py's and plumbing.py's parts: flags and their automatic choices, micro-batching,
gradient checkpointing, the loss with --distill_mask_answer, SFT's reader rows (reader_alpha). Tiny or
embedded models, no subprocess; train.py end to end is in test_train.py."""

import pytest
import torch

import plumbing


def test_dtype_auto_takes_the_faster_matmul_and_a_resume_keeps_its_dtype(monkeypatch):
    import model as modellib
    import train

    rates = {}
    monkeypatch.setattr(modellib, "matmul_rate", lambda dtype, **kw: rates[dtype])
    rates.update({torch.bfloat16: 7.0, torch.float32: 1.0})  # a CPU with bf16 units
    assert modellib.pick_dtype("auto") == "bfloat16"
    rates.update({torch.bfloat16: 1.0, torch.float32: 1.8})  # bf16 emulated: slower than fp32
    assert modellib.pick_dtype("auto") == "float32"
    assert modellib.pick_dtype("auto", "cuda") == "bfloat16"  # never measured on a GPU
    assert modellib.pick_dtype("bfloat16") == "bfloat16"  # an explicit choice is kept

    cfg = train.parse_config(["--dtype", "auto"])
    assert plumbing.choose_dtype(cfg, torch.device("cpu"), False, None) == "float32"
    # resumed: the dtype the run started with, whatever this machine measures now
    assert plumbing.choose_dtype(cfg, torch.device("cpu"), False, {"config": {"dtype": "bfloat16"}}) == "bfloat16"
    cfg = train.parse_config(["--dtype", "bfloat16"])
    assert plumbing.choose_dtype(cfg, torch.device("cpu"), False, None) == "bfloat16"


def test_chunk_size_auto_chunks_the_distillation_and_sft_losses_on_a_cpu_only():
    import train

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    pick = lambda *flags, device=cpu, resume=None: plumbing.choose_chunk_size(train.parse_config(list(flags)), device,
                                                                          resume)
    assert pick("--method", "dasd") == 256 and pick("--method", "opsd") == 256 and pick("--method", "sft") == 256
    assert pick("--method", "dasd", device=gpu) == 0  # the plain path on a GPU
    assert pick("--method", "dasd", "--fsdp") == 0  # FSDP2 shards the lm_head the chunked loss multiplies by
    assert pick("--method", "sft", device=gpu) == 0 and pick("--method", "grpo", "--samples_per_prompt", "2") == 0
    assert pick("--method", "dasd", "--chunk_size", "0") == 0 and pick("--method", "opsd", "--chunk_size", "8") == 8
    # a resumed run keeps the path it started with
    assert pick("--method", "dasd", resume={"config": {"chunk_size": 0}}) == 0
    with pytest.raises(SystemExit, match="--chunk_size -2"):
        plumbing.check_config(train.parse_config(["--chunk_size", "-2"]))


def test_attn_auto_is_eager_on_a_cpu_and_a_resume_keeps_the_runs_kernel():
    import train

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    pick = lambda *flags, device=cpu, resume=None: plumbing.choose_attn(train.parse_config(list(flags)), device, resume)
    assert pick() == "eager" and pick(device=gpu) == "sdpa"
    assert pick("--attn", "sdpa") == "sdpa" and pick("--attn", "eager", device=gpu) == "eager"
    assert pick(resume={"config": {"attn": "sdpa"}}) == "sdpa"
    assert pick(resume={"config": {}}) == "sdpa"  # a checkpoint from before the flag ran transformers' default
    with pytest.raises(SystemExit, match="--attn 'flash'"):
        plumbing.check_config(train.parse_config(["--attn", "flash"]))


def test_chunk_size_auto_on_a_gpu_chunks_large_vocabularies():
    import train

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    pick = lambda *flags, device=gpu, vocab=None, resume=None: plumbing.choose_chunk_size(
        train.parse_config(list(flags)), device, resume, vocab)
    qwen3, smol = 151936, 49152
    for method in ("opsd", "dasd", "sft"):
        assert pick("--method", method, vocab=qwen3) == 512  # from plumbing.LARGE_VOCAB = 65,536 entries on
        assert pick("--method", method, vocab=smol) == 0  # a small vocabulary keeps the plain path on a GPU
        assert pick("--method", method, vocab=smol, device=cpu) == 256  # the CPU rule ignores the vocabulary
    assert pick("--method", "dasd", vocab=plumbing.LARGE_VOCAB) == 512 and pick(vocab=plumbing.LARGE_VOCAB - 1) == 0
    assert pick("--method", "dasd", "--fsdp", vocab=qwen3) == 0  # FSDP2 shards the lm_head
    assert pick("--method", "grpo", "--samples_per_prompt", "2", vocab=qwen3) == 0  # full logits anyway
    assert pick("--method", "dasd", "--chunk_size", "0", vocab=qwen3) == 0  # an explicit value is kept
    assert pick("--method", "dasd", vocab=qwen3, resume={"config": {"chunk_size": 0}}) == 0  # so is a run's


def tiny_qwen3(attn="eager"):
    """A tiny random Qwen3 (q/k norms, grouped-query attention) in float32, in training mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, attn_implementation=attn,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(cfg).float().train()


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(attn, use_lora):
    """One OPSD forward/backward (frozen teacher, padded batch) with and without checkpointing: the same loss and
    the same gradient of every trained parameter (LoRA: A and B, reached through frozen blocks)."""
    import copy

    import losses
    import lora
    import teacher as teacherlib

    student = tiny_qwen3(attn)
    if use_lora:
        student = lora.add_lora(student, r=4, alpha=8)
    frozen = teacherlib.make_teacher(student, "frozen")
    with torch.no_grad():  # move the student away from its frozen teacher, so the loss and gradients are not ~0
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    plain, ckpt = student, copy.deepcopy(student)
    plumbing.enable_gradient_checkpointing(ckpt)
    net = ckpt.get_base_model() if use_lora else ckpt
    assert all(layer.gradient_checkpointing for layer in net.model.layers)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in frozen.modules())  # the copy came first
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5]], [[20, 21, 22, 23], [30], [40, 41]]
    results = []
    for model in (plain, ckpt):
        t_logits, _ = teacherlib.teacher_logits(frozen if not use_lora else teacherlib.make_teacher(model), prompts,
                                                responses)
        s_logits, mask = teacherlib.response_forward(model, prompts, responses)
        loss, _ = losses.opsd_loss(s_logits, t_logits, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a.item() > 1e-4
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-9)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_b.values())
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-8, msg=n)


def test_generate_under_gradient_checkpointing_samples_the_same_tokens():
    """HF rollouts sample from the live student: with checkpointing on (a training-mode setting), generate keeps its
    KV cache (it runs in eval mode) and samples exactly the tokens and log-probs it samples without it."""
    from types import SimpleNamespace

    import rollout

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, get_vocab=lambda: {})
    prompts = [[1, 5, 9, 11, 3], [1, 7], [1, 20, 21, 22, 23, 24, 25, 8]]
    out = []
    for ckpt in (False, True):
        model = tiny_qwen3("sdpa")
        if ckpt:
            plumbing.enable_gradient_checkpointing(model)
        engine = rollout.make_rollout("hf", model=model, tokenizer=tok)
        samples = engine.generate(prompts, n=2, max_new_tokens=12, temperature=1.0, seed=5)
        assert model.training  # generate's eval mode is undone
        out.append([(s.token_ids, s.logprobs) for s in samples])
    assert out[0] == out[1] and sum(len(t) for t, _ in out[0]) > 12


def test_gradient_checkpointing_auto_is_on_with_a_gpu_only():
    import train

    pick = lambda *flags, device="cpu": plumbing.choose_gradient_checkpointing(train.parse_config(list(flags)),
                                                                            torch.device(device))
    assert pick() is False and pick(device="cuda") is True
    assert pick("--gradient_checkpointing") is True and pick("--gradient_checkpointing", "false", device="cuda") is False
    assert pick("--gradient_checkpointing", "none", device="cuda") is True  # none = auto


def test_resume_refuses_a_flag_that_changes_the_trained_network(tmp_path):
    import dataclasses

    import train

    first = train.parse_config(["--lora_r", "16", "--method", "opsd"])
    plumbing.check_config(first)  # what the checkpoint's config.json records (lora_alpha resolved to 2r)
    saved = dataclasses.asdict(first)
    same = train.parse_config(["--lora_r", "16", "--method", "opsd", "--steps", "9"])  # a longer run: fine
    plumbing.check_config(same)
    plumbing.check_resume_config(same, saved, str(tmp_path))
    other = train.parse_config(["--lora_r", "8", "--method", "dasd"])
    plumbing.check_config(other)
    with pytest.raises(SystemExit) as e:
        plumbing.check_resume_config(other, saved, str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "--method dasd (checkpoint: opsd)" in msg
    assert "--lora_r 8 (checkpoint: 16)" in msg and "--lora_alpha 16.0 (checkpoint: 32.0)" in msg


def test_micro_batches_group_by_length_partition_the_batch_and_pad_less():
    import random

    import train

    rng = random.Random(0)
    batch = [{"student_prompt": [1] * rng.randint(5, 40), "response": [2] * rng.randint(1, 90), "id": i}
             for i in range(21)]

    def padded(mbs):  # tokens a pass computes: every row padded to its longest prompt + longest response
        return sum(len(mb) * (max(len(b["student_prompt"]) for b in mb) + max(len(b["response"]) for b in mb))
                   for mb in mbs)

    plain = plumbing.micro_batches(batch, 8, group_by_length=False)
    grouped = plumbing.micro_batches(batch, 8, group_by_length=True)
    assert [len(mb) for mb in grouped] == [len(mb) for mb in plain] == [8, 8, 5]
    assert [b["id"] for mb in plain for b in mb] == list(range(21))  # off: the batch's own order
    assert sorted(b["id"] for mb in grouped for b in mb) == list(range(21))  # every sequence exactly once
    lens = [len(b["response"]) for mb in grouped for b in mb]
    assert lens == sorted(lens)
    assert padded(grouped) < padded(plain)
    # one pass: the order is kept whatever the flag
    assert plumbing.micro_batches(batch[:8], 8, group_by_length=True) == [batch[:8]]


def test_student_confidence_from_hidden_states_equals_a_per_token_loop():
    """The ATESD state features (the student's NLL of its own tokens, its top-1 probability), from logits and from
    the chunked path's hidden states, against a plain loop over tokens with math.log / math.exp."""
    import math

    import chunked_loss
    import train

    g = torch.Generator().manual_seed(0)
    B, T, H, V, temp = 3, 5, 4, 7, 0.7
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    responses = [[1, 2, 3, 4, 5], [6, 0], [3, 3, 3]]
    mask = torch.zeros(B, T)
    for b, r in enumerate(responses):
        mask[b, :len(r)] = 1
    # the logit at position t predicts responses[b][t] (response_forward's alignment)
    nll = top1 = 0.0
    for b, r in enumerate(responses):
        for t, tok in enumerate(r):
            z = [sum(h[b, t, i].item() * W[v, i].item() for i in range(H)) / temp for v in range(V)]
            lse = math.log(sum(math.exp(x) for x in z))
            nll += lse - z[tok]
            top1 += math.exp(max(z) - lse)
    tgt = train.response_targets(responses, h.shape[1], h.device)
    from_logits = chunked_loss.student_confidence(h @ W.T, tgt, mask, temp, rows_per_pass=2)
    from_hidden = chunked_loss.student_confidence(h, tgt, mask, temp, lm_head_weight=W, rows_per_pass=3)
    for got in (from_logits, from_hidden):
        assert got["student/nll"] == pytest.approx(nll, rel=1e-9)
        assert got["student/confidence"] == pytest.approx(top1, rel=1e-9)


def test_ranks_of_one_tensor_parallel_group_sample_with_one_seed():
    # vLLM tensor parallelism: ranks 2g and 2g+1 run one engine and must submit identical seeded requests;
    # without tensor parallelism (and with HF generate) every rank has its own seed
    from types import SimpleNamespace

    import train

    def ranks(backend, tp, world=4):
        return [train.sampler_rank(SimpleNamespace(cfg=SimpleNamespace(vllm_tensor_parallel_size=tp), rank=r,
                                                   engine=SimpleNamespace(backend=backend))) for r in range(world)]

    assert ranks("vllm", 2) == [0, 0, 1, 1]
    assert ranks("vllm", 4) == [0, 0, 0, 0]
    assert ranks("vllm", 1) == [0, 1, 2, 3]
    assert ranks("hf", 2) == [0, 1, 2, 3]  # the flag means nothing to HF generate: each rank samples alone


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_distill_mask_answer_leaves_the_answer_span_out_of_the_loss(tiny_llama, chunk_size):
    # the loss with --distill_mask_answer equals losses.opsd_loss over the tokens before each response's span, and
    # its token count is those tokens only
    import contextlib

    import losses
    import teacher as teacherlib
    import train

    g = torch.Generator().manual_seed(0)
    mb = [{"student_prompt": torch.randint(3, 64, (n,), generator=g).tolist(),
           "teacher_prompt": torch.randint(3, 64, (n + 4,), generator=g).tolist(),
           "response": torch.randint(3, 64, (t,), generator=g).tolist(), "loss_len": k}
          for n, t, k in [(5, 9, 6), (7, 6, 6), (4, 8, 0)]]
    teacher_model = teacherlib.make_teacher(tiny_llama, mode="frozen")
    cfg = train.parse_config(["--method", "opsd", "--distill_mask_answer", "true", "--chunk_size", str(chunk_size),
                              "--dtype", "float32", "--clip", "none"])
    loss, n, _ = train.microbatch_loss(cfg, tiny_llama, teacher_model, tiny_llama.get_output_embeddings(), mb,
                                       contextlib.nullcontext)
    with torch.no_grad():
        zs, mask = teacherlib.response_forward(tiny_llama, [b["student_prompt"] for b in mb], [b["response"] for b in mb])
        zt, _ = teacherlib.response_forward(tiny_llama, [b["teacher_prompt"] for b in mb], [b["response"] for b in mb])
    cut = mask.clone()
    for i, b in enumerate(mb):
        cut[i, b["loss_len"]:] = 0
    ref, _ = losses.opsd_loss(zs, zt, cut, beta=0.0, clip=None)
    assert n == 6 + 6 + 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    full, _ = losses.opsd_loss(zs, zt, mask, beta=0.0, clip=None)
    assert abs(full.item() - ref.item()) > 1e-4  # the span's tokens did count without the flag


def test_reader_rows_come_from_the_training_split_only(embedded_dir, tmp_path):
    # the reader warm start's data (experiments/demo.py): a share of the SFT rows carries reader_alpha and trains from
    # the teacher's prompt (the reference revealed) to the reference. Every such row is a training-split problem shown
    # with its own solution; none is a test problem.
    import json
    import sys
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import data
    import teacher as teacherlib
    import train

    sys.path.insert(0, "experiments")
    import demo

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    train_rows, test_rows = data.embedded_split("train"), data.embedded_split("test")
    test_problems = {r["problem"] for r in test_rows}
    recipe = ["--method", "sft", "--prompts_per_step", "16", "--steps", "4", "--max_new_tokens", "128",
              "--sft_reader_share", "0.5", "--seed", "3"]
    flags = demo.train_flags(recipe, str(tmp_path))
    assert "--sft_reader_share" not in flags and flags[-2:] == ["--data", str(tmp_path / "reader_rows.jsonl")]
    cfg = train.parse_config(flags)
    rows = data.load_dataset(cfg.data)  # the field survives data.py's mapping
    assert [{k: v for k, v in r.items() if k != "reader_alpha"} for r in rows] == train_rows
    run = SimpleNamespace(cfg=cfg, tok=tok, rank=0)
    n_teacher = 0
    for step in range(4):
        step_rows = train.step_rows(rows, cfg, step, 0, 1)
        batch, _ = train.sample_batch(run, step_rows, step)
        for r, b in zip(step_rows, batch):
            assert r["problem"] not in test_problems
            prompt = tok.decode(b["student_prompt"])
            assert r["problem"] in prompt
            if "reader_alpha" in r:
                n_teacher += 1
                assert r["reader_alpha"] in demo.READER_ALPHAS
                assert b["student_prompt"] != teacherlib.student_prompt_ids(tok, r["problem"])
                assert "\\boxed{" + r["answer"] + "}" in prompt  # the teacher's context: its own reference's answer
                assert not any(p in prompt for p in test_problems)
            else:
                assert b["student_prompt"] == teacherlib.student_prompt_ids(tok, r["problem"])
            assert b["response"][:-1] == tok(r["solution"], add_special_tokens=False)["input_ids"][:127]
    assert 16 <= n_teacher <= 48  # about half of 64 rows
    assert sum("reader_alpha" in r for r in rows) == n_teacher  # only the rows the run meets are drawn
    assert demo.train_flags(recipe, str(tmp_path)) == flags  # the mix is a function of the recipe
    assert open(cfg.data).read() == "".join(json.dumps(r) + "\n" for r in demo.reader_mix(
        train_rows, 0.5, seed=3, steps=4, prompts_per_step=16))
    with pytest.raises(SystemExit, match="reader_alpha.*only under --method sft"):
        plumbing.load_rows(train.parse_config(["--method", "opsd", "--data", cfg.data]))
    with pytest.raises(ValueError, match="exceed"):  # a row met twice would need two draws
        demo.reader_mix(train_rows[:20], 0.5, seed=0, steps=2, prompts_per_step=16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(train_rows[0], reader_alpha=1.5)) + "\n")
    with pytest.raises(data.DataError, match="bad.jsonl, line 1, field 'reader_alpha'"):
        data.load_dataset(str(bad))


def test_bad_numbers_are_one_line_errors_naming_the_flag_before_any_work():
    import train

    for argv, line in [
        (["--lr", "nan"], "--lr nan must be a finite number >= 0"),
        (["--lr=-1e-5"], "--lr -1e-05 must be a finite number >= 0"),
        (["--lr", "inf"], "--lr inf must be a finite number >= 0"),
        (["--weight_decay", "-0.1"], "--weight_decay -0.1 must be a finite number >= 0"),
        (["--grad_clip", "-1"], "--grad_clip -1.0 must be >= 0 (0: no clipping)"),
        (["--warmup_steps", "-1"], "--warmup_steps -1 must be >= 0 (0: no warm-up)"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0 must be >= 1"),
        (["--micro_batch", "0"], "--micro_batch 0 must be >= 1"),
        (["--temperature", "nan"], "--temperature nan must be a finite number > 0 (on-policy distillation needs "
                                   "sampled rollouts)"),
        (["--top_p", "0"], "--top_p 0.0 must be in (0, 1] (1: off)"),
        (["--top_p", "1.5"], "--top_p 1.5 must be in (0, 1] (1: off)"),
        (["--top_k", "0"], "--top_k 0: use k >= 1 or -1 (off)"),
        (["--top_k", "-2"], "--top_k -2: use k >= 1 or -1 (off)"),
        (["--ema_decay", "1"], "--ema_decay 1.0 must be in [0, 1)"),
        (["--clip", "-0.05"], "--clip -0.05 must be >= 0 (0 or none: no clip)"),
        (["--push_weight", "-1"], "--push_weight -1.0 must be a finite number >= 0"),
        (["--pull_weight", "nan"], "--pull_weight nan must be a finite number >= 0"),
        (["--push_margin", "0"], "--push_margin 0.0 must be > 0 (none: the default in losses.py)"),
        (["--hold", "0"], "--hold 0 must be >= 1 (none: the default in exposure.py)"),
        (["--batch_decisions", "1"], "--batch_decisions 1 must be >= 2 (none: the default in exposure.py)"),
        (["--vllm_gpu_memory_utilization", "1.5"], "--vllm_gpu_memory_utilization 1.5 must be in (0, 1]"),
    ]:
        with pytest.raises(SystemExit) as e:
            plumbing.check_config(train.parse_config(argv))
        assert str(e.value).splitlines() == ["train.py: invalid flags:", "  " + line], (argv, str(e.value))
    with pytest.raises(SystemExit) as e:  # every bad flag at once, one line each
        plumbing.check_config(train.parse_config(["--lr", "nan", "--top_k", "0"]))
    assert str(e.value).splitlines()[1:] == ["  --top_k 0: use k >= 1 or -1 (off)",
                                             "  --lr nan must be a finite number >= 0"]
    # the edges of each range, and the values that turn a feature off, are allowed
    plumbing.check_config(train.parse_config(["--top_p", "1", "--top_k", "-1", "--ema_decay", "0", "--clip", "0",
                                              "--grad_clip", "0", "--warmup_steps", "0", "--push_weight", "0",
                                              "--pull_weight", "0", "--weight_decay", "0", "--max_new_tokens", "1"]))
    plumbing.check_config(train.parse_config(["--clip", "none", "--top_k", "1", "--push_margin", "none"]))
