"""mdtrain models inside lm-evaluation-harness: the ``mdtrain`` model of ``lm_eval``, for every objective.

    python -m mdtrain.harness --model mdtrain --model_args path=RUN_OR_EXPORT,mc_samples=128 --tasks TASKS
    mdtrain lm-eval RUN_OR_EXPORT --tasks TASKS [--model-args mc_samples=128,seed=1234] [--include-path DIR]

lm_eval 0.4.13 looks models up in its own table (``lm_eval/models/__init__.py``) and in classes registered in the
running process; it reads no entry points or plugins. So the bare ``lm_eval`` command cannot see ``mdtrain``:
``python -m mdtrain.harness`` *is* lm_eval's command line (``lm_eval.__main__.cli_evaluate``, every flag
unchanged) with this module registered first; in Python, ``import mdtrain.harness`` before
``lm_eval.simple_evaluate(model="mdtrain", ...)`` does the same.

What each request computes (``MdtrainLM.describe()`` states it, and ``mdtrain lm-eval`` prints it):
- ``loglikelihood``: AR models exactly (one forward pass). Masked-family models (mdlm, md4, genmd4, d3pm, sedd) by
  Monte Carlo: ``mc_samples`` draws, context never masked, noise from ``seed`` keyed by the request's context
  (the answer choices of one question share their draws: common random numbers). ``estimator=llada`` (default,
  LLaDA's conditional likelihood, Nie et al. 2025): l ~ U{1..m} stratified over the draws, l of the m
  continuation tokens masked uniformly without replacement, value (m/l)·Σ_masked −log p_θ(x_i | context, unmasked); ``estimator=elbo``:
  the objective's own NELBO with t drawn as in training, continuation tokens masked with probability 1 − α(t).
  Either is an upper bound on −log p(continuation | context) in expectation (exact for the true posterior), so
  the returned log-likelihood is a lower bound; ``is_greedy``: LLaDA's check — greedy confidence-first decoding
  (one position per step, the most confident, its most likely token) from the masked continuation reproduces it.
- ``loglikelihood_rolling``: lm_eval's rolling windows (``get_rolling_token_windows``), each scored as above; for
  masked models the sum of window NELBOs, a bound (perplexities derived from it are upper bounds).
- ``generate_until``: ``mdtrain.objectives.samplers.sample`` (``sampler``, ``steps``; default one step per
  generated token) with the context as a fixed prefix, ``max_gen_toks`` new tokens, cut at EOS and at the first
  stop string of ``until``. ``do_sample=false`` / ``temperature=0`` → the most likely token at every draw
  (nucleus with top_p → 0); sampling otherwise (``top_p`` honoured).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

log = logging.getLogger(__name__)

ESTIMATORS = ("llada", "elbo")
GREEDY_TOP_P = 1e-300  # nucleus keeps only the most likely class: argmax with the samplers' own code path
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


@dataclass
class Scorer:
    """What the adapter needs: ``model_fn(x [B, L], cond [B]) -> logits``, the objective, the tokenizer, the
    model length. ``MdtrainLM(path=...)`` builds one from a run, checkpoint or export directory."""
    model_fn: Callable
    objective: Any
    tokenizer: Any
    seq_len: int
    name: str = ""


def register() -> None:
    """Make ``mdtrain`` an lm_eval model name (idempotent; lazy, so lm_eval imports this module on first use)."""
    import lm_eval.models  # noqa: F401 - lm_eval fills its own table only while its registry is empty
    if "mdtrain" not in model_registry:
        model_registry.register("mdtrain", target="mdtrain.harness:MdtrainLM")


def request_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the base seed and a request's content (same request → same draws, in any batch)."""
    h = hashlib.blake2b(json.dumps([int(seed), *parts], default=str).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def stratified_se(values: torch.Tensor) -> float:
    """Standard error of the mean of draws taken one per stratum, in stratum order (the collapsed-strata
    estimator: Σ over adjacent pairs of (v_a − v_b)² / K², scaled to K for odd K). The plain std/√K would
    ignore the stratification and overstate the error many times over; NaN for one draw."""
    v = values.to(torch.float64).flatten()
    K = v.numel()
    if K < 2:
        return float("nan")
    pairs = v[:K - K % 2].view(-1, 2)
    return math.sqrt(float((pairs[:, 0] - pairs[:, 1]).pow(2).sum()) * K / (2 * pairs.shape[0])) / K


class MdtrainLM(TemplateLM):
    """An mdtrain model as an ``lm_eval`` LM (one process, one device)."""

    backend = "causal"  # TemplateLM._encode_pair: encode context+continuation together, split (as HF models do)

    def __init__(self, path: Optional[str] = None, mc_samples: int = 128, mc_batch_size: int = 32,
                 estimator: str = "llada", seed: int = 1234, sampler: str = "auto", steps: int = 0,
                 max_gen_toks: int = 256, add_bos: bool = True, use_ema: bool = True, precision: str = "auto",
                 device: Optional[str] = None, batch_size: Any = 8, max_batch_size: Optional[int] = None,
                 scorer: Optional[Scorer] = None):
        # batch_size: AR sequences per forward (masked models batch their Monte Carlo draws, mc_batch_size);
        # max_batch_size is accepted because lm_eval always passes it, and has no use here.
        super().__init__()
        if (path is None) == (scorer is None):
            raise ValueError("mdtrain lm_eval model: pass path=RUN_DIR_CHECKPOINT_OR_EXPORT (model_args) or scorer=")
        if estimator not in ESTIMATORS:
            raise ValueError(f"mdtrain lm_eval model: estimator={estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if int(mc_samples) < 1 or int(mc_batch_size) < 1 or int(max_gen_toks) < 1 or int(steps) < 0:
            raise ValueError(f"mdtrain lm_eval model: mc_samples, mc_batch_size, max_gen_toks must be >= 1 and "
                             f"steps >= 0 (got {mc_samples}, {mc_batch_size}, {max_gen_toks}, {steps})")
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"mdtrain lm_eval model: precision={precision!r}; choose auto, fp32 or bf16")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if scorer is None:
            scorer = load_scorer(str(path), use_ema=bool(use_ema), device=dev)
        self.s = scorer
        self.path = path
        self._device = dev
        self.objective, self.tok, self.L = scorer.objective, scorer.tokenizer, int(scorer.seq_len)
        self.causal = bool(self.objective.causal)
        self.mc_samples, self.mc_batch_size = int(mc_samples), int(mc_batch_size)
        self.estimator, self.seed, self.sampler = estimator, int(seed), sampler
        self.steps, self.max_gen_toks, self.add_bos = int(steps), int(max_gen_toks), bool(add_bos)
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
        if self.causal and not self.add_bos:
            raise ValueError("mdtrain lm_eval model: add_bos=False does not fit an AR model (its first prediction "
                             "needs the BOS token as context)")
        self.records: list[dict] = []  # one per request: kind, value, its Monte Carlo standard error, draws
        self._repeats: Counter = Counter()

    # --- lm_eval's tokenization hooks --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.L

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "spec", "") or type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens, mask_text=None)

    def describe(self) -> dict:
        """The estimator behind the numbers, for the results file and the paper's footnote."""
        masked = not self.causal
        return {"model": "mdtrain", "path": self.path, "objective": self.objective.name, "seq_len": self.L,
                "loglikelihood": "exact" if not masked else f"monte_carlo:{self.estimator}",
                "bound": "exact" if not masked else
                "loglikelihood is a lower bound (NELBO): perplexity is an upper bound",
                "mc_samples": self.mc_samples if masked else None, "seed": self.seed, "add_bos": self.add_bos,
                "sampler": self.sampler, "steps": self.steps or "one per generated token"}

    def summary(self) -> dict:
        """Monte Carlo standard errors of the scored requests (0 for AR): how far each number may move."""
        out = {}
        for kind in ("loglikelihood", "loglikelihood_rolling"):
            se = [r["se"] for r in self.records if r["kind"] == kind]
            if se:
                out[kind] = {"requests": len(se), "mean_se": sum(se) / len(se), "max_se": max(se)}
        return out

    # --- context manager for the network's precision ------------------------------------------------------
    def _autocast(self):
        if self.bf16 and self._device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _frame(self, ctx: list[int]) -> list[int]:
        """The model's context: lm_eval's empty-context prefix replaced by (optionally) BOS."""
        ctx = list(ctx)
        if ctx[:1] == [self.tok.bos_id]:
            ctx = ctx[1:]
        return ([self.tok.bos_id] if self.add_bos else []) + ctx

    # --- loglikelihood -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(self._frame(ctx), list(cont)) for _, ctx, cont in requests]
        out = self._score(pairs, "loglikelihood")
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]], kind: str) -> list[tuple[float, bool]]:
        limit = self.L - (1 if self.add_bos and not self.causal else 0)
        for _, cont in pairs:
            if len(cont) > limit:
                raise ValueError(f"mdtrain lm_eval model: a continuation of {len(cont)} tokens does not fit the "
                                 f"model length {self.L}; use a task with shorter targets")
        if self.causal:
            return self._score_ar(pairs, kind)
        return [self._score_masked(self._fit(ctx, self.L - len(cont)), cont, kind) for ctx, cont in pairs]

    def _fit(self, ctx: list[int], room: int) -> list[int]:
        """``ctx`` cut to ``room`` tokens: the oldest go first, a leading BOS stays."""
        if len(ctx) <= room:
            return ctx
        head = ctx[:1] if (ctx[:1] == [self.tok.bos_id] and room > 0) else []
        rest = room - len(head)
        return head + (ctx[len(ctx) - rest:] if rest > 0 else [])

    @torch.no_grad()
    def _score_ar(self, pairs, kind: str) -> list[tuple[float, bool]]:
        from mdtrain.objectives.logprob import target_logprob

        inputs = []
        for ctx, cont in pairs:
            if not ctx:
                raise ValueError("mdtrain lm_eval model: an AR continuation needs at least one context token")
            inputs.append((self._fit(ctx, self.L + 1 - len(cont)) + cont)[:-1])
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        results: list = [None] * len(pairs)
        mask_id, pad = self.objective.mask_id, self.tok.pad_id
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            width = len(inputs[idx[0]])
            # right padding: a causal model's outputs at real positions never see the padding after them
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, :len(inputs[i])] = torch.tensor(inputs[i])
            x = x.to(self._device)
            with self._autocast():
                logits = self.s.model_fn(x, self.objective.cond(torch.zeros(len(idx), device=self._device)))
            for j, i in enumerate(idx):
                cont = pairs[i][1]
                n, m = len(inputs[i]), len(cont)
                rows = logits[j, n - m:n][None]
                target = torch.tensor(cont, device=self._device)[None]
                ll = float(target_logprob(rows, target, mask_id).to(torch.float64).sum())
                w = rows[0].float().clone()
                w[:, mask_id] = -math.inf
                greedy = bool((w.argmax(-1) == target[0]).all())
                results[i] = (ll, greedy)
                self.records.append({"kind": kind, "value": ll, "se": 0.0, "draws": 0})
        return results

    def _score_masked(self, ctx: list[int], cont: list[int], kind: str) -> tuple[float, bool]:
        if not cont:
            return 0.0, True
        gen = torch.Generator().manual_seed(request_seed(self.seed, "ll", ctx))
        values = self.mc_values(ctx, cont, self.mc_samples, gen)
        nll, se = float(values.mean()), stratified_se(values)
        self.records.append({"kind": kind, "value": -nll, "se": se, "draws": values.numel()})
        return -nll, self._masked_greedy(ctx, cont)

    @torch.no_grad()
    def mc_values(self, ctx: list[int], cont: list[int], K: int, gen: torch.Generator) -> torch.Tensor:
        """K Monte Carlo values (float64, CPU) of the NLL bound of ``cont`` given the clean ``ctx``; their mean is
        the estimate and their spread / √K its standard error."""
        f64, dev = torch.float64, self._device
        x0 = torch.tensor(ctx + cont, device=dev)
        n, m = x0.numel(), len(cont)
        target = torch.zeros(n, dtype=torch.bool, device=dev)
        target[len(ctx):] = True
        strata = (torch.arange(K, dtype=f64) + torch.rand(K, generator=gen, dtype=f64)) / K
        pos_u = torch.rand(K, n, generator=gen, dtype=f64)
        out = []
        for s in range(0, K, self.mc_batch_size):
            u, pu = strata[s:s + self.mc_batch_size].to(dev), pos_u[s:s + self.mc_batch_size].to(dev)
            xb, tb = x0.expand(u.numel(), n), target.expand(u.numel(), n)
            with self._autocast():
                v = self._llada(xb, tb, m, u, pu) if self.estimator == "llada" else self._elbo(xb, tb, u, pu)
            out.append(v.to(f64).cpu())
        return torch.cat(out)

    def _llada(self, x0, target, m: int, u, pos_u) -> torch.Tensor:
        obj = self.objective
        l = (u * m).floor().long().clamp(0, m - 1) + 1  # uniform on {1..m}, stratified over the draws
        rank = torch.where(target, pos_u, torch.full_like(pos_u, 2.0)).argsort(1).argsort(1)
        masked = target & (rank < l[:, None])  # l continuation positions, uniformly without replacement
        xt = torch.where(masked, torch.full_like(x0, obj.mask_id), x0)
        logits = self.s.model_fn(xt, self._cond_at_fraction(l.to(torch.float64) / m))
        logp = obj.denoiser_logprobs(logits[masked]).gather(1, x0[masked][:, None]).squeeze(1)
        per = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        per.index_add_(0, masked.nonzero()[:, 0], -logp)
        return per * (m / l.to(torch.float64))

    def _elbo(self, x0, target, u, pos_u) -> torch.Tensor:
        obj = self.objective
        t = obj.sample_time(u)
        xt = torch.where(target, obj.corrupt(x0, t, pos_u), x0)
        logits = self.s.model_fn(xt, obj.cond(t))
        per_token = obj.nelbo(logits, x0, xt, t, target, **obj.nelbo_extras(self.s.model_fn, x0, t))
        return per_token.to(torch.float64).sum(1)

    def _per_token_schedule(self) -> bool:
        t = torch.full((1,), 0.5, dtype=torch.float64, device=self._device)
        return self.objective.time_conditioning and self.objective.schedule.mask_prob(t).shape != t.shape

    def _cond_at_fraction(self, frac: torch.Tensor) -> torch.Tensor:
        """The network's time input when a fraction ``frac`` of the scored tokens is masked: t with
        P(mask at t) = frac (bisection on the schedule), or zeros for networks without time conditioning."""
        obj = self.objective
        if not obj.time_conditioning:
            return obj.cond(frac)
        lo, hi = torch.zeros_like(frac), torch.ones_like(frac)
        for _ in range(60):
            mid = (lo + hi) / 2
            mp = obj.schedule.mask_prob(mid)
            if mp.shape != mid.shape:
                raise ValueError(f"estimator=llada needs a scalar noise schedule to give a time-conditioned network "
                                 f"its t; objective '{obj.name}' has a per-token one: use estimator=elbo")
            below = mp < frac
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return obj.cond(hi)

    @torch.no_grad()
    def _masked_greedy(self, ctx, cont) -> bool:
        """Would greedy decoding produce ``cont``? LLaDA's check: from the fully masked continuation, reveal one
        position per step — the most confident one, with its most likely token — and compare the result."""
        obj = self.objective
        x = torch.tensor(ctx + [obj.mask_id] * len(cont), device=self._device)[None]
        for _ in cont:
            masked = (x[0] == obj.mask_id).nonzero()[:, 0]
            frac = torch.tensor([masked.numel() / len(cont)], dtype=torch.float64, device=self._device)
            # GenMD4's per-token schedule has no single t for a masked fraction: its t ≈ the fraction (power 1)
            cond = obj.cond(frac) if self._per_token_schedule() else self._cond_at_fraction(frac)
            with self._autocast():
                logits = self.s.model_fn(x, cond)
            best, tok = obj.denoiser_logprobs(logits[0, masked]).max(-1)
            i = int(best.argmax())
            x[0, masked[i]] = tok[i]
        return x[0, len(ctx):].tolist() == list(cont)

    # --- loglikelihood_rolling ---------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (string,) = req.args
            windows = self.rolling_windows(self.tok_encode(string))
            total = sum(ll for ll, _ in self._score(windows, "rolling_window")) if windows else 0.0
            se = math.sqrt(sum(r["se"] ** 2 for r in self.records[len(self.records) - len(windows):])) \
                if windows else 0.0
            self.records.append({"kind": "loglikelihood_rolling", "value": total, "se": se, "draws": self.mc_samples})
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, predictions) windows in which every token is predicted once: lm_eval's rule (the first window
        from BOS, later ones from the token before them, the last with as much context as fits). A masked model's
        window (context + predictions) fits its length; without BOS its first window has no context at all."""
        if self.causal:
            return [tuple(map(list, lm_utils.make_disjoint_window(w)))
                    for w in lm_utils.get_rolling_token_windows(tokens, self.tok.bos_id, self.L, 1)]
        first = [self.tok.bos_id] if self.add_bos else []
        out, start = [], self.L - len(first)
        if tokens:
            out.append((first, tokens[:start]))
        while start < len(tokens):
            end = min(start + self.L - 1, len(tokens))
            out.append((tokens[max(0, end - self.L):start], tokens[start:end]))
            start = end
        return out

    # --- generate_until ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    @torch.no_grad()
    def generate(self, context: str, gen_kwargs: dict) -> str:
        """One continuation of ``context`` under lm_eval's ``gen_kwargs`` (see the module doc)."""
        from mdtrain.objectives.samplers import sample

        unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
        if unknown:
            log.warning("mdtrain lm_eval model: ignoring generation arguments %s", unknown)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        temperature = gen_kwargs.get("temperature")
        greedy = not gen_kwargs.get("do_sample", False) or temperature in (0, 0.0)
        if not greedy and temperature not in (None, 1, 1.0):
            raise ValueError(f"mdtrain lm_eval model: temperature={temperature} is not supported (the samplers draw "
                             "from the model's distribution); use do_sample=false, or top_p")
        top_p = GREEDY_TOP_P if greedy else float(gen_kwargs.get("top_p") or 1.0)
        ctx = self._frame(self.tok_encode(context))
        new = max(1, min(max_new, self.L - (1 if self.causal or self.add_bos else 0)))
        ctx = self._fit(ctx, self.L - new)  # room for the new tokens
        if self.causal and not ctx:
            raise ValueError("mdtrain lm_eval model: AR generation needs at least one context token")
        key = (context, sorted(gen_kwargs.items(), key=str))
        self._repeats[json.dumps(key, default=str)] += 1
        gen = torch.Generator().manual_seed(request_seed(self.seed, "gen", ctx, key,
                                                         self._repeats[json.dumps(key, default=str)]))
        prefix = torch.tensor(ctx + [self.objective.mask_id] * new, device=self._device)[None]
        with self._autocast():
            tokens, info = sample(self.objective, self.s.model_fn, 1, prefix.shape[1], self.steps or new, gen,
                                  sampler=self.sampler, top_p=top_p, prefix=prefix)
        ids = tokens[0, len(ctx):].tolist()
        if self.tok.eos_id in ids:
            ids = ids[:ids.index(self.tok.eos_id)]
        text = self.tok_decode(ids)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        self.records.append({"kind": "generate_until", "value": None, "se": 0.0, "draws": 0, "nfe": info["nfe"]})
        return text


