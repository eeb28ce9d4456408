"""rollout.py: sampling log-probs checked against brute force, seeds, stop/length, and the vLLM weight sync.

The vLLM tests share one float32 engine on the embedded model (module-scoped fixture: ~30 s to
start on CPU). They are marked `vllm` and run by default.
"""

import copy
import os
import math
from types import SimpleNamespace

import pytest
import torch

import rollout


# ----------------------------------------------------------------------------------------------
# independent references


def brute_force_logp(logits, token, temperature, top_k, top_p):
    """log-prob of `token` under temperature/top-k/top-p, one row, with plain Python loops.

    logits: (V,) float. Mirrors the definition in rollout.py's docstring, written differently:
    top-k keeps every logit >= the k-th largest; top-p walks the tokens from most to least likely
    and keeps them until the kept mass reaches top_p (the token that crosses it is kept too).
    """
    z = [float(x) / temperature for x in logits]
    V = len(z)
    keep = [True] * V
    if 0 < top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = [z[v] >= kth for v in range(V)]
    if top_p < 1.0:
        m = max(z[v] for v in range(V) if keep[v])
        w = [math.exp(z[v] - m) if keep[v] else 0.0 for v in range(V)]
        total = sum(w)
        order = sorted(range(V), key=lambda v: -z[v])
        kept, mass = set(), 0.0
        for v in order:
            if not keep[v]:
                continue
            kept.add(v)
            mass += w[v] / total
            if mass >= top_p - 1e-12:
                break
        keep = [v in kept for v in range(V)]
    if not keep[token]:
        return float("-inf")
    m = max(z[v] for v in range(V) if keep[v])
    lse = m + math.log(sum(math.exp(z[v] - m) for v in range(V) if keep[v]))
    return z[token] - lse


@torch.no_grad()
def near_sampling_boundary(logits, temperature, top_k, top_p, tol=1e-3):
    """(T,) bool: positions where float noise between two backends (~1e-4 in the logits) could change which
    tokens top-k / top-p keep: the k-th and (k+1)-th scaled logits, or a cumulative probability of the
    sorted kept tokens and top_p, closer than tol. There the two backends may renormalize over different
    sets, and their log-probs legitimately differ by the boundary token's probability."""
    z = logits.float() / temperature  # (T, V)
    zs = z.sort(-1, descending=True).values  # (T, V)
    near = (zs[:, top_k - 1] - zs[:, top_k]).abs() < tol if 0 < top_k < z.shape[-1] else torch.zeros(len(z), dtype=torch.bool)
    p = torch.softmax(zs[:, :top_k] if top_k > 0 else zs, -1)  # (T, k) kept by top-k, renormalized
    return near | ((p.cumsum(-1) - top_p).abs() < tol).any(-1)


