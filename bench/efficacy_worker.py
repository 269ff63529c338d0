"""One training run of bench/efficacy_gpu.py: `python bench/efficacy_worker.py SPEC.json`.

Trains one model through labo_hf's LABOSeq2SeqTrainer (translation) or LABOTrainer (images), so the
measured loss path is the product's, then scores it and writes SPEC's "result_path" (JSON). The data
come prepared by efficacy_data.py; batches are built here (length-bucketed token batches; GPU-resident
CIFAR-10 with augmentation on the GPU) and handed to the Trainer through `get_train_dataloader`, which
keeps the Trainer's loss, optimizer step, bf16 autocast and schedule untouched.

Training stops at SPEC's "deadline" (unix time) even if its epochs are not done; the result then says
"truncated" and the summary leaves it out, so a run cut short never counts as a finished one.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402  (path set above so the bench runs from a checkout)

ECE_BINS = 15


class EpochBatches(torch.utils.data.Dataset):
    """Whole batches, reshuffled each epoch from the run's seed (same seed, same order for every
    regularizer). Index 0 starts a new epoch, since the Trainer reads a plain DataLoader in order."""

    def __init__(self, num_items: int, batch_size: int, seed: int, make_batch, pool: int = 1, device="cpu",
                 sort_key=None):
        self.n, self.bs, self.make_batch, self.pool, self.sort_key = num_items, batch_size, make_batch, pool, sort_key
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.batches = device, []

    def __len__(self):
        return math.ceil(self.n / self.bs)

    def _new_epoch(self):
        perm = torch.randperm(self.n, generator=self.gen, device=self.device)
        if self.sort_key is None:
            self.batches = list(perm.split(self.bs))
            return
        # Length bucketing: sort pools of `pool` batches by length so batches carry little padding,
        # then shuffle the batch order.
        perm, batches = perm.tolist(), []
        span = self.bs * self.pool
        for start in range(0, self.n, span):
            chunk = sorted(perm[start:start + span], key=self.sort_key)
            batches += [chunk[i:i + self.bs] for i in range(0, len(chunk), self.bs)]
        order = torch.randperm(len(batches), generator=self.gen, device=self.device).tolist()
        self.batches = [batches[i] for i in order]

    def __getitem__(self, i):
        if i == 0 or not self.batches:
            self._new_epoch()
        return self.make_batch(self.batches[i])


def _trainer_with_batches(trainer_cls, batches):
    class Trainer(trainer_cls):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    return Trainer


def _deadline_callback(deadline: float, progress_path: Path):
    """Stops training at `deadline`, and writes the step count every few seconds so that the scheduler can
    project when the run will end."""
    from transformers import TrainerCallback

    class StopAtDeadline(TrainerCallback):
        truncated, last_write = False, 0.0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            if now - self.last_write > 2:
                self.last_write = now
                progress_path.write_text(json.dumps({"step": state.global_step, "max_steps": state.max_steps}))
            if now > deadline and state.global_step < state.max_steps:
                self.truncated = True
                control.should_training_stop = True

    return StopAtDeadline()


def _training_args(spec: dict, tmp: str, steps_per_epoch: int, seq2seq: bool):
    from labo_hf import LABOSeq2SeqTrainingArguments, LABOTrainingArguments

    cuda = torch.cuda.is_available()
    total = spec.get("max_steps") or steps_per_epoch * spec["epochs"]
    cls = LABOSeq2SeqTrainingArguments if seq2seq else LABOTrainingArguments
    return cls(
        output_dir=tmp, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**6,
        disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        num_train_epochs=spec["epochs"], max_steps=spec.get("max_steps") or -1,
        per_device_train_batch_size=spec["batch_size"], learning_rate=spec["lr"],
        # An integer step count (not a ratio) reads the same in every transformers 5.x.
        warmup_steps=int(spec["warmup"] * total), lr_scheduler_type="linear", weight_decay=spec["weight_decay"],
        label_regularizer=spec["regularizer"],
        label_regularizer_alpha=None if spec["regularizer"] == "cross_entropy" else spec["alpha"],
        labo_temperature=spec["temperature"],
    )


def binned_calibration(stats: torch.Tensor | None, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Running per-bin (count, confidence sum, correct sum) plus an NLL sum, on the logits' device.

    The equal-width bins of labo_hf.analysis.metrics.expected_calibration_error, accumulated batch by batch so that
    no (tokens, vocab) array is ever gathered (27 concurrent runs would not fit it in host memory)."""
    keep = labels != -100
    logp = torch.log_softmax(logits[keep].float(), dim=-1)
    y = labels[keep]
    conf, pred = logp.exp().max(dim=-1)
    bins = (torch.ceil(conf.double() * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)
    new = torch.zeros(3 * ECE_BINS + 1, dtype=torch.float64, device=logits.device)
    new[:ECE_BINS].index_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
    new[ECE_BINS:2 * ECE_BINS].index_add_(0, bins, conf.double())
    new[2 * ECE_BINS:3 * ECE_BINS].index_add_(0, bins, (pred == y).double())
    new[-1] = -logp.gather(1, y[:, None]).double().sum()
    return new if stats is None else stats + new


def calibration_from_bins(stats: torch.Tensor) -> dict:
    s = stats.cpu()
    n = s[:ECE_BINS].sum().item()
    ece = (s[2 * ECE_BINS:3 * ECE_BINS] - s[ECE_BINS:2 * ECE_BINS]).abs().sum().item() / n
    return {"nll": s[-1].item() / n, "ece": ece, "accuracy": s[2 * ECE_BINS:3 * ECE_BINS].sum().item() / n,
            "tokens": int(n)}


# ------------------------------------------------------------------------------------------ translation
def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out


def run_translation(spec: dict) -> dict:
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast, set_seed

    from labo_hf import LABOSeq2SeqTrainer

    work = Path(spec["work_dir"])
    data = torch.load(work / "translation_ids.pt")
    tok = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    src, tgt, pad = data["train_src"], data["train_tgt"], tok.pad_token_id

    def make_batch(idx):
        x = _pad([src[i] for i in idx], pad)
        return {"input_ids": x, "attention_mask": (x != pad).long(), "labels": _pad([tgt[i] for i in idx], -100)}

    batches = EpochBatches(len(src), spec["batch_size"], spec["seed"], make_batch, pool=50,
                           sort_key=lambda i: len(src[i]))
    m = spec["model"]
    config = MarianConfig(
        vocab_size=len(tok), decoder_vocab_size=len(tok), d_model=m["d_model"], encoder_layers=m["layers"],
        decoder_layers=m["layers"], encoder_attention_heads=m["heads"], decoder_attention_heads=m["heads"],
        encoder_ffn_dim=m["ffn"], decoder_ffn_dim=m["ffn"], dropout=m["dropout"], max_position_embeddings=256,
        scale_embedding=True, share_encoder_decoder_embeddings=True, pad_token_id=pad,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=pad, forced_eos_token_id=tok.eos_token_id)
    set_seed(spec["seed"])  # same initialization for every regularizer at a given seed
    model = MarianMTModel(config)
    stop = _deadline_callback(spec["deadline"], Path(spec["result_path"]).with_suffix(".progress"))
    with tempfile.TemporaryDirectory(prefix="labo_eff_") as tmp:
        trainer = _trainer_with_batches(LABOSeq2SeqTrainer, batches)(
            model=model, args=_training_args(spec, tmp, len(batches), seq2seq=True), train_dataset=batches,
            callbacks=[stop])
        t0 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_translation(trainer.model.eval(), tok, data["tests"], spec)
    return {**res, "train_loss": out.training_loss, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
            "steps": trainer.state.global_step, "epochs_completed": trainer.state.epoch, "truncated": stop.truncated,
            "parameters": sum(p.numel() for p in model.parameters())}


def evaluate_translation(model, tok, tests: dict, spec: dict) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    res, pad, bs = {}, tok.pad_token_id, spec["eval_batch_size"]
    with torch.no_grad(), autocast:
        for name, t in tests.items():
            ids = t["src_ids"]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding in beam search
            hyps = [""] * len(ids)
            for start in range(0, len(ids), bs):
                chunk = order[start:start + bs]
                x = _pad([ids[i] for i in chunk], pad).to(device)
                gen = model.generate(input_ids=x, attention_mask=(x != pad).long(), num_beams=spec["beams"],
                                     max_new_tokens=spec["max_len"], do_sample=False)
                for i, h in zip(chunk, tok.batch_decode(gen, skip_special_tokens=True), strict=True):
                    hyps[i] = h.strip().lower() if t["lowercased"] else h.strip()
            res[f"{name}_bleu"] = BLEU().corpus_score(hyps, [t["refs"]]).score
            res[f"{name}_chrf"] = CHRF().corpus_score(hyps, [t["refs"]]).score
            res[f"{name}_sample"] = hyps[:2]
        t, stats = tests["multi30k_test2016"], None
        for start in range(0, len(t["src_ids"]), bs):
            x = _pad(t["src_ids"][start:start + bs], pad).to(device)
            labels = _pad(t["tgt_ids"][start:start + bs], -100).to(device)
            logits = model(input_ids=x, attention_mask=(x != pad).long(),
                           decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
            stats = binned_calibration(stats, logits, labels)
    cal = calibration_from_bins(stats)
    res.update(test_token_nll=cal["nll"], test_token_ece=100 * cal["ece"], test_token_acc=100 * cal["accuracy"],
               test_tokens=cal["tokens"])
    return res


# ---------------------------------------------------------------------------------------------- images
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 training-set statistics


def gpu_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the reflect-padded (4 px) uint8 batch and a horizontal flip, all on x's device."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    dy, dx = (torch.randint(0, 9, (2, b), generator=gen, device=x.device))
    ar = torch.arange(32, device=x.device)
    rows, cols = (dy[:, None] + ar)[:, None, :, None], (dx[:, None] + ar)[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
                 rows, cols]
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - mean) / std).contiguous(memory_format=_memory_format(x.device))


