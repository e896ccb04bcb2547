"""mdtrain as an lm-evaluation-harness model: lm_eval's own evaluator on local tasks this file writes (JSONL +
YAML, nothing downloaded), checked against independent computations.

- AR: every loglikelihood / rolling loglikelihood against a float64 recomputation from the network's logits,
  greedy generation against a float64 greedy loop, stop strings honoured.
- Masked family: the Monte Carlo estimate against the exact conditional of a toy joint (exact posterior as the
  network), the estimator's expectation against an exhaustive enumeration of its masks on a real DiT, more samples
  shrink the spread as 1/√K, and sampled continuations follow the exact conditional.
"""
import itertools
import json
import math
import os
import string
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mdtrain.config import Config  # noqa: E402
from mdtrain.data.tokenizers import AlphabetTokenizer  # noqa: E402
from mdtrain.exported import load_exported, save_exported  # noqa: E402
from mdtrain.harness import MdtrainLM, Scorer  # noqa: E402
from mdtrain.models import build_model  # noqa: E402
from mdtrain.objectives import ObjectiveConfig, build_objective  # noqa: E402
from mdtrain.objectives.toy import ExactJoint  # noqa: E402

PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " \n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_MC = [{"ctx": "ab", "choices": ["ca", "bb", "ac"], "label": 0},
          {"ctx": "c", "choices": ["abc", "bca", "aaa"], "label": 1},
          {"ctx": "bca", "choices": ["a", "c"], "label": 1}]
TEXT_MC = [{"ctx": "The cat sat on the", "choices": [" mat", " dog", " moon."], "label": 0},
           {"ctx": "def f(x):\n    return", "choices": [" x", " None", " x + 1"], "label": 2}]
TEXT_GEN = [{"prompt": "Once upon a", "answer": " time"}, {"prompt": "import numpy as", "answer": " np"}]
TEXT_ROLL = [{"text": "A short line."},
             {"text": "A document longer than the model length of 32 bytes, so the rolling windows are used."}]


def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _task_yaml(d, name, data, body):
    _write_jsonl(os.path.join(d, f"{name}.jsonl"), data)
    with open(os.path.join(d, f"{name}.yaml"), "w") as fh:
        fh.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d}/{name}.jsonl\n"
                 f"  cache_dir: {d}/hf_cache\ntest_split: test\n" + body)


MC_BODY = ('output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\n'
           'doc_to_target: label\ntarget_delimiter: "DELIM"\nmetric_list:\n  - metric: acc\n')


