"""Shared helpers for the bench scripts: machine description, statistics, result files.

Kept dependency-free (torch + stdlib) so every bench stays runnable on its own.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DATA_DIR = Path(os.environ.get("LABO_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data")))

# Line-buffered output so that a bench running under nohup shows its progress as it goes.
if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(line_buffering=True)

# Make `import labo_hf` work when the package is not pip-installed (bench run from a checkout).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def machine_info() -> dict:
    """What ran the bench; load average is recorded because the CPU runs share cores."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(info: dict) -> str:
    if info.get("cuda"):
        return f"GPU {info.get('gpu')}, torch {info['torch']}"
    return (
        f"CPU only ({info['cpu_count']} cores, {info['cpu_model']}), torch {info['torch']} "
        f"with {info['torch_threads']} threads, 1-min load avg at start {info.get('loadavg_1m', '?')}"
    )


# Two-sided 95% Student-t quantiles; small seed counts make the normal 1.96 too optimistic.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_std_ci(values: list[float]) -> dict:
    """Mean, sample std and half-width of the 95% t-interval (nan when fewer than 2 values)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci95": float("nan")}
    mean = statistics.fmean(vals)
    if n < 2:
        return {"n": 1, "mean": mean, "std": float("nan"), "ci95": float("nan")}
    std = statistics.stdev(vals)
    t = _T95.get(n - 1, 1.96)
    return {"n": n, "mean": mean, "std": std, "ci95": t * std / math.sqrt(n)}


def fmt_stat(s: dict, digits: int = 2) -> str:
    if s["n"] == 0:
        return "-"
    if s["n"] == 1 or math.isnan(s["std"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [±{s['ci95']:.{digits}f}]"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def calibration_metrics(logits, labels, n_bins: int = 15, ignore_index: int = -100) -> dict:
    """Top-1 accuracy, mean NLL and expected calibration error (ECE, equal-width bins on the top-1
    confidence, Guo et al. 2017) of the kept positions. Computed here rather than imported so the
    benches report one fixed definition whatever the library's metrics module does."""
    import torch

    logits = torch.as_tensor(logits).float().reshape(-1, logits.shape[-1])
    labels = torch.as_tensor(labels).long().reshape(-1)
    keep = labels != ignore_index
    logits, labels = logits[keep], labels[keep]
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    conf, pred = logp.exp().max(dim=-1)
    correct = (pred == labels).float()
    ece = 0.0
    edges = torch.linspace(0, 1, n_bins + 1)
    n = max(1, labels.numel())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.sum().item() / n * abs(conf[in_bin].mean().item() - correct[in_bin].mean().item())
    return {"accuracy": correct.mean().item(), "nll": nll.mean().item(), "ece": ece,
            "num_positions": int(labels.numel())}


def summarize_runs(records: list[dict], group_keys: list[str], metrics: list[str]) -> list[dict]:
    """Group run records by group_keys (all but the seed) and add mean/std/CI per metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(group_keys, key, strict=True))
        row["seeds"] = sorted(r["seed"] for r in rs)
        for m in metrics:
            row[m] = mean_std_ci([r[m] for r in rs if r.get(m) is not None])
        out.append(row)
    return out


def paired_differences(records: list[dict], match_keys: list[str], metric: str,
                       a: dict, b: dict) -> dict:
    """Per-seed difference metric(a) - metric(b) between runs that share match_keys and the seed,
    where a and b are dicts of key->value selecting the two arms (e.g. LABO vs LS at one alpha)."""
    def pick(sel):
        return {tuple(r.get(k) for k in match_keys) + (r["seed"],): r for r in records
                if all(r.get(k) == v for k, v in sel.items())}

    ra, rb = pick(a), pick(b)
    diffs = {k[-1]: ra[k][metric] - rb[k][metric] for k in ra.keys() & rb.keys()
             if ra[k].get(metric) is not None and rb[k].get(metric) is not None}
    return {"per_seed": dict(sorted(diffs.items())), **mean_std_ci(list(diffs.values()))}
