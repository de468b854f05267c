"""Train small classifiers on the offline datasets, and cache their weights so nothing retrains twice.

Weights live under ``$LASTBIT_CACHE`` (default ``~/.cache/lastbit/weights/``), one
``state_dict`` file per (model name, dataset, epochs, architecture + recipe hash).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lastbit.frontend import datasets

log = logging.getLogger(__name__)

CACHE_ENV = "LASTBIT_CACHE"


def train_classifier(
    model: nn.Module,
    train_arrays: tuple[np.ndarray, np.ndarray],
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``model`` in place with cross-entropy and return it in eval mode.

    ``train_arrays`` is ``(images, labels)`` as the loaders in ``datasets`` return them.
    ``optimizer`` is "adam" or "sgd" (momentum 0.9, cosine learning-rate decay).  The batch
    order and any random layers follow ``seed``, so a rerun gives the same weights.  The data
    moves to ``device`` (the model's) once, not per batch.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    images, labels = (t.to(device) for t in _as_tensors(train_arrays))
    n = len(labels)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    order_rng = np.random.default_rng(seed)
    start = time.perf_counter()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and friends
        model.train()
        for epoch in range(epochs):
            order = torch.from_numpy(order_rng.permutation(n)).to(device)
            seen = correct = 0
            loss_sum = 0.0
            bar = _progress(range(steps_per_epoch), progress, f"epoch {epoch + 1}/{epochs}")
            for step in bar:
                idx = order[step * batch_size:(step + 1) * batch_size]
                x, y = images[idx], labels[idx]
                logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                seen += len(y)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(loss.detach()) * len(y)
                if hasattr(bar, "set_postfix") and (step % 10 == 0 or step == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            log.info("epoch %d/%d: loss %.4f, train accuracy %.4f", epoch + 1, epochs, loss_sum / seen, correct / seen)
    log.info("trained %s for %d epoch(s) in %.1f s", type(model).__name__, epochs, time.perf_counter() - start)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, arrays: tuple[np.ndarray, np.ndarray], batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (run in eval mode) on ``(images, labels)``."""
    images, labels = _as_tensors(arrays)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            logits = model(images[start:start + batch_size])
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))


def cache_dir() -> Path:
    """Where trained weights are cached: ``$LASTBIT_CACHE`` or ``~/.cache/lastbit/weights``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "lastbit" / "weights"


def architecture_hash(model: nn.Module) -> str:
    """A short digest of the module tree and every parameter/buffer name, shape and dtype."""
    h = hashlib.sha256(repr(model).encode())
    for key, value in model.state_dict().items():
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
    return h.hexdigest()[:16]


def cached_weights_path(name: str, model: nn.Module, dataset: str, epochs: int, **recipe) -> Path:
    """The cache file for ``model`` trained on ``dataset`` for ``epochs`` with the given recipe."""
    h = hashlib.sha256(architecture_hash(model).encode())
    h.update(repr(sorted(recipe.items())).encode())
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / f"{safe_name}-{dataset}-e{epochs}-{h.hexdigest()[:12]}.pt"


def cached_trained(
    name: str,
    build_fn: Callable[[], nn.Module],
    dataset: str,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "adam",
    progress: bool = True,
) -> nn.Module:
    """``build_fn()`` with weights trained on ``dataset``'s train split, from the cache if there.

    On a miss it trains (logging the test accuracy) and stores the ``state_dict``
    atomically; an unreadable cache file is logged and retrained over.
    """
    model = build_fn()
    recipe = dict(lr=lr, batch_size=batch_size, seed=seed, optimizer=optimizer)
    path = cached_weights_path(name, model, dataset, epochs, **recipe)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            log.info("loaded trained %s weights from %s", name, path)
            return model.eval()
        except Exception as err:  # a truncated or foreign file: retrain rather than fail
            log.warning("ignoring unreadable cached weights %s (%s); retraining", path, err)
    log.info("no cached weights for %s on %s (%d epochs); training", name, dataset, epochs)
    train_classifier(model, datasets.load(dataset, "train"), epochs=epochs, lr=lr, batch_size=batch_size,
                     seed=seed, optimizer=optimizer, progress=progress)
    try:
        log.info("%s test accuracy on %s: %.4f", name, dataset, evaluate(model, datasets.load(dataset, "test")))
    except Exception as err:  # the accuracy is informative only
        log.debug("could not evaluate %s on %s test split: %s", name, dataset, err)
    _save_atomic(model.state_dict(), path)
    log.info("cached trained %s weights at %s", name, path)
    return model.eval()


def _save_atomic(state: dict, path: Path) -> None:
    # A crash mid-write must not leave a truncated file under the final name, since the
    # next run would load it; write beside it and rename (atomic on one filesystem).
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shareable like any download
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_tensors(arrays: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, unit="batch")
