"""Metric pretraining on a source dataset: a step-budgeted, seeded, resumable training loop.

``pretrain(config, out)`` trains ``config.arch`` with ``config.objective`` (``ce``, ``nca`` or
``instance``, see ``objectives``) on one dataset split and writes a checkpoint to ``out`` every
``checkpoint_every`` steps, at the end, and on Ctrl-C. ``resume=True`` continues from ``out``:
weights, optimizer, memory bank, step and loss history are restored, and because
every random draw of step ``t`` (the epoch permutation it falls in, its augmentation, its NCE
noise) comes from a ``torch.Generator`` seeded by ``(seed, t)`` alone, a resumed run on CPU
reproduces an uninterrupted one bit for bit. (On CUDA cuDNN kernels may differ in the last bits.)

Budgets are steps, not epochs, so CPU runs use short budgets and GPU runs the papers' ones.
The learning rate follows a cosine schedule over ``steps`` (after optional linear warm-up);
it is a function of the step only, so raising ``steps`` on resume simply extends the schedule.
AMP (bfloat16 autocast, :func:`fewshot_bench.runtime.autocast`) is used on CUDA only; objectives and the
memory bank stay in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fewshot_bench.backbones.augment import AUGMENTS, augment
from fewshot_bench.backbones.checkpoint import load_checkpoint, save_checkpoint
from fewshot_bench.backbones.embedders import Embedder
from fewshot_bench.backbones.nets import build_backbone, to_unit_range
from fewshot_bench.backbones.objectives import (
    Objective,
    build_objective,
    weighted_knn_predict,
)
from fewshot_bench.choices import OBJECTIVES
from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import FsbenchError, InputDataError, ProtocolError
from fewshot_bench.runtime import autocast, resolve_device

DEFAULT_LR = {"ce": 0.1, "nca": 0.1, "instance": 0.03}
DEFAULT_AUGMENT = {"ce": "none", "nca": "none", "instance": "strong"}
# fields that may change between a checkpoint and ``--resume``
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "log_every"}


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (besides device and data root).

    ``lr`` and ``augment`` default by objective: ce/nca lr 0.1 without augmentation,
    instance lr 0.03 with ``strong`` augmentation. ``tau`` defaults to 0.05 (nca) / 0.07
    (instance). ``nce_k`` = 0 uses the full softmax for instance discrimination.
    """

    dataset: str = "omniglot"
    split: str = "background"
    arch: str = "conv4"
    objective: str = "ce"
    steps: int = 1000
    batch_size: int = 128
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    augment: str | None = None
    tau: float | None = None
    embed_dim: int = 128
    memory_momentum: float = 0.5
    nce_k: int = 0
    image_size: int | None = None
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    amp: bool = True

    def resolved(self) -> PretrainConfig:
        """A copy with per-objective defaults filled in and values checked."""
        if self.objective not in OBJECTIVES:
            raise ProtocolError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )
        cfg = replace(
            self,
            lr=DEFAULT_LR[self.objective] if self.lr is None else self.lr,
            augment=DEFAULT_AUGMENT[self.objective] if self.augment is None else self.augment,
        )
        if cfg.augment not in AUGMENTS:
            raise ProtocolError(
                f"unknown augment {cfg.augment!r}; choose one of {', '.join(AUGMENTS)}"
            )
        if cfg.optimizer not in ("sgd", "adam"):
            raise ProtocolError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")
        if cfg.schedule not in ("cosine", "constant"):
            raise ProtocolError(f"unknown schedule {cfg.schedule!r}; use cosine or constant")
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1 or cfg.log_every < 1:
            raise ProtocolError(
                "steps, batch size, checkpoint_every and log_every must be positive"
            )
        return cfg


@dataclass
class PretrainResult:
    """What a (possibly resumed) run did: checkpoint path, final step, this run's per-step losses."""

    path: Path
    step: int
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    history: list[list[float]] = field(default_factory=list)


def derived_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and the ``stream`` numbers."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for augmentation and noise of training step ``step``."""
    return torch.Generator().manual_seed(derived_seed(seed, 1, step))


