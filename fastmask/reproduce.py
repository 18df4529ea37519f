"""``python -m fastmask.reproduce PAPER``: a paper's paired ablation at small scale.

    python -m fastmask.reproduce attmask --scale cpu              # AttMask high / random / low, 3 seeds
    python -m fastmask.reproduce maskedkd --scale cpu --budget 3600   # stop (resumably) after an hour
    python -m fastmask.reproduce maskedkd --dry-run               # print the runs and their overrides
    python -m fastmask.reproduce attmask --report-only            # rebuild table/plot from results.json

Papers: attmask, random_masking_dino, maskedkd, masksub, maskdistill.  Their settings, seeds and
claims live in ``fastmask/reproduce.yaml`` (fixed before any result was looked at).  Every setting
runs with the same seeds, so that seed ``s`` of two settings differs only in the setting: the
comparison is paired, a difference per seed, and the table reports the mean difference with a 95%
t-interval over seeds next to each setting's mean +- std.

Runs are ``python -m fastmask.train`` processes (``--runner inprocess`` calls the same CLI in this
process, for tests).  A run is finished when its work folder holds ``run.json`` with the run's
hash (recipe + overrides + the teacher's hash), or when ``results.json`` in the output folder
already lists it with that hash, so committed results are never recomputed; an unfinished run
continues from its last checkpoint (``resume=auto``; the driver checkpoints every epoch).
``--budget SECONDS`` is a wall-clock cap: no run starts after it and a running one is stopped at
it (its checkpoint stays); running the same command again continues.

Outputs (``--out``, default ``bench/results/reproduce-PAPER-SCALE``): ``results.json`` (every
run's metric, summary, wall and CPU seconds, hash; the statistics), ``table.md`` and ``plot.png``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import yaml

__all__ = ["PAPERS", "Plan", "Run", "load_plan", "paired_difference", "claim_verdict", "summarise",
           "format_table", "main"]

SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reproduce.yaml")
PAPERS = ("attmask", "random_masking_dino", "maskedkd", "masksub", "maskdistill")
SCALES = ("cpu", "cpu_long", "gpu", "smoke")
RELATIONS = (">", ">=", "~")
# Config keys renamed since results were recorded (old -> new): a recorded run whose overrides equal
# a planned run's up to these names is the same run.
_RENAMED_KEYS = {f"method.teacher_{k}": f"method.teacher.{k}"
                 for k in ("arch", "checkpoint", "depth", "embed_dim", "num_heads", "patch_size")}


@dataclass
class Run:
    """One training: a setting at a seed (or a paper's prerequisite teacher)."""

    name: str  # "setting/seed0" or "teacher:supervised_deep"
    setting: str
    seed: Optional[int]
    recipe: str
    overrides: List[str]
    work_dir: str
    hash: str

    @property
    def finished_marker(self) -> str:
        return os.path.join(self.work_dir, "run.json")


@dataclass
class Plan:
    paper: str
    scale: str
    title: str
    metric: str
    settings: List[str]
    seeds: List[int]
    claims: List[List[str]]
    equivalence_margin: float
    runs: List[Run]
    teacher: Optional[Run] = None
    out_dir: str = ""
    chance: Optional[float] = None  # the metric of a guess (100 / classes), drawn and printed beside results

    def student_runs(self) -> List[Run]:
        return [r for r in self.runs if r.seed is not None]


def _read_spec(path: str = SETTINGS_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _hash(recipe: str, overrides: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([recipe, list(overrides)]).encode()).hexdigest()[:16]


def load_plan(paper: str, scale: str = "cpu", *, work_root: str = "runs/reproduce", out_dir: Optional[str] = None,
              seeds: Optional[Sequence[int]] = None, settings: Optional[Sequence[str]] = None,
              spec: Optional[dict] = None) -> Plan:
    """The runs of ``paper`` at ``scale``: the teacher first (if any), then seed-major (every setting
    at seed 0, then at seed 1, ...) so that a cut-short sweep still holds complete pairs."""
    spec = spec or _read_spec()
    if paper not in spec["papers"]:
        raise ValueError(f"unknown paper {paper!r}; choose one of {', '.join(spec['papers'])}")
    if scale not in spec["scales"]:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(spec['scales'])}")
    p = spec["papers"][paper]
    sc = spec["scales"][scale]
    p_scale = (p.get("scales") or {}).get(scale) or {}
    names = list(settings) if settings else list(p_scale.get("settings") or p["settings"])
    for s in names:
        if s not in p["settings"]:
            raise ValueError(f"{paper}: unknown setting {s!r}; choose among {', '.join(p['settings'])}")
    seeds = [int(s) for s in (seeds if seeds is not None else sc["seeds"])]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    common = list(sc.get("common") or [])

    teacher = None
    teacher_ref = None
    if p.get("teacher"):
        t = spec["teachers"][p["teacher"]]
        t_over = common + list(t.get("overrides") or []) + list((t.get("scales") or {}).get(scale) or [])
        t_hash = _hash(t["recipe"], t_over)
        t_dir = os.path.join(work_root, "teachers", f"{p['teacher']}-{scale}-{t_hash}")
        teacher = Run(f"teacher:{p['teacher']}", "teacher", None, t["recipe"], t_over, t_dir, t_hash)
        teacher_ref = (os.path.join(t_dir, "checkpoint.pt"), t_hash)

    runs = [teacher] if teacher else []
    paper_dir = os.path.join(work_root, f"{paper}-{scale}")
    base = common + list(p.get("common") or []) + list(p_scale.get("overrides") or [])
    for seed in seeds:
        for name in names:
            over = base + list(p["settings"][name]) + [f"seed={seed}"]
            hashed = [o.replace("{teacher}", f"teacher:{teacher_ref[1]}") if teacher_ref else o for o in over]
            if teacher_ref:
                over = [o.replace("{teacher}", teacher_ref[0]) for o in over]
            elif any("{teacher}" in o for o in over):
                raise ValueError(f"{paper}: a setting names {{teacher}} but the paper has no teacher")
            h = _hash(p["recipe"], hashed)
            runs.append(Run(f"{name}/seed{seed}", name, seed, p["recipe"], over,
                            os.path.join(paper_dir, name, f"seed{seed}"), h))
    claims = [list(c) for c in p.get("claims") or [] if c[0] in names and c[2] in names]
    for a, rel, b in claims:
        if rel not in RELATIONS:
            raise ValueError(f"{paper}: claim relation {rel!r} must be one of {RELATIONS}")
    return Plan(paper, scale, p.get("title", paper), p["metric"], names, seeds, claims,
                float(p.get("equivalence_margin", 1.0)), runs, teacher,
                out_dir or os.path.join("bench", "results", f"reproduce-{paper}-{scale}"),
                float(sc["chance"]) if sc.get("chance") is not None else None)


# ------------------------------------------------------------------------------------ statistics

def _t_quantile(q: float, df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(q, df))
    except ImportError:  # two-sided 95% only, df 1..10 (beyond: normal approximation)
        table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
        return table[df - 1] if df <= len(table) else 1.96


def paired_difference(a: Dict[int, float], b: Dict[int, float], confidence: float = 0.95) -> dict:
    """Mean of ``a[s] - b[s]`` over the seeds both have, its std and a t-interval (None below 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    out = {"n": n, "seeds": seeds, "diffs": diffs, "mean": None, "std": None, "ci": None}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n >= 2:
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = _t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci=[mean - half, mean + half])
    return out


def claim_verdict(rel: str, diff: dict, margin: float) -> str:
    """``reproduces`` / ``reversed`` / ``not shown`` (the CI cannot decide) / ``too few seeds``."""
    if diff["ci"] is None:
        return "too few seeds"
    lo, hi = diff["ci"]
    if rel in (">", ">="):
        if lo > 0:
            return "reproduces"
        if hi < 0:
            return "reversed"
        return "not shown (CI includes 0)"
    if -margin <= lo and hi <= margin:
        return f"reproduces (CI within +-{margin:g})"
    if lo > margin or hi < -margin:
        return f"not equivalent (CI outside +-{margin:g})"
    return f"not shown (CI wider than +-{margin:g})"


def _mean_std(values: Sequence[float]):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def summarise(plan: Plan, results: dict) -> dict:
    """Per-setting mean/std and per-claim paired differences of ``plan.metric``."""
    per = {s: {int(seed): r["metric"] for seed, r in results["runs"].get(s, {}).items() if int(seed) in plan.seeds}
           for s in plan.settings}
    settings = {}
    for s in plan.settings:
        mean, std = _mean_std([per[s][k] for k in sorted(per[s])])
        settings[s] = {"n": len(per[s]), "mean": mean, "std": std, "per_seed": per[s]}
    claims = []
    for a, rel, b in plan.claims:
        d = paired_difference(per[a], per[b])
        claims.append({"claim": f"{a} {rel} {b}", "a": a, "relation": rel, "b": b, **d,
                       "verdict": claim_verdict(rel, d, plan.equivalence_margin)})
    return {"settings": settings, "claims": claims}


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(plan: Plan, results: dict) -> str:
    stats = results["stats"]
    lines = [f"### {plan.paper} ({plan.scale} scale): {plan.metric}, seeds {plan.seeds}", ""]
    t = results.get("teacher")
    if t:
        acc = t["summary"].get("val_top1")
        lines += [f"Teacher ({t['name']}): val top-1 {_fmt(acc)}%.", ""]
    lines += [f"| setting | seeds done | {plan.metric} mean ± std | per seed |", "|---|---|---|---|"]
    for s in plan.settings:
        st = stats["settings"][s]
        per = ", ".join(f"{st['per_seed'][k]:.1f}" for k in sorted(st["per_seed"])) or "-"
        lines.append(f"| {s} | {st['n']}/{len(plan.seeds)} | {_fmt(st['mean'])} ± {_fmt(st['std'])} | {per} |")
    if stats["claims"]:
        lines += ["", "| paper's claim | paired seeds | mean difference [95% CI] | verdict |", "|---|---|---|---|"]
        for c in stats["claims"]:
            ci = f"[{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]" if c["ci"] else "[-]"
            mean = "-" if c["mean"] is None else f"{c['mean']:+.1f}"
            lines.append(f"| {c['claim']} | {c['n']} | {mean} {ci} | {c['verdict']} |")
    cpu = sum(r.get("cpu_seconds") or 0 for runs in results["runs"].values() for r in runs.values())
    wall = sum(r.get("wall_seconds") or 0 for runs in results["runs"].values() for r in runs.values())
    if plan.chance is not None:
        lines += ["", f"Chance level of {plan.metric}: {plan.chance:g}%."]
    codes = collections.Counter(r.get("code") or "not recorded" for runs in results["runs"].values()
                                for r in runs.values())
    if codes:
        lines += ["", "Code of the runs: " + ", ".join(f"{c} ({n})" for c, n in sorted(codes.items())) + "."]
    lines += ["", f"Runs finished: {sum(st['n'] for st in stats['settings'].values())}/"
                  f"{len(plan.settings) * len(plan.seeds)}; {wall / 3600:.2f} h wall, {cpu / 3600:.2f} CPU-h "
                  f"(students; teacher excluded)."]
    return "\n".join(lines) + "\n"


def save_plot(plan: Plan, results: dict, path: str) -> Optional[str]:
    """Each seed a line across the settings (the pairing), and each setting's mean ± std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stats = results["stats"]["settings"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(plan.settings), 3.2))
    xs = range(len(plan.settings))
    for seed in plan.seeds:
        ys = [stats[s]["per_seed"].get(seed, float("nan")) for s in plan.settings]
        ax.plot(xs, ys, "-o", color="0.7", lw=1, ms=3, zorder=1)
    means = [stats[s]["mean"] if stats[s]["mean"] is not None else float("nan") for s in plan.settings]
    stds = [stats[s]["std"] or 0.0 for s in plan.settings]
    ax.errorbar(xs, means, yerr=stds, fmt="s", color="C3", capsize=4, zorder=2, label="mean ± std")
    ax.set_ylabel(plan.metric)
    if plan.chance is not None:  # a result near this line says the features learnt nothing yet
        seen = [v for s in plan.settings for v in stats[s]["per_seed"].values()]
        lo, hi = (min(seen), max(seen)) if seen else (plan.chance, plan.chance)
        if plan.chance >= lo - 2 * max(hi - lo, 1.0):
            ax.axhline(plan.chance, ls="--", lw=0.8, color="0.4", zorder=0, label=f"chance ({plan.chance:g}%)")
        else:  # far below the results: a line there would squash the differences that matter
            ax.set_ylabel(f"{plan.metric} (chance {plan.chance:g}%)")
    ax.set_xticks(list(xs), plan.settings, rotation=15, fontsize=8)
    ax.set_title(f"{plan.paper} ({plan.scale}): grey = one seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ running

def _summary_of(work_dir: str) -> Optional[dict]:
    """The driver's final record (``event: end``) in ``work_dir/metrics.jsonl``, if the run ended."""
    path = os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    end = None
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("event") == "end":
                    end = rec
    return end


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _train_argv(run: Run) -> List[str]:
    return ["--config", run.recipe, *run.overrides, f"output_dir={run.work_dir}", "resume=auto",
            "progress_bar=true"]


def _execute(run: Run, runner: str, timeout: Optional[float]) -> str:
    """Train ``run``; ``"done"``, ``"timeout"`` (stopped at the budget, resumable) or ``"failed"``."""
    os.makedirs(run.work_dir, exist_ok=True)
    argv = _train_argv(run)
    if runner == "inprocess":
        from .train import main as train_main

        return "done" if train_main(argv) == 0 else "failed"
    log_path = os.path.join(run.work_dir, "train.log")
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fastmask.train", *argv], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timeout"
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        print(f"[reproduce] {run.name} failed (exit {rc}); last lines of {log_path}:\n{tail}", file=sys.stderr)
        return "failed"
    return "done"


def _prepare_work_dir(run: Run) -> str:
    """Make ``run.work_dir`` hold this run only: a folder left by other settings (another hash) is
    cleared, so ``resume=auto`` never continues a different run."""
    stamp = os.path.join(run.work_dir, "hash")
    if os.path.isdir(run.work_dir):
        old = open(stamp).read().strip() if os.path.isfile(stamp) else None
        if old != run.hash:
            shutil.rmtree(run.work_dir)
    os.makedirs(run.work_dir, exist_ok=True)
    if os.path.isfile(os.path.join(run.work_dir, "checkpoint.pt")):
        return "continuing from its checkpoint"
    with open(stamp, "w") as f:
        f.write(run.hash + "\n")
    return "starting"


def _load_results(plan: Plan) -> dict:
    path = os.path.join(plan.out_dir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("paper") == plan.paper and old.get("scale") == plan.scale:
            return old
    return {"paper": plan.paper, "scale": plan.scale, "runs": {}, "teacher": None}


def code_version() -> str:
    """The commit of the code a run starts on (``+dirty`` when its sources differ from it), or the
    package version outside a git checkout.  A run's hash covers its settings, not the code, so
    results made by different code stay comparable only when this says which code made them."""
    from . import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "-C", root]
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=20)
        # only fastmask's own checkout: an installed copy may sit inside some other repository
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), root):
            sha = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                 timeout=20).stdout.strip()
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "fastmask",
                                          "kernels", "csrc"], capture_output=True, text=True, timeout=20)
            return sha + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"fastmask {__version__}"