def _gen_body(until, max_gen_toks):
    return ('output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")


ROLL_BODY = ('output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
             "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


def _evaluate(lm, tasks, task_dir):
    return simple_evaluate(model=lm, tasks=tasks, task_manager=_tasks(task_dir), log_samples=True, bootstrap_iters=0)


def _tasks(task_dir):
    """Only the tasks written here (indexing lm_eval's ~10k shipped task files takes ~20 s)."""
    return TaskManager(include_path=task_dir, include_defaults=False)


def _lls(res, task):
    """[(context, continuation, loglikelihood, is_greedy)] from lm_eval's logged samples."""
    out = []
    for s in res["samples"][task]:
        for (ctx, cont), ((ll, greedy),) in zip(s["arguments"], s["resps"]):
            out.append((ctx, cont, ll, greedy))
    return out


# ----------------------------------------------------------------------------------------------------
# the toy: an explicit joint over {a,b,c}^4 and its exact posterior as the network


@pytest.fixture(scope="module")
def toy():
    tok = AlphabetTokenizer("abc")
    joint = ExactJoint.random(3, 4, seed=0, vocab_size=tok.vocab_size, mask_id=tok.mask_id)
    return tok, joint


def _toy_lm(toy, estimator="llada", mc_samples=2048, seed=1234, objective="mdlm"):
    tok, joint = toy
    obj = build_objective(ObjectiveConfig(name=objective), tok.vocab_size, tok.mask_id)
    return MdtrainLM(scorer=Scorer(joint.denoiser, obj, tok, 4), add_bos=False, estimator=estimator,
                     mc_samples=mc_samples, mc_batch_size=512, seed=seed, device="cpu")


def _exact_conditional(toy, ctx: str, cont: str) -> float:
    tok, joint = toy
    pre, full = tok.encode(ctx), tok.encode(ctx + cont)
    match = lambda ids: (joint.seqs[:, :len(ids)] == torch.tensor(ids)).all(1)  # noqa: E731
    return float(torch.log(joint.p[match(full)].sum() / joint.p[match(pre)].sum()))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tasks"))
    _task_yaml(d, "toy_mc", TOY_MC, MC_BODY.replace("DELIM", ""))
    _task_yaml(d, "toy_gen", [{"prompt": "ab", "answer": "ca"}, {"prompt": "c", "answer": "abc"}], _gen_body(["c"], 3))
    _task_yaml(d, "text_mc", TEXT_MC, MC_BODY.replace("DELIM", ""))
    _task_yaml(d, "text_roll", TEXT_ROLL, ROLL_BODY)
    _task_yaml(d, "toy_roll", [{"text": "abca"}, {"text": "ccab"}, {"text": "bbbcaab"}], ROLL_BODY)
    return d


@pytest.mark.parametrize("estimator", ["llada", "elbo"])
def test_masked_loglikelihood_matches_exact_conditional_of_toy(toy, task_dir, estimator):
    """lm_eval's multiple-choice requests on the exact-posterior toy: the MC estimate of log p(cont | ctx) lies
    within 4 standard errors of the enumerated conditional (plus the ELBO's ~1e-3 schedule-ε slack)."""
    lm = _toy_lm(toy, estimator, mc_samples=2048 if estimator == "llada" else 8192)
    res = _evaluate(lm, ["toy_mc"], task_dir)
    rows = _lls(res, "toy_mc")
    assert len(rows) == sum(len(d["choices"]) for d in TOY_MC)
    records = [r for r in lm.records if r["kind"] == "loglikelihood"]
    assert len(records) == len(rows)
    by_value = {round(r["value"], 12): r["se"] for r in records}
    for ctx, cont, ll, _ in rows:
        exact = _exact_conditional(toy, ctx, cont)
        se = by_value[round(ll, 12)]
        assert se < (0.05 if estimator == "llada" else 0.2)  # LLaDA's l-uniform form: a 4-5x smaller error
        # a one-token continuation is exact under llada (l = 1 always): zero spread, the exact value
        slack = 1e-9 if estimator == "llada" else 0.01 * abs(exact) + 1e-3
        assert abs(ll - exact) < 4 * se + slack, (ctx, cont, ll, exact, se)
    # lm_eval's accuracy is computed from these numbers: the exact argmax per question is what it should pick
    picks = [max(d["choices"], key=lambda c, d=d: _exact_conditional(toy, d["ctx"], c)) for d in TOY_MC]
    acc = sum(p == d["choices"][d["label"]] for p, d in zip(picks, TOY_MC)) / len(TOY_MC)
    assert res["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)
    assert lm.describe()["loglikelihood"] == f"monte_carlo:{estimator}" and "lower bound" in lm.describe()["bound"]


@pytest.mark.parametrize("objective", ["md4", "genmd4", "sedd", "d3pm"])
def test_every_masked_objective_estimates_the_exact_conditional(toy, objective):
    """Each objective's own NELBO (estimator=elbo) and LLaDA's estimator (time-conditioned networks get t from the
    schedule) recover the toy's exact conditional; GenMD4's per-token schedule has no single t for LLaDA's form,
    which is a clear error pointing to estimator=elbo."""
    tok, joint = toy
    obj = build_objective(ObjectiveConfig(name=objective), tok.vocab_size, tok.mask_id)
    # SEDD's network outputs log-scores: the exact posterior shifted by log(V − 1) (objectives/sedd.py)
    net = (lambda x, c=None: joint.denoiser(x, c, offset=math.log(tok.vocab_size - 1))) if objective == "sedd" \
        else joint.denoiser
    for estimator in ("llada", "elbo"):
        if objective == "genmd4" and estimator == "llada":
            with pytest.raises(ValueError, match="use estimator=elbo"):
                MdtrainLM(scorer=Scorer(net, obj, tok, 4), add_bos=False, estimator="llada", device="cpu") \
                    .loglikelihood([Instance("loglikelihood", {}, ("ab", "ca"), 0)], disable_tqdm=True)
            continue
        lm = MdtrainLM(scorer=Scorer(net, obj, tok, 4), add_bos=False, estimator=estimator, mc_samples=4096,
                       mc_batch_size=1024, device="cpu")
        for ctx, cont in [("ab", "ca"), ("c", "abc")]:
            (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)
            exact, se = _exact_conditional(toy, ctx, cont), lm.records[-1]["se"]
            slack = 1e-9 if estimator == "llada" else 0.01 * abs(exact) + 1e-3
            assert abs(ll - exact) < 4 * se + slack, (objective, estimator, ctx, cont, ll, exact, se)


def test_masked_rolling_loglikelihood_is_the_bound_on_the_exact_toy_likelihood(toy, task_dir):
    """loglikelihood_rolling on the toy (model length 4, no BOS): a 4-token document is one window, log p(x); a
    7-token one is log p(x[:4]) + log p(x[4:] | x[3]) — both within 4 standard errors of the exact values. The
    perplexity lm_eval derives from them is labelled a bound."""
    tok, joint = toy
    lm = _toy_lm(toy)
    res = _evaluate(lm, ["toy_roll"], task_dir)
    rolled = [r for r in lm.records if r["kind"] == "loglikelihood_rolling"]
    assert len(rolled) == 3
    for s in res["samples"]["toy_roll"]:
        (ll,) = s["resps"][0]
        text = s["doc"]["text"]
        exact = -float(joint.nll(torch.tensor([tok.encode(text[:4])]))[0])
        if len(text) > 4:
            exact += _exact_conditional(toy, text[3], text[4:])
        se = next(r["se"] for r in rolled if r["value"] == ll)
        assert 0 < se < 0.1 and abs(ll - exact) < 4 * se, (ll, exact, se)
    assert "upper bound" in lm.describe()["bound"]


@pytest.mark.parametrize("ctx", ["ab", "ba", "aa", "bc"])  # ba, aa, bc: one-pass argmax would answer otherwise
def test_masked_is_greedy_is_llada_confidence_first_greedy_decoding(toy, ctx):
    """is_greedy is True exactly for the continuation that greedy decoding reaches: reveal the most confident
    position (its most likely token) one at a time, worked out here from the joint's enumerated conditionals."""
    tok, joint = toy
    fixed = dict(enumerate(tok.encode(ctx)))
    while len(fixed) < 4:
        ok = torch.ones(len(joint.p), dtype=torch.bool)
        for i, v in fixed.items():
            ok &= joint.seqs[:, i] == v
        w = joint.p * ok
        best = None
        for pos in range(4):
            if pos in fixed:
                continue
            marg = torch.stack([w[joint.seqs[:, pos] == v].sum() for v in range(3)]) / w.sum()
            if best is None or marg.max() > best[0]:
                best = (marg.max(), pos, int(marg.argmax()))
        fixed[best[1]] = best[2]
    want = tok.decode([fixed[2], fixed[3]])
    lm = _toy_lm(toy, mc_samples=4)
    answers = ["".join(p) for p in itertools.product("abc", repeat=2)]
    res = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, a), i) for i, a in enumerate(answers)],
                           disable_tqdm=True)
    assert [a for a, (_, greedy) in zip(answers, res) if greedy] == [want]


