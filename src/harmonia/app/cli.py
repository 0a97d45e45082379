"""Command line: ``harmonia train | report | audit | data | prep | list | bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonia.errors import HarmoniaError


def _cmd_train(args: argparse.Namespace) -> int:
    from harmonia.app.train.distributed import launched_distributed, shutdown_distributed

    try:
        return _train(args)
    except RuntimeError as exc:
        if not (launched_distributed() and _is_collective_failure(exc)):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"harmonia: error: rank {rank}: a collective operation with the other ranks failed or timed out "
            f"(train.dist_timeout_s bounds the wait): another rank has probably stopped; see its log above. "
            f"Restart with --resume to continue from the last checkpoint. ({str(exc).splitlines()[0]})",
            file=sys.stderr,
        )
        return 1
    finally:
        shutdown_distributed()


def _is_collective_failure(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistBackendError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def _train(args: argparse.Namespace) -> int:
    from harmonia.app.config import TaskKind, load_config
    from harmonia.app.train import build_trainer

    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    main_rank = trainer.dist.is_main
    what = "resuming" if args.resume else "training"
    model = (
        f"{cfg.pretrain.backbone.value} backbone, contrastive pre-training"
        if cfg.task is TaskKind.PRETRAIN
        else f"{cfg.model.fusion.value} fusion"
    )
    ranks = f" on {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    if main_rank:
        print(
            f"harmonia: {what} {cfg.name} ({', '.join(cfg.data.modalities)}; {model}){ranks} -> "
            f"{trainer.run_dir}",
            file=sys.stderr,
        )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        if not main_rank:
            return 130
        command = " ".join(["harmonia train", args.config, *args.overrides])
        if not trainer.checkpoint_path.exists():
            hint = (
                f"no epoch had finished, so there is no checkpoint. Start again with: {command} --overwrite"
            )
        elif trainer.epoch >= trainer.num_epochs:
            hint = f"training had finished; rerun the final evaluation with: {command} --resume"
        else:
            hint = f"the last checkpoint holds {trainer.epoch} finished epochs. "
            hint += f"Continue with: {command} --resume"
        print(f"\nharmonia: interrupted. {hint}", file=sys.stderr)
        return 130
    if main_rank:
        from harmonia.app.report import write_run_report_safely

        print(format_result(result.test, result.probe, result.seconds, str(result.run_dir)))
        page = write_run_report_safely(result.run_dir)
        if page is not None:
            print(f"report: {page} (and report.md beside it)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from harmonia.app.report import write_comparison, write_run_report

    if len(args.runs) == 1:
        if args.out:
            raise HarmoniaError("--out is for comparing several runs; one run's report goes into its folder")
        page = write_run_report(args.runs[0])
    else:
        page = write_comparison(args.runs, args.out)
    print(f"report: {page} (and report.md beside it)")
    return 0


def format_result(test: dict[str, float], probe: dict[str, float], seconds: float, run_dir: str) -> str:
    if "accuracy" not in test:  # pre-training: retrieval
        lines = [
            "zero-shot retrieval (test): "
            + "   ".join(f"{k} {v:.3f}" for k, v in test.items() if k.endswith(("R@1", "R@10")))
        ]
        if probe:
            lines.append(
                "digit linear-probe accuracy of each frozen backbone (test): "
                + "   ".join(f"{m} {v:.4f}" for m, v in probe.items())
            )
        lines.append(f"finished in {seconds:.0f} s; run folder {run_dir}")
        return "\n".join(lines)
    lines = [
        f"test accuracy {test['accuracy']:.4f}   macro-F1 {test['macro_f1']:.4f}   mAP {test['mAP']:.4f}",
    ]
    unimodal = {k.split("/", 1)[1]: v for k, v in test.items() if k.startswith("unimodal_accuracy/")}
    if unimodal:
        lines.append(
            "unimodal-logit accuracy (test): " + "   ".join(f"{m} {v:.4f}" for m, v in unimodal.items())
        )
    if probe:
        lines.append(
            "linear-probe accuracy of each frozen encoder (test): "
            + "   ".join(f"{m} {v:.4f}" for m, v in probe.items())
        )
    lines.append(f"finished in {seconds:.0f} s; run folder {run_dir}")
    return "\n".join(lines)


def _cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harmonia.app.audit import audit_conflicts
    from harmonia.app.config import load_config
    from harmonia.app.train.checkpoint import last_checkpoint_path

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.out_dir) / cfg.name
    checkpoint = Path(args.checkpoint) if args.checkpoint else last_checkpoint_path(run_dir)
    out = Path(args.out) if args.out else run_dir / f"audit_{args.mode}.csv"
    result = audit_conflicts(cfg, checkpoint, out, mode=args.mode, progress=not args.quiet)
    n = len(result.cosine)
    print(f"scored {n} training triplets with {checkpoint}; ranked CSV (most conflicting first): {out}")
    print(f"conflicting (cos < 0): {float((result.cosine < 0).float().mean()):.1%}")
    if result.auroc:
        print(
            f"misaligned triplets (ground truth): {int(result.noisy.sum())} of {n}; AUROC of each detector:"
        )
        for name, value in result.auroc.items():
            print(f"  {name:<20} {value:.3f}")
    return 0


def _cmd_prep(args: argparse.Namespace) -> int:
    from harmonia.data.prep import prepare
    from harmonia.data.raw_layouts import scan

    if args.dataset == "shards":
        return _prep_shards(args)

    found = scan(args.dataset, args.src)
    settings = found.settings
    if args.fps is not None:
        from dataclasses import replace

        settings = replace(settings, fps=args.fps)
    report = prepare(
        args.dataset, found.clips, args.dst, settings, args.workers, not args.quiet, found.problems
    )
    print(f"harmonia prep {args.dataset}: {report.summary()}\nindex: {Path(args.dst) / 'index.csv'}")
    if report.failed and not report.prepared and not report.already_done:
        print(
            f"harmonia: error: every one of the {len(report.failed)} clips failed (reasons above and in "
            f"{Path(args.dst) / 'prep_report.json'}); check --src, --fps and the files' codecs",
            file=sys.stderr,
        )
        return 1
    return 0


def _prep_shards(args: argparse.Namespace) -> int:
    from harmonia.data.shards import ShardSettings, write_shards

    settings = ShardSettings(
        frames=args.frames,
        frame_size=args.frame_size,
        seconds=args.seconds,
        n_mels=args.n_mels,
        shard_size=args.shard_size,
        test_fraction=args.test_fraction,
    )
    sizes = {"--frames": args.frames, "--frame-size": args.frame_size, "--n-mels": args.n_mels}
    for key, value in sizes.items():
        if value < 1:
            raise HarmoniaError(f"{key} must be at least 1, got {value}")
    if not 0 < args.test_fraction < 1 or args.shard_size < 1 or args.seconds <= 0:
        raise HarmoniaError("--test-fraction must be in (0, 1), --shard-size >= 1 and --seconds > 0")
    report = write_shards(args.src, args.dst, settings, args.workers, not args.quiet)
    print(f"harmonia prep shards: {report.summary()}\nindex: {Path(args.dst) / 'shards.json'}")
    if report.failed and not sum(report.samples.values()):
        print(
            f"harmonia: error: every one of the {len(report.failed)} clips failed (see "
            f"{Path(args.dst) / 'prep_report.json'}); check --src and the files' codecs",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from harmonia.app.config import AVDigitsRecipe, apply_overrides, settings_from
    from harmonia.data.avdigits import dataset_summary, format_summary, load_avdigits

    if args.dataset != "avdigits":
        raise HarmoniaError(f"unknown dataset {args.dataset!r}; available: avdigits")
    recipe = settings_from(AVDigitsRecipe, apply_overrides({}, args.overrides), prefix="data.avdigits")
    ds = load_avdigits(recipe, rebuild=args.rebuild, progress=not args.quiet)
    summary = dataset_summary(ds)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


@dataclass(frozen=True)
class BenchSpec:
    """How ``harmonia bench <name>`` calls its benchmark: ``harmonia.app.bench.<module>.<function>``
    (imported only when run) with ``out_dir``, ``overrides`` and ``progress``, plus the parsed options
    named in ``given`` (always passed) and in ``unless_set`` (passed only when set, else the function's
    own default); ``"steps=speed_steps"`` passes option ``speed_steps`` as keyword ``steps``.
    ``own_config``: why the benchmark refuses ``--config``."""

    module: str
    function: str
    given: tuple[str, ...] = ()
    unless_set: tuple[str, ...] = ()
    own_config: str | None = None

    def replot(self, args: argparse.Namespace) -> list[Path]:
        """Redraw the benchmark's figures from its saved JSON in ``args.out`` (no training)."""
        from harmonia.app.bench.pipeline import BenchReport

        plots = getattr(importlib.import_module(f"harmonia.app.bench.{self.module}"), "PLOTS", None)
        if not plots or self.function != f"run_{self.module}_benchmark":
            raise HarmoniaError(f"bench {args.benchmark} draws no figures; there is nothing to replot")
        return BenchReport(self.module, args.out).replot(plots)

    def run(self, args: argparse.Namespace) -> None:
        if self.own_config and args.config:
            raise HarmoniaError(f"bench {args.benchmark} {self.own_config}, not --config")
        kwargs = {}
        for names, always in ((self.given, True), (self.unless_set, False)):
            for keyword, _, option in (n.partition("=") for n in names):
                value = getattr(args, option or keyword)
                if always or value:
                    kwargs[keyword] = value
        module = importlib.import_module(f"harmonia.app.bench.{self.module}")
        getattr(module, self.function)(
            out_dir=args.out, overrides=args.overrides, progress=not args.quiet, **kwargs
        )