def load_scorer(path: str, use_ema: bool = True, device="cpu") -> Scorer:
    """A run dir, checkpoint dir or export dir → Scorer (EMA weights when there are any)."""
    from mdtrain.inference import load_for_inference
    from mdtrain.objectives.protocol import make_model_fn

    bundle = load_for_inference(path, use_ema=use_ema)
    model = bundle.model.to(device).eval()
    bundle.objective.to(device)
    return Scorer(make_model_fn(model), bundle.objective, bundle.tokenizer, bundle.cfg.data.seq_len, path)


# ----------------------------------------------------------------------------------------------------
# `mdtrain lm-eval`


def task_manager(tasks: list[str], include_path: Optional[str] = None):
    """lm_eval's TaskManager; only the ``include_path`` tasks when they are all that is asked for (indexing
    lm_eval's ~10k shipped task files takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def run(lm: MdtrainLM, tasks: list[str], include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
        limit: Optional[float] = None, log_samples: bool = False, bootstrap_iters: int = 100000) -> dict:
    """lm_eval's ``simple_evaluate`` on an mdtrain model; the results plus ``mdtrain`` (the estimator) and
    ``mdtrain_mc`` (Monte Carlo standard errors of the requests)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                              task_manager=task_manager(tasks, include_path), bootstrap_iters=bootstrap_iters)
    if results is None:
        raise RuntimeError("lm_eval returned no results")
    results["mdtrain"] = lm.describe()
    results["mdtrain_mc"] = lm.summary()
    return results


