"""Efficacy of LABO vs label smoothing in one short GPU window: many small runs at once, paired results.

    python bench/efficacy_gpu.py --task translation      # Multi30k de->en, from-scratch Marian
    python bench/efficacy_gpu.py --task image            # CIFAR-10, ResNet-18-style (CIFAR stem)
    python bench/efficacy_gpu.py --task translation --plan_only   # what would run, what is trimmed
    python bench/efficacy_gpu.py --task image --dry_run  # tiny models, CPU, 2 at a time, < 1 min

One process per (regularizer, alpha, T, seed) on one GPU, as many at once as --concurrency allows
(default: all), each training through labo_hf's LABOSeq2SeqTrainer / LABOTrainer
(bench/efficacy_worker.py). The data are prepared once before any run starts (bench/efficacy_data.py):
the shared 8k BPE tokenizer and the tokenized splits, or CIFAR-10 decoded to a uint8 tensor; the
preparation time is reported.

Budget. Everything, preparation included, ends within --budget_s. The default grid (CE; LS and LABO
T=2 at alpha 0.1/0.2/0.3; LABO alpha 0.1 at T=1 and T=4; seeds 0-2) is cut in priority order so
that the runs kept fit an estimate of their time (ESTIMATES below; the translation figure is the one
measurement we have: 6 concurrent Marian runs x 15 epochs took about 230 s each on one H200). Whole
LS/LABO pairs are cut, so every LABO run kept has its LS pair; what is cut is printed and written to
the summary. While the runs train, their progress is read: if the slowest would miss the budget, the
lowest-priority pairs still running are stopped to make room (said in the summary too). A run that
still reaches the budget stops where it is, is marked truncated and is left out of the statistics.

Output: bench/results/efficacy_gpu_<task>[_<tag>].jsonl (one record per run) and .md (per-config
mean/std/95% t-interval, and the paired difference LABO - LS at the same alpha and seed), or under
--out_dir. A dry run writes efficacy_gpu_<task>_dryrun.*.

On the GPU machine the data come from the carried folder made by bench/prepare_gpu_carry.py; see
bench/results/README.md ("GPU efficacy runs") for the exact device commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (path set above so the bench runs from a checkout)
    DATA_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    describe_machine,
    fmt_stat,
    machine_info,
    md_table,
    paired_differences,
    summarize_runs,
    write_jsonl,
)

TASKS = {
    "translation": dict(
        model={"d_model": 256, "layers": 3, "heads": 4, "ffn": 1024, "dropout": 0.1}, vocab=8000, epochs=15,
        batch_size=128, lr=1e-3, warmup=0.05, weight_decay=1e-4, beams=4, max_len=128, eval_batch_size=128,
        max_train=None, test_max=None, ood_max=500, per_class=None),
    "image": dict(
        model={"width": 32}, epochs=20, batch_size=512, lr=0.2, warmup=0.05, weight_decay=5e-4, eval_batch_size=1000,
        per_class=None),
}
DRY = {
    "translation": dict(model={"d_model": 32, "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.1}, vocab=300,
                        batch_size=16, beams=2, max_len=24, eval_batch_size=16, max_train=256, test_max=16,
                        ood_max=8, max_steps=2),
    "image": dict(model={"width": 4}, batch_size=16, eval_batch_size=16, per_class=8, max_steps=2),
}
# Wall time of one run with `concurrency` runs alive = startup_s + (run_s * epochs / ref_epochs + eval_s)
# * max(1, concurrency / ref_concurrency): beyond ref_concurrency the GPU is assumed shared, so runs slow
# down in proportion. translation: the one measurement (230 s at 6 concurrent, 15 epochs). image: a guess,
# unmeasured (half-width ResNet-18, ~1 s of GPU per epoch, 3 runs overlapping); the progress check
# corrects a wrong guess. safety_s is kept free at the end of the budget for writing the results; a run still
# alive grace_s after the budget is killed (its own deadline should have stopped it; scoring can overrun).
ESTIMATES = {
    "translation": dict(run_s=230.0, ref_concurrency=6, ref_epochs=15, eval_s=40.0, startup_s=20.0, prep_s=30.0,
                        safety_s=20.0, grace_s=40.0),
    "image": dict(run_s=50.0, ref_concurrency=3, ref_epochs=20, eval_s=5.0, startup_s=20.0, prep_s=30.0,
                  safety_s=20.0, grace_s=40.0),
    "dry_run": dict(run_s=2.0, ref_concurrency=2, ref_epochs=None, eval_s=1.0, startup_s=10.0, prep_s=3.0,
                    safety_s=2.0, grace_s=120.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), required=True)
    p.add_argument("--budget_s", type=float, default=None, help="wall-clock budget, preparation included "
                   "(default 480; 40 with --dry_run)")
    p.add_argument("--concurrency", type=int, default=0, help="runs at once (0: all planned; 2 with --dry_run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.3, 0.1],
                   help="LS/LABO(T=2) pairs, in priority order (first kept first)")
    p.add_argument("--no_extras", action="store_true", help="leave out CE and the LABO T=1/T=4 runs")
    p.add_argument("--epochs", type=float, default=None, help="default: 15 translation, 20 image")
    p.add_argument("--width", type=int, default=None, help="image: ResNet base width (default 32, half of ResNet-18's 64)")
    p.add_argument("--run_s", type=float, default=None,
                   help="override the estimate of one run's training seconds at --ref_concurrency runs at once")
    p.add_argument("--ref_concurrency", type=int, default=None,
                   help="override how many runs share the GPU before each slows down")
    p.add_argument("--dry_run", action="store_true", help="tiny models on CPU, 2 at a time, a few steps")
    p.add_argument("--plan_only", action="store_true", help="print the plan (kept and trimmed runs) and exit")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="data folder (default: LABO_DATA_DIR, else gpu_carry/data if present, else ../shared/data)")
    p.add_argument("--work_dir", type=Path, default=RESULTS_DIR / "cache" / "efficacy")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: none; 'dryrun' with --dry_run)")
    args = p.parse_args(argv)
    for k, v in {**TASKS[args.task], **(DRY[args.task] if args.dry_run else {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.width is not None:
        args.model = {**args.model, "width": args.width}
    args.max_steps = DRY[args.task]["max_steps"] if args.dry_run else None
    args.budget_s = args.budget_s or (40.0 if args.dry_run else 480.0)
    args.concurrency = args.concurrency or (2 if args.dry_run else 0)
    args.tag = args.tag or ("dryrun" if args.dry_run else None)
    if args.data_dir is None:
        carried = REPO_ROOT / "gpu_carry" / "data"
        args.data_dir = DATA_DIR if "LABO_DATA_DIR" in os.environ or not carried.exists() else carried
    for name in ("budget_s", "epochs"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive; got {getattr(args, name)}")
    if args.concurrency < 0:
        raise ValueError(f"--concurrency must be >= 0; got {args.concurrency}")
    if any(not 0 < a < 1 for a in args.alphas):
        raise ValueError(f"--alphas must lie in (0, 1); got {args.alphas}")
    return args


# ------------------------------------------------------------------------------------------------ grid
def grid_units(args) -> list[list[dict]]:
    """The grid as units in priority order; a unit (an LS/LABO pair, or one extra run) is kept or cut whole.

    Pairs at the higher alphas first (where the CPU sweep saw LABO gain), then alpha 0.1, then CE and
    LABO's T=1/T=4 at alpha 0.1, whose LS pair is the alpha-0.1 one (kept before them)."""
    def cfg(reg, alpha, t, seed):
        return {"regularizer": reg, "alpha": alpha, "temperature": t, "seed": seed}

    units = [[cfg("label_smoothing", a, None, s), cfg("labo", a, 2.0, s)] for a in args.alphas for s in args.seeds]
    if not args.no_extras:
        units += [[cfg("cross_entropy", 0.0, None, s)] for s in args.seeds]
        if 0.1 in args.alphas:
            units += [[cfg("labo", 0.1, t, s)] for t in (1.0, 4.0) for s in args.seeds]
    return units


