"""Teacher-exposure schedules for ATESD: how much of the reference solution the teacher sees at each step.

Paper: "Adaptive Teacher Exposure for Self-Distillation in LLM Reasoning", arXiv 2605.11458.

The exposure alpha in [0, 1] says which share of the reference reasoning the teacher reads
(the first ceil(alpha * m) of its m steps, plus the final answer always; teacher.py builds that
context). alpha = 1 is plain OPSD. This file only decides alpha; it never touches a model.

Schedules (all with one interface, see `make_exposure`):
    full    alpha_t = 1                                   (OPSD)
    fixed   alpha_t = alpha                               (the paper's fixed sweep)
    random  alpha_k ~ Uniform[alpha_min, alpha_max], held for `hold` steps  (random-exposure ablation)
    atesd   alpha_k ~ Beta(a, b), (a, b) = 1 + softplus(f_phi(s_k)), held for `hold` steps

The learned controller (mode "atesd"), with k a decision made at step t0 = k * H:

    s_k      = normalized training state at t0 (6 features, see `BetaController.features`)
    (a, b)   = 1 + softplus(f_phi(s_k))                 f_phi: 6 -> hidden -> 2 MLP, a, b > 1
    u_k      ~ Beta(a, b)                               alpha_k = clip(u_k, alpha_min, alpha_max)
    alpha_t  = alpha_k   for t0 <= t < t0 + H           (held for H student updates)

    reward, once the losses l_t0 .. l_(t0+L) and teacher answer log-probs g_(t0+1) .. g_(t0+L) are in:
    G_lp     = sum_{i=1..L} gamma^(i-1) * max(0, l_(t0+i-1) - l_(t0+i))     only decreases count
    G_gt     = sum_{i=1..L} gamma^(i-1) * g_(t0+i)  /  sum_{i=1..L} gamma^(i-1)
    R_k      = G_lp + lambda_gt * G_gt

    update, each time B decisions have their reward (REINFORCE, own Adam optimizer):
    A_k      = (R_k - mean_B R) / (std_B R + eps)
    loss     = -mean_B A_k * log Beta(u_k; a(s_k), b(s_k))
               + c_ent * mean_B max(0, Entropy(Beta(a(s_k), b(s_k))) - entropy_target)

Where the paper is silent and we chose (keyword arguments of `make_exposure`), each an item of the list in
docs/choices.md, choice 6, with its reasons and measurements: hold H = 4 (item 1); lookahead L = 3 = H - 1, so
every loss difference in G_lp is taken under one alpha and a reward is complete before the next decision (item 2);
gamma = 0.9 (item 3); lambda_gt = 0.1, both reward terms logged to tune it (item 4); batch_decisions B = 4, a
partial batch at the end unused (item 5); MLP 6 -> 32 -> 2, tanh, float64 on CPU, last layer zero (prior mean 0.5,
std 0.24), Adam lr 0.02, about 100 steps before it learns anything (item 6); alpha in [0.05, 1.0], REINFORCE on the
unclipped sample u_k (item 7); entropy_target = -0.9 nats with c_ent = 0.01, a gentle ceiling (item 8); state
features O(1) from the first step (item 9, `BetaController.features`); a decision whose lookahead runs past the
last step or misses a report is dropped (item 10); a private Beta sampler and an elementwise float64 MLP, the same
alphas on every rank (item 11); "random" differs from ATESD only in the policy (item 12).

Metrics: exposure/* in docs/metrics.md. The "fixed", "full" and "random" schedules log exposure/alpha only.

Example:
    python experiments/exposure_demo.py   # the controller learning on a synthetic student, step by step
"""

import copy
import math

import torch

# ---------------------------------------------------------------------------------------------
# the reward: pure functions


def discounted_progress(losses, gamma):
    """G_lp = sum_{i=1..L} gamma^(i-1) * max(0, l_(i-1) - l_i) for losses = [l_0, l_1, ..., l_L].

    Only decreases count: a loss that goes up between two steps contributes 0, not a penalty.
    """
    return sum(gamma ** (i - 1) * max(0.0, losses[i - 1] - losses[i]) for i in range(1, len(losses)))