def test_more_mc_samples_shrink_the_spread(toy):
    """Over 16 seeds, K = 64 draws spread ~4x less than K = 4 (1/√K), and the reported standard error matches the
    spread actually seen across seeds."""
    req = Instance("loglikelihood", {}, ("ab", "ca"), 0)
    spread, reported = {}, {}
    for K in (4, 64):
        vals, ses = [], []
        for seed in range(16):
            lm = _toy_lm(toy, mc_samples=K, seed=seed)
            vals.append(lm.loglikelihood([req], disable_tqdm=True)[0][0])
            ses.append(lm.records[-1]["se"])
        spread[K] = float(torch.tensor(vals, dtype=torch.float64).std())
        reported[K] = float(torch.tensor(ses, dtype=torch.float64).pow(2).mean().sqrt())
    assert spread[64] < spread[4] / 2
    for K in (4, 64):
        assert 0.5 < reported[K] / spread[K] < 2.0, (K, reported[K], spread[K])
    # the same seed gives the same number (the noise is keyed by the seed and the request)
    a, b = (_toy_lm(toy, mc_samples=8, seed=3).loglikelihood([req], disable_tqdm=True) for _ in range(2))
    assert a == b


def test_masked_generation_follows_the_exact_conditional_and_honours_stops(toy, task_dir):
    """The last token sampled (ddpm, float64 draws) after the fixed prefix 'bca' follows the exact conditional,
    which is far from the token's marginal (so a sampler that ignored the context would fail); through lm_eval's
    evaluator, greedy generation stops before the stop string."""
    tok, joint = toy
    lm = _toy_lm(toy)
    lm.sampler = "ddpm"
    reqs = [Instance("generate_until", {}, ("bca", {"until": [], "max_gen_toks": 1, "do_sample": True}), i)
            for i in range(600)]
    outs = lm.generate_until(reqs)
    freq = {c: outs.count(c) / len(outs) for c in "abc"}
    exact = {c: math.exp(_exact_conditional(toy, "bca", c)) for c in "abc"}
    marginal = {c: float(joint.p[joint.seqs[:, 3] == tok.encode(c)[0]].sum()) for c in "abc"}
    assert 0.5 * sum(abs(exact[c] - marginal[c]) for c in "abc") > 0.2
    assert 0.5 * sum(abs(freq[c] - exact[c]) for c in "abc") < 0.06, (freq, exact)
    res = _evaluate(_toy_lm(toy), ["toy_gen"], task_dir)
    for s in res["samples"]["toy_gen"]:
        (text,) = s["filtered_resps"] if isinstance(s["filtered_resps"], list) else [s["filtered_resps"]]
        assert "c" not in text and len(text) <= 3


