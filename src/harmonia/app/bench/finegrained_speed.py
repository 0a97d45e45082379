"""``harmonia bench finegrained-speed``: what the fine-grained loss costs, from the kernel to the step.

Two measurements, no training runs:

* **the loss kernel**: fwd+bwd of :func:`~harmonia.losses.finegrained.finegrained_nce` (direction ``both``,
  one process, no gather) on L2-normalized random tokens a [B, K, D], b [B, J, D] against the bare similarity
  einsum S = a·bᵀ [B, K, B, J] with its backward (∂a = ∂S·b, ∂b = ∂Sᵀ·a for a given ∂S): the matmuls any
  implementation needs. Also timed: the einsum a second time (an A/A control: the noise floor) and the
  previous implementation, the same scores through autograd (``previous (autograd)``); on request, the
  loss with given rows per chunk and with its elementwise passes compiled. Interleaved call by call in
  rotated order, medians over repeats of the time and of the per-repeat ratio to the einsum; peak memory of
  each variant's fwd+bwd (:func:`~harmonia.app.bench.common.peak_memory_mib`), next to the size of one
  [B, B, K, J] block of similarities.
* **the scaling curve**: for each batch size, the paired step times of the coarse and the fine-grained
  variants of ``harmonia bench finegrained`` (same encoder, same batches, interleaved, with a second coarse
  trainer as an A/A control), their peak step memory, and the loss's share of the step: the median time of
  the loss's fwd+bwd alone, on detached copies of the tensors it received in one step, paired with the
  variant's own step.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harmonia.app.bench.common import paired_times, peak_memory_mib, prepare_steps
from harmonia.app.bench.finegrained import VARIANTS, VIDEO_TOKENS, _overrides, speed_trainers
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, unless_default
from harmonia.app.config import load_config
from harmonia.app.plotstyle import StyleMap
from harmonia.losses.finegrained import PoolDirection, _chunk_scores, finegrained_nce
from harmonia.losses.nce import nce_from_scores

BATCH_SIZES = (16, 32, 64, 128, 256)
KERNEL_BATCH_SIZES = (128, 256)
KERNEL_SHAPE = (32, 8, 64)  # K video tokens, J words, D
STEP_VARIANTS = ("coarse", "finegrained")
REPEATS = 30
TEMPERATURE, TAU_ATT = 0.07, 0.1
EINSUM, CONTROL, FINE, PREVIOUS = "einsum", "einsum (A/A)", "finegrained_nce", "previous (autograd)"
KERNELS = (EINSUM, CONTROL, FINE, PREVIOUS)
COMPILED = f"{FINE} (compiled)"


# ------------------------------------------------------------------------------------------------------
# the loss kernel


def kernel_inputs(batch: int, k: int, j: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """L2-normalized tokens a [B, K, D], b [B, J, D] (leaves that need gradients) and the ∂S [B, K, B, J]
    the einsum's backward is given."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(batch, k, d, generator=gen), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(batch, j, d, generator=gen), dim=-1).requires_grad_()
    return a, b, torch.randn(batch, k, batch, j, generator=gen)