def main(args) -> int:
    """Entry point of ``mdtrain lm-eval`` (argparse namespace from ``mdtrain.cli``)."""
    from lm_eval.utils import handle_non_serializable, make_table

    model_args = lm_utils.simple_parse_args_string(args.model_args or "")
    if "path" in model_args:
        print("mdtrain lm-eval: error: give the model as the positional RUN_OR_EXPORT, not path= in --model-args",
              file=sys.stderr)
        return 2
    tasks = [t for t in ",".join(args.tasks).split(",") if t]
    try:
        lm = MdtrainLM(path=args.path, device=args.device, **model_args)
    except (TypeError, ValueError) as e:  # an unknown or bad model argument: one line, not a traceback
        print(f"mdtrain lm-eval: error in --model-args: {e}", file=sys.stderr)
        return 2
    results = run(lm, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
                  log_samples=bool(args.output and args.log_samples))
    print(make_table(results))
    d = results["mdtrain"]
    print(f"mdtrain: {d['objective']} loglikelihood {d['loglikelihood']}" +
          ("" if d["mc_samples"] is None else f" ({d['mc_samples']} samples, seed {d['seed']}; {d['bound']})"))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1, default=handle_non_serializable)
    print(json.dumps({"results": results["results"], "mdtrain": d, "mdtrain_mc": results["mdtrain_mc"]},
                     default=handle_non_serializable), flush=True)
    return 0


register()

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "python -m mdtrain.harness"
    cli_evaluate()