def run_name(c: dict) -> str:
    t = f"_T{c['temperature']:g}" if c["temperature"] is not None else ""
    return f"{c['regularizer']}_a{c['alpha']:g}{t}_s{c['seed']}"


def estimate(args) -> dict:
    est = dict(ESTIMATES["dry_run" if args.dry_run else args.task])
    if args.run_s is not None:
        est["run_s"] = args.run_s
    if args.ref_concurrency is not None:
        est["ref_concurrency"] = args.ref_concurrency
    scale = 1.0 if est["ref_epochs"] is None else args.epochs / est["ref_epochs"]
    est["train_s"] = est["run_s"] * scale
    return est


def wall_time(n_runs: int, concurrency: int, est: dict) -> float:
    """Estimated seconds for n_runs in waves of `concurrency` (0: all at once)."""
    if n_runs == 0:
        return 0.0
    c = min(n_runs, concurrency) if concurrency else n_runs
    per_run = est["startup_s"] + (est["train_s"] + est["eval_s"]) * max(1.0, c / est["ref_concurrency"])
    return math.ceil(n_runs / c) * per_run


def plan(units: list[list[dict]], seconds: float, concurrency: int, est: dict) -> tuple[list, list]:
    """Longest prefix of units whose estimated wall time fits `seconds`; returns (kept, cut) run lists."""
    kept = 0
    while kept < len(units) and wall_time(sum(map(len, units[:kept + 1])), concurrency, est) <= seconds:
        kept += 1
    return [c for u in units[:kept] for c in u], [c for u in units[kept:] for c in u]


