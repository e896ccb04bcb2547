"""Running a scaling-law sweep: the plan (steps from each budget and the model's FLOPs per token, both parameter
counts) against an independent recount on the real module tree; a mini sweep runs end to end (results.jsonl,
report.md, PNGs); a re-run of a finished sweep trains nothing; a crashed cell resumes from its checkpoint to the
loss of an uninterrupted run; unknown sweep keys and changed cells fail with a clear message."""
import glob
import json
import os
import subprocess

import pytest
import yaml

from mdtrain import cli
from mdtrain.config import load_config
from mdtrain.configtools import ConfigError, to_dict
from mdtrain.models import build_model
from mdtrain.sweep import ROW_FIELDS
from mdtrain.sweep.config import load_sweep
from mdtrain.sweep.run import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 16


def write_sweep(tmp_path, name="sweep.yaml", **sweep):
    """A mini sweep file: a tiny model on a synthetic Markov source, a handful of steps per cell."""
    data = {
        "model": {"name": "dit", "flavor": "debug", "cond_dim": 8, "dropout": 0.0},
        "objective": {"name": "mdlm"},
        "data": {"train": "synthetic:markov:vocab=8,branch=2", "seq_len": SEQ},
        "train": {"global_batch_size": BATCH, "micro_batch_size": BATCH, "ema": 0.0, "seed": 3},
        "optim": {"lr": 3e-3, "schedule": "cosine"},
        "checkpoint": {"every": 0},
        "logging": {"every": 1, "progress_bar": False},
        "eval": {"batches": 2, "batch_size": 16, "mc_samples": 2},
        "sweep": {"out": str(tmp_path / "out"), "objectives": ["mdlm", "ar"], "budgets": [1.5e7, 3e7],
                  "sizes": ["1x8x2", "1x16x2"], "threads": 1, "min_steps": 2,
                  "fit": {"parametric": False, "n_boot": 0}, **sweep},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def metrics(cell):
    with open(os.path.join(cell.run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def results(sw):
    with open(sw.results_path) as fh:
        return [json.loads(line) for line in fh]


# ---------------------------------------------------------------------------------------------------------------
# planning


def _recount(model_cfg, vocab, seq_len):
    """Parameter counts from a real (CPU) model: total, and total minus the input embedding and the output head."""
    model = build_model(model_cfg, vocab, seq_len)
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed."))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    cond = sum(p.numel() for n, p in model.named_parameters() if n.startswith("time_embed") or "adaLN" in n)
    return total, total - emb - head, cond, emb


@pytest.mark.parametrize("flops", ["exact", "rule", "6n"])
def test_plan_derives_steps_from_budget_and_flops_per_token(tmp_path, flops):
    sw = load(write_sweep(tmp_path, flops=flops, sizes=["1x8x2", "2x16x4", "ladder-6M"], budgets=[2e7, 1e12],
                          min_steps=5))
    vocab = 8 + 4  # the Markov alphabet plus the tokenizer's specials (pad, bos, eos, mask)
    assert (sw.plan.vocab_size, sw.plan.seq_len) == (vocab, SEQ)
    seen = set()
    for cell in sw.plan.cells:
        d = cell.cfg.model
        causal = cell.objective == "ar"
        assert d.name == ("causal" if causal else "dit")
        total, nonembed, cond, emb = _recount(d, vocab, SEQ)
        assert (cell.params_total, cell.params_nonembed) == (total, nonembed)
        from mdtrain.models.flavors import resolve
        dims = resolve(d)
        L, w = dims.n_layers, dims.d_model
        # Kaplan's rule, written out: 6 x (the parameters a token multiplies) + the non-causal attention term
        assert cell.flops_per_token_rule == pytest.approx(6 * (total - emb - cond) + 12 * L * w * SEQ, rel=1e-12)
        assert cell.flops_per_token_6n == 6 * nonembed
        if causal:  # closed form of the causal model: qkv+out 4w², MLP 8w², causal q·k and p·v, the head
            fwd = L * (2 * 4 * w * w + 2 * 8 * w * w + 2 * w * (SEQ + 1)) + 2 * w * vocab
            assert cell.flops_per_token_exact == pytest.approx(3 * fwd, rel=1e-12)
        fpt = {"exact": cell.flops_per_token_exact, "rule": cell.flops_per_token_rule, "6n": 6.0 * nonembed}[flops]
        assert cell.flops_per_token == fpt
        steps = round(cell.budget / (fpt * BATCH * SEQ))
        assert cell.steps == steps and cell.tokens == steps * BATCH * SEQ
        assert abs(cell.flops_used - cell.budget) <= 0.5 * fpt * BATCH * SEQ  # within half a step of the budget
        assert cell.cfg.train.steps == steps and cell.cfg.optim.schedule == "cosine"
        assert cell.cfg.optim.warmup_steps == round(0.01 * steps)
        assert cell.cfg.train.run_dir == os.path.join(sw.out, "cells", cell.name)
        seen.add((cell.objective, cell.size, cell.budget))
    # every (objective, size, budget) is planned unless its budget buys fewer than min_steps steps
    left = {name for name, _, _ in sw.plan.left_out}
    for obj in ("mdlm", "ar"):
        for size in ("1x8x2", "2x16x4", "ladder-6M"):
            for c in (2e7, 1e12):
                name = f"{obj}-{size}-C{'2e7' if c == 2e7 else '1e12'}"
                assert ((obj, size, c) in seen) != (name in left), name
    assert "mdlm-ladder-6M-C2e7" in left and "ar-1x8x2-C1e12" not in left


def test_cells_rebuilt_from_base_yaml_and_overrides_are_the_planned_configs(tmp_path, capsys):
    """Subprocess and SLURM cells run `mdtrain train SWEEP_OUT/base.yaml OVERRIDES`: that must be the planned config;
    the SLURM plan is one job array over the unfinished cells, as the launcher renders it."""
    path = write_sweep(tmp_path, executor="slurm", overrides={"ar": ["optim.lr=1e-3"]},
                       launch={"array_parallelism": 3, "partition": "cpu"})
    assert cli.main(["sweep", path, "plan"]) == 0
    out = capsys.readouterr().out
    sw = load(path)
    assert len(sw.plan.cells) == 8
    for cell in sw.plan.cells:
        assert to_dict(load_config(sw.base_yaml, cell.overrides)) == to_dict(cell.cfg)
        assert cell.cfg.optim.lr == (1e-3 if cell.objective == "ar" else 3e-3)
    assert "#SBATCH --array=0-7%3" in out and "#SBATCH --partition=cpu" in out
    assert not os.path.exists(os.path.join(sw.out, "cells")), "plan must not start any cell"


# ---------------------------------------------------------------------------------------------------------------
# running


def test_mini_sweep_end_to_end_then_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path)
    assert cli.main(["sweep", path, "run"]) == 0
    sw = load(path)
    rows = results(sw)
    assert len(rows) == len(sw.plan.cells) == 8
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for cell, row in zip(sw.plan.cells, rows):
        assert set(ROW_FIELDS) <= set(row)
        final = [m for m in metrics(cell) if m.get("split") == "valid"]
        assert len(final) == 1 and final[0]["step"] == cell.steps
        assert row["loss"] == final[0]["nll"]  # the final validation NELBO / NLL of the cell
        trained = [m["step"] for m in metrics(cell) if "split" not in m]
        assert trained == list(range(1, cell.steps + 1))
        assert (row["objective"], row["flavor"], row["budget_flops"]) == (cell.objective, cell.size, cell.budget)
        assert (row["params_total"], row["params_nonembed"]) == (cell.params_total, cell.params_nonembed)
        assert (row["steps"], row["tokens"]) == (cell.steps, cell.steps * BATCH * SEQ)
        assert row["loss_bound"] == ("exact" if cell.objective == "ar" else "upper")
        from mdtrain.data.synthetic import entropy_per_token
        assert row["entropy_per_token"] == entropy_per_token(cell.cfg.data.train, cell.cfg.data.seq_len)
        assert row["commit"] == (head or "unknown") and row["wall_s"] > 0 and row["wall_source"] == "driver"
        # every cell is evaluated on the same 2 x 16 validation sequences (AR scores positions 1.., MDLM all)
        assert row["eval_tokens"] == 2 * 16 * (SEQ - 1 if cell.objective == "ar" else SEQ)
    rep = os.path.join(sw.out, "report")
    text = open(os.path.join(rep, "report.md")).read()
    assert "IsoFLOP" in text and "mdlm" in text and "ar" in text
    for png in ("isoflop.png", "compute_optimal.png", "loss_vs_compute.png"):
        with open(os.path.join(rep, png), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert len(open(os.path.join(rep, "results.csv")).read().splitlines()) == 1 + 8

    # re-run: nothing is trained or even built, nothing in the cells changes, no row is added
    before = {c.name: open(os.path.join(c.run_dir, "metrics.jsonl")).read() for c in sw.plan.cells}
    ckpts = {c.name: sorted(os.listdir(os.path.join(c.run_dir, "checkpoints"))) for c in sw.plan.cells}
    import mdtrain.trainer

    def no_training(*a, **k):
        raise AssertionError("a finished cell was built again")
    monkeypatch.setattr(mdtrain.trainer.Trainer, "__init__", no_training)
    capsys.readouterr()
    assert cli.main(["sweep", "run", path]) == 0  # the action may also come first
    assert "8 cell(s) done, 0 to run" in capsys.readouterr().out
    assert before == {c.name: open(os.path.join(c.run_dir, "metrics.jsonl")).read() for c in sw.plan.cells}
    assert ckpts == {c.name: sorted(os.listdir(os.path.join(c.run_dir, "checkpoints"))) for c in sw.plan.cells}
    assert results(sw) == rows
    assert cli.main(["sweep", path, "collect"]) == 0 and results(sw) == rows

    # a cell started under another config is refused, naming what changed
    capsys.readouterr()
    assert cli.main(["sweep", path, "run", "optim.lr=2e-3"]) == 2
    assert "optim.lr: 0.003 -> 0.002" in capsys.readouterr().err
    assert results(sw) == rows


def test_crashed_cell_resumes_from_its_checkpoint_to_the_uninterrupted_loss(tmp_path, monkeypatch):
    one = dict(objectives=["ar"], sizes=["1x16x2"], budgets=[3.5e7])
    (tmp_path / "ref").mkdir()
    ref_path = write_sweep(tmp_path / "ref", **one)
    assert cli.main(["sweep", ref_path, "run"]) == 0
    ref = load(ref_path)
    (ref_cell,) = ref.plan.cells
    ref_loss = results(ref)[0]["loss"]
    assert ref_cell.steps >= 10

    path = write_sweep(tmp_path, **one, out=str(tmp_path / "crash"))
    import mdtrain.trainer
    real_step = mdtrain.trainer.Trainer.train_step

    def crash_at_6(self, read=True):
        if self.step == 6:
            raise RuntimeError("simulated node failure")
        return real_step(self, read)
    monkeypatch.setattr(mdtrain.trainer.Trainer, "train_step", crash_at_6)
    assert cli.main(["sweep", path, "run", "checkpoint.every=4"]) == 1  # the cell failed; the sweep says so
    sw = load(path, ["checkpoint.every=4"])
    (cell,) = sw.plan.cells
    from mdtrain.sweep.plan import cell_status
    assert cell_status(cell) == ("partial", f"checkpoint at step 4 of {cell.steps}")
    assert not os.path.exists(sw.results_path) or results(sw) == []
    monkeypatch.setattr(mdtrain.trainer.Trainer, "train_step", real_step)

    # while another process trains the cell (holds its lock), a second driver leaves it alone
    from mdtrain.sweep.run import lock_cell
    held = lock_cell(cell)
    before = open(os.path.join(cell.run_dir, "metrics.jsonl")).read()
    assert cli.main(["sweep", path, "run", "checkpoint.every=4", "sweep.executor=subprocess"]) == 1
    assert open(os.path.join(cell.run_dir, "metrics.jsonl")).read() == before
    os.close(held)

    # the second attempt runs as a subprocess (`python -m mdtrain train base.yaml overrides`) and resumes at step 4
    assert cli.main(["sweep", path, "run", "checkpoint.every=4", "sweep.executor=subprocess"]) == 0
    steps = [m["step"] for m in metrics(cell) if "split" not in m]
    assert steps == list(range(1, 7)) + list(range(5, cell.steps + 1))
    (row,) = results(sw)
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-6, abs=0)
    attempts = [json.loads(line) for line in open(os.path.join(cell.run_dir, "attempts.jsonl"))]
    assert [a["status"] for a in attempts] == ["failed", "done"]
    assert row["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts))


# ---------------------------------------------------------------------------------------------------------------
# config errors


def test_unknown_sweep_keys_fail_naming_the_closest_key(tmp_path, capsys):
    path = write_sweep(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key 'sweep.budgts' \(did you mean 'sweep.budgets'\?\)"):
        load_sweep(path, ["sweep.budgts=[1e9]"])
    data = yaml.safe_load(open(path))
    data["sweep"]["sizez"] = data["sweep"].pop("sizes")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"unknown key 'sweep.sizez' \(did you mean 'sweep.sizes'\?\)"):
        load_sweep(str(bad))
    assert cli.main(["sweep", path, "plan", "sweep.fit.param=total"]) == 2
    assert "did you mean 'sweep.fit.params'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval.batches is shared by every cell"):
        load_sweep(path, ["sweep.overrides={ar: [eval.batches=3]}"])
    with pytest.raises(ConfigError, match="does not decay the learning rate"):
        load(path, ["optim.schedule=constant_warmup"])
    assert cli.main(["sweep", path, "plan", "fit"]) == 2
    assert "one action at a time" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# shipped sweep files


def _is_sweep_file(path):
    with open(path) as fh:
        data = yaml.safe_load(fh)
    return isinstance(data, dict) and "sweep" in data


SWEEP_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if _is_sweep_file(p))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=os.path.basename)
def test_shipped_sweep_files_plan_every_cell(path, tmp_path):
    """Each shipped sweep plans its whole grid (prepared corpora swapped for a synthetic source of the same length)
    with every cell annealed to its own end and its compute within half a step of its budget."""
    base, sweep = load_sweep(path)
    over = [f"sweep.out={tmp_path / 'out'}"]
    if not base.data.train.startswith("synthetic:"):
        over.append("data.train=synthetic:markov:vocab=32")
    sw = load(path, over)
    assert not sw.plan.left_out
    assert len(sw.plan.cells) == len(sweep.budgets) * sum(len(sweep.sizes_for(o)) for o in sweep.objectives)
    for cell in sw.plan.cells:
        per_step = cell.flops_per_token * cell.global_batch_size * cell.seq_len
        assert abs(cell.flops_used - cell.budget) <= per_step / 2
        assert cell.cfg.optim.schedule in ("cosine", "wsd") and cell.cfg.optim.warmup_steps < cell.steps
        assert cell.cfg.objective.name == cell.objective
    if os.path.basename(path) == "sweep_demo.yaml":  # the CPU demo: 3 budgets x 3-4 sizes x {mdlm, ar}, synthetic
        assert sorted(sweep.objectives) == ["ar", "mdlm"] and len(sweep.budgets) == 3
        assert all(3 <= len(sweep.sizes_for(o)) <= 4 for o in sweep.objectives)
        assert base.data.train.startswith("synthetic:")
        # its 15-minute promise on 2 cores: ~58k steps took ~600 CPU-s (about 10 ms per step at these sizes),
        # 2 cells at a time; a grid that grows much beyond that breaks the promise
        assert sum(c.steps for c in sw.plan.cells) < 65_000
        assert sweep.executor == "subprocess" and sweep.parallel == 2 and sweep.threads == 1


