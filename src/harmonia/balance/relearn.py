"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024).

Yake Wei, Siwei Li, Ruoxuan Feng, Di Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning",
European Conference on Computer Vision (ECCV 2024); arXiv:2407.09705. Official code:
github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024 (``code/ours.py``, ``code/script/ours.sh``); BalanceMM's
version: github.com/GeWu-Lab/BalanceBenchmark (``balancemm/trainer/ReLearning_trainer.py``).

Instead of comparing the modalities with each other, the method diagnoses each modality on its own: how
separable its uni-modal representation space is on the training set and on held-out data. Every
``interval`` epochs (at most ``max_reinits`` times), for every modality m:

1. Diagnosing. The encoder's features ``φ^m(x)`` of the whole training split ``D`` and of the validation
   split ``V`` (eval mode, no gradient) are each scaled per feature dimension to [-1, 1] (min-max over
   that split) and clustered by k-means into K clusters, K = the number of classes. The purity of a
   clustering (majority label per cluster) is

       P = (1/N) Σ_clusters max_k |{i in cluster : y_i = k}|,

   giving ``P^m_D`` and ``P^m_V``. A modality whose training representation is much more separable than
   its held-out one (a large gap) is learnt well or over-fitted; a scarcely informative or worse-learnt
   one has a small gap.

2. Re-learning. The re-initialisation strength and the soft re-initialisation of the encoder are

       g^m = |P^m_D - P^m_V|,      α^m = tanh(λ · g^m),
       θ^m <- (1 - α^m) · θ^m + α^m · θ^m_0,

   with θ^m_0 the encoder's initial parameters. Each modality depends only on its own gap (no cross-modal
   term); well-learnt modalities are pulled back towards their initialisation more, which both curbs
   their over-training and lets the worse-learnt ones catch up.