# ------------------------------------------------------------------------------------------------ runs
def prepare(args, work: Path) -> dict:
    import efficacy_data

    work.mkdir(parents=True, exist_ok=True)
    if args.task == "translation":
        return efficacy_data.prepare_translation(args.data_dir, work, args.vocab, args.max_len, args.max_train,
                                                 args.test_max, args.ood_max)
    return efficacy_data.prepare_images(args.data_dir, work, args.per_class, workers=min(16, os.cpu_count() or 1))


def spec_for(cfg: dict, args, work: Path, deadline: float) -> dict:
    keys = ("epochs", "batch_size", "lr", "warmup", "weight_decay", "model", "eval_batch_size", "max_steps")
    spec = {**cfg, "task": args.task, "work_dir": str(work), "deadline": deadline, "threads": 1,
            "result_path": str(work / "runs" / f"{run_name(cfg)}.json"), **{k: getattr(args, k) for k in keys}}
    if args.task == "translation":
        spec.update(beams=args.beams, max_len=args.max_len)
    return spec


def launch(spec: dict, work: Path) -> subprocess.Popen:
    path = work / "runs" / f"{run_name(spec)}.spec.json"
    path.write_text(json.dumps(spec))
    Path(spec["result_path"]).unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    log = open(work / "runs" / f"{run_name(spec)}.log", "w")  # noqa: SIM115  (closed when the run ends)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("efficacy_worker.py")), str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    proc.log = log
    return proc


def progress(spec: dict) -> tuple[int, int] | None:
    path = Path(spec["result_path"]).with_suffix(".progress")
    try:
        d = json.loads(path.read_text())
        return d["step"], d["max_steps"]
    except (OSError, ValueError, KeyError):
        return None


def execute(runs: list[dict], args, work: Path, deadline: float, est: dict) -> tuple[list, list]:
    """Run `runs` (priority order) with at most --concurrency alive; returns (records, events)."""
    (work / "runs").mkdir(parents=True, exist_ok=True)
    train_deadline = deadline - est["eval_s"] - est["safety_s"] / 2
    pending = [spec_for(c, args, work, train_deadline) for c in runs]
    alive, records, events, first_seen = {}, [], [], {}
    limit = args.concurrency or len(pending)
    last_shed = time.time()
    while pending or alive:
        while pending and len(alive) < limit:
            spec = pending.pop(0)
            alive[run_name(spec)] = (spec, launch(spec, work))
        time.sleep(0.5)
        for name, (spec, proc) in list(alive.items()):
            if proc.poll() is None:
                if time.time() > deadline + est["grace_s"]:
                    proc.kill()
                    events.append(f"{name} killed {est['grace_s']:.0f} s after the budget")
                continue
            proc.log.close()
            del alive[name]
            res = Path(spec["result_path"])
            if proc.returncode == 0 and res.exists():
                records.append({**{k: spec[k] for k in ("regularizer", "alpha", "temperature", "seed")},
                                **json.loads(res.read_text())})
                print(f"  done {name}: " + ", ".join(f"{k} {records[-1][k]:.3f}" for k in
                      ("multi30k_test2016_bleu", "top1", "test_token_nll", "nll") if k in records[-1]), flush=True)
            elif not getattr(proc, "shed", False):
                tail = (work / "runs" / f"{name}.log").read_text()[-2000:]
                events.append(f"{name} failed (exit {proc.returncode})")
                print(f"  FAILED {name} (exit {proc.returncode}); log tail:\n{tail}", flush=True)
        if alive and not pending and time.time() - last_shed > 20:
            shed = _shed_if_late(alive, deadline - est["eval_s"] - est["safety_s"], first_seen)
            if shed:
                last_shed = time.time()
                events += shed
                first_seen.clear()  # the survivors speed up: measure their rates afresh
        if time.time() > deadline + est["grace_s"] + 5:
            break
    return records, events


