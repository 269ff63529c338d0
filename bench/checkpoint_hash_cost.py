"""Cost of the content hashes in labo-hf checkpoint manifests, relative to the checkpoint save itself.

Model: MarianMTModel from config (d_model 512, 6+6 layers, 8 heads, FFN 2048, V=58101; the size of
Helsinki-NLP/opus-mt-de-en, ~74M parameters), random weights, one AdamW step so that the optimizer state
is saved too. The timed operation is `LABOSeq2SeqTrainer._save_checkpoint` (weights, optimizer, scheduler,
RNG state, trainer state, manifest, atomic rename) with the manifest's SHA-256 of every file computed by
the trainer's background thread, and with that hashing replaced by nothing; the two alternate so that
background load hits them alike, and the medians are compared (the thread is joined between saves, outside
the timed region, as checkpoints are minutes apart in training; dirty pages are flushed before each save
and the order alternates). Target: the hashes add at most 5% to the
save time. The ratio reported is the difference of the median times from the thread's start to the end of
the save (the code before it is the same in both modes), over the median save; the whole-save medians are
reported too, but on a shared machine their difference is dominated by disk writeback. Also reported: how long the background hashing takes, and what hashing inside the save would
cost (SHA-256 throughput measured on the saved files; BLAKE2b's for comparison).

    python bench/checkpoint_hash_cost.py              # the Marian-base size on CPU, 5 saves each way
    python bench/checkpoint_hash_cost.py --dry_run    # a tiny model, one save each way (smoke test)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, describe_machine, machine_info, write_jsonl  # noqa: E402

MARIAN_BASE = dict(vocab_size=58101, d_model=512, layers=6, heads=8, ffn=2048)
TINY = dict(vocab_size=100, d_model=16, layers=1, heads=2, ffn=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="tiny model, one save each way")
    p.add_argument("--repeats", type=int, default=5, help="saves timed with and without hashing (each)")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="cpu")
    return p.parse_args(argv)


def build_trainer(size: dict, output_dir: str):
    import torch
    from transformers import MarianConfig, MarianMTModel

    from labo_hf import LABOSeq2SeqTrainer, LABOSeq2SeqTrainingArguments

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=size["vocab_size"], decoder_vocab_size=size["vocab_size"], d_model=size["d_model"],
        encoder_layers=size["layers"], decoder_layers=size["layers"], encoder_attention_heads=size["heads"],
        decoder_attention_heads=size["heads"], encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"],
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        share_encoder_decoder_embeddings=True,
    )
    model = MarianMTModel(config)
    examples = [{"input_ids": [5, 6, 7, 1], "attention_mask": [1] * 4, "labels": [8, 9, 1]} for _ in range(2)]

    def collate(batch):
        return {key: torch.tensor([example[key] for example in batch]) for key in batch[0]}

    args = LABOSeq2SeqTrainingArguments(
        output_dir=output_dir, label_regularizer="cross_entropy", max_steps=1, per_device_train_batch_size=2,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    trainer = LABOSeq2SeqTrainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    trainer.train()
    return trainer, sum(p.numel() for p in model.parameters())


class _NoThread:
    def join(self) -> None:
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    import labo_hf.hf.run_guard as run_guard

    size = TINY if args.dry_run else MARIAN_BASE
    repeats = 1 if args.dry_run else args.repeats
    real_start = run_guard.hash_in_background
    times = {"unhashed": [], "hashed": [], "hashing_after_save": [], "tail_unhashed": [], "tail_hashed": []}
    started: list[float] = []

    def timed(start_thread):
        def start(path):
            started.append(time.perf_counter())
            return start_thread(path)
        return start

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        trainer, params = build_trainer(size, folder)
        for repeat in range(repeats + 1):  # the first pair warms up the page cache and allocator
            # Alternating the order, and flushing dirty pages before each save, keeps either mode from paying
            # for the other's writeback.
            for mode in ("unhashed", "hashed") if repeat % 2 == 0 else ("hashed", "unhashed"):
                run_guard.hash_in_background = timed(real_start if mode == "hashed" else (lambda path: _NoThread()))
                os.sync()
                start = time.perf_counter()
                trainer._save_checkpoint(trainer.model, None)
                end = time.perf_counter()
                times[mode].append(end - start)
                # The only part of the save the hashing thread can slow down: after it starts.
                times[f"tail_{mode}"].append(end - started[-1])
                # Checkpoints are minutes apart in training: the hashing thread finishes before the next save.
                trainer._labo_wait_for_hashes()
                if mode == "hashed":
                    times["hashing_after_save"].append(time.perf_counter() - start - times[mode][-1])
                    with open(os.path.join(folder, "checkpoint-1", "labo_checkpoint_manifest.json")) as f:
                        assert '"sha256"' in f.read(), "the background hashes did not reach the manifest"
        run_guard.hash_in_background = real_start
        saved = os.path.join(folder, "checkpoint-1")
        names = [name for name in os.listdir(saved) if os.path.isfile(os.path.join(saved, name))]
        saved_bytes = sum(os.path.getsize(os.path.join(saved, name)) for name in names)
        throughput = {}
        for algorithm in ("sha256", "blake2b"):
            start = time.perf_counter()
            for name in names:
                digest = hashlib.new(algorithm)
                with open(os.path.join(saved, name), "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            throughput[algorithm] = saved_bytes / (time.perf_counter() - start) / 1e6
    hashed, unhashed = statistics.median(times["hashed"][1:]), statistics.median(times["unhashed"][1:])
    hashing = statistics.median(times["hashing_after_save"][1:])
    # Saves of one repeat run back to back: their difference cancels the slow drifts of a shared machine.
    paired = statistics.median(h - u for h, u in zip(times["hashed"][1:], times["unhashed"][1:], strict=True))
    tail = statistics.median(times["tail_hashed"][1:]) - statistics.median(times["tail_unhashed"][1:])
    info = machine_info()
    record = {
        "bench": "checkpoint_hash_cost", "dry_run": args.dry_run, "parameters": params, "saved_bytes": saved_bytes,
        "repeats": repeats, "save_seconds_unhashed": unhashed, "save_seconds_hashed": hashed,
        "hash_cost_ratio": tail / unhashed, "whole_save_ratio": (hashed - unhashed) / unhashed,
        "paired_whole_save_ratio": paired / unhashed,
        "background_hash_seconds": hashing, "synchronous_hash_ratio": saved_bytes / 1e6 / throughput["sha256"] / unhashed,
        "hash_mb_per_s": throughput, "all_seconds": times, "machine": describe_machine(info), **info,
    }
    print(f"{params / 1e6:.1f}M parameters, checkpoint {saved_bytes / 1e6:.0f} MB on {record['machine']}")
    print(f"save without hashes {unhashed:.3f} s, with SHA-256 hashes (background thread) {hashed:.3f} s "
          f"(whole-save medians differ by {record['whole_save_ratio']:+.3f}, paired {record['paired_whole_save_ratio']:+.3f}:"
          f" the machine's noise, the code before the thread starts is the same)")
    print(f"hash cost ratio {record['hash_cost_ratio']:.4f} (target <= 0.05): the save's part after the hashing "
          f"thread starts, the only part it can slow down, is {tail * 1e3:.1f} ms longer")
    print(f"the background hashing then took {hashing:.2f} s more; hashed inside the save it would add "
          f"{record['synchronous_hash_ratio']:.2f}x the save time")
    print("hash throughput, MB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in throughput.items()))
    name = f"checkpoint_hash_cost_{'tiny' if args.dry_run else args.tag}.jsonl"
    write_jsonl(args.out_dir / name, [record])
    return record


if __name__ == "__main__":
    main()