# ----------------------------------------------------------------------------------------------------
# real networks, loaded from export directories through model_args path=...


def _export(tmp_path_factory, objective, model_name, variant="mdlm"):
    cfg = Config()
    cfg.model.name, cfg.model.flavor, cfg.model.variant, cfg.model.dropout = model_name, "debug", variant, 0.0
    cfg.objective.name = objective
    cfg.data.seq_len = 32
    cfg.validate()
    tok = AlphabetTokenizer(PRINTABLE)  # every generated token is readable text (bytes may not decode)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len)
    with torch.no_grad():  # zero-initialised output/modulation layers would give constant logits: randomise them
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    out = str(tmp_path_factory.mktemp(f"export_{objective}"))
    save_exported(out, model.state_dict(), cfg, tok)
    return out


@pytest.fixture(scope="module")
def ar_export(tmp_path_factory):
    return _export(tmp_path_factory, "ar", "causal")


def _ar_logprobs64(bundle, ids):
    """log p(x_{i+1} | x_{≤i}) in float64 for one token list (mask class suppressed, as the AR objective does)."""
    model = bundle.model.double()
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(x[:, :-1], torch.zeros(1, dtype=torch.float64)).double()
    logits[..., bundle.tokenizer.mask_id] = -math.inf
    return torch.log_softmax(logits, -1)[0].gather(1, x[0, 1:, None]).squeeze(1)