Schedule (the official code): after training epoch e (counted from 0, after that epoch's evaluation),
diagnose and re-learn iff ``e > 0``, ``e % interval == 0`` and ``e // interval <= max_reinits``; so with
the defaults after epochs 20, 40 and 60 of the official 90. The rule is a function of the epoch, so a
resume needs no counter; θ_0 is kept in buffers (``init_<i>_<j>``: parameter j of modality i's encoder,
in ``named_parameters`` order) and is restored by ``load_state_dict``. Logged (with the epoch's metrics)
when it fires: ``balance/relearn/purity_train/<m>``, ``balance/relearn/purity_val/<m>``,
``balance/relearn/gap/<m>`` and ``balance/relearn/alpha/<m>``.

Harmonia specifics and differences from the official code:

* The diagnosis needs the validation split, which no per-step hook sees: Relearn uses the epoch-end hook
  :meth:`BalancingMethod.on_epoch_end`, whose ``features(split)`` runs the encoders over a whole split in
  eval mode (exactly what the official ``get_feature`` does for its ``my_train`` and ``val`` loaders).
  ``train_split`` / ``val_split`` name the splits (the data must have a validation split).
* k-means is harmonia's own (:func:`kmeans`: k-means++ seeding from a seeded ``torch.Generator``, Lloyd
  iterations in float64, the best of ``n_init`` runs by inertia); the official code calls scikit-learn's
  ``KMeans(n_clusters=K, random_state=0)`` (also k-means++ and Lloyd; its ``n_init`` depends on the
  scikit-learn version: 10 before 1.4, 1 from 1.4), so individual cluster assignments, and hence purities,
  can differ slightly on ambiguous data.
* Which parameters: all parameters of ``model.encoders[m]`` (the official code: every parameter named
  ``audio_net`` / ``visual_net``, i.e. the encoders, BatchNorm affine parameters included; BatchNorm running
  statistics are buffers and are left alone there and here). BalanceMM takes every parameter whose name
  contains the modality's name.
* Optimiser state: the official code assigns ``param.data`` and leaves the optimiser untouched (SGD
  momentum 0.9 and weight decay keep their buffers); here the parameters are changed in place under
  ``torch.no_grad()``, so the trainer's optimiser state likewise carries over unchanged.
* Distributed: every rank extracts the same full-split features; α is nevertheless computed on rank 0 and
  sent to the others (an all-reduce of rank 0's values), so all ranks apply the same re-initialisation.
* If the last epoch qualifies, the encoders are re-initialised after its evaluation (as in the official
  code), so a linear probe run after training sees the re-initialised encoders.
* Any number M >= 1 of modalities (the paper writes two, and the method is per modality).

Defaults and sources:

* ``lam = 3`` (λ): official ``--move_lambda`` default and ``ours.sh`` 3; BalanceMM ``move_lambda: 3``;
* ``interval = 20``: official ``--reinit_epoch`` default and ``ours.sh`` 20 (BalanceMM 15);
* ``max_reinits = 3``: official ``--reinit_num`` default and ``ours.sh`` 3 (BalanceMM 2);
* ``clusters = None``: K = the number of classes (official ``n_clusters=args.n_classes``);
* ``n_init = 10``, ``max_iter = 300``, ``tol = 1e-4``: scikit-learn's classic k-means settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalancingMethod, SplitFeatures
from harmonia.distributed import from_rank_zero
from harmonia.errors import ConfigError, InputError
from harmonia.settings import setting


@dataclass
class RelearnSettings:
    """Diagnosing & Re-learning hyper-parameters (defaults: the official code; see the module docstring)."""

    lam: float = setting(
        3.0, help="λ: re-initialisation strength α = tanh(λ·|P_train - P_val|) (official 3)", ge=0
    )
    interval: int = setting(
        20, help="diagnose after every epoch e > 0 with e % interval == 0 (official 20)", ge=1
    )
    max_reinits: int = setting(3, help="at most this many diagnoses / re-initialisations (official 3)", ge=0)
    clusters: int | None = setting(None, help="k-means clusters (null: the number of classes)", ge=2)
    n_init: int = setting(10, help="k-means restarts; the lowest-inertia clustering is kept", ge=1)
    max_iter: int = setting(300, help="k-means Lloyd iterations per restart, at most", ge=1)
    tol: float = setting(
        1e-4, help="k-means stops when the centres move less (relative to the variance)", ge=0
    )
    train_split: str = setting("train", help="the split whose purity is P_train")
    val_split: str = setting("val", help="the held-out split whose purity is P_val")


# --------------------------------------------------------------------------------------------------
# the maths


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Each column of ``[N, d]`` ``x`` mapped linearly onto ``[low, high]`` (its min to ``low``, its max to
    ``high``); a constant column maps to ``low`` (scikit-learn's ``MinMaxScaler``)."""
    x = x.double()
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - lo) / span * (high - low) + low


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability ∝ squared distance."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # fewer distinct points than clusters
            idx = int(torch.randint(n, (1,), generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(
    x: Tensor, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the rows of ``x`` ``[N, d]`` into ``k`` clusters, deterministic given ``seed``.

    k-means++ seeding, ``n_init`` restarts (the lowest inertia wins), each at most ``max_iter`` iterations,
    stopping when the centres move (squared, summed) less than ``tol`` times the mean per-dimension
    variance. An empty cluster keeps its centre. Returns ``(labels [N] long, centres [k, d] float64)``.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"kmeans needs a non-empty [N, d] tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise InputError(f"kmeans needs k >= 1, got {k}")
    x = x.detach().double().cpu()
    k = min(k, x.shape[0])
    threshold = tol * float(x.var(dim=0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, generator)
        for _ in range(max_iter):
            labels = torch.cdist(x, centres).argmin(1)
            counts = torch.bincount(labels, minlength=k).double()
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        labels = torch.cdist(x, centres).argmin(1)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2]


def purity(clusters: Tensor, labels: Tensor) -> float:
    """Purity of a clustering: the fraction of samples whose class is their cluster's majority class,
    ``(1/N) Σ_c max_k |{i : cluster_i = c, y_i = k}|``."""
    if clusters.shape != labels.shape or clusters.numel() == 0:
        raise InputError(
            f"purity needs one cluster per label, got {tuple(clusters.shape)} and {tuple(labels.shape)}"
        )
    clusters, labels = clusters.long().cpu(), labels.long().cpu()
    _, c = torch.unique(clusters, return_inverse=True)
    _, y = torch.unique(labels, return_inverse=True)
    table = torch.zeros(int(c.max()) + 1, int(y.max()) + 1, dtype=torch.long)
    table.index_put_((c, y), torch.ones_like(c), accumulate=True)
    return float(table.max(dim=1).values.sum()) / clusters.numel()


def relearn_alpha(purity_train: float, purity_val: float, lam: float) -> float:
    """Re-initialisation strength ``α = tanh(λ·|P_train - P_val|)``."""
    return float(torch.tanh(torch.tensor(lam * abs(purity_train - purity_val), dtype=torch.float64)))


@torch.no_grad()
def soft_reinit(params: Sequence[Tensor], initial: Sequence[Tensor], alpha: float) -> None:
    """``θ <- (1 - α)·θ + α·θ_0`` in place for each parameter and its initial value."""
    for p, p0 in zip(params, initial, strict=True):
        p.mul_(1 - alpha).add_(p0.to(device=p.device, dtype=p.dtype), alpha=alpha)


# --------------------------------------------------------------------------------------------------
# the method


class Relearn(BalancingMethod):
    """Diagnosing & Re-learning: per-modality purity gap -> soft re-initialisation of the encoder.

    Args:
        encoders: ``{modality: encoder}`` of the model (their parameters are re-initialised in place; the
            encoders are referenced, not registered, so they are not part of this module's state).
        num_classes: K when ``clusters`` is None (None: the number of distinct labels of the train split).
        seed: seeds k-means.
        lam, interval, max_reinits, clusters, n_init, max_iter, tol, train_split, val_split: see
            :class:`RelearnSettings`.
    """

    Settings: ClassVar[type[Any]] = RelearnSettings

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int | None = None,
        seed: int = 0,
        lam: float = 3.0,
        interval: int = 20,
        max_reinits: int = 3,
        clusters: int | None = None,
        n_init: int = 10,
        max_iter: int = 300,
        tol: float = 1e-4,
        train_split: str = "train",
        val_split: str = "val",
    ) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("Relearn needs at least one encoder (model.encoders is empty)")
        if lam < 0 or interval < 1 or max_reinits < 0:
            raise ConfigError(
                f"Relearn needs lam >= 0, interval >= 1 and max_reinits >= 0, got lam={lam}, "
                f"interval={interval}, max_reinits={max_reinits}"
            )
        if clusters is not None and clusters < 2:
            raise ConfigError(f"Relearn clusters must be >= 2 (or null), got {clusters}")
        self.modalities = tuple(encoders)
        self.num_classes, self.seed = num_classes, seed
        self.lam, self.interval, self.max_reinits, self.clusters = lam, interval, max_reinits, clusters
        self.n_init, self.max_iter, self.tol = n_init, max_iter, tol
        self.train_split, self.val_split = train_split, val_split
        # plain dict of lists: the encoders' parameters are referenced, not registered as submodules
        self._params: dict[str, list[nn.Parameter]] = {}
        self.param_names: dict[str, list[str]] = {}
        for i, m in enumerate(self.modalities):
            named = list(encoders[m].named_parameters())
            self._params[m] = [p for _, p in named]
            self.param_names[m] = [name for name, _ in named]
            for j, (_, p) in enumerate(named):
                self.register_buffer(f"init_{i}_{j}", p.detach().clone())
        self.last_alpha: dict[str, float] = {}

    @classmethod
    def build(cls, model: nn.Module, settings: RelearnSettings | None = None, seed: int = 0) -> Relearn:
        """Relearn over ``model.encoders``, remembering their current (initial) parameters as θ_0."""
        s = settings or RelearnSettings()
        encoders = getattr(model, "encoders", None)
        if not isinstance(encoders, Mapping) and not isinstance(encoders, nn.ModuleDict):
            raise ConfigError(
                f"Relearn re-initialises the encoders: {type(model).__name__} has no model.encoders dict"
            )
        num_classes = getattr(getattr(model, "fusion", None), "num_classes", None)
        num_classes = getattr(model, "num_classes", num_classes)
        return cls(
            dict(encoders.items()),
            num_classes=num_classes,
            seed=seed,
            lam=s.lam,
            interval=s.interval,
            max_reinits=s.max_reinits,
            clusters=s.clusters,
            n_init=s.n_init,
            max_iter=s.max_iter,
            tol=s.tol,
            train_split=s.train_split,
            val_split=s.val_split,
        )

    def initial(self, modality: str) -> list[Tensor]:
        """θ_0 of ``modality``'s encoder (its parameters at build time), in ``named_parameters`` order."""
        i = self.modalities.index(modality)
        return [getattr(self, f"init_{i}_{j}") for j in range(len(self._params[modality]))]

    def fires_after(self, epoch: int) -> bool:
        """Whether the method diagnoses and re-learns after training ``epoch`` (the official schedule)."""
        return epoch > 0 and epoch % self.interval == 0 and epoch // self.interval <= self.max_reinits

    def split_purity(self, features: Tensor, labels: Tensor, k: int) -> float:
        """Purity of the k-means clustering of min-max scaled ``features`` against ``labels``."""
        clusters, _ = kmeans(
            minmax_scale(features),
            k,
            seed=self.seed,
            n_init=self.n_init,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        return purity(clusters, labels)

    def diagnose(
        self,
        train: tuple[Mapping[str, Tensor], Tensor],
        val: tuple[Mapping[str, Tensor], Tensor],
    ) -> dict[str, tuple[float, float, float]]:
        """``{m: (P_train, P_val, α)}`` from the features and labels of the two splits."""
        (train_x, train_y), (val_x, val_y) = train, val
        k = self.clusters or self.num_classes or int(torch.unique(train_y).numel())
        out = {}
        for m in self.modalities:
            if m not in train_x or m not in val_x:
                raise InputError(f"Relearn needs features of modality {m!r}; got {sorted(train_x)}")
            p_train = self.split_purity(train_x[m], train_y, k)
            p_val = self.split_purity(val_x[m], val_y, k)
            out[m] = (p_train, p_val, relearn_alpha(p_train, p_val, self.lam))
        return out

    def reinit(self, alphas: Mapping[str, float]) -> None:
        """``θ^m <- (1 - α^m)·θ^m + α^m·θ^m_0`` for each modality's encoder, in place."""
        for m, a in alphas.items():
            soft_reinit(self._params[m], self.initial(m), a)

    def on_epoch_end(self, epoch: int, features: SplitFeatures, metrics: dict[str, float]) -> None:
        """After the official schedule's epochs: diagnose every modality and softly re-initialise it."""
        if not self.fires_after(epoch):
            return
        result = self.diagnose(features(self.train_split), features(self.val_split))
        values = torch.tensor([v for m in self.modalities for v in result[m]], dtype=torch.float64)
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        values = from_rank_zero(values, device)  # rank 0's diagnosis for everyone
        values = values.view(len(self.modalities), 3)
        alphas = {}
        for i, m in enumerate(self.modalities):
            p_train, p_val, a = (float(v) for v in values[i])
            alphas[m] = a
            metrics[f"balance/relearn/purity_train/{m}"] = p_train
            metrics[f"balance/relearn/purity_val/{m}"] = p_val
            metrics[f"balance/relearn/gap/{m}"] = abs(p_train - p_val)
            metrics[f"balance/relearn/alpha/{m}"] = a
        self.reinit(alphas)
        self.last_alpha = alphas