_SPEED = ("speed_steps", "speed_rounds")
_OWN_RECIPE = "runs its own recipe; change it with overrides"
#: the benchmarks of ``harmonia bench <name>``, in the order its help lists them
BENCHMARKS: dict[str, BenchSpec] = {
    "imbalance": BenchSpec("imbalance", "run_imbalance_benchmark", given=("config", "seeds")),
    "balance": BenchSpec(
        "balance",
        "run_balance_benchmark",
        given=("seeds", *_SPEED),
        unless_set=("methods", "variants"),
        own_config="runs on the defaults; change them with overrides",
    ),
    "balance-speed": BenchSpec(
        "balance",
        "run_speed_benchmark",
        given=("steps=speed_steps", "rounds=speed_rounds"),
        unless_set=("methods",),
    ),
    "pretrain": BenchSpec(
        "pretrain", "run_pretrain_benchmark", given=("seeds",), unless_set=("rates",), own_config=_OWN_RECIPE
    ),
    "harmonize": BenchSpec(
        "harmonize",
        "run_harmonize_benchmark",
        given=("seeds", *_SPEED),
        unless_set=("variants", "backbones", "steps", "evaluations"),
        own_config=_OWN_RECIPE,
    ),
    "finegrained": BenchSpec(
        "finegrained",
        "run_finegrained_benchmark",
        given=("seeds", *_SPEED),
        unless_set=("variants", "batch_sizes", "steps", "evaluations", "video_tokens"),
        own_config=_OWN_RECIPE,
    ),
    "finegrained-speed": BenchSpec(
        "finegrained_speed",
        "run_finegrained_speed_benchmark",
        given=("steps=speed_steps", "rounds=speed_rounds"),
        unless_set=(
            "variants",
            "batch_sizes",
            "kernel_batch_sizes",
            "kernel_chunk_sizes",
            "kernel_compiled",
            "repeats",
            "video_tokens",
        ),
        own_config=_OWN_RECIPE,
    ),
    "distributed": BenchSpec(
        "distributed", "run_distributed_benchmark", given=("nprocs", "epochs"), unless_set=("config",)
    ),
    "data": BenchSpec(
        "data",
        "run_data_benchmark",
        unless_set=("clips", "workers", "loader_workers", "clip_seconds", "clip_size", "rounds"),
        own_config="measures the repository's CREMA-D, Kinetics-Sounds and shard configs; change them with "
        "overrides",
    ),
    "compile": BenchSpec(
        "compile",
        "run_compile_benchmark",
        given=("steps=speed_steps", "rounds=speed_rounds"),
        unless_set=("tasks",),
        own_config=_OWN_RECIPE,
    ),
}