def einsum_fwd_bwd(a: Tensor, b: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    """S_iknj = a_ik · b_nj and its backward for the upstream gradient ``grad``."""
    sim = torch.einsum("ikd,njd->iknj", a, b)
    return torch.autograd.grad(sim, (a, b), grad)


def finegrained_loss(a: Tensor, b: Tensor, chunk_size: int | None = None, compile: bool = False) -> Tensor:
    """The loss the kernel benchmark times: :func:`finegrained_nce`, direction ``both``, one process."""
    return finegrained_nce(
        a,
        b,
        temperature=TEMPERATURE,
        tau_att=TAU_ATT,
        direction="both",
        gather=False,
        chunk_size=chunk_size,
        compile=compile,
    )


def previous_loss(a: Tensor, b: Tensor) -> Tensor:
    """The same loss as the implementation before the hand-written backward computed it: the scores of one
    chunk through autograd (every [B, B, K, J] intermediate kept for backward), then symmetric InfoNCE."""
    scores = _chunk_scores(a, None, b, None, TAU_ATT, PoolDirection.BOTH)
    return nce_from_scores(scores, scores.T, 0, TEMPERATURE).mean()


def _loss_fwd_bwd(loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Any]:
    def run(a: Tensor, b: Tensor, _grad: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(loss(a, b), (a, b))

    return run


def kernel_calls(
    chunk_sizes: Sequence[int] = (), compiled: bool = False
) -> dict[str, Callable[[Tensor, Tensor, Tensor], Any]]:
    """Each variant's fwd+bwd on (a, b, ∂S), in :data:`KERNELS`' order, then the new loss with each of
    ``chunk_sizes`` rows per chunk (``finegrained_nce, chunk R``; :data:`FINE` takes the default) and,
    when ``compiled``, with its elementwise passes compiled (:data:`COMPILED`)."""
    calls = {
        EINSUM: einsum_fwd_bwd,
        CONTROL: einsum_fwd_bwd,
        FINE: _loss_fwd_bwd(finegrained_loss),
        PREVIOUS: _loss_fwd_bwd(previous_loss),
    }
    for rows in chunk_sizes:
        calls[chunk_variant(rows)] = _loss_fwd_bwd(functools.partial(finegrained_loss, chunk_size=rows))
    if compiled:
        calls[COMPILED] = _loss_fwd_bwd(functools.partial(finegrained_loss, compile=True))
    return calls


def chunk_variant(rows: int) -> str:
    return f"{FINE}, chunk {rows}"


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (nothing when None)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _call(call: Callable[[Tensor, Tensor, Tensor], Any], a: Tensor, b: Tensor, grad: Tensor, _: Any) -> Any:
    return call(a, b, grad)


def measure_kernel(
    batch: int,
    shape: tuple[int, int, int] = KERNEL_SHAPE,
    repeats: int = REPEATS,
    threads: int | None = None,
    progress: bool = True,
    chunk_sizes: Sequence[int] = (),
    compiled: bool = False,
) -> dict[str, Any]:
    """Median time (s) of each kernel variant's fwd+bwd at ``batch`` and the median of its per-repeat
    ratios to the einsum's, the size of one [B, B, K, J] float32 block (MiB) and how far the new loss and
    its gradient are from the previous implementation's."""
    k, j, d = shape
    calls = kernel_calls(chunk_sizes, compiled)
    with torch_threads(threads):
        a, b, grad = kernel_inputs(batch, k, j, d)
        loss_new, loss_old = finegrained_loss(a, b), previous_loss(a, b)
        grads_new = torch.autograd.grad(loss_new, (a, b))
        grads_old = torch.autograd.grad(loss_old, (a, b))
        times = paired_times(
            [functools.partial(_call, c, a, b, grad) for c in calls.values()],
            [None],
            repeats,
            progress,
            desc=f"loss kernel, batch {batch}",
        )
    return {
        "block_mib": batch * batch * k * j * 4 / 2**20,
        "variants": {name: dict(t) for name, t in zip(calls, times, strict=True)},
        "difference": {
            "loss": abs(float(loss_new.detach() - loss_old.detach())),
            "grad": max(float((n - o).abs().max()) for n, o in zip(grads_new, grads_old, strict=True)),
        },
    }


# ------------------------------------------------------------------------------------------------------
# the scaling curve


def _leaf(x: Any) -> Any:
    if isinstance(x, Tensor):
        copy = x.detach().clone()
        return copy.requires_grad_() if x.requires_grad and copy.is_floating_point() else copy
    return x


class LossAlone:
    """A trainer's loss fwd+bwd on its own: one training step records what its ``loss`` module receives;
    calling this runs that module's forward and backward on detached copies of those tensors
    (``step_result``: what that step returned)."""

    def __init__(self, trainer: Any, batch: dict[str, Any]) -> None:
        captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.loss = trainer.loss
        handle = self.loss.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append((args, kwargs)), with_kwargs=True
        )
        try:
            self.step_result = trainer.train_step(batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"a training step called the trainer's loss {len(captured)} times, expected once"
            )
        args, kwargs = captured[0]
        self.args = tuple(_leaf(x) for x in args)
        self.kwargs = {key: _leaf(x) for key, x in kwargs.items()}
        self.leaves = [
            x for x in (*self.args, *self.kwargs.values()) if isinstance(x, Tensor) and x.requires_grad
        ]

    def __call__(self, _batch: Any = None) -> None:
        out = self.loss(*self.args, **self.kwargs)
        torch.autograd.grad(getattr(out, "loss", out), self.leaves)


def measure_steps(
    variants: Sequence[str],
    batch_size: int,
    overrides: Sequence[str],
    steps: int,
    rounds: int,
    progress: bool = True,
    video_tokens: str = VIDEO_TOKENS,
) -> dict[str, Any]:
    """At ``batch_size``: each variant's median step time (s) and its ratio to the first variant's (plus
    ``<first> (A/A)``, a second trainer of the first variant), the median time of its loss fwd+bwd alone
    and that time's ratio to its own step (the loss's share)."""
    control = f"{variants[0]} (A/A)"
    names = [*variants, control]
    configs = [*variants, variants[0]]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = speed_trainers(configs, batch_size, overrides, video_tokens, tmp)
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        alone = [LossAlone(t, batches[0]) for t in trainers[: len(variants)]]
        n = len(trainers)
        times = paired_times(
            [*(t.train_step for t in trainers), *alone],
            batches,
            rounds,
            progress,
            reference=[0] * n + list(range(len(variants))),
            desc=f"step timing, batch {batch_size}",
        )
    result: dict[str, Any] = {name: dict(t) for name, t in zip(names, times, strict=False)}
    for i, name in enumerate(variants):
        loss = times[n + i]
        result[name].update(loss_seconds=loss["seconds"], loss_share=loss["ratio"])
    return result


def measure_memory(
    kernel_batch_sizes: Sequence[int],
    shape: tuple[int, int, int],
    threads: int | None,
    steps: Mapping[int, Mapping[str, Sequence[str]]],
    chunk_sizes: Sequence[int] = (),
    compiled: bool = False,
) -> dict[tuple[Any, ...], float]:
    """Peak memory (MiB) of each kernel variant's fwd+bwd, ``("kernel", batch, variant)``, and of one
    training step of each config (``steps``: batch → variant → overrides), ``("step", batch, variant)``;
    all in one fresh process (:func:`~harmonia.app.bench.common.peak_memory_mib`)."""
    return peak_memory_mib(
        _prepare_memory, list(kernel_batch_sizes), shape, threads, steps, list(chunk_sizes), compiled
    )


def _prepare_memory(
    kernel_batch_sizes: list[int],
    shape: tuple[int, int, int],
    threads: int | None,
    steps: Mapping[int, Mapping[str, Sequence[str]]],
    chunk_sizes: list[int],
    compiled: bool,
) -> dict[tuple[Any, ...], Callable[[], Any]]:
    if threads is not None:
        torch.set_num_threads(threads)
    runs: dict[tuple[Any, ...], Callable[[], Any]] = {}
    nothing = torch.empty(0)  # the losses make their own ∂S: the einsum's is not in their memory
    for batch in kernel_batch_sizes:
        a, b, grad = kernel_inputs(batch, *shape)
        for name, call in kernel_calls(chunk_sizes, compiled).items():
            given = grad if name in (EINSUM, CONTROL) else nothing
            runs["kernel", batch, name] = functools.partial(call, a, b, given)
    for batch, configs in steps.items():
        for name, run in prepare_steps({n: list(o) for n, o in configs.items()}).items():
            runs["step", batch, name] = run
    return runs


# ------------------------------------------------------------------------------------------------------
# the benchmark


def run_finegrained_speed_benchmark(
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    variants: Sequence[str] = STEP_VARIANTS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    kernel_batch_sizes: Sequence[int] = KERNEL_BATCH_SIZES,
    repeats: int = REPEATS,
    steps: int = 20,
    rounds: int = 5,
    video_tokens: str = VIDEO_TOKENS,
    kernel_shape: tuple[int, int, int] = KERNEL_SHAPE,
    kernel_chunk_sizes: Sequence[int] = (),
    kernel_compiled: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The loss kernel at ``kernel_batch_sizes`` (also with each of ``kernel_chunk_sizes`` rows per
    chunk, and compiled when ``kernel_compiled``) and the step-time / memory curve of ``variants`` at
    ``batch_sizes``; writes ``finegrained_speed.{json,md,png}`` into ``<out_dir>/finegrained_speed/``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not variants or not batch_sizes or repeats < 1 or steps < 1 or rounds < 1:
        raise ValueError("finegrained-speed needs variants, batch sizes and repeats, steps, rounds >= 1")
    threads = load_config(None, _overrides(variants[0], batch_sizes[0], overrides, video_tokens)).train
    configs = {b: {v: _overrides(v, b, overrides, video_tokens) for v in variants} for b in batch_sizes}
    memory = measure_memory(
        kernel_batch_sizes, kernel_shape, threads.num_threads, configs, kernel_chunk_sizes, kernel_compiled
    )
    kernel = {
        str(b): measure_kernel(
            b, kernel_shape, repeats, threads.num_threads, progress, kernel_chunk_sizes, kernel_compiled
        )
        for b in kernel_batch_sizes
    }
    timed = {
        str(b): measure_steps(variants, b, overrides, steps, rounds, progress, video_tokens)
        for b in batch_sizes
    }
    for (kind, batch, name), peak in memory.items():
        (kernel[str(batch)]["variants"] if kind == "kernel" else timed[str(batch)])[name]["peak_mib"] = peak
    summary: dict[str, Any] = {
        "overrides": list(overrides),
        "video_tokens": video_tokens,
        "threads": threads.num_threads or torch.get_num_threads(),
        "kernel": {
            "shape": dict(zip("KJD", kernel_shape, strict=True)),
            "direction": "both",
            "repeats": repeats,
            "batches": kernel,
        },
        "steps": {"variants": list(variants), "steps": steps, "rounds": rounds, "batches": timed},
    }
    command = bench_command(
        "finegrained-speed",
        overrides,
        f"--repeats {repeats} --speed-steps {steps} --speed-rounds {rounds}",
        f"--out {out_dir}",
        *unless_default("--variants", variants, STEP_VARIANTS),
        *unless_default("--batch-sizes", batch_sizes, BATCH_SIZES),
        *unless_default("--kernel-batch-sizes", kernel_batch_sizes, KERNEL_BATCH_SIZES),
        *unless_default("--kernel-chunk-sizes", kernel_chunk_sizes, ()),
        *(["--kernel-compiled"] if kernel_compiled else []),
        *unless_default("--video-tokens", [video_tokens], [VIDEO_TOKENS]),
    )
    summary["command"] = command
    BenchReport("finegrained_speed", out_dir).write(summary, format_report, PLOTS)
    return summary


def format_report(summary: dict[str, Any]) -> str:
    kernel, steps = summary["kernel"], summary["steps"]
    shape = kernel["shape"]
    first = steps["variants"][0]
    lines = [
        "# What the fine-grained loss costs",
        "",
        f"Measured with `{summary['command']}` ({summary['threads']} CPU thread(s)).",
        "",
        f"**The loss kernel**: fwd+bwd of `finegrained_nce` (direction `{kernel['direction']}`, "
        f"K={shape['K']} tokens, J={shape['J']} words, D={shape['D']}, L2-normalized random tokens) "
        "against the bare similarity einsum S = a·bᵀ [B, K, B, J] with its backward for a given ∂S; "
        "`previous (autograd)` is the same loss through autograd, as before the hand-written backward; "
        "`einsum (A/A)` times the einsum again (the noise floor). Medians over "
        f"{kernel['repeats']} repeats, the variants interleaved in rotated order; × einsum is the median of "
        "the per-repeat ratios. Peak memory: growth of a fresh process's resident set during one fwd+bwd; "
        "block: one [B, B, K, J] float32 tensor.",
        "",
        "| batch | variant | ms | × einsum | peak memory (MiB) | × block |",
        "|---|---|---|---|---|---|",
    ]
    for batch, by in kernel["batches"].items():
        for name, s in by["variants"].items():
            peak = s.get("peak_mib")
            lines.append(
                f"| {batch} | {name} | {s['seconds'] * 1000:.1f} | {s['ratio']:.2f} | "
                + ("– | –" if peak is None else f"{peak:.0f} | {peak / by['block_mib']:.2f}")
                + " |"
            )
    lines += [
        "",
        "Block size (MiB) and the largest difference between the new and the previous implementation "
        "(float32):",
        "",
        "| batch | block (MiB) | Δ loss | max Δ gradient |",
        "|---|---|---|---|",
    ]
    for batch, by in kernel["batches"].items():
        diff = by["difference"]
        lines.append(f"| {batch} | {by['block_mib']:.1f} | {diff['loss']:.1e} | {diff['grad']:.1e} |")
    lines += [
        "",
        f"**The training step** of `harmonia bench finegrained`'s encoder (video tokens "
        f"`{summary['video_tokens']}`): paired step times on the same {steps['steps']} batches, "
        f"{steps['rounds']} rounds after a warm-up, the trainers interleaved in rotated order; × {first} is "
        f"the median of the per-batch ratios; `{first} (A/A)` is a second {first} trainer (the noise floor). "
        "Loss alone: the loss's fwd+bwd on detached copies of the tensors it received in a step; its share "
        "is the median ratio to the variant's own step. Peak step memory: growth of a fresh process's "
        "resident set during one step.",
        "",
        f"| batch | variant | ms / step | × {first} | loss alone (ms) | loss share | peak step memory (MiB) "
        f"| memory × {first} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, by in steps["batches"].items():
        base = by[first].get("peak_mib")
        for name, s in by.items():
            peak = s.get("peak_mib")
            loss = (
                f"{s['loss_seconds'] * 1000:.1f} | {s['loss_share'] * 100:.0f} %"
                if "loss_share" in s
                else "– | –"
            )
            memory = "– | –" if peak is None else f"{peak:.0f} | " + (f"{peak / base:.2f}" if base else "–")
            lines.append(
                f"| {batch} | {name} | {s['seconds'] * 1000:.1f} | {s['ratio']:.2f} | {loss} | {memory} |"
            )
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    """Step time and peak step memory against batch size (log-log), coarse vs fine-grained, and the cost
    ratios: the loss kernel's to the einsum, the fine-grained step's to the coarse one."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    steps, kernel = summary["steps"], summary["kernel"]
    variants, first = steps["variants"], steps["variants"][0]
    batches = [int(b) for b in steps["batches"]]
    kernel_batches = [int(b) for b in kernel["batches"]]
    step, alone = "step", "loss alone"
    ratios = [f"loss kernel: {name} ÷ einsum" for name in (FINE, PREVIOUS, CONTROL)]
    for v in variants[1:]:
        ratios += [f"{v} ÷ {first}: step time", f"{v} ÷ {first}: step memory"]
    styles = StyleMap([*variants, *ratios], (step, alone))
    shape = kernel["shape"]
    with figure(path, 1, 3, figsize=(16, 4.6)) as (_, axes):
        time_ax, memory_ax, ratio_ax = axes
        for v in variants:
            by = [steps["batches"][str(b)][v] for b in batches]
            time_ax.plot(
                batches, [s["seconds"] * 1000 for s in by], label=f"{v}: step", **styles(v, step).kwargs()
            )
            time_ax.plot(
                batches,
                [s["loss_seconds"] * 1000 for s in by],
                label=f"{v}: loss fwd+bwd alone",
                **styles(v, alone).kwargs(),
            )
            if all("peak_mib" in s for s in by):
                memory_ax.plot(batches, [s["peak_mib"] for s in by], label=v, **styles(v, step).kwargs())
        for name, label in zip((FINE, PREVIOUS, CONTROL), ratios, strict=False):
            values = [kernel["batches"][str(b)]["variants"][name]["ratio"] for b in kernel_batches]
            ratio_ax.plot(kernel_batches, values, label=label, **styles(label, step).kwargs())
        for v in variants[1:]:
            by = [steps["batches"][str(b)][v] for b in batches]
            label = f"{v} ÷ {first}: step time"
            ratio_ax.plot(batches, [s["ratio"] for s in by], label=label, **styles(label, step).kwargs())
            base = [steps["batches"][str(b)][first].get("peak_mib") for b in batches]
            if all(base) and all("peak_mib" in s for s in by):
                label = f"{v} ÷ {first}: step memory"
                ratio_ax.plot(
                    batches,
                    [s["peak_mib"] / m for s, m in zip(by, base, strict=True)],
                    label=label,
                    **styles(label, step).kwargs(),
                )
        ratio_ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        time_ax.set(ylabel="ms", title="time per step (log-log)", yscale="log")
        memory_ax.set(ylabel="MiB", title="peak step memory (log-log)", yscale="log")
        ratio_ax.set(
            ylabel="ratio", title=f"cost ratios (kernel: K={shape['K']}, J={shape['J']}, D={shape['D']})"
        )
        ticks = sorted({*batches, *kernel_batches})
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        for ax in axes:
            ax.set(xlabel="batch size", xscale="log")
            ax.minorticks_off()
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, handlelength=3)
        for ax in (time_ax, memory_ax):
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)


#: the figure of ``harmonia bench finegrained-speed``, drawn from ``finegrained_speed.json``
PLOTS = {"finegrained_speed.png": _plot}