def teacher_forced_logits(model, prompt, response):
    """Logits predicting each response token, from one unpadded forward pass. Returns (T, V) float32."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(ids).logits[0].float()  # (L + T, V)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # (T, V)


def check_structure(samples, n_prompts, n, max_new_tokens, stop_ids):
    """Prompt-major order, types, and the stop/length rules (docs/choices.md, choice 9)."""
    assert [s.prompt_index for s in samples] == [i for i in range(n_prompts) for _ in range(n)]
    for s in samples:
        assert isinstance(s, rollout.Sample)
        assert all(isinstance(t, int) for t in s.token_ids)
        assert all(isinstance(x, float) and x <= 0 for x in s.logprobs)
        assert len(s.logprobs) == len(s.token_ids) >= 1
        assert s.finish_reason in ("stop", "length")
        assert s.truncated == (s.finish_reason == "length")
        stops_before_end = [t for t in s.token_ids[:-1] if t in stop_ids]
        assert stops_before_end == []  # generation ends at the first stop token
        if s.finish_reason == "stop":
            assert s.token_ids[-1] in stop_ids  # the stop token is part of the response
        else:
            assert len(s.token_ids) == max_new_tokens and s.token_ids[-1] not in stop_ids


# ----------------------------------------------------------------------------------------------
# process_logits and the transformers backend on a tiny in-memory model


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8), (0.9, 10, 0.6)])
def test_process_logits_matches_brute_force(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, generator=g) * 3  # (B, V)
    logp = torch.log_softmax(rollout.process_logits(z, temperature, top_k, top_p), dim=-1)  # (B, V)
    for b in range(3):
        for v in range(40):
            want = brute_force_logp(z[b].tolist(), v, temperature, top_k, top_p)
            if want == float("-inf"):
                assert logp[b, v] == float("-inf")
            else:
                assert abs(logp[b, v].item() - want) < 1e-5


def tiny_tokenizer(stop_words=()):
    """Just what HFRollout reads from a tokenizer: eos, pad, and a vocabulary of named tokens."""
    return SimpleNamespace(eos_token_id=2, pad_token_id=0, get_vocab=lambda: dict(stop_words))


PROMPTS = [[1, 5, 9, 11, 3], [1, 7], [1, 20, 21, 22, 23, 24, 25, 8]]  # different lengths: left padding


def test_hf_sampling_logprobs_match_teacher_forced(tiny_llama):
    engine = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer())
    samples = engine.generate(PROMPTS, n=2, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    check_structure(samples, len(PROMPTS), 2, 12, engine.stop_ids)
    for s in samples:
        logits = teacher_forced_logits(tiny_llama, PROMPTS[s.prompt_index], s.token_ids)  # (T, V)
        for t, tok in enumerate(s.token_ids):
            want = brute_force_logp(logits[t].tolist(), tok, 0.8, 20, 0.9)
            assert want > float("-inf")  # the sampled token was inside the top-k/top-p support
            assert abs(s.logprobs[t] - want) < 1e-4, (t, s.logprobs[t], want)


def test_hf_generates_with_the_lora_adapter_on(tiny_llama, tiny_lora):
    # the sampler must hold exactly the weights being trained: under LoRA, W + s B A, not the base W
    engine = rollout.make_rollout("hf", model=tiny_lora, tokenizer=tiny_tokenizer())
    samples = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=1.0, seed=3)
    check_structure(samples, len(PROMPTS), 2, 8, engine.stop_ids)
    off_base = 0.0
    for s in samples:
        adapted = torch.log_softmax(teacher_forced_logits(tiny_lora, PROMPTS[s.prompt_index], s.token_ids), -1)
        base = torch.log_softmax(teacher_forced_logits(tiny_llama, PROMPTS[s.prompt_index], s.token_ids), -1)
        idx = torch.tensor(s.token_ids)[:, None]
        assert (torch.tensor(s.logprobs) - adapted.gather(1, idx).squeeze(1)).abs().max() < 1e-4
        off_base = max(off_base, (torch.tensor(s.logprobs) - base.gather(1, idx).squeeze(1)).abs().max().item())
    assert off_base > 1e-2


def test_hf_same_seed_same_samples_and_training_rng_untouched(tiny_llama):
    engine = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(PROMPTS, n=3, max_new_tokens=10, seed=7)
    b = engine.generate(PROMPTS, n=3, max_new_tokens=10, seed=7)
    c = engine.generate(PROMPTS, n=3, max_new_tokens=10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)  # sampling ran in a forked RNG
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    # seed=None: reproducible from the engine seed
    d = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer(), seed=4).generate(PROMPTS, n=2)
    e = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer(), seed=4).generate(PROMPTS, n=2)
    assert [s.token_ids for s in d] == [s.token_ids for s in e]


def test_hf_stop_and_truncation(tiny_llama):
    # six stop tokens out of 64 make both endings common with the random tiny model
    stops = {name: 10 + i for i, name in enumerate(rollout.END_OF_TURN_TOKENS)}
    stops["<|not_a_stop|>"] = 20
    engine = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer(stops))
    assert engine.stop_ids == [2, 10, 11, 12, 13, 14]  # EOS and the end-of-turn tokens, nothing else
    samples = engine.generate(PROMPTS, n=6, max_new_tokens=8, seed=0)
    check_structure(samples, len(PROMPTS), 6, 8, engine.stop_ids)
    assert any(s.finish_reason == "stop" for s in samples)
    assert any(s.truncated for s in samples)


def test_hf_empty_prompt_list_does_no_work(tiny_llama):
    engine = rollout.make_rollout("hf", model=tiny_llama, tokenizer=tiny_tokenizer())
    tiny_llama.generate = lambda *a, **k: pytest.fail("generate called for an empty prompt list")
    assert engine.generate([], n=4) == []


def test_stop_token_ids_of_embedded_model(embedded_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ids = rollout.stop_token_ids(tok, AutoConfig.from_pretrained(embedded_dir))
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids  # the chat template's end of turn
    assert tok.eos_token_id in ids


def test_make_rollout_rejects_unknown_backend(tiny_llama):
    with pytest.raises(ValueError):
        rollout.make_rollout("sglang", model=tiny_llama, tokenizer=tiny_tokenizer())


# ----------------------------------------------------------------------------------------------
# vLLM on the embedded model (float32 so that transformers and vLLM can agree to 1e-3)


@pytest.fixture(scope="module")
def policy(embedded_dir):
    import model

    m, tok = model.load(embedded_dir, dtype=torch.float32)
    return m.eval(), tok


@pytest.fixture(scope="module")
def vllm_engine(policy, embedded_dir):
    pytest.importorskip("vllm")
    m, tok = policy
    env = dict(os.environ)  # the engine sets LD_PRELOAD, thread and rank variables for its own process
    engine = rollout.make_rollout("vllm", model=m, model_path=embedded_dir, tokenizer=tok, dtype="float32",
                                  max_model_len=512, kv_cache_gb=0.25, seed=0)
    yield engine
    engine.shutdown()  # also removes the 1-rank process group vLLM set up in this pytest process
    os.environ.clear()  # later tests (and the subprocesses they start) see the environment they began with
    os.environ.update(env)


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_dict=True)["input_ids"]


def transformers_logp(model, seq):
    """(L+T-1,) log p(seq[t] | seq[:t]) for t >= 1, by a plain transformers forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()  # (L+T, V)
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)