def _shed_if_late(alive: dict, train_end: float, first_seen: dict) -> list[str]:
    """Stop the lowest-priority pairs still running when the slowest run's projected end misses train_end.

    Assumes the runs share the GPU, so stopping k of n speeds the others up by n / (n - k)."""
    now, projected = time.time(), []
    for name, (spec, _) in alive.items():
        p = progress(spec)
        if p is None:
            continue
        first_seen.setdefault(name, (now, p[0]))
        t0, s0 = first_seen[name]
        if now - t0 < 30 or p[0] <= s0:  # 30 s of steady training, past the first steps' warm-up
            continue
        projected.append((p[1] - p[0]) / ((p[0] - s0) / (now - t0)))
    if len(projected) < len(alive) or not projected or now + max(projected) <= train_end:
        return []
    n, room = len(alive), max(train_end - now, 1.0)
    keep = max(2, int(n * room / max(projected)))
    victims = list(alive)[keep:]  # alive keeps launch order, i.e. priority order
    # Never leave a LABO run without its LS pair: stop the LS run's partner too.
    for name in list(victims):
        spec = alive[name][0]
        if spec["regularizer"] == "label_smoothing":
            partner = run_name({**spec, "regularizer": "labo", "temperature": 2.0})
            if partner in alive and partner not in victims:
                victims.append(partner)
    msgs = []
    for name in victims:
        proc = alive[name][1]
        proc.shed = True
        proc.kill()
        msgs.append(f"{name} stopped at {time.strftime('%H:%M:%S')} to make room (slowest run projected "
                    f"{max(projected):.0f} s, {room:.0f} s left)")
        print("  " + msgs[-1], flush=True)
    return msgs


# ---------------------------------------------------------------------------------------------- report
METRICS = {
    "translation": ["multi30k_test2016_bleu", "multi30k_test2016_chrf", "iwslt14_test_bleu", "iwslt14_test_chrf",
                    "newstest2014_bleu", "newstest2014_chrf", "test_token_nll", "test_token_ece"],
    "image": ["top1", "nll", "ece"],
}
SHORT = {"multi30k_test2016_bleu": "M30k BLEU", "multi30k_test2016_chrf": "M30k chrF",
         "iwslt14_test_bleu": "IWSLT BLEU", "iwslt14_test_chrf": "IWSLT chrF", "newstest2014_bleu": "nt14 BLEU",
         "newstest2014_chrf": "nt14 chrF", "test_token_nll": "test NLL", "test_token_ece": "test ECE %",
         "top1": "top-1 %", "nll": "NLL", "ece": "ECE %"}