def _record(run: Run, plan: Plan, summary: dict, wall: Optional[float], cpu: Optional[float],
            code: Optional[str] = None) -> dict:
    rec = {"name": run.name, "hash": run.hash, "overrides": run.overrides, "recipe": run.recipe,
           "summary": summary, "wall_seconds": wall, "cpu_seconds": cpu, "code": code}
    if run.seed is not None:
        if plan.metric not in summary:
            raise RuntimeError(f"{run.name}: the run's summary has no {plan.metric!r} (keys: {sorted(summary)})")
        rec["metric"] = float(summary[plan.metric])
    return rec


def _canonical(overrides: Sequence[str]) -> List[str]:
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        out.append(_RENAMED_KEYS.get(key, key) + eq + value)
    return out


def _same_run(rec: Optional[dict], run: Run) -> bool:
    if not rec:
        return False
    if rec.get("hash") == run.hash:
        return True
    return rec.get("recipe") == run.recipe and _canonical(rec.get("overrides", [])) == _canonical(run.overrides)


def _known(results: dict, run: Run) -> Optional[dict]:
    """A finished record of ``run`` (same hash, or the same overrides up to renamed keys) in
    results.json or its work folder."""
    rec = results["teacher"] if run.seed is None else results["runs"].get(run.setting, {}).get(str(run.seed))
    if not _same_run(rec, run) and os.path.isfile(run.finished_marker):
        with open(run.finished_marker) as f:
            rec = json.load(f)
    if _same_run(rec, run):
        return {**rec, "hash": run.hash, "overrides": run.overrides}
    return None