def gap_before_and_after_sync(engine, seq, trained):
    """max |log p_vLLM - log p_transformers(trained)| over seq, before and after engine.sync_weights of the model
    wrapped like DDP wraps it (sync_weights must unwrap `.module`)."""
    ddp_like = torch.nn.Module()
    ddp_like.module = trained
    want = transformers_logp(trained, seq)
    stale = (torch.tensor(engine.prompt_logprobs(seq)) - want).abs().max().item()
    engine.sync_weights(ddp_like)
    synced = (torch.tensor(engine.prompt_logprobs(seq)) - want).abs().max().item()
    return stale, synced


@pytest.mark.vllm
def test_vllm_weights_synced_match_transformers(policy, vllm_engine):
    """The on-policy test: after one training step and sync_weights, vLLM scores tokens like transformers.

    Tolerance 1e-3 nats per token: both sides run float32, but vLLM's CPU kernels (attention,
    fused RMSNorm and SiLU) sum in a different order than PyTorch's eager ops, which leaves
    differences of ~1e-5..1e-4 after 30 layers. A stale weight (such as the tied output layer
    not being refreshed) moves log-probs by far more than that.
    """
    m, tok = policy
    prompt = chat(tok, "What is 12 + 30?")
    response = tok("12 + 30 = 42. The answer is \\boxed{42}.<|im_end|>", add_special_tokens=False)["input_ids"]
    seq = prompt + response

    # the engine starts from the same checkpoint
    assert (torch.tensor(vllm_engine.prompt_logprobs(seq)) - transformers_logp(m, seq)).abs().max() < 1e-3

    # one AdamW step on the response's negative log-likelihood (a real training step; it moves every
    # weight, the tied embedding / output layer included), on a copy wrapped like DDP wraps a model
    trained = copy.deepcopy(m).train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.0)
    logits = trained(torch.tensor([seq])).logits[0, len(prompt) - 1 : -1]  # (T, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(response))
    loss.backward()
    opt.step()
    del opt
    trained.eval()
    embed_moved = (trained.model.embed_tokens.weight - m.model.embed_tokens.weight).abs().max()
    assert embed_moved > 0 and trained.lm_head.weight is trained.model.embed_tokens.weight
    stale, synced = gap_before_and_after_sync(vllm_engine, seq, trained)
    print(f"max |logp_vllm - logp_transformers|: before sync {stale:.3g}, after sync {synced:.3g}")
    assert stale > 0.05  # before the sync the engine samples from the old policy
    assert synced < 1e-3  # after it, from exactly the trained one

    # and back: other tests in this module use the original weights
    vllm_engine.sync_weights(m)
    assert (torch.tensor(vllm_engine.prompt_logprobs(seq)) - transformers_logp(m, seq)).abs().max() < 1e-3