def write_report(args, records: list[dict], notes: dict, info: dict, stem: str) -> Path:
    metrics = METRICS[args.task]
    digits = {m: 3 if "nll" in m else 2 for m in metrics}
    done = [r for r in records if not r.get("truncated")]
    epochs = f"{args.epochs} epochs" + (f" capped at {args.max_steps} steps" if args.max_steps else "")
    if args.task == "translation":
        what = (f"Multi30k de→en, from-scratch Marian ({args.model}), shared BPE {args.vocab}, {epochs}, "
                f"batch {args.batch_size}, AdamW lr {args.lr}, bf16 on GPU, beam {args.beams}; IWSLT14 and "
                f"newstest2014: first {args.ood_max or 'all'} lines (IWSLT14 scored lowercased); test NLL/ECE "
                "(15 bins): teacher-forced reference tokens of test_2016_flickr.")
    else:
        what = (f"CIFAR-10 ({notes['prep'].get('train_images')} train / {notes['prep'].get('test_images')} test "
                f"images), ResNet-18-style with CIFAR stem ({args.model}), {epochs}, batch "
                f"{args.batch_size}, SGD-Nesterov lr {args.lr}, augmentation on the GPU (crop pad 4, flip), bf16 on "
                "GPU; top-1 and ECE (15 bins) in %, NLL in nats.")
    lines = [f"# efficacy_gpu: {args.task}{' (dry run: tiny models, a few steps; numbers mean nothing)' if args.dry_run else ''}",
             "", f"Machine: {describe_machine(info)}.", "", what, "",
             f"Budget {args.budget_s:.0f} s wall clock; data preparation {notes['prep_s']:.1f} s "
             f"({json.dumps(notes['prep'], sort_keys=True)}); runs {notes['runs_s']:.0f} s, {notes['concurrency']} "
             f"at once; whole invocation {notes['total_s']:.0f} s.", "",
             f"Planned {len(notes['kept'])} runs; cut before starting to fit the budget (estimate "
             f"{json.dumps(notes['estimate'], sort_keys=True)}): "
             + (", ".join(run_name(c) for c in notes["cut"]) or "none") + ".", ""]
    for e in notes["events"]:
        lines.append(f"- {e}")
    if records:
        # What the next plan should assume: ESTIMATES[task]["run_s"] at this many runs at once.
        med = sorted(r["train_seconds"] for r in records)[len(records) // 2]
        lines.append(f"- measured: median training time {med:.0f} s per run, {notes['concurrency']} runs at once "
                     f"(median scoring {sorted(r['eval_seconds'] for r in records)[len(records) // 2]:.0f} s)")
    trunc = [run_name(r) for r in records if r.get("truncated")]
    lines += [f"- truncated at the budget (left out below): {', '.join(trunc)}" if trunc else
              "- no run was truncated", ""]
    groups = summarize_runs(done, ["regularizer", "alpha", "temperature"], metrics)
    groups.sort(key=lambda g: (g["alpha"], g["regularizer"], g["temperature"] or 0))
    rows = [[g["regularizer"], g["alpha"], g["temperature"] if g["temperature"] is not None else "-", len(g["seeds"]),
             *[fmt_stat(g[m], digits[m]) for m in metrics]] for g in groups]
    lines += ["Cells: mean ± std [±95% t-interval half-width] over seeds.", "",
              md_table(["regularizer", "alpha", "T", "seeds", *[SHORT[m] for m in metrics]], rows), "",
              "Paired difference LABO - LS at the same alpha and seed (positive BLEU/chrF/top-1 and negative "
              "NLL/ECE favour LABO): mean ± std [±95% t-interval half-width] (n pairs).", ""]
    drows = []
    for alpha in sorted({r["alpha"] for r in done if r["regularizer"] == "labo"}):
        for t in sorted({r["temperature"] for r in done if r["regularizer"] == "labo" and r["alpha"] == alpha}):
            cells = []
            for m in metrics:
                d = paired_differences(done, ["alpha"], m, {"regularizer": "labo", "alpha": alpha, "temperature": t},
                                       {"regularizer": "label_smoothing", "alpha": alpha})
                cells.append(f"{fmt_stat(d, digits[m])} (n={d['n']})" if d["n"] else "-")
            drows.append([alpha, t, *cells])
    lines += [md_table(["alpha", "LABO T", *[f"Δ {SHORT[m]}" for m in metrics]], drows), ""]
    md = args.out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    deadline = t_start + args.budget_s
    info = machine_info()
    est = estimate(args)
    units = grid_units(args)
    kept, cut = plan(units, args.budget_s - est["prep_s"] - est["safety_s"], args.concurrency, est)
    print(f"machine: {describe_machine(info)}\ntask {args.task}: {len(kept)} runs planned, {len(cut)} cut to fit "
          f"{args.budget_s:.0f} s (estimate {wall_time(len(kept), args.concurrency, est):.0f} s of runs)")
    for c in cut:
        print(f"  not started (would not fit the budget): {run_name(c)}")
    if args.plan_only:
        for c in kept:
            print(f"  run: {run_name(c)}")
        return
    if not kept:
        raise ValueError(f"--budget_s {args.budget_s:.0f} leaves room for no run (estimate {est})")
    work = args.work_dir / f"{args.task}{'_dryrun' if args.dry_run else ''}"
    t0 = time.time()
    prep = prepare(args, work)
    prep_s = time.time() - t0
    print(f"data prepared in {prep_s:.1f} s: {prep}", flush=True)
    # Re-plan with the measured preparation time: runs that no longer fit are not started.
    kept2, cut2 = plan([[c] for c in kept], deadline - time.time() - est["safety_s"], args.concurrency, est)
    if cut2:
        kept2, _ = plan(units, deadline - time.time() - est["safety_s"], args.concurrency, est)
        cut2 = [c for c in kept if c not in kept2]
        for c in cut2:
            print(f"  not started (preparation took longer than estimated): {run_name(c)}")
    t0 = time.time()
    records, events = execute(kept2, args, work, deadline, est)
    runs_s = time.time() - t0
    stem = f"efficacy_gpu_{args.task}{'_' + args.tag if args.tag else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{stem}.jsonl"
    write_jsonl(out, [{**r, "task": args.task, "epochs": args.epochs, "model": args.model, "dry_run": args.dry_run,
                       "machine": info} for r in records])
    notes = {"prep": prep, "prep_s": prep_s, "runs_s": runs_s, "total_s": time.time() - t_start, "kept": kept2,
             "cut": cut + cut2, "events": events, "estimate": {k: v for k, v in est.items() if k != "ref_epochs"},
             "concurrency": args.concurrency or len(kept2)}
    md = write_report(args, records, notes, info, stem)
    print(md.read_text())
    print(f"wrote {out} and {md} ({time.time() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
