"""The README's from-scratch translation command, timed: BLEU/chrF on Multi30k test_2016_flickr and wall time.

Runs the command exactly as the README shows it (only the data folder and --output_dir substituted), with
no OMP_NUM_THREADS set, so the script's own from-scratch defaults decide everything. Prints and records the
test BLEU and chrF, the wall time of the whole command, and when the first training loss was logged.

    python bench/readme_translation.py                    # ~10-15 min on 2 CPU cores
    python bench/readme_translation.py --dry_run          # a few steps on a few examples (smoke test)

Results: bench/results/translation_readme_command_<tag>.{jsonl,md} (tag: cpu, or dry_run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA_DIR, REPO_ROOT, RESULTS_DIR, describe_machine, machine_info, write_jsonl

# The README command, with DATA for the data folder and OUT for --output_dir.
README_COMMAND = (
    "python run_translation.py --model_type marian "
    "--train_prefix DATA/multi30k/train --validation_prefix DATA/multi30k/val "
    "--test_prefix DATA/multi30k/test_2016_flickr --source_lang de --target_lang en "
    "--do_train --do_eval --do_predict --predict_with_generate "
    "--label_regularizer labo --output_dir OUT"
)
# --dry_run: the same command cut to a few steps and examples.
DRY_RUN_FLAGS = ["--max_steps", "2", "--max_train_samples", "128", "--max_eval_samples", "8",
                 "--max_predict_samples", "8", "--logging_steps", "1"]  # fmt: skip


def readme_command(data_dir: Path, output_dir: Path) -> list[str]:
    words = shlex.split(README_COMMAND.replace("DATA", str(data_dir)).replace("OUT", str(output_dir)))
    return [sys.executable, *words[1:]]


def run(command: list[str], log_path: Path) -> dict:
    """Run the command, streaming its output to ``log_path``; the wall time and when the first loss appeared."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    # Unbuffered: the loss lines are printed to a pipe here, and must be timed when printed.
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    first_loss = None
    with open(log_path, "w", encoding="utf-8", buffering=1) as log, subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if first_loss is None and "{'loss':" in line:
                first_loss = time.perf_counter() - start
    wall = time.perf_counter() - start
    # CPU seconds of the run: on cores shared with other jobs the wall time says more about them than about
    # the run; with the script's one thread, CPU time is what the wall time would be on a quiet core.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"run_translation.py failed ({proc.returncode}); log {log_path}, tail:\n{tail}")
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "first_loss_seconds": first_loss and round(first_loss, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=DATA_DIR, help="folder holding multi30k/ (default: %(default)s)")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="the run's --output_dir, kept (default: a temp folder, deleted after a successful run)")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR, help="where the result files go")
    p.add_argument("--tag", default=None, help="result file suffix (default: cpu, or dry_run)")
    p.add_argument("--dry_run", action="store_true", help="a few steps on a few examples (smoke test)")
    p.add_argument("--seed", type=int, default=None, help="append --seed N (another seed of the same command)")
    args = p.parse_args(argv)
    tag = args.tag or ("dry_run" if args.dry_run else "cpu")
    work = Path(tempfile.mkdtemp(prefix="readme_translation_"))
    output_dir = args.output_dir or work / "run"
    shutil.rmtree(output_dir, ignore_errors=True)  # a stale folder would be resumed or refused
    extra_flags = (DRY_RUN_FLAGS if args.dry_run else []) + ([] if args.seed is None else ["--seed", str(args.seed)])
    command = readme_command(args.data_dir, output_dir) + extra_flags
    info = machine_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    timing = run(command, work / "run.log")  # on failure the log stays there, and the error names it
    results = json.loads((output_dir / "all_results.json").read_text(encoding="utf-8"))
    record = {
        "command": README_COMMAND, "commit": commit.stdout.strip() or None, "extra_flags": extra_flags, **timing,
        **{key: results.get(key) for key in ("predict_bleu", "predict_chrf", "eval_bleu", "eval_chrf",
                                             "train_runtime", "train_loss", "epoch")},
        # The run's threads are the script's choice (1 for its default model on CPU), not this process's.
        "machine": describe_machine(info).replace(f"with {info['torch_threads']} threads", "(threads: the script's)"), **{f"machine_{k}": v for k, v in info.items()},
    }  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    write_jsonl(args.out_dir / f"translation_readme_command_{tag}.jsonl", [record])
    (args.out_dir / f"translation_readme_command_{tag}.md").write_text(
        f"# The README's from-scratch translation command ({tag})\n\n"
        f"Machine: {record['machine']}. Commit {record['commit']}.\n\n"
        f"Command (DATA = the data folder, OUT = a fresh output folder; extra flags: "
        f"{' '.join(record['extra_flags']) or 'none'}):\n\n    {README_COMMAND}\n\n"
        f"| test BLEU | test chrF | val BLEU | wall time | CPU time | first training loss logged after | epochs |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {record['predict_bleu']} | {record['predict_chrf']} | {record['eval_bleu']} | "
        f"{record['wall_seconds'] / 60:.1f} min | {record['cpu_seconds'] / 60:.1f} min | "
        f"{record['first_loss_seconds']} s | {record['epoch']} |\n",
        encoding="utf-8",
    )
    print(f"test BLEU {record['predict_bleu']}, chrF {record['predict_chrf']}, wall time "
          f"{record['wall_seconds'] / 60:.1f} min (CPU {record['cpu_seconds'] / 60:.1f} min), first loss after "
          f"{record['first_loss_seconds']} s")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