def test_ar_loglikelihoods_match_a_direct_float64_computation(ar_export, task_dir):
    """`model="mdtrain", model_args="path=EXPORT"` through simple_evaluate: each choice's loglikelihood and
    is_greedy, and each document's rolling loglikelihood (windows of the model length), recomputed here."""
    res = simple_evaluate(model="mdtrain", model_args=f"path={ar_export},batch_size=2,device=cpu",
                          tasks=["text_mc", "text_roll"], task_manager=_tasks(task_dir),
                          log_samples=True, bootstrap_iters=0)
    ref = load_exported(ar_export)
    tok, L = ref.tokenizer, ref.cfg.data.seq_len
    rows = _lls(res, "text_mc")
    assert len(rows) == sum(len(d["choices"]) for d in TEXT_MC)
    for ctx, cont, ll, greedy in rows:
        c, full = tok.encode(ctx), tok.encode(ctx + cont)
        lp = _ar_logprobs64(ref, [tok.bos_id] + full)[len(c):]
        assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
        with torch.no_grad():
            logits = ref.model.double()(torch.tensor([[tok.bos_id] + full[:-1]]), torch.zeros(1)).double()[0]
        logits[:, tok.mask_id] = -math.inf
        assert greedy == bool((logits[len(c):].argmax(-1) == torch.tensor(full[len(c):])).all())
    for s in res["samples"]["text_roll"]:
        ids = tok.encode(s["doc"]["text"])
        direct = 0.0
        # lm_eval's rule: window k predicts ids[kL:(k+1)L]; its input is the model length of tokens ending just
        # before its last prediction (the first window starts from BOS), so only the last window has long context
        for start in range(0, len(ids), L):
            end = min(start + L, len(ids))
            prev = [tok.bos_id] if start == 0 else ids[max(0, end - L - 1):start]
            direct += float(_ar_logprobs64(ref, prev + ids[start:end])[-(end - start):].sum())
        (ll,) = s["resps"][0]
        assert ll == pytest.approx(direct, abs=1e-3)
    assert max(len(tok.encode(d["text"])) for d in TEXT_ROLL) > 2 * L  # several windows really were scored


def test_ar_greedy_generation_matches_a_direct_greedy_loop_and_stops(ar_export, tmp_path):
    """generate_until through lm_eval: the text is the float64 greedy continuation, cut at the first stop string
    (chosen here as a character the greedy continuation does produce, so the cut really happens)."""
    ref = load_exported(ar_export)
    tok = ref.tokenizer
    model = ref.model.double()
    greedy = {}
    for d in TEXT_GEN:
        ids = [tok.bos_id] + tok.encode(d["prompt"])
        new = []
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([ids + new]), torch.zeros(1)).double()[0, -1]
                logits[tok.mask_id] = -math.inf
                new.append(int(logits.argmax()))
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        greedy[d["prompt"]] = tok.decode(new, mask_text=None)
    first = greedy[TEXT_GEN[0]["prompt"]]
    stop = next((ch for ch in first[2:] if ch.isalnum()), None)
    if stop is None:
        pytest.fail(f"the greedy continuation {first!r} offers no stop character; change the model seed")
    d = str(tmp_path)
    _task_yaml(d, "text_gen", TEXT_GEN, _gen_body([stop], 12))
    lm = MdtrainLM(path=ar_export, device="cpu")
    res = _evaluate(lm, ["text_gen"], d)
    for s in res["samples"]["text_gen"]:
        want = greedy[s["doc"]["prompt"]]
        want = want[:want.index(stop)] if stop in want else want
        got = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert got == want
    assert len(greedy[TEXT_GEN[0]["prompt"]]) > len(res["samples"]["text_gen"][0]["filtered_resps"][0])


