"""``fsbench pretrain``: learn a metric on a source split and write a checkpoint.

The checkpoint is then a backbone for every feature method:
``fsbench run PROTOCOL -m nearest-prototype --backbone checkpoint:PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fewshot_bench.choices import ARCHS, OBJECTIVES


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Run (or resume) pretraining, then optionally report kNN accuracy on ``--eval-split``."""
    from fewshot_bench.backbones.checkpoint import CheckpointEmbedder
    from fewshot_bench.backbones.pretrain import (
        PretrainConfig,
        knn_accuracy,
        load_source,
        pretrain,
    )
    from fewshot_bench.runtime import resolve_device

    cfg = PretrainConfig(
        dataset=args.dataset,
        split=args.split,
        arch=args.arch,
        objective=args.objective,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        augment=args.augment,
        tau=args.tau,
        embed_dim=args.embed_dim,
        memory_momentum=args.memory_momentum,
        nce_k=args.nce_k,
        image_size=args.image_size,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        amp=not args.no_amp,
    ).resolved()
    device = resolve_device(args.device)
    data = load_source(cfg, args.data_root)
    print(
        f"pretraining {cfg.arch} with {cfg.objective} on {data.name}/{data.split} "
        f"({len(data)} images, {data.n_classes} classes, {tuple(data.images.shape[1:])}) "
        f"for {cfg.steps} steps of {cfg.batch_size} on {device}"
    )
    try:
        result = pretrain(
            cfg,
            args.out,
            data=data,
            device=device,
            resume=args.resume,
            overwrite=args.force,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        saved = (
            f"the checkpoint {args.out} holds the last finished step: rerun the same command "
            "with --resume to continue"
            if args.out.exists()
            else "no step had finished, nothing was written"
        )
        print(f"\nfsbench pretrain: interrupted; {saved}", file=sys.stderr)
        return 130
    last = result.history[-1][1] if result.history else float("nan")
    print(
        f"wrote {result.path} at step {result.step} (final loss {last:.4f}, "
        f"{result.wall_seconds:.1f} s of training)"
    )
    print(f"use it with: --backbone checkpoint:{result.path}")
    if args.eval_split:
        test = load_source(dataclasses.replace(cfg, split=args.eval_split), args.data_root)
        scores = {}
        layers = ["backbone"] + (["embed"] if cfg.objective != "ce" else [])
        for layer in layers:
            accs = knn_accuracy(
                CheckpointEmbedder(result.path, layer), data, test, device, k=(1, args.knn_k)
            )
            for k, acc in accs.items():
                scores[f"{layer}/knn{k}"] = acc
                print(
                    f"kNN accuracy on {test.name}/{test.split} ({layer} features, k={k}): {100 * acc:.2f}%"
                )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"checkpoint": str(result.path), **scores}, indent=2)
            )
    return 0


def add_pretrain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``fsbench pretrain`` to the CLI's subcommands."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone (ce, nca or instance discrimination) and write a checkpoint",
        description=(
            "Train a backbone on a source split for a budget of --steps optimisation steps; "
            "the checkpoint at --out is rewritten every --checkpoint-every steps and on Ctrl-C, "
            "and --resume continues it exactly. Use the result as --backbone checkpoint:PATH "
            "(raw backbone features) or checkpoint:PATH#embed (the L2-normalised 128-d metric "
            "of nca/instance)."
        ),
    )
    p.add_argument("--dataset", default="omniglot", help="source dataset (default: omniglot)")
    p.add_argument("--split", default="background", help="source split (default: background)")
    p.add_argument(
        "--arch", default="conv4", help=f"backbone: {', '.join(ARCHS)} or wrn-D-K (default: conv4)"
    )
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="ce", help="training objective (default: ce)"
    )
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 0.1 ce/nca, 0.03 instance)",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default="sgd",
        help="default: sgd (Nesterov, momentum 0.9)",
    )
    p.add_argument("--weight-decay", type=float, default=5e-4, help="default: 5e-4")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    p.add_argument(
        "--schedule", choices=["cosine", "constant"], default="cosine", help="default: cosine"
    )
    p.add_argument(
        "--augment",
        choices=["none", "light", "strong"],
        default=None,
        help="augmentation preset (default: none for ce/nca, strong for instance)",
    )
    p.add_argument(
        "--tau", type=float, default=None, help="temperature (default: 0.05 nca, 0.07 instance)"
    )
    p.add_argument(
        "--embed-dim", type=int, default=128, help="nca/instance embedding size (default: 128)"
    )
    p.add_argument(
        "--memory-momentum", type=float, default=0.5, help="memory bank momentum (default: 0.5)"
    )
    p.add_argument(
        "--nce-k",
        type=int,
        default=0,
        help="instance: NCE noise samples; 0 = full softmax (default)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this side (default: dataset's)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of batches, augmentation and init (default: 0)"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    p.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between checkpoints (default: 500)"
    )
    p.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    p.add_argument(
        "--force", action="store_true", help="overwrite an existing --out instead of resuming"
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."
    )
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument(
        "--eval-split",
        default=None,
        help="after training, report kNN accuracy on this split of the same dataset (same classes)",
    )
    p.add_argument(
        "--knn-k", type=int, default=200, help="k of the weighted kNN evaluation (default: 200)"
    )
    p.add_argument("--json", default=None, help="also write the kNN scores to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the datasets (default: $FSBENCH_DATA or ~/.cache/fewshot-bench/data)",
    )
    p.set_defaults(func=cmd_pretrain)
    return p
