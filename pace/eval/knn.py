"""k-nearest-neighbour classification on frozen features (DINO's protocol).

Every sample's pooled pre-logits feature (`forward_head(forward_features(x), pre_logits=True)`, the input of the
classifier) is L2-normalised; a test sample's `k` most cosine-similar training samples vote for their classes with
weight `exp(similarity / temperature)`. Features are gathered from every rank and sorted by key before voting, so
the result is the same on every rank and for any number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pace.distributed import DistEnv, resolve_dist_env
from pace.eval.classify import EvalResult
from pace.eval.forward import LoaderWait, eval_mode, forward_batches
from pace.eval.gather import gather_predictions
from pace.eval.predictions import Predictions, canonicalise
from pace.eval.scoring import score_predictions
from pace.eval.tta import FlipTTA

KNN_K = 20
KNN_TEMPERATURE = 0.07


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled pre-logits features of a timm model (the mean over both views under `FlipTTA`).

    Raises:
        TypeError: the model has no timm `forward_features` / `forward_head`.
    """
    if isinstance(model, FlipTTA):
        return (pooled_features(model.model, images) + pooled_features(model.model, images.flip(-1))) / 2
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__} has no forward_features/forward_head; k-NN needs a timm model")
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    env: DistEnv | None = None,
    allow_partial: bool = False,
    **forward_options,
) -> tuple[Predictions, float]:
    """L2-normalised features of every sample on every rank, sorted by key.

    The features ride in the `logits` field of `Predictions`, so they are gathered and checked for repeated keys
    exactly as predictions are.

    Args:
        model: a timm model (DDP wrappers are looked through).
        loader: yields `(images, targets, keys)` for this rank's share.
        env: this process's place in the job, whose ranks are gathered (None: `resolve_dist_env()`).
        allow_partial: drop repeated keys with a warning instead of raising.
        **forward_options: `device` and optionally `amp_dtype`, `channels_last`, `limit_batches`, as
            `pace.eval.forward.forward_batches` takes them.

    Returns:
        Canonical rows with `logits` = (N, D) float32 unit-norm features, and this rank's data-loading seconds.
    """
    parts = []
    wait = LoaderWait()
    with eval_mode(model) as net:
        forward = partial(pooled_features, net)
        for _, features, targets, keys in forward_batches(forward, loader, wait=wait, **forward_options):
            features = F.normalize(features.float(), dim=1).cpu()
            n = len(keys)
            empty = torch.zeros(n, 1, dtype=torch.long)
            loss = torch.full((n,), float("nan"))
            parts.append(Predictions(keys, empty, targets.long(), loss, features.shape[1], features))
    if parts:
        local = Predictions.concat(parts)
    else:  # this rank got no samples; the feature width comes from the other ranks
        no_rows = torch.zeros(0, dtype=torch.long)
        local = Predictions([], no_rows.reshape(0, 1), no_rows, torch.zeros(0), 0, torch.zeros(0, 0))
    gathered = gather_predictions(local, resolve_dist_env() if env is None else env)
    preds, _ = canonicalise(gathered, allow_partial=allow_partial)
    return preds, wait.seconds


def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class votes.

    Args:
        train_features: (N, D) unit-norm memory bank.
        train_labels: (N,) class indices.
        test_features: (M, D) unit-norm queries.
        num_classes: the number of classes.
        k: neighbours per query (at most N).
        temperature: the votes are `exp(cosine / temperature)`.
        chunk: queries per similarity block (bounds the (chunk, N) matrix).

    Returns:
        (M, num_classes) summed vote weights.
    """
    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start : start + chunk] @ train_features.T  # (m, N) cosine similarities
        top_sims, top_index = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        out.append(votes.scatter_add_(1, train_labels[top_index], weights))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_evaluate(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    device: torch.device | str,
    num_classes: int | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    topk: tuple[int, ...] = (1, 5),
    name: str = "knn",
    label_sets=None,
    amp_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    env: DistEnv | None = None,
    limit_batches: int | None = None,
    allow_partial: bool = False,
) -> EvalResult:
    """k-NN accuracy of a model's frozen features: the test samples classified by their training neighbours.

    Call it on every rank with that rank's loaders; the result is the same on every rank.

    Args:
        model: a timm model.
        train_loader: this rank's share of the memory bank `(images, targets, keys)`.
        test_loader: this rank's share of the samples to classify.
        device: where features are computed and compared.
        num_classes: the number of classes (None: the largest training label + 1).
        k: neighbours per query.
        temperature: vote temperature.
        topk: the top-k accuracies to report.
        name: the metric group (`knn/top1`, ...).
        label_sets: metric group -> `LabelSets` also scored by key (e.g. ImageNet-ReaL).
        amp_dtype: autocast dtype or None.
        channels_last: feed channels-last images.
        env: this process's place in the job (None: `resolve_dist_env()`).
        limit_batches: stop after this many batches per rank and loader (implies partial).
        allow_partial: accept repeated keys (dropped with a warning).
    """
    allow_partial = allow_partial or limit_batches is not None
    start = time.perf_counter()
    options = {"device": device, "amp_dtype": amp_dtype, "channels_last": channels_last, "env": env}
    options.update(limit_batches=limit_batches, allow_partial=allow_partial)
    bank, bank_seconds = extract_features(model, train_loader, **options)
    queries, query_seconds = extract_features(model, test_loader, **options)
    labelled = bank.targets >= 0
    if not bool(labelled.any()):
        raise ValueError("k-NN: the memory bank has no labelled samples")
    classes = num_classes or int(bank.targets.max()) + 1
    votes = knn_votes(
        bank.logits[labelled].to(device),
        bank.targets[labelled].to(device),
        queries.logits.to(device),
        num_classes=classes,
        k=k,
        temperature=temperature,
    ).cpu()
    n = len(queries)
    preds = Predictions(
        keys=queries.keys,
        topk=votes.topk(min(max(max(topk), 5), classes), dim=1).indices,
        targets=queries.targets,
        loss=torch.full((n,), float("nan")),  # votes are not probabilities: no NLL or calibration
        num_classes=classes,
    )
    metrics, counts = score_predictions(preds, topk=topk, name=name, label_sets=label_sets)
    counts["memory_bank"] = int(labelled.sum())
    return EvalResult(metrics, counts, time.perf_counter() - start, bank_seconds + query_seconds, preds)