@pytest.mark.parametrize("objective,variant", [("mdlm", "mdlm"), ("md4", "md4")])
def test_masked_estimate_matches_enumeration_of_its_masks_on_a_dit(tmp_path_factory, objective, variant):
    """LLaDA's estimator on a real DiT (loaded from an export): its expectation, enumerated over every l and every
    l-subset of a 3-token continuation (t for the time-conditioned md4 from the schedule in closed form), agrees
    with the Monte Carlo estimate within 4 standard errors."""
    export = _export(tmp_path_factory, objective, "dit", variant)
    lm = MdtrainLM(path=export, mc_samples=4096, mc_batch_size=512, device="cpu")
    ctx_text, cont_text = "Hello wor", "ld!"
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx_text, cont_text), 0)], disable_tqdm=True)
    se = lm.records[-1]["se"]
    ref = load_exported(export)
    tok, obj = ref.tokenizer, ref.objective
    ctx, cont = [tok.bos_id] + tok.encode(ctx_text), tok.encode(cont_text)
    m, n = len(cont), len(ctx) + len(cont)
    x0 = torch.tensor(ctx + cont)
    expect = 0.0
    for l in range(1, m + 1):
        subsets = list(itertools.combinations(range(m), l))
        if obj.time_conditioning:  # md4_linear: P(mask at t) = (1 − 2ε)t + ε
            eps = obj.schedule.eps
            t = torch.tensor([(l / m - eps) / (1 - 2 * eps)], dtype=torch.float64)
            cond = t.float()
        else:
            cond = torch.zeros(1)
        for sub in subsets:
            xt = x0.clone()
            for i in sub:
                xt[len(ctx) + i] = obj.mask_id
            with torch.no_grad():
                logits = ref.model(xt[None], cond).double()[0]
            logits[:, obj.mask_id] = -math.inf
            logp = torch.log_softmax(logits, -1)
            nll = -sum(float(logp[len(ctx) + i, cont[i]]) for i in sub)
            expect += (1 / m) * (m / l) * nll / len(subsets)
    assert n <= 32
    assert se > 0 and abs(-ll - expect) < 4 * se, (ll, expect, se)


def test_python_m_mdtrain_harness_is_lm_evals_cli_with_mdtrain_registered(ar_export, task_dir, tmp_path):
    """The documented command line: lm_eval's own CLI (flags unchanged), the model found by name, results written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mdtrain.harness", "--model", "mdtrain", "--model_args", f"path={ar_export}",
         "--tasks", "text_mc", "--include_path", task_dir, "--device", "cpu", "--output_path", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    assert files, proc.stdout[-2000:]
    with open(files[0]) as fh:
        results = json.load(fh)["results"]
    assert 0.0 <= results["text_mc"]["acc,none"] <= 1.0


def test_mdtrain_lm_eval_wrapper_prints_results_and_the_estimator(tmp_path_factory, task_dir, tmp_path):
    """`mdtrain lm-eval EXPORT --tasks ...` on a masked model: lm_eval's table, the estimator line, and a final
    JSON line whose accuracy is the one lm_eval computed; a bad --model-args value is one line, exit status 2."""
    export = _export(tmp_path_factory, "mdlm", "dit")
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "mdtrain", "lm-eval", export, "--tasks", "text_mc", "--include-path", task_dir,
           "--model-args", "mc_samples=16,seed=7", "--device", "cpu", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["mdtrain"]["loglikelihood"] == "monte_carlo:llada" and last["mdtrain"]["mc_samples"] == 16
    assert last["mdtrain_mc"]["loglikelihood"]["requests"] == sum(len(d["choices"]) for d in TEXT_MC)
    assert "16 samples, seed 7" in proc.stdout and "upper bound" in proc.stdout
    with open(out) as fh:
        assert json.load(fh)["results"]["text_mc"]["acc,none"] == last["results"]["text_mc"]["acc,none"]
    bad = subprocess.run(cmd[:-6] + ["--model-args", "estimator=exact"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 2 and "estimator='exact'" in bad.stderr and "Traceback" not in bad.stderr