def _cmd_list(args: argparse.Namespace) -> int:
    """Print the registered names of one kind, one per line (with the first line of each docstring)."""
    from harmonia.app.registry import BALANCING, DATASETS, MODELS, Registry

    registries: dict[str, Registry[Any]] = {"methods": BALANCING, "datasets": DATASETS, "models": MODELS}
    registry = registries[args.kind]
    for name in registry.names():
        entry = registry.get(name)
        target = entry.build if args.kind == "datasets" else entry  # type: ignore[attr-defined]
        doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
        print(f"{name:<20} {doc[0]}" if args.verbose and doc else name)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    spec = BENCHMARKS.get(args.benchmark)
    if spec is None:
        raise HarmoniaError(f"unknown benchmark {args.benchmark!r}; available: {', '.join(BENCHMARKS)}")
    if args.replot:
        for path in spec.replot(args):
            print(f"redrew {path}")
        return 0
    spec.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmonia", description="Robust and balanced multimodal learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="experiment YAML, e.g. configs/avdigits_concat.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 train.epochs=3")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "report",
        help="(re)write a run's report.md and index.html, or compare several runs side by side",
    )
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/avdigits_concat")
    p.add_argument(
        "--out", help="comparison folder (default: compare-<names> beside the first run)", default=None
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("audit", help="rank training triplets by cross-modal gradient conflict (pretrain)")
    p.add_argument("config", help="the task=pretrain experiment YAML the checkpoint was trained with")
    p.add_argument("overrides", nargs="*", help="the same dotted overrides as the training run")
    p.add_argument("--checkpoint", help="checkpoint to audit (default: out_dir/name/checkpoints/last.pt)")
    p.add_argument("--out", help="CSV to write (default: out_dir/name/audit_<mode>.csv)")
    p.add_argument("--mode", choices=["feature", "parameter"], default="feature", help="where gradients meet")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("data", help="build a dataset (if needed) and print its statistics")
    p.add_argument("dataset", help="dataset name: avdigits")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. audio_snr_db=5 image_blur_sigma=1")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cache even if it is valid")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "prep",
        help="prepare a raw dataset (CREMA-D, Kinetics-Sounds, AVE, VGGSound), or write pre-training "
        "shards from videos with transcripts (prep shards)",
    )
    p.add_argument("dataset", help="cremad, kinetics_sounds, ave, vggsound, or shards")
    p.add_argument(
        "--src",
        required=True,
        help="the raw dataset folder (layouts: docs/datasets.md); shards: videos with .txt transcripts",
    )
    p.add_argument("--dst", required=True, help="output folder (frames, spectrograms, index.csv / shards)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--fps", type=float, default=None, help="frames kept per second (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    shards = p.add_argument_group("shards (harmonia prep shards; docs/pretraining.md)")
    shards.add_argument("--frames", type=int, default=8, help="frames per clip")
    shards.add_argument("--frame-size", type=int, default=32, help="side of the square frames in pixels")
    shards.add_argument("--seconds", type=float, default=4.0, help="seconds of each video kept")
    shards.add_argument("--n-mels", type=int, default=32, help="log-mel bands of the audio")
    shards.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shards.add_argument("--test-fraction", type=float, default=0.05, help="share of clips held out for test")
    p.set_defaults(func=_cmd_prep)

    p = sub.add_parser("list", help="print the registered balancing methods, datasets or models")
    p.add_argument("kind", choices=["methods", "datasets", "models"])
    p.add_argument("-v", "--verbose", action="store_true", help="add each entry's one-line description")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("bench", help="run a benchmark and write a Markdown report")
    *others, last = BENCHMARKS
    p.add_argument("benchmark", help=f"{', '.join(others)} or {last}")
    p.add_argument(
        "--nprocs", type=int, nargs="+", default=[1, 2], help="distributed: process counts (default 1 2)"
    )
    p.add_argument("--epochs", type=int, default=4, help="distributed: epochs per run (default 4)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    p.add_argument("--config", default=None, help="base config (default: the benchmark's own)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument(
        "--methods",
        nargs="+",
        help="balance, balance-speed: balancing methods to compare ('all': every registered method; "
        "'a+b' combines two; default: ogm_ge opm opm+ogm_ge), each with its fusion's baseline",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        help="balance: fusion/method pairs instead of --methods, e.g. concat/none film/opm; "
        "harmonize: baseline realign ...; "
        "finegrained, finegrained-speed: coarse finegrained finegrained-both finegrained-av",
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="finegrained: batch sizes (default 16 32); finegrained-speed: of the step curve "
        "(default 16 32 64 128 256)",
    )
    p.add_argument(
        "--kernel-batch-sizes",
        type=int,
        nargs="+",
        help="finegrained-speed: batch sizes of the loss kernel against the einsum (default 128 256)",
    )
    p.add_argument(
        "--kernel-chunk-sizes",
        type=int,
        nargs="+",
        help="finegrained-speed: also time the loss kernel with these rows per chunk (chunk_size)",
    )
    p.add_argument(
        "--kernel-compiled",
        action="store_true",
        help="finegrained-speed: also time the loss kernel with its elementwise passes compiled "
        "(FineGrainedNCE(compile=True); compiles first)",
    )
    p.add_argument(
        "--repeats", type=int, help="finegrained-speed: timed calls of each loss kernel variant (default 30)"
    )
    p.add_argument(
        "--steps",
        type=int,
        help="finegrained, harmonize: optimizer steps of every run, whatever its batch size "
        "(train.max_steps; default: the benchmark's)",
    )
    p.add_argument(
        "--evaluations",
        type=int,
        help="finegrained, harmonize: evaluations per run, for the curves (default: the benchmark's)",
    )
    p.add_argument(
        "--backbones", nargs="+", choices=["shared", "specific"], help="harmonize: backbones (default shared)"
    )
    p.add_argument(
        "--video-tokens",
        choices=["global", "time_local"],
        help="finegrained, finegrained-speed: the video tokens of every run's encoder (default time_local)",
    )
    p.add_argument(
        "--rates", type=float, nargs="+", help="pretrain: misalignment rates (default 0 0.1 0.3 0.5)"
    )
    p.add_argument(
        "--tasks", nargs="+", choices=["classify", "pretrain"], help="compile: tasks (default both)"
    )
    p.add_argument(
        "--speed-steps",
        type=int,
        default=20,
        help="balance-speed, harmonize, finegrained, finegrained-speed, compile: batches timed per round",
    )
    p.add_argument(
        "--speed-rounds",
        type=int,
        default=5,
        help="balance-speed, harmonize, finegrained(-speed), compile: timing rounds after a warm-up",
    )
    data = p.add_argument_group("data (harmonia bench data; docs/datasets.md, Throughput)")
    data.add_argument("--clips", type=int, help="clips generated and prepared (default 48)")
    data.add_argument("--workers", type=int, nargs="+", help="prep worker processes (default 1 2)")
    data.add_argument(
        "--loader-workers", type=int, nargs="+", help="DataLoader workers of the loaders (default 0 1 2)"
    )
    data.add_argument("--clip-seconds", type=float, help="length of the generated clips (default 10)")
    data.add_argument("--clip-size", help="WIDTHxHEIGHT of the generated clips (default 640x360)")
    data.add_argument("--rounds", type=int, help="interleaved prep/floor timing rounds (default 3)")
    p.add_argument("--out", default="bench-results", help="folder for runs and the report")
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw the figures from the saved <out>/<benchmark>/<benchmark>.json, without training",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from harmonia.reproducibility import set_reproducible_environment

    set_reproducible_environment()  # before anything imports torch and multiplies matrices
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # overrides may come after flags (`--overwrite optim.lr=0.1`): argparse leaves those in `extras`
    unknown = [e for e in extras if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    try:
        return int(args.func(args))
    except HarmoniaError as exc:
        print(f"harmonia: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