def guard_term(values, gamma):
    """G_gt = sum_{i=1..L} gamma^(i-1) g_i / sum_{i=1..L} gamma^(i-1) for values = [g_1, ..., g_L].

    A discounted mean of the exposure-conditioned teacher's log-probability of the reference
    answer: it rewards exposures under which the teacher actually knows where it is going, so
    the controller cannot win by shrinking alpha just to make the student-teacher gap small.
    """
    weights = [gamma ** (i - 1) for i in range(1, len(values) + 1)]
    return sum(w * g for w, g in zip(weights, values)) / sum(weights)


# ---------------------------------------------------------------------------------------------
# Beta sampling from a private generator


def sample_gamma(k, gen):
    """One Gamma(k, 1) draw, k >= 1, by Marsaglia & Tsang (2000), from torch.Generator `gen`."""
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = (1.0 + c * x) ** 3
        if v <= 0.0:
            continue
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u > 0.0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def sample_beta(a, b, gen):
    """One Beta(a, b) draw (a, b >= 1, always true here since a, b = 1 + softplus) as X / (X + Y)."""
    x = sample_gamma(a, gen)
    y = sample_gamma(b, gen)
    return x / (x + y)


# ---------------------------------------------------------------------------------------------
# the ablation schedules: full, fixed, random


class FixedExposure:
    """alpha_t = alpha for every step ("full" is alpha = 1, which is plain OPSD)."""

    def __init__(self, alpha):
        self.alpha = float(alpha)

    def alpha_for_step(self, step):
        return self.alpha

    def report(self, step, **measured):
        pass  # nothing to learn

    def metrics(self):
        return {"exposure/alpha": self.alpha}

    def state_dict(self):
        return {"kind": "fixed", "alpha": self.alpha}

    def load_state_dict(self, sd):
        if sd["kind"] != "fixed":
            raise ValueError(f"checkpoint holds a {sd['kind']} schedule, this one is fixed")
        self.alpha = float(sd["alpha"])


