"""The paired-ablation harness (``python -m fastmask.reproduce``): settings, pairing, statistics, and a
smoke run through the real training driver on a tiny budget (in-process, seconds)."""
from __future__ import annotations

import json
import math
import os

import pytest

from fastmask import reproduce
from fastmask.config import load_config
from fastmask.data.builtin import parse_builtin


@pytest.mark.parametrize("paper", reproduce.PAPERS)
@pytest.mark.parametrize("scale", reproduce.SCALES)
def test_every_setting_is_a_valid_training_config(paper, scale, tmp_path):
    plan = reproduce.load_plan(paper, scale, work_root=str(tmp_path))
    if plan.teacher is not None:  # the students' configs check that the teacher checkpoint exists
        os.makedirs(plan.teacher.work_dir)
        open(os.path.join(plan.teacher.work_dir, "checkpoint.pt"), "w").close()
    assert len(plan.seeds) >= 3 and len(plan.settings) >= 2 and plan.claims
    for run in plan.runs:
        cfg = load_config(config=run.recipe, overrides=run.overrides)
        assert cfg.method_name == load_config(config=plan.runs[-1].recipe).method_name or run is plan.teacher
        parse_builtin(cfg.data.data.split(":", 1)[1])
        if run.seed is not None:
            assert cfg.seed == run.seed
    # paired: every setting at every seed, seed-major, one hash per run
    students = plan.student_runs()
    assert [(r.seed, r.setting) for r in students] == [(s, n) for s in plan.seeds for n in plan.settings]
    assert len({r.hash for r in plan.runs}) == len(plan.runs)


def test_settings_that_differ_only_in_the_setting():
    plan = reproduce.load_plan("attmask", "cpu")
    by = {(r.setting, r.seed): r.overrides for r in plan.runs}
    a, b = by[("attmask_high", 1)], by[("random", 1)]
    assert [o for o in a if o not in b] == ["method.mask=attmask_high"]
    assert [o for o in b if o not in a] == ["method.mask=block"]
    with pytest.raises(ValueError, match="unknown setting"):
        reproduce.load_plan("attmask", "cpu", settings=["attmask_medium"])
    with pytest.raises(ValueError, match="unknown paper"):
        reproduce.load_plan("mae", "cpu")


def test_paired_difference_t_interval_and_verdicts():
    a = {0: 50.0, 1: 52.0, 2: 54.0, 5: 99.0}
    b = {0: 49.0, 1: 50.0, 2: 51.0}
    d = reproduce.paired_difference(a, b)  # diffs 1, 2, 3 over the shared seeds
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(2.0)
    assert d["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2)
    assert d["ci"] == pytest.approx([2.0 - half, 2.0 + half])
    assert reproduce.claim_verdict(">", d, 1.0) == "not shown (CI includes 0)"
    tight = reproduce.paired_difference({0: 3.0, 1: 3.1, 2: 2.9}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert reproduce.claim_verdict(">", tight, 1.0) == "reproduces"
    neg = reproduce.paired_difference({0: 0.0, 1: 0.0, 2: 0.0}, {0: 3.0, 1: 3.1, 2: 2.9})
    assert reproduce.claim_verdict(">=", neg, 1.0) == "reversed"
    assert reproduce.claim_verdict("~", reproduce.paired_difference({0: 1.0, 1: 1.2}, {0: 1.1, 1: 1.1}), 1.5) \
        .startswith("reproduces")
    assert reproduce.claim_verdict("~", tight, 1.5).startswith("not equivalent")
    assert reproduce.claim_verdict(">", reproduce.paired_difference({0: 1.0}, {0: 0.0}), 1.0) == "too few seeds"


@pytest.mark.slow
def test_smoke_run_writes_results_and_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["maskedkd", "--scale", "smoke", "--settings", "no_kd,maskedkd_top50", "--runner", "inprocess",
            "--work", str(work), "--out", str(out)]
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    assert reproduce.main(argv) == 0
    results = json.load(open(out / "results.json"))
    assert results["teacher"]["summary"]["val_top1"] >= 0
    for setting in ("no_kd", "maskedkd_top50"):
        runs = results["runs"][setting]
        assert sorted(runs) == ["0", "1", "2"]
        for rec in runs.values():
            assert 0.0 <= rec["metric"] <= 100.0 and rec["metric"] == rec["summary"]["val_top1"]
            assert "teacher_val_top1" in rec["summary"] and "knn_top1" in rec["summary"]
            assert rec["code"] == reproduce.code_version() and rec["code"]  # the commit (or version) it ran on
    claim = results["stats"]["claims"]
    assert claim == [] or claim[0]["n"] == 3  # no claim pairs these two settings alone
    st = results["stats"]["settings"]["no_kd"]
    assert st["n"] == 3 and st["mean"] == pytest.approx(sum(st["per_seed"].values()) / 3)
    table = open(out / "table.md").read()
    assert "| no_kd | 3/3 |" in table and "Teacher (teacher:supervised_deep)" in table
    assert "Chance level of val_top1: 10%." in table  # builtin:objects: 10 classes
    assert f"Code of the runs: {reproduce.code_version()} (6)." in table
    assert open(out / "plot.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # Resume: everything is finished, so nothing trains again, even with the work folders gone.
    import fastmask.train

    monkeypatch.setattr(fastmask.train, "main", lambda argv: pytest.fail("retrained a finished run"))
    capsys.readouterr()
    for marker in work.rglob("run.json"):
        if "teachers" not in str(marker):
            marker.unlink()
    assert reproduce.main(argv) == 0
    assert "0 to go" in capsys.readouterr().out
    # A budget that is already spent starts nothing and says how to continue.
    assert reproduce.main(argv[:4] + ["no_kd,full_teacher", *argv[5:], "--budget", "1e-9"]) == 0
    assert "budget of 0 s spent" in capsys.readouterr().out


def test_a_recorded_run_with_renamed_config_keys_is_the_same_run(tmp_path):
    plan = reproduce.load_plan("maskedkd", "cpu", work_root=str(tmp_path))
    run = plan.student_runs()[1]
    old = [o.replace("method.teacher.arch=", "method.teacher_arch=") for o in run.overrides]
    assert old != run.overrides
    results = {"runs": {run.setting: {str(run.seed): {"hash": "0" * 16, "recipe": run.recipe, "overrides": old,
                                                       "metric": 1.0}}}, "teacher": None}
    assert reproduce._known(results, run)["hash"] == run.hash
    other = plan.student_runs()[2]  # another setting's record is not this run
    results["runs"][run.setting][str(run.seed)]["overrides"] = other.overrides
    assert reproduce._known(results, run) is None