def _memory_format(device: torch.device) -> torch.memory_format:
    # channels_last is a GPU speed-up; on CPU, torch 2.13's channels_last conv backward segfaults on some AMD EPYC
    # hosts (a 3-conv repro, nothing of ours involved), so the dry run keeps the default layout there.
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def run_image(spec: dict) -> dict:
    from cifar_resnet import CifarResNet
    from transformers import set_seed

    from labo_hf import LABOTrainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.load(Path(spec["work_dir"]) / "cifar10_uint8.pt")
    xtr, ytr = data["train"]["images"].to(device), data["train"]["labels"].to(device)
    aug_gen = torch.Generator(device=device).manual_seed(spec["seed"])

    def make_batch(idx):
        return {"pixel_values": _normalize(gpu_augment(xtr[idx], aug_gen)), "labels": ytr[idx]}

    batches = EpochBatches(len(ytr), spec["batch_size"], spec["seed"], make_batch, device=device)
    set_seed(spec["seed"])
    model = CifarResNet(width=spec["model"]["width"]).to(memory_format=_memory_format(device))
    # SGD with Nesterov momentum is the standard recipe for ResNets on CIFAR; the Trainer builds the
    # warmup + linear-decay schedule around it.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": spec["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=spec["lr"], momentum=0.9, nesterov=True)
    stop = _deadline_callback(spec["deadline"], Path(spec["result_path"]).with_suffix(".progress"))
    with tempfile.TemporaryDirectory(prefix="labo_eff_") as tmp:
        trainer = _trainer_with_batches(LABOTrainer, batches)(
            model=model, args=_training_args(spec, tmp, len(batches), seq2seq=False), train_dataset=batches,
            optimizers=(opt, None), callbacks=[stop])
        t0 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    from labo_hf.analysis.metrics import classification_metrics

    model.eval()
    xte, yte = data["test"]["images"].to(device), data["test"]["labels"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        logits = torch.cat([model(_normalize(xte[i:i + 1000]))["logits"].float().cpu()
                            for i in range(0, len(yte), 1000)])
    m = classification_metrics(logits, yte)
    return {"top1": 100 * m["accuracy"], "nll": m["nll"], "ece": 100 * m["ece"], "test_images": int(m["num_examples"]),
            "train_loss": out.training_loss, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
            "steps": trainer.state.global_step, "epochs_completed": trainer.state.epoch, "truncated": stop.truncated,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_file():
        raise ValueError(f"usage: efficacy_worker.py SPEC.json (an existing file); got {argv}")
    spec = json.loads(Path(argv[0]).read_text())
    if spec["task"] not in ("translation", "image"):
        raise ValueError(f"{argv[0]}: task must be 'translation' or 'image'; got {spec['task']!r}")
    torch.set_num_threads(spec.get("threads", 1))
    t0 = time.perf_counter()
    res = (run_translation if spec["task"] == "translation" else run_image)(spec)
    info = machine_info()
    res.update(run_seconds=time.perf_counter() - t0, gpu=info.get("gpu"), torch=info["torch"],
               transformers=info.get("transformers"))
    Path(spec["result_path"]).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