def _write_outputs(plan: Plan, results: dict) -> None:
    os.makedirs(plan.out_dir, exist_ok=True)
    results.update(paper=plan.paper, scale=plan.scale, title=plan.title, metric=plan.metric,
                   settings=plan.settings, seeds=plan.seeds, claims=plan.claims,
                   equivalence_margin=plan.equivalence_margin, settings_file="fastmask/reproduce.yaml")
    results["stats"] = summarise(plan, results)
    tmp = os.path.join(plan.out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
    os.replace(tmp, os.path.join(plan.out_dir, "results.json"))
    with open(os.path.join(plan.out_dir, "table.md"), "w") as f:
        f.write(format_table(plan, results))
    save_plot(plan, results, os.path.join(plan.out_dir, "plot.png"))


def execute(plan: Plan, *, runner: str = "subprocess", budget: float = 0.0) -> dict:
    """Run what is not finished yet (in plan order), writing the outputs after every run."""
    results = _load_results(plan)
    t0 = time.monotonic()
    todo = [r for r in plan.student_runs() if _known(results, r) is None]
    if plan.teacher is not None:
        # The students still to run need the teacher's checkpoint, not only its record.
        have_ckpt = os.path.isfile(os.path.join(plan.teacher.work_dir, "checkpoint.pt"))
        if _known(results, plan.teacher) is None or (todo and not have_ckpt):
            todo.insert(0, plan.teacher)
    done_before = len(plan.runs) - len(todo)
    print(f"[reproduce] {plan.paper} ({plan.scale}): {len(plan.runs)} runs, {done_before} already finished, "
          f"{len(todo)} to go -> {plan.out_dir}", flush=True)
    for r in plan.runs:  # finished runs found only in work folders join results.json
        rec = _known(results, r)
        if rec is not None:
            _store(results, r, rec)
    durations = []
    for i, run in enumerate(todo):
        elapsed = time.monotonic() - t0
        remaining = budget - elapsed if budget > 0 else None
        if remaining is not None and remaining <= 0:
            print(f"[reproduce] budget of {budget:.0f} s spent: {len(todo) - i} runs left; run the same "
                  f"command again to continue", flush=True)
            break
        state = _prepare_work_dir(run)
        eta = ""
        if durations:
            left = sum(durations) / len(durations) * (len(todo) - i)
            eta = f", about {left / 60:.0f} min left for the rest"
        print(f"[reproduce] [{done_before + i + 1}/{len(plan.runs)}] {run.name}: {state}{eta}", flush=True)
        cpu0, w0, code = _children_cpu_seconds(), time.monotonic(), code_version()
        status = _execute(run, runner, remaining)
        wall = time.monotonic() - w0
        cpu = _children_cpu_seconds() - cpu0 if runner == "subprocess" else None
        if status == "timeout":
            print(f"[reproduce] {run.name} stopped at the budget after {wall:.0f} s (checkpoint kept; run the "
                  f"same command again to continue)", flush=True)
            break
        if status == "failed":
            raise SystemExit(f"[reproduce] {run.name} failed; see {run.work_dir}")
        summary = _summary_of(run.work_dir)
        if summary is None:
            raise SystemExit(f"[reproduce] {run.name} ended without a final record in {run.work_dir}/metrics.jsonl")
        rec = _record(run, plan, summary, wall, cpu, code)
        with open(run.finished_marker, "w") as f:
            json.dump(rec, f, indent=1)
        _store(results, run, rec)
        _write_outputs(plan, results)
        durations.append(wall)
        value = f"{plan.metric} {rec['metric']:.2f}" if "metric" in rec else \
            f"val_top1 {summary.get('val_top1', float('nan')):.2f}"
        print(f"[reproduce] {run.name}: {value} ({wall:.0f} s)", flush=True)
    _write_outputs(plan, results)
    return results


def _store(results: dict, run: Run, rec: dict) -> None:
    if run.seed is None:
        results["teacher"] = rec
    else:
        results["runs"].setdefault(run.setting, {})[str(run.seed)] = rec


# ------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmask.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paper", choices=PAPERS)
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--budget", type=float, default=0.0,
                   help="wall-clock seconds: no run starts after it, a running one is stopped (resumable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    p.add_argument("--settings", default=None, help="comma-separated subset of the paper's settings")
    p.add_argument("--work", default="runs/reproduce", help="where the runs' folders (checkpoints) go")
    p.add_argument("--out", default=None, help="results folder (default bench/results/reproduce-PAPER-SCALE)")
    p.add_argument("--runner", choices=("subprocess", "inprocess"), default="subprocess")
    p.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite table.md/plot.png from results.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    settings = args.settings.split(",") if args.settings else None
    try:
        plan = load_plan(args.paper, args.scale, work_root=args.work, out_dir=args.out, seeds=seeds,
                         settings=settings)
    except ValueError as e:
        print(f"fastmask.reproduce: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for r in plan.runs:
            print(f"{r.name} [{r.hash}] python -m fastmask.train {' '.join(_train_argv(r))}")
        return 0
    if args.report_only:
        results = _load_results(plan)
        _write_outputs(plan, results)
    else:
        results = execute(plan, runner=args.runner, budget=args.budget)
    print(format_table(plan, results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