@pytest.mark.vllm
def test_vllm_lora_weights_synced_match_transformers(policy, vllm_engine):
    """The on-policy test under LoRA: the engine receives the merged weights W + s B A under the base model's
    names, and then scores tokens like transformers with the adapter on (same 1e-3 nats as above). The training
    module is not merged in place: its adapter stays separate and its base weights untouched."""
    import lora

    m, tok = policy
    seq = chat(tok, "What is 12 + 30?") + tok("12 + 30 = 42. The answer is \\boxed{42}.<|im_end|>",
                                              add_special_tokens=False)["input_ids"]

    # an adapter as if trained: peft starts B at 0 (a no-op); a random B moves every adapted projection
    student = lora.add_lora(copy.deepcopy(m), r=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.adapter_params(student).items():
            if ".lora_B." in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    stale, synced = gap_before_and_after_sync(vllm_engine, seq, student)  # unwraps `.module`, then peft
    print(f"LoRA: max |logp_vllm - logp_transformers|: before sync {stale:.3g}, after sync {synced:.3g}")
    assert stale > 0.05  # before the sync the engine samples from the base model
    assert synced < 1e-3  # after it, from the adapted one

    layers = lora.lora_layers(student)
    assert len(layers) == 30 * 7 and not any(layer.merged for layer in layers.values())
    base = dict(m.named_parameters())
    for name, p in student.get_base_model().named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name

    vllm_engine.sync_weights(m)  # back: other tests in this module use the original weights
    assert (torch.tensor(vllm_engine.prompt_logprobs(seq)) - transformers_logp(m, seq)).abs().max() < 1e-3


@pytest.mark.vllm
def test_vllm_sampling_logprobs_match_transformers(policy, vllm_engine):
    m, tok = policy
    prompts = [chat(tok, "Name a prime number larger than 10."), chat(tok, "What is 7 times 6?")]
    samples = vllm_engine.generate(prompts, n=2, max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=1)
    check_structure(samples, 2, 2, 12, vllm_engine.stop_ids)
    for s in samples:
        logits = teacher_forced_logits(m, prompts[s.prompt_index], s.token_ids)  # (T, V)
        want = torch.log_softmax(rollout.process_logits(logits, 0.8, 50, 0.9), dim=-1)
        want = want.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)  # (T,)
        # the first token, checked against the loop reference as well
        assert abs(want[0].item() - brute_force_logp(logits[0].tolist(), s.token_ids[0], 0.8, 50, 0.9)) < 1e-4
        sure = ~near_sampling_boundary(logits, 0.8, 50, 0.9)  # (T,) positions both backends must agree on
        assert sure.float().mean() > 0.5, "too few unambiguous positions to compare"
        assert (torch.tensor(s.logprobs) - want)[sure].abs().max() < 1e-3


@pytest.mark.vllm
def test_vllm_same_seed_same_samples(policy, vllm_engine):
    m, tok = policy
    prompts = [chat(tok, "Say hello."), chat(tok, "Say hello.")]  # a repeated prompt gets distinct samples
    a = vllm_engine.generate(prompts, n=2, max_new_tokens=6, seed=11)
    b = vllm_engine.generate(prompts, n=2, max_new_tokens=6, seed=11)
    c = vllm_engine.generate(prompts, n=2, max_new_tokens=6, seed=12)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert len({tuple(s.token_ids) for s in a}) > 1


@pytest.mark.vllm
def test_backends_same_structure_stop_and_truncation(policy, vllm_engine):
    m, tok = policy
    hf = rollout.make_rollout("hf", model=m, tokenizer=tok)
    assert hf.stop_ids == vllm_engine.stop_ids
    prompts = [chat(tok, "Answer with one word: what color is the sky?"), chat(tok, "Write a long story about a cat.")]
    greedy = {}
    for engine in (hf, vllm_engine):
        # greedy: the short answer ends with <|im_end|>, the story is cut at 12 tokens
        samples = greedy[engine.backend] = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0)
        check_structure(samples, 2, 1, 12, engine.stop_ids)
        assert samples[0].finish_reason == "stop" and samples[0].token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert samples[1].truncated and samples[1].finish_reason == "length"
        cut = engine.generate(prompts, n=2, max_new_tokens=2, seed=0)
        check_structure(cut, 2, 2, 2, engine.stop_ids)
    # greedy decoding in float32: both backends pick the same tokens, except after a near-tie: where the
    # top two logits are closer than the backends' float noise (~1e-4), either pick is right
    for a, b, p in zip(greedy["hf"], greedy["vllm"], prompts):
        j = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if j is None:
            assert a.token_ids == b.token_ids
            continue
        top2 = teacher_forced_logits(m, p, a.token_ids)[j].topk(2).values
        assert top2[0] - top2[1] < 1e-3, (j, a.token_ids, b.token_ids)


@pytest.mark.vllm
def test_vllm_empty_prompt_list_does_no_work(vllm_engine, monkeypatch):
    monkeypatch.setattr(vllm_engine.llm, "generate", lambda *a, **k: pytest.fail("engine called"))
    assert vllm_engine.generate([], n=4) == []
    vllm_engine.sleep()  # no-ops on CPU
    vllm_engine.wake_up()


