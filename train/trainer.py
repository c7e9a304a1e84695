"""The DeepSpeed training loop: set-up, steps, evaluation on STS-B dev, checkpoints, report.

One process per device (or one on the CPU); under torchrun / the deepspeed launcher each
rank runs `train(config)`. The batch of a micro-step is `train.batch_size` sentences per rank;
with global negatives (on by default when there are several ranks) every rank's keys are
negatives of every row, so the negative pool is batch_size × world size. Gradient
accumulation averages the gradients of several such micro-batches: it does not enlarge the
pool (each micro-batch's softmax only sees its own keys).

A non-finite loss, loss part or gradient stops the run before the optimizer applies it (or,
with train.skip_nonfinite, skips the step), naming the step, the part and the batch's
source lines (train.guard); a checkpoint or model is never written from non-finite weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import transformers
import yaml
from tqdm import tqdm
from transformers import AutoTokenizer

from train import checkpoint
from train.config import Config, ConfigError, to_dict
from train.data import Batches, Collator, load_pairs, read_text
from train.datasets import senteval_dir
from train.guard import (
    NonFiniteError,
    describe_sources,
    format_parts,
    nonfinite_parameter,
    nonfinite_part,
    ranks_flagging,
    skipped_update,
)
from train.model import SentenceModel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> torch.device:
    """Join (or, run alone, create) the process group; this rank's device.

    Without a launcher the process is rank 0 of 1. On the CPU the backend is gloo, and
    DeepSpeed's shared-memory all-reduce (a C++ op it would JIT-build for a minute or more at
    start-up, a speed-up over gloo only) is not built.
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not cuda:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_optimizer(config: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch, fused on GPU), transformers 4.x's AdamW (adamw_hf: train.optim), or LAMB:
    apex's FusedLAMB when NVIDIA apex is importable, DeepSpeed's FusedLamb otherwise; LAMB needs a GPU."""
    o = config.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    common = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **common)
    if o.name == "adamw_hf":
        from train.optim import AdamWHF

        return AdamWHF(groups, **common)
    if device.type != "cuda":
        raise ConfigError(
            "optim.name=lamb needs a GPU (apex's FusedLAMB and DeepSpeed's FusedLamb are CUDA "
            "kernels); use optim.name=adamw on the CPU"
        )
    try:
        from apex.optimizers import FusedLAMB  # NVIDIA apex, built from source (not PyPI's "apex")
    except ImportError:
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(groups, **common)
    return FusedLAMB(groups, **common)


def build_scheduler(config: Config, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over optim.warmup_steps, then linear decay to 0 at total_steps (or constant)."""
    warmup = config.optim.warmup_steps
    linear = config.optim.schedule == "linear"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup)) if linear else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(config: Config, device: torch.device) -> Optional[torch.dtype]:
    """The forward's autocast dtype (None: fp32) from deepspeed.precision. The weights, their
    gradients and the optimizer stay fp32 (DeepSpeed's own bf16 mode, which casts the model,
    is never used), so evaluation, best-model selection and the saved models are fp32."""
    p = config.deepspeed.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def deepspeed_config(config: Config) -> Dict[str, Any]:
    """The DeepSpeed JSON config from the deepspeed section (fp32 engine: see autocast_dtype)."""
    d = config.deepspeed
    return {
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "gradient_clipping": d.gradient_clipping,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def experiment_notes(config: Config, world: int, global_negatives: Optional[str]) -> List[str]:
    """How this run differs from the experiment its configuration states (train.global_batch:
    that global batch on one process, every softmax over the whole batch); [] when it does not
    or when no global batch is stated."""
    stated, local = config.train.global_batch, config.train.batch_size
    if not stated:
        return []
    ga = config.deepspeed.gradient_accumulation_steps
    run = local * world * ga
    keys = local * (world if global_negatives else 1)
    notes = []
    if run != stated:
        notes.append(
            f"global batch {run} ({local} per rank × {world} rank(s) × {ga} accumulation) where the "
            f"configured experiment has {stated}: {stated / run:.3g}× the optimizer steps per epoch "
            "of that experiment"
        )
    if keys != stated:
        notes.append(
            f"each softmax sees {keys} keys (global negatives: {global_negatives or 'off'}) where the "
            f"configured experiment's sees {stated}"
        )
    if notes and stated % world == 0:
        notes.append(
            f"the configured experiment on {world} rank(s): --override train.batch_size={stated // world} "
            "deepspeed.gradient_accumulation_steps=1" + (" loss.global_negatives=gather" if world > 1 else "")
        )
    return notes


def _sts_module():
    try:
        from train import sts
    except ImportError as e:
        raise RuntimeError(
            f"the STS evaluation (train.sts) is not importable ({e}); train without it with "
            "--override train.eval_steps=0 train.eval_before=false train.eval_after=false"
        ) from e
    return sts


class Trainer:
    """One run of `config` on this rank: `run()` trains, evaluates and writes the report."""

    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.out = Path(config.train.output_dir)
        self.sts_dir = senteval_dir(config.train.sts_dir)
        t = config.train
        self.evaluating = t.eval_steps > 0 or t.eval_before or t.eval_after
        if self.evaluating:
            _sts_module()
        method = config.method
        self.texts, self.text_lines = (
            read_text(config.data.text, config.data.text_limit) if config.data.text else ([], [])
        )
        self.pairs = (
            load_pairs(config.data.pairs, regions=method == "mcseo", teacher=method == "kdmcse")
            if method != "simcse"
            else None
        )
        self.batches = Batches(
            len(self.texts), len(self.pairs.captions) if self.pairs else 0, t.batch_size, self.rank, self.world, t.seed
        )
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
        self.collator = Collator(
            self.tokenizer, config.model.max_length, method, config.model.phrase_encoding, config.loss.group_same_image
        )
        mode = config.loss.global_negatives
        mode = ("gather" if self.world > 1 else None) if mode == "auto" else None if mode == "none" else mode
        self.global_negatives = mode
        self.notes = experiment_notes(config, self.world, mode)
        if self.rank == 0:
            for note in self.notes:
                tqdm.write(f"note: this run is not the configured experiment: {note}", file=sys.stderr)
        torch.manual_seed(t.seed)  # the same initial heads on every rank
        image_dim = self.pairs.image_features.shape[1] if self.pairs else None
        teacher_dim = self.pairs.teacher_text.shape[1] if self.pairs is not None and method == "kdmcse" else None
        model = SentenceModel(config, image_dim, teacher_dim, mode, autocast_dtype(config, self.device)).to(self.device)
        ga = config.deepspeed.gradient_accumulation_steps
        steps_per_epoch = len(self.batches) // ga
        self.total_steps = t.max_steps or t.epochs * steps_per_epoch
        if self.total_steps <= 0:
            raise ConfigError(
                f"no optimizer step: {len(self.batches)} micro-batches per epoch with gradient_accumulation_steps={ga}"
            )
        optimizer = build_optimizer(config, model, self.device)
        scheduler = build_scheduler(config, optimizer, self.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config)
        )
        torch.manual_seed(t.seed + 1 + self.rank)  # different dropout masks on each rank
        self.state: Dict[str, Any] = {
            "micro_step": 0,
            "best": None,
            "results": {},
            "train_seconds": 0.0,
            "samples": 0,
            "skipped_terms": 0,
            "nonfinite_steps": 0,
        }

    # --- evaluation (rank 0 evaluates, the others wait) ---

    def _sentence_encoder(self, pooling: Optional[str] = None):
        """The model's sentence encoder (train.encoders.TransformersEncoder) with model.pooling, or
        with encoder pooling `pooling` ("cls", "mean") and no head."""
        from train.encoders import TransformersEncoder

        model = self.engine.module
        head = model.mlp if pooling is None and self.config.model.pooling == "cls" else None
        pooling = pooling or ("mean" if self.config.model.pooling == "mean" else "cls")
        return TransformersEncoder(
            model.encoder,
            self.tokenizer,
            pooling=pooling,
            head=head,
            max_length=self.config.model.eval_max_length,
            device=self.device,
        )

    def _encoder(self, desc: str, pooling: Optional[str] = None):
        """encode(sentences) -> (n, H): the sentence embeddings (see _sentence_encoder), in chunks
        under a progress bar."""
        encoder = self._sentence_encoder(pooling)

        bf16 = self.config.train.eval_cpu_bf16 and self.device.type == "cpu"

        def encode(sentences: List[str]) -> torch.Tensor:
            chunks = range(0, len(sentences), 2048)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return torch.cat(
                    [
                        encoder(sentences[i : i + 2048])
                        for i in tqdm(
                            chunks,
                            desc=f"{desc}: encoding {len(sentences)} sentences",
                            unit="chunk",
                            leave=False,
                            dynamic_ncols=True,
                        )
                    ]
                )

        return encode

    def _evaluate(self, full: bool, pooling: Optional[str] = None) -> Optional[Any]:
        """All STS sets (full) or the STS-B dev score, on rank 0; None on the other ranks.
        pooling: see _sentence_encoder."""
        result = None
        if self.rank == 0:
            sts = _sts_module()
            encode = self._encoder("STS" if full else "STS-B dev", pooling)
            tasks = sts.ALL_TASKS if self.config.train.sts_tasks == "all" else self.config.train.sts_tasks.split(",")
            result = sts.evaluate_sts(encode, self.sts_dir, tasks) if full else sts.stsb_dev(encode, self.sts_dir)
            self.engine.module.train()
        dist.barrier()
        return result

    def _log(self, record: Dict[str, Any], name: str = "metrics.jsonl") -> None:
        """Append a JSON line to metrics.jsonl (everything) or loss.jsonl (step and loss parts: the plot)."""
        if self.rank == 0:
            with open(self.out / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- the run ---

    def run(self) -> Dict[str, Any]:
        """Train to total_steps (resuming when a checkpoint exists); returns the run's summary."""
        config, t = self.config, self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = checkpoint.load_latest(self.engine, self.out) if t.resume else None
        if resumed:
            self.state.update(resumed["trainer"])
        elif self.rank == 0:
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        if self.state["micro_step"] == 0 and t.eval_before:
            self.state["results"]["before"] = self._report_sts("before training", self._evaluate(full=True))
            self._evaluate_own_pooling()
        self._train()
        summary = self._finish()
        return summary

    def _evaluate_own_pooling(self) -> None:
        """The starting model as it was meant to be used: a sentence-transformers directory's
        own pooling (results "own"; the "before" scores when the run evaluates that way)."""
        from train.evaluate import detect_pooling

        path = Path(self.config.model.name_or_path)
        if not (path / "1_Pooling" / "config.json").is_file():
            return
        own = detect_pooling(path)
        self.state["own_pooling"] = own
        same = self.config.model.pooling == {"mean": "mean", "cls": "cls_before_pooler"}[own]
        self.state["results"]["own"] = (
            self.state["results"]["before"]
            if same
            else self._report_sts(
                f"of the starting model, its own {own} pooling", self._evaluate(full=True, pooling=own)
            )
        )

    def _report_sts(self, when: str, results: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        if self.rank == 0 and results is not None:
            tqdm.write(f"STS {when}:\n" + _sts_module().sts_table({when: results}))
            self._log({"sts": when, **results})
        return results

    # --- non-finite values (train.guard) ---

    def _sources(self, kind: str, index: torch.Tensor) -> List[str]:
        """ "file:line" of each example of a batch."""
        if kind == "text":
            return [f"{self.config.data.text}:{self.text_lines[i]}" for i in index.tolist()]
        return [self.pairs.where[i] for i in index.tolist()]

    def _nonfinite(self, step: int, what: Optional[str], sources: List[str]) -> bool:
        """Every rank, after a check: `what` describes this rank's non-finite value (None: all
        finite). Raises NonFiniteError on every rank when one flagged (or returns True: skip the
        step, with train.skip_nonfinite); False when all are finite."""
        ranks = ranks_flagging(what is not None, self.device)
        if not ranks:
            return False
        if self.config.train.skip_nonfinite:
            if self.rank == ranks[0]:
                tqdm.write(f"step {step}: skipped, {what}; batch: {describe_sources(sources)}")
            return True
        where = (
            f"{what} on rank {self.rank}; the batch: {describe_sources(sources)}"
            if what is not None
            else f"a non-finite value on rank(s) {ranks} (that rank's message names the batch)"
        )
        raise NonFiniteError(
            f"step {step}: {where}. Stopped before the optimizer step: no checkpoint or model "
            "holds this state. Set train.skip_nonfinite=true to skip such steps instead"
        )

    def _check_weights(self, step: int) -> None:
        """Before a checkpoint, an evaluation or a saved model: the weights must be finite."""
        name = nonfinite_parameter(self.engine.module, gradients=False)
        ranks = ranks_flagging(name is not None, self.device)
        if ranks:
            raise NonFiniteError(
                f"step {step}: weight {name} is not finite (rank(s) {ranks}); no checkpoint or "
                "model was written from this state"
            )

    def _train(self) -> None:
        done = self.state["micro_step"] // self.config.deepspeed.gradient_accumulation_steps
        bar = tqdm(
            total=self.total_steps,
            initial=done,
            disable=self.rank != 0,
            unit="step",
            desc=self.config.method,
            dynamic_ncols=True,
        )
        try:
            self._steps(bar)
        finally:  # also when a non-finite value stops the run
            bar.close()

    def _steps(self, bar) -> None:
        t, ga = self.config.train, self.config.deepspeed.gradient_accumulation_steps
        total_micro = self.total_steps * ga
        micro = self.state["micro_step"]
        window: Dict[str, List[float]] = defaultdict(list)
        counts: Dict[str, int] = defaultdict(int)  # skipped_terms, nonfinite_steps of the log window
        window_seconds, window_samples, step_samples = 0.0, 0, 0
        plain_optimizer = not hasattr(self.engine.optimizer, "overflow")  # ZeRO-0 fp32: torch's, no check of its own
        skip, sources = False, []  # this optimizer step is skipped; its examples
        tick = time.perf_counter()
        self.engine.module.train()
        while micro < total_micro:
            kind, index = self.batches.indices(micro)
            if kind == "text":
                batch = self.collator.text([self.texts[i] for i in index.tolist()])
            else:
                batch = self.collator.pairs(self.pairs, index)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            step, sources = micro // ga + 1, sources + self._sources(kind, index)
            loss, parts = self.engine(batch)
            skipped = parts.pop("skipped_terms", None)
            part = nonfinite_part(loss, parts)
            bad = self._nonfinite(
                step, f"loss part {part!r} is not finite ({format_parts(loss, parts)})" if part else None, sources
            )
            skip = skip or bad
            # A skipped step's gradients are made NaN, so that every optimizer path drops them:
            # DeepSpeed's own check (ZeRO-1/2, bf16) or the one below (ZeRO-0).
            self.engine.backward(loss * float("nan") if bad else loss)
            boundary = (micro + 1) % ga == 0
            if boundary and plain_optimizer and not skip:
                name = nonfinite_parameter(self.engine.module, gradients=True)
                skip = self._nonfinite(step, f"the gradient of {name} is not finite" if name else None, sources)
            drop = boundary and plain_optimizer and skip
            with skipped_update(self.engine.module, self.engine.optimizer) if drop else contextlib.nullcontext():
                self.engine.step()
            if boundary and not plain_optimizer and not skip:
                skip = self._nonfinite(
                    step,
                    None
                    if self.engine.was_step_applied()
                    else "a gradient is not finite (DeepSpeed skipped the update)",
                    sources,
                )
            micro += 1
            if not bad:
                window["loss"].append(loss.item())
                for name, value in parts.items():
                    window[name].append(value.item())
            if skipped is not None:
                counts["skipped_terms"] += int(skipped.item())
                self.state["skipped_terms"] += int(skipped.item())
            step_samples += len(index) * self.world
            if micro % ga:
                continue
            if skip:
                counts["nonfinite_steps"] += 1
                self.state["nonfinite_steps"] += 1
            skip, sources = False, []
            step = micro // ga
            now = time.perf_counter()
            window_seconds += now - tick
            self.state["train_seconds"] += now - tick
            self.state["samples"] += step_samples
            window_samples += step_samples
            step_samples = 0
            self.state["micro_step"] = micro
            bar.update(1)
            if step % t.log_steps == 0 or step == self.total_steps:
                record = {
                    "step": step,
                    "lr": self.engine.get_lr()[0],
                    "samples_per_s": window_samples / window_seconds,
                    **{k: sum(v) / len(v) for k, v in window.items()},
                    **counts,
                }
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"}, refresh=False)
                self._log(record)
                self._log({"step": step, **{k: sum(v) / len(v) for k, v in window.items()}}, "loss.jsonl")
                window.clear()
                counts.clear()
                window_seconds, window_samples = 0.0, 0
            evaluate = t.eval_steps > 0 and (step % t.eval_steps == 0 or step == self.total_steps)
            save = (t.save_steps > 0 and step % t.save_steps == 0) or step == self.total_steps
            if evaluate or save:
                self._check_weights(step)
            if evaluate:
                self._dev(step)
            if save:
                checkpoint.save_checkpoint(self.engine, self.out, step, {"trainer": self.state}, t.keep_checkpoints)
            tick = time.perf_counter()  # evaluation and checkpoints are not training time

    def _dev(self, step: int) -> None:
        """STS-B dev at `step`; keeps the model when it is the best so far (the official scripts)."""
        score = self._evaluate(full=False)
        if self.rank != 0:
            return
        best = self.state["best"]
        self._log({"step": step, "stsb_dev": score})
        if best is None or score > best["score"]:
            name = checkpoint.save_model(
                self.engine.module, self.tokenizer, self.out, step, "best", best["model"] if best else None
            )
            self.state["best"] = {"step": step, "score": score, "model": name}
        tqdm.write(
            f"step {step}: STS-B dev {score:.2f} (best {self.state['best']['score']:.2f} "
            f"at step {self.state['best']['step']})"
        )

    def _finish(self) -> Dict[str, Any]:
        """Save the last model, evaluate the best one (or the last) on all STS sets, write the report."""
        t = self.config.train
        if self.rank == 0:
            checkpoint.save_model(self.engine.module, self.tokenizer, self.out, self.total_steps, "last")
        best = self.state["best"]
        if best is not None and t.eval_after:
            checkpoint.load_model_weights(self.engine.module, self.out / best["model"])
        if t.eval_after:
            which = f"after training (best dev, step {best['step']})" if best else "after training"
            self.state["results"]["after"] = self._report_sts(which, self._evaluate(full=True))
        summary = {
            "method": self.config.method,
            "steps": self.total_steps,
            "world_size": self.world,
            "train_seconds": self.state["train_seconds"],
            "samples_per_s": self.state["samples"] / max(self.state["train_seconds"], 1e-9),
            "skipped_terms": self.state["skipped_terms"],
            "nonfinite_steps": self.state["nonfinite_steps"],
            "best": best,
            "results": self.state["results"],
        }
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._export()
            self._report(summary)
        dist.barrier()
        return summary

    def _export(self) -> None:
        """The model the run ends with (the best by STS-B dev when eval_after, else the last) as a
        sentence-transformers directory with the run's pooling (and the MLP with pooling "cls")."""
        from train.export import export_sentence_transformers

        export_sentence_transformers(self._sentence_encoder(), self.out / "sentence-transformers")

    def _report(self, summary: Dict[str, Any]) -> None:
        """report.md: the run's facts, the STS table and plots (train.report), the loss curves."""
        from train.report import write_report

        c = self.config
        facts = [
            f"- encoder: {c.model.name_or_path}",
            f"- data: {len(self.texts)} sentences, {len(self.pairs.captions) if self.pairs else 0} captions",
            f"- {summary['steps']} optimizer steps, batch {c.train.batch_size} × {self.world} rank(s) × "
            f"{c.deepspeed.gradient_accumulation_steps} accumulation, ZeRO-{c.deepspeed.zero_stage}, "
            f"global negatives: {self.global_negatives or 'off'}",
            f"- training time {summary['train_seconds']:.1f} s, {summary['samples_per_s']:.1f} sentences/s",
            f"- {summary['skipped_terms']} loss term(s) skipped for want of a valid row (e.g. no phrase in a "
            f"batch), {summary['nonfinite_steps']} step(s) skipped for a non-finite loss or gradient",
        ]
        facts.append(
            f"- pooling {c.model.pooling}, precision {c.deepspeed.precision} (fp32 weights), "
            f"optimizer {c.optim.name} (eps {c.optim.eps:g}), seed {c.train.seed}"
        )
        facts += [f"- note: this run is not the configured experiment: {note}" for note in self.notes]
        if summary["best"]:
            facts.append(
                f"- best STS-B dev {summary['best']['score']:.2f} at step {summary['best']['step']} "
                f"(model: {summary['best']['model']}; sentence-transformers export: sentence-transformers/)"
            )
        results = summary["results"]
        verdict = training_verdict(results, self.state.get("own_pooling"))
        if verdict:
            facts.append(f"- **{verdict}**")
            tqdm.write(verdict)
        labels = {
            "own": f"starting model, own pooling ({self.state.get('own_pooling')})",
            "before": "before",
            "after": "after",
        }
        title = f"{c.method} run: {self.out.name}"
        path = write_report(
            self.out,
            sts={labels[k]: results[k] for k in ("own", "before", "after") if results.get(k)} or None,
            log_file=self.out / "loss.jsonl",
            title=title,
        )
        text = path.read_text()
        path.write_text(text.replace(f"# {title}\n", f"# {title}\n\n" + "\n".join(facts) + "\n", 1))


def training_verdict(results: Dict[str, Optional[Dict[str, float]]], own_pooling: Optional[str]) -> Optional[str]:
    """One sentence: did training beat the starting model's own score (results "own"), else its
    score before training ("before")? None without "after" or a reference."""
    after = results.get("after")
    name, ref = (
        (f"the starting model's own score ({own_pooling} pooling)", results["own"])
        if results.get("own")
        else ("the starting model's score", results.get("before"))
    )
    if not after or not ref:
        return None
    delta = after["avg"] - ref["avg"]
    if delta > 0:
        return f"Training improved the STS average over {name}: {ref['avg']:.2f} -> {after['avg']:.2f} ({delta:+.2f})."
    return (
        f"Training did not improve on {name}: {ref['avg']:.2f} -> {after['avg']:.2f} ({delta:+.2f}); "
        "the trained model is no better than the starting model used as it was meant to be."
    )


def train(config: Config) -> Dict[str, Any]:
    """Train `config` on this rank; the run's summary."""
    return Trainer(config).run()
