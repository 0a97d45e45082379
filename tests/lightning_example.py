"""The two LightningModules of docs/lightning.md, loaded from the page itself, and the runs the Lightning
tests compare (in one process, or as one rank of a 2-process DDP run: :func:`ddp_rank`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

PAGE = Path(__file__).resolve().parents[1] / "docs" / "lightning.md"
#: the sizes of tests/helpers.py's tiny_experiment (its model and batch)
TINY_MODEL = {"batch_size": 32, "feature_dim": 16, "encoder_widths": (8, 16)}
STEPS = 2  # per epoch: the tiny data holds 2 full global batches of 32 (a third, smaller one in one process)
PRETRAIN_BATCH = 8  # global batch of the harmonizer runs


def load_example(index: int, as_main: bool = False) -> dict[str, Any]:
    """The namespace of the page's ``index``-th python block, run as a script (``as_main``) or imported."""
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)[index]
    namespace: dict[str, Any] = {"__name__": "__main__" if as_main else f"lightning_example_{index}"}
    exec(compile(code, f"{PAGE}#{index}", "exec"), namespace)
    return namespace


def tiny_data() -> Any:
    """The tiny AV-Digits recipe of the tests (the doc example's subset), audio and image."""
    from harmonia.data.avdigits import AVDigitsRecipe, load_avdigits
    from harmonia.data.sources import InMemoryData
    from helpers import TINY_RECIPE

    return InMemoryData(load_avdigits(AVDigitsRecipe(**TINY_RECIPE), progress=False), ["audio", "image"])


def lightning_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(accelerator="cpu", num_sanity_val_steps=0, default_root_dir=root, **quiet, **kwargs)


def copied(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def balanced_state(module: Any) -> dict[str, Any]:
    """The module's parameters and buffers, and each balancing method's state (``balance.<key>.<name>``)."""
    state = {k: copied(v) for k, v in module.model.state_dict().items()}
    for key, buffers in module.balancing.state_dict().items():
        state.update({f"balance.{key}.{k}": copied(v) for k, v in buffers.items()})
    return state


def pretrain_batches(rank: int = 0, world: int = 1, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """This rank's rows of ``steps`` global batches of random tri-modal inputs (the same in every world)."""
    from harmonia.data import captions

    g = torch.Generator().manual_seed(0)
    ids, mask = captions.tokenize(["a seven moving left", "number 7", "the digit three", "number 3"] * 4)
    rows = slice(rank * PRETRAIN_BATCH // world, (rank + 1) * PRETRAIN_BATCH // world)
    batches = []
    for _ in range(steps):
        whole = {
            "video": torch.rand(PRETRAIN_BATCH, 1, 8, 16, 16, generator=g),
            "audio": torch.randn(PRETRAIN_BATCH, 1, 32, 101, generator=g),
            "text": ids.view(PRETRAIN_BATCH, 2, -1),
            "text_mask": mask.view(PRETRAIN_BATCH, 2, -1),
        }
        batches.append({k: v[rows] for k, v in whole.items()})
    return batches


def harmonized_run(example: dict[str, Any], root: Path, devices: int = 1, sgd: bool = True) -> Any:
    """The harmonizer example trained on :func:`pretrain_batches` (with SGD: Adam turns float noise in
    gradients that are zero in exact arithmetic into full-size steps, hiding a DDP comparison)."""
    base = example["HarmonizedPretraining"]

    class WithSGD(base):  # type: ignore[misc, valid-type]
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0, verbose=False)
    module = WithSGD() if sgd else base()
    rank = int(os.environ.get("RANK", "0"))
    batches = DataLoader(pretrain_batches(rank, devices), batch_size=None)  # this rank's rows already
    strategy = "ddp" if devices > 1 else "auto"
    trainer = lightning_trainer(
        root,
        max_epochs=1,
        devices=devices,
        strategy=strategy,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=batches)
    return module


def harmonized_state(module: Any) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    harmonizer = module.harmonizing.harmonizer
    state["harmonizer.num_steps"] = torch.tensor(harmonizer.num_steps)
    state["harmonizer.gradvac_target"] = torch.tensor(harmonizer.gradvac_target)
    return state


def balanced_run(example: dict[str, Any], data: Any, root: Path, devices: int = 1) -> dict[str, Any]:
    """The balancing example (OPM + OGM-GE) for 2 epochs of :data:`STEPS` steps."""
    L.seed_everything(0, verbose=False)
    module = example["BalancedAVDigits"](data, **TINY_MODEL)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = lightning_trainer(
        root,
        max_epochs=2,
        limit_train_batches=STEPS,
        devices=devices,
        strategy=strategy,
        enable_checkpointing=False,
    )
    trainer.fit(module)
    return balanced_state(module)


def ddp_rank(rank: int, world: int, port: int, out: Path, data: Any) -> None:
    """One rank of the DDP test, in a process forked from the test's: joins the others as a rank that
    torchrun started (Lightning's ``ddp`` strategy reads the environment), runs both examples and saves what
    they trained to ``out/rank<r>.pt``."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as in a DataLoader worker: a forked child must not reuse the parent's threads
    balanced = balanced_run(load_example(0), data, out, devices=world)
    harmonized = harmonized_state(harmonized_run(load_example(1), out, devices=world))
    torch.save({"balanced": balanced, "harmonized": harmonized}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