def test_submitit_local_executor_runs_cells_as_launcher_jobs(tmp_path):
    """executor=local: each cell is a submitit LocalExecutor job made by mdtrain/launch/slurm.py (`mdtrain train BASE
    OVERRIDES` in a fresh process); its loss equals the in-process run of the same cell."""
    one = dict(objectives=["ar"], sizes=["1x16x2"], budgets=[3e7], threads=0)
    ref_path = write_sweep(tmp_path, "ref.yaml", out=str(tmp_path / "ref"), **one)
    assert cli.main(["sweep", ref_path, "run"]) == 0
    path = write_sweep(tmp_path, **one, executor="local", launch={"cpus_per_task": 2})
    assert cli.main(["sweep", path, "run"]) == 0
    sw = load(path)
    (row,) = results(sw)
    assert row["loss"] == pytest.approx(results(load(ref_path))[0]["loss"], rel=1e-6, abs=0)
    assert row["wall_source"] == "metrics" and row["wall_s"] > 0  # timed from the logged throughput
    assert os.listdir(os.path.join(sw.out, "submitit"))  # the launcher's job folder


def test_no_compute_multiplier_against_a_frontier_that_does_not_fall():
    """A reference whose loss does not fall with compute (AR at its data's entropy, as a small sweep can reach) has
    no inverse C(L): no multiplier, instead of one extrapolated to absurdity."""
    from mdtrain.sweep import compute_multiplier, fit_loss_vs_compute
    c = [1e11, 3e11, 1e12]
    ar = fit_loss_vs_compute(c, [0.78, 0.78, 0.78], objective="ar")
    mdlm = fit_loss_vs_compute(c, [2.0 * (x / 1e11) ** -0.1 for x in c], objective="mdlm")
    assert mdlm.gamma == pytest.approx(0.1) and abs(ar.gamma) < 1e-9
    m = compute_multiplier(mdlm, ar)
    assert m.status == "not_decreasing" and not m.usable and "ar frontier" in m.message