class BatchSchedule:
    """Batches without replacement within an epoch; epoch ``e``'s order is seeded by (seed, e)."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        self.n = n_items
        self.batch_size = min(batch_size, n_items)
        self.per_epoch = n_items // self.batch_size
        self.seed = seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, 0, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """The learning rate at ``step``: linear warm-up, then cosine to 0 (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_source(cfg: PretrainConfig, data_root: str | Path | None = None) -> LabeledData:
    """The configured dataset split as images (the pretraining source)."""
    from fewshot_bench.data import load_dataset

    kwargs = {} if cfg.image_size is None else {"image_size": cfg.image_size}
    data = load_dataset(cfg.dataset, cfg.split, data_root, **kwargs)
    if data.kind != "images":
        raise InputDataError(f"{cfg.dataset}/{cfg.split} holds features; pretraining needs images")
    return data


def _data_info(data: LabeledData) -> dict[str, Any]:
    return {
        "name": data.name,
        "split": data.split,
        "fingerprint": data.fingerprint(),
        "n_items": len(data),
        "n_classes": data.n_classes,
    }


@torch.no_grad()
def _train_mode_features(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Features as training computes them (batch-norm batch statistics), leaving the model's
    running statistics untouched: the memory bank's starting point."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    out = torch.cat(
        [model(images[s : s + batch_size]).float() for s in range(0, len(images), batch_size)]
    )
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    return out


def _make_optimizer(cfg: PretrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.momentum > 0,
    )


def _check_resumable(
    saved: dict[str, Any], cfg: PretrainConfig, info: dict[str, Any], path: Path
) -> None:
    old = saved["config"]
    diffs = [
        f"{k}: checkpoint {old.get(k)!r} vs now {v!r}"
        for k, v in asdict(cfg).items()
        if k not in _RESUMABLE_CHANGES and old.get(k) != v
    ]
    if saved["data"]["fingerprint"] != info["fingerprint"]:
        diffs.append(
            f"data: checkpoint trained on {saved['data']['name']}/{saved['data']['split']} with other contents"
        )
    if diffs:
        raise FsbenchError(
            f"cannot resume {path}: the run's settings differ ({'; '.join(diffs)}); "
            "rerun with the checkpoint's settings or write to another --out"
        )


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    *,
    data: LabeledData | None = None,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> PretrainResult:
    """Train ``config.arch`` with ``config.objective`` on ``data`` (default: the configured split)
    and keep the checkpoint ``out`` current. ``stop_at`` ends this call after that many total
    steps (the schedule still spans ``config.steps``), as an interruption would."""
    cfg = config.resolved()
    out = Path(out)
    device = resolve_device(device)
    data = data if data is not None else load_source(cfg, data_root)
    info = _data_info(data)
    if out.exists() and not (resume or overwrite):
        raise FsbenchError(f"{out} exists; pass --resume to continue it or choose another --out")

    images = data.images.to(device)
    labels = torch.as_tensor(data.labels, dtype=torch.long).to(device)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
        torch.manual_seed(derived_seed(cfg.seed, 2))
        model = build_backbone(cfg.arch, images.shape[1], images.shape[-1])
        objective: Objective = build_objective(
            cfg.objective,
            model.out_dim,
            labels.cpu(),
            data.n_classes,
            embed_dim=cfg.embed_dim,
            tau=cfg.tau,
            memory_momentum=cfg.memory_momentum,
            nce_k=cfg.nce_k,
        )
    model, objective = model.to(device), objective.to(device)
    optimizer = _make_optimizer(cfg, [*model.parameters(), *objective.parameters()])
    use_amp = cfg.amp and device.type == "cuda"
    start, history, wall_before = 0, [], 0.0

    if resume and out.exists():
        saved = load_checkpoint(out, map_location=device)
        _check_resumable(saved, cfg, info, out)
        model.load_state_dict(saved["state_dict"])
        objective.load_state_dict(saved["objective_state"])
        optimizer.load_state_dict(saved["optimizer"])
        start, history = int(saved["step"]), list(saved["history"])
        wall_before = float(saved.get("wall_seconds", 0.0))
    elif objective.uses_memory:
        objective.init_memory(_train_mode_features(model, images, max(cfg.batch_size, 64)))

    schedule = BatchSchedule(len(data), cfg.batch_size, cfg.seed)
    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    t0 = time.perf_counter()
    step = start

    def checkpoint() -> None:
        save_checkpoint(
            {
                "arch": model.arch,
                "in_channels": int(images.shape[1]),
                "image_size": int(images.shape[-1]),
                "out_dim": int(model.out_dim),
                "objective": cfg.objective,
                "step": step,
                "steps": cfg.steps,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "objective_state": {k: v.detach().cpu() for k, v in objective.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "config": asdict(cfg),
                "data": info,
                "history": history,
                "wall_seconds": wall_before + time.perf_counter() - t0,
                "torch_version": str(torch.__version__),
            },
            out,
        )

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    spec = AUGMENTS[cfg.augment]
    model.train()
    objective.train()
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"pretrain {cfg.arch}/{cfg.objective}",
        disable=not progress,
        dynamic_ncols=True,
    )

    def flush() -> None:
        if not pending:
            return
        vals = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        if not all(math.isfinite(v) for v in vals):
            raise InputDataError(
                f"pretraining diverged (loss {vals[-1]}) before step {step}; lower --lr "
                f"(now {cfg.lr}) or resume from the last checkpoint"
            )
        losses.extend(vals)
        history.append([step, float(np.mean(vals))])
        bar.set_postfix(loss=f"{history[-1][1]:.4f}", lr=f"{learning_rate(cfg, step - 1):.4g}")

    try:
        while step < stop:
            gen = step_generator(cfg.seed, step)
            idx = schedule.indices(step).to(device)
            x = augment(to_unit_range(images[idx]), gen, spec)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            with autocast(device, use_amp):
                feats = model(x)
            loss = objective(feats.float(), labels[idx], idx, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            objective.after_step()
            pending.append(loss.detach())
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == stop:
                flush()
            if step % cfg.checkpoint_every == 0 and step < stop:
                checkpoint()
    except KeyboardInterrupt:
        flush()
        checkpoint()
        bar.close()
        raise
    flush()
    checkpoint()
    bar.close()
    return PretrainResult(out, step, losses, wall_before + time.perf_counter() - t0, history)


def knn_accuracy(
    embedder: Embedder,
    train: LabeledData,
    test: LabeledData,
    device: str | torch.device = "cpu",
    k: int | tuple[int, ...] = 200,
    tau: float = 0.07,
) -> float | dict[int, float]:
    """Accuracy on ``test`` of weighted kNN (cosine, weights exp(s/τ); ``k=1``: 1-NN) over
    ``train``'s features; both splits must share classes. A tuple ``k`` gives ``{k: accuracy}``
    from one embedding pass."""
    if train.class_names != test.class_names:
        raise ProtocolError("kNN evaluation needs train and test splits with the same classes")
    device = resolve_device(device)
    ftr = embedder.embed(train.images, device)
    fte = embedder.embed(test.images, device)
    train_labels = torch.as_tensor(train.labels)
    accs = {}
    for kk in (k,) if isinstance(k, int) else k:
        pred = weighted_knn_predict(ftr, train_labels, fte, train.n_classes, k=kk, tau=tau)
        accs[kk] = float((pred.numpy() == test.labels).mean())
    return accs[k] if isinstance(k, int) else accs