@pytest.mark.vllm
def test_vllm_seeded_batch_larger_than_one_scheduler_step(policy, vllm_engine):
    """More prompt tokens than the scheduler takes in one step (4096 here): on CPU, chunked prefill of a
    seeded request crashed vLLM ("CPU Generator does not use offset"); rollout.py prefills whole. Each
    prompt's samples must also not depend on the batch it came in (per-request seeds, docs/choices.md, choice 45)."""
    m, tok = policy
    prompts = [chat(tok, f"Item {i}. Add up: " + " + ".join(str(j) for j in range(40, 90))) for i in range(40)]
    assert sum(len(p) for p in prompts) > 4096
    big = vllm_engine.generate(prompts, n=2, max_new_tokens=3, seed=5)
    check_structure(big, 40, 2, 3, vllm_engine.stop_ids)
    for i in (0, 23, 39):  # prompt i's samples are seeded 5 + 2i and 5 + 2i + 1
        vllm_engine.llm.reset_prefix_cache()  # computed afresh, not from the batch's cached prefixes
        alone = vllm_engine.generate([prompts[i]], n=2, max_new_tokens=3, seed=5 + 2 * i)
        assert [s.token_ids for s in alone] == [s.token_ids for s in big[2 * i:2 * i + 2]]


# ----------------------------------------------------------------------------------------------
# a quiet console (docs/choices.md, choice 50)

ENV_AT_IMPORT = dict(os.environ)  # before any engine here sets its thread and preload variables
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_engine_log_takes_vllm_records_and_low_level_output(tmp_path, capfd, monkeypatch):
    """EngineLog: the `vllm` logger's records and what is written straight to file descriptors 1 and 2 land in the
    file, none on the console; close() gives the logger back as it was. OPSD_VERBOSE switches it off."""
    import logging

    logger = logging.getLogger("vllm")
    before = (list(logger.handlers), logger.level, logger.propagate)
    # vllm.logger.suppress_logging sets a process-wide logging.disable and restores it only when its block ends
    # without an exception: an engine that failed earlier in this process can leave it set
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # EngineLog takes vLLM's own level setting
    log = rollout.EngineLog(str(tmp_path / "run" / "engine.log"))
    # the `vllm` logger itself: a module logger below it may carry a level of its own from earlier tests
    state = (logger.disabled, logger.getEffectiveLevel(), logging.root.manager.disable)
    logger.warning("a record from inside vLLM")
    with log.capture_output():
        os.write(2, b"[W] a C++ notice on stderr\n")
        os.write(1, b"a line on stdout\n")
    print("after the capture: console again")
    log.close()
    text = (tmp_path / "run" / "engine.log").read_text()
    assert "WARNING" in text and "a record from inside vLLM" in text, (state, text)
    assert "a C++ notice on stderr" in text and "a line on stdout" in text
    out, err = capfd.readouterr()
    assert "after the capture: console again" in out
    assert "inside vLLM" not in out + err and "C++ notice" not in out + err
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    for value, verbose in [("", False), ("0", False), ("1", True), ("true", True)]:
        monkeypatch.setenv("OPSD_VERBOSE", value)
        assert rollout.verbose() is verbose


@pytest.mark.vllm
@pytest.mark.e2e
def test_vllm_training_console_is_quiet_and_engine_log_holds_the_engine(tmp_path):
    """Two training steps through vLLM (one weight sync) in the faster dtype of this CPU: under 20 WARNING lines
    on the console (vLLM alone logs ~40 per engine start, and in bf16 one per tensor per sync), the engine's lines
    in <out_dir>/engine.log, and in bf16 no per-tensor dtype warning there either (sync_weights casts)."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    out = tmp_path / "run"
    env = {k: v for k, v in ENV_AT_IMPORT.items() if k != "OPSD_VERBOSE"}
    cmd = [sys.executable, "train.py", "--method", "opsd", "--exposure", "full", "--rollout", "vllm", "--steps", "2",
           "--prompts_per_step", "1", "--max_new_tokens", "8", "--dtype", "auto", "--save_every", "-1",
           "--out_dir", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    console = p.stdout
    assert p.returncode == 0, console[-3000:]
    n_warn = sum("WARNING" in line for line in console.splitlines())
    assert n_warn < 20, console[-3000:]
    assert "opsd/full" in console and "metrics:" in console  # the progress bar and the result stay
    engine_log = (out / "engine.log").read_text()
    assert "Initializing a V1 LLM engine" in engine_log and "Reloading weights inplace" in engine_log
    assert "Initializing a V1 LLM engine" not in console
    assert "Attempted to load weight" not in engine_log  # weights arrive in the engine's dtype