class RandomExposure:
    """alpha_k ~ Uniform[alpha_min, alpha_max], a fresh draw every `hold` steps (the random ablation)."""

    def __init__(self, *, hold, alpha_min, alpha_max, seed):
        self.hold, self.alpha_min, self.alpha_max = hold, alpha_min, alpha_max
        self.gen = torch.Generator().manual_seed(seed)
        self.k = None  # index of the current decision (step // hold)
        self.alpha = None

    def alpha_for_step(self, step):
        if self.k != step // self.hold:
            self.k = step // self.hold
            u = float(torch.rand((), generator=self.gen, dtype=torch.float64))
            self.alpha = self.alpha_min + (self.alpha_max - self.alpha_min) * u
        return self.alpha

    def report(self, step, **measured):
        pass

    def metrics(self):
        return {} if self.alpha is None else {"exposure/alpha": self.alpha}

    def state_dict(self):
        return {"kind": "random", "k": self.k, "alpha": self.alpha, "gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        if sd["kind"] != "random":
            raise ValueError(f"checkpoint holds a {sd['kind']} schedule, this one is random")
        self.k, self.alpha = sd["k"], sd["alpha"]
        self.gen.set_state(sd["gen"])


# ---------------------------------------------------------------------------------------------
# the learned controller

N_FEATURES = 6  # progress, EMA alpha, EMA loss, EMA mismatch, EMA probe NLL, confidence


class BetaController:
    """ATESD: a Beta policy over alpha, rewarded by discounted learning progress (see module doc)."""

    def __init__(self, *, total_steps, seed=0, hold=4, lookahead=3, gamma=0.9, lambda_gt=0.1,
                 batch_decisions=4, lr=0.02, alpha_min=0.05, alpha_max=1.0, entropy_target=-0.9,
                 entropy_coef=0.01, hidden=32, ema=0.9):
        assert hold >= 1 and lookahead >= 1 and batch_decisions >= 2
        self.total_steps, self.hold, self.lookahead, self.gamma = total_steps, hold, lookahead, gamma
        self.lambda_gt, self.batch_decisions = lambda_gt, batch_decisions
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        self.entropy_target, self.entropy_coef, self.ema = entropy_target, entropy_coef, ema

        # f_phi: s -> tanh(s W1 + b1) W2 + b2, as four plain tensors, float64 (it costs nothing here).
        # Initialized from our own generator so that the same seed gives the same controller.
        self.gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(N_FEATURES)  # the usual fan-in uniform init for the hidden layer
        self.phi = {
            "W1": (torch.rand(N_FEATURES, hidden, generator=self.gen, dtype=torch.float64) * 2 - 1) * bound,
            "b1": (torch.rand(hidden, generator=self.gen, dtype=torch.float64) * 2 - 1) * bound,
            "W2": torch.zeros(hidden, 2, dtype=torch.float64),  # zero: prior Beta(1 + ln 2, 1 + ln 2) in every state
            "b2": torch.zeros(2, dtype=torch.float64),
        }
        for p in self.phi.values():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(list(self.phi.values()), lr=lr)

        # training state: EMAs and the first value of each (the normalization reference)
        self.emas = {"alpha": None, "loss": None, "mismatch": None, "probe_nll": None}
        self.firsts = {"loss": None, "mismatch": None, "probe_nll": None}
        self.confidence = 0.0

        # decisions
        self.current = None  # the decision in use: {"k", "t0", "alpha", "u", "a", "b", "entropy"}
        self.pending = []    # decisions waiting for their lookahead: {"t0", "u", "state", "losses", "gts"}
        self.scored = []     # decisions with a reward, waiting for a full batch: {"u", "state", "R"}
        self.counts = {"decisions": 0, "dropped": 0, "scored": 0, "updates": 0}
        self.last = {}       # last reward / update values, for metrics()

    # ---- the policy -----------------------------------------------------------------------

    def features(self, step):
        """The normalized state s at `step` (a list of N_FEATURES floats; docs/choices.md, choice 6, item 9)."""

        def rel(name):  # relative change of an EMA from its first value, clipped
            if self.emas[name] is None:
                return 0.0
            x0 = self.firsts[name]
            return max(-5.0, min(5.0, (self.emas[name] - x0) / (abs(x0) + 1e-8)))

        ema_alpha = 0.5 if self.emas["alpha"] is None else self.emas["alpha"]
        return [
            2.0 * step / self.total_steps - 1.0,
            2.0 * ema_alpha - 1.0,
            rel("loss"),
            rel("mismatch"),
            rel("probe_nll"),
            2.0 * self.confidence - 1.0,
        ]

    def beta_params(self, states):
        """(a, b) = 1 + softplus(f_phi(s)) for states (N, F) -> a (N,), b (N,)."""
        # Elementwise products summed, not a matmul: at this size a multithreaded BLAS call only
        # costs (it can stall for milliseconds on a busy CPU), and the sums are reproducible.
        W1, b1, W2, b2 = self.phi["W1"], self.phi["b1"], self.phi["W2"], self.phi["b2"]
        h = torch.tanh((states[:, :, None] * W1).sum(1) + b1)  # (N, F, 1) * (F, hidden) -> (N, hidden)
        out = (h[:, :, None] * W2).sum(1) + b2  # (N, hidden, 1) * (hidden, 2) -> (N, 2)
        ab = 1.0 + torch.nn.functional.softplus(out)  # (N, 2), both > 1: unimodal, no mass at 0 or 1
        return ab[:, 0], ab[:, 1]

    def policy(self, step):
        """(a, b) of the Beta the controller would sample from at `step` now (draws nothing)."""
        with torch.no_grad():
            a, b = self.beta_params(torch.tensor([self.features(step)], dtype=torch.float64))
        return float(a[0]), float(b[0])

    # ---- the interface train.py uses ------------------------------------------------------

    def alpha_for_step(self, step):
        """The exposure for `step`: a new Beta draw at the first step of each hold, else the held one."""
        k = step // self.hold
        if self.current is None or self.current["k"] != k:
            self.decide(step, k)
        return self.current["alpha"]

    def decide(self, step, k):
        state = self.features(step)
        with torch.no_grad():  # sampling needs no graph; the update recomputes log-probs with grad
            a, b = self.beta_params(torch.tensor([state], dtype=torch.float64))
            entropy = float(torch.distributions.Beta(a, b).entropy()[0])
        a, b = float(a[0]), float(b[0])
        u = sample_beta(a, b, self.gen)
        alpha = min(self.alpha_max, max(self.alpha_min, u))
        self.current = {"k": k, "t0": step, "alpha": alpha, "u": u, "a": a, "b": b, "entropy": entropy}
        self.counts["decisions"] += 1
        if step + self.lookahead <= self.total_steps - 1:
            self.pending.append({"t0": step, "u": u, "state": state, "losses": [], "gts": []})
        else:
            self.counts["dropped"] += 1  # its lookahead would run past the end of training

    def report(self, step, *, loss, answer_logprob, mismatch=0.0, probe_nll=0.0, confidence=0.0):
        """Record step `step` (after its optimizer update); score and learn when decisions complete."""
        assert self.current is not None, "call alpha_for_step(step) before report(step, ...)"
        # 1) training-state EMAs (the alpha EMA tracks the alpha actually used at this step)
        measured = {"alpha": self.current["alpha"], "loss": loss, "mismatch": mismatch, "probe_nll": probe_nll}
        for name, x in measured.items():
            x = float(x)
            if self.emas[name] is None:
                self.emas[name] = x
                if name in self.firsts:
                    self.firsts[name] = x
            else:
                self.emas[name] = self.ema * self.emas[name] + (1.0 - self.ema) * x
        self.confidence = float(confidence)

        # 2) feed the pending decisions: l_t0 .. l_(t0+L) and g_(t0+1) .. g_(t0+L)
        still_pending = []
        for d in self.pending:
            i = step - d["t0"]  # position of this step in the decision's window
            if i < 0:
                still_pending.append(d)
                continue
            if i != len(d["losses"]):  # a report was missed: drop rather than score a broken window
                self.counts["dropped"] += 1
                continue
            d["losses"].append(float(loss))
            if i >= 1:
                d["gts"].append(float(answer_logprob))
            if len(d["losses"]) < self.lookahead + 1:
                still_pending.append(d)
                continue
            # the lookahead is complete: R = G_lp + lambda_gt * G_gt
            g_lp = discounted_progress(d["losses"], self.gamma)
            g_gt = guard_term(d["gts"], self.gamma)
            reward = g_lp + self.lambda_gt * g_gt
            self.scored.append({"u": d["u"], "state": d["state"], "R": reward})
            self.counts["scored"] += 1
            self.last.update({"reward": reward, "reward_lp": g_lp, "reward_gt": g_gt})
        self.pending = still_pending

        # 3) REINFORCE once B decisions are scored
        if len(self.scored) >= self.batch_decisions:
            batch, self.scored = self.scored[: self.batch_decisions], self.scored[self.batch_decisions :]
            self.update(batch)

    def update(self, batch):
        """One REINFORCE step on B scored decisions with standardized advantages and an entropy hinge."""
        states = torch.tensor([d["state"] for d in batch], dtype=torch.float64)  # (B, F)
        u = torch.tensor([d["u"] for d in batch], dtype=torch.float64)  # (B,)
        R = torch.tensor([d["R"] for d in batch], dtype=torch.float64)  # (B,)
        adv = (R - R.mean()) / (R.std(unbiased=False) + 1e-8)  # (B,) zero when all rewards tie

        a, b = self.beta_params(states)  # (B,), (B,) with grad
        dist = torch.distributions.Beta(a, b)
        # log-prob of the raw draw u, not of the clipped alpha (clipping is part of the environment);
        # the clamp only keeps log u finite if a draw landed at 0 or 1 in floating point
        logp = dist.log_prob(u.clamp(1e-6, 1.0 - 1e-6))  # (B,)
        ent = dist.entropy()  # (B,) differential entropy, <= 0 on [0, 1]
        loss_pg = -(adv * logp).mean()
        loss_ent = self.entropy_coef * torch.relu(ent - self.entropy_target).mean()
        loss = loss_pg + loss_ent

        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.counts["updates"] += 1
        self.last.update({
            "controller_loss": float(loss.detach()), "reward_batch_mean": float(R.mean()),
            "reward_batch_std": float(R.std(unbiased=False)),
        })

    def metrics(self):
        """Scalars to log. Reward / loss entries appear once there is a reward / an update."""
        if self.current is None:
            return {}
        c = self.current
        out = {
            "exposure/alpha": c["alpha"],
            "exposure/beta_mean": c["a"] / (c["a"] + c["b"]),
            "exposure/beta_concentration": c["a"] + c["b"],
            "exposure/policy_entropy": c["entropy"],
        }
        out.update({f"exposure/{name}": float(n) for name, n in self.counts.items()})
        out.update({f"exposure/{name}": v for name, v in self.last.items()})
        return out

    # ---- checkpointing (plumbing) ----------------------------------------------------------

    def state_dict(self):
        """Everything a resumed run needs to sample and learn exactly as an uninterrupted one.

        Only tensors, numbers, strings, None, lists and dicts: loadable with
        torch.load(weights_only=True). Copies, so later training does not change a saved dict.
        """
        return {
            "kind": "atesd",
            "structure": {"hold": self.hold, "lookahead": self.lookahead, "batch_decisions": self.batch_decisions},
            "phi": {name: p.detach().clone() for name, p in self.phi.items()},
            "opt": copy.deepcopy(self.opt.state_dict()),
            "gen": self.gen.get_state(),
            "emas": dict(self.emas),
            "firsts": dict(self.firsts),
            "confidence": self.confidence,
            "current": copy.deepcopy(self.current),
            "pending": copy.deepcopy(self.pending),
            "scored": copy.deepcopy(self.scored),
            "counts": dict(self.counts),
            "last": dict(self.last),
        }

    def load_state_dict(self, sd):
        structure = {"hold": self.hold, "lookahead": self.lookahead, "batch_decisions": self.batch_decisions}
        if sd["kind"] != "atesd" or sd["structure"] != structure:
            raise ValueError(f"checkpoint is {sd['kind']} {sd.get('structure')}, this controller is atesd {structure}")
        with torch.no_grad():
            for name, p in self.phi.items():
                p.copy_(sd["phi"][name])
        self.opt.load_state_dict(copy.deepcopy(sd["opt"]))
        self.gen.set_state(sd["gen"])
        self.emas, self.firsts = dict(sd["emas"]), dict(sd["firsts"])
        self.confidence = sd["confidence"]
        self.current = copy.deepcopy(sd["current"])
        self.pending = copy.deepcopy(sd["pending"])
        self.scored = copy.deepcopy(sd["scored"])
        self.counts, self.last = dict(sd["counts"]), dict(sd["last"])


# ---------------------------------------------------------------------------------------------
# one constructor for train.py


def make_exposure(mode, *, alpha=0.5, total_steps, seed=0, hold=4, lookahead=3, gamma=0.9, lambda_gt=0.1,
                  batch_decisions=4, lr=0.02, alpha_min=0.05, alpha_max=1.0, entropy_target=-0.9,
                  entropy_coef=0.01, hidden=32, ema=0.9):
    """The exposure schedule for mode "full" | "fixed" | "random" | "atesd" (defaults: module doc)."""
    if mode == "full":
        return FixedExposure(1.0)
    if mode == "fixed":
        return FixedExposure(alpha)
    if mode == "random":
        return RandomExposure(hold=hold, alpha_min=alpha_min, alpha_max=alpha_max, seed=seed)
    if mode == "atesd":
        return BetaController(
            total_steps=total_steps, seed=seed, hold=hold, lookahead=lookahead, gamma=gamma,
            lambda_gt=lambda_gt, batch_decisions=batch_decisions, lr=lr, alpha_min=alpha_min,
            alpha_max=alpha_max, entropy_target=entropy_target, entropy_coef=entropy_coef,
            hidden=hidden, ema=ema,
        )
    raise ValueError(f"unknown exposure mode {mode!r}: expected full, fixed, random or atesd")
