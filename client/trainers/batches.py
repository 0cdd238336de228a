"""Which samples each local step sees, drawn reproducibly, loaded in order.

Sites are small (a handful of training series), so a round of ``local-steps``
steps passes over the data many times. :func:`balanced_batches` cycles
through reshuffled epochs: every item is seen equally often, and no batch
holds the same item twice (a repeated series would give KoLeo and the
contrastive loss a false near-duplicate or a false negative).

Every random choice is made up front from one seed, and each draw's
augmentation has its own seed, so the result does not depend on
``num_workers``: a rerun is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fedmri.client.trainers.context import derive_seed


def balanced_batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """``steps`` batches of ``batch_size`` distinct indices in ``range(n)``, cycling reshuffled epochs.

    When an epoch runs out mid-batch, the next epoch's permutation puts the
    indices already in that batch last, so the batch stays duplicate-free and
    every index still comes once per epoch.

    Raises:
        ValueError: If ``batch_size`` is not in [1, n] or ``steps`` < 0.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size {batch_size} must be in [1, {n}] (the number of items)")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    order: list[int] = []
    out: list[list[int]] = []
    for _ in range(steps):
        batch: list[int] = []
        while len(batch) < batch_size:
            if not order:
                perm = [int(i) for i in rng.permutation(n)]
                order = [i for i in perm if i not in batch] + [i for i in perm if i in batch]
            batch.append(order.pop(0))
        out.append(batch)
    return out


class _Draws(Dataset):
    """Draw ``k`` -> ``transform(dataset[index[k]], seed_k)``, seeds fixed up front."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], seeds: Sequence[int],
                 transform: Callable[[dict[str, Any], int], Any]) -> None:
        self.dataset, self.indices, self.seeds, self.transform = dataset, list(indices), list(seeds), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        return self.transform(self.dataset[self.indices[k]], self.seeds[k])


def load_batches(
    dataset: Dataset,
    batches: Sequence[Sequence[int]],
    transform: Callable[[dict[str, Any], int], Any],
    seed: int,
    num_workers: int = 0,
    collate: Callable[[list[Any]], Any] = list,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Yield ``collate([transform(sample, seed_k) for k in batch])`` for each batch, in order.

    Args:
        dataset: The site's samples.
        batches: Index lists, e.g. from :func:`balanced_batches`.
        transform: Turns a sample dict into what the step needs; ``seed_k``
            seeds its randomness (augmentation) for that one draw.
        seed: The round's seed, from which every draw's seed derives.
        num_workers: DataLoader workers (0 loads in this process).
        collate: Joins a batch's draws (in the workers); default: the list itself.
            It must draw nothing at random: the draws' seeds are all there is.
        pin_memory: Put each collated batch in page-locked memory (for a CUDA
            device: the copy then runs asynchronously with ``non_blocking=True``).
            Only tensors made by ``collate`` benefit; a list of draws stacked
            later is pageable again.
    """
    flat = [i for b in batches for i in b]
    seeds = [derive_seed(seed, "draw", k) % 2**32 for k in range(len(flat))]
    starts = np.cumsum([0, *(len(b) for b in batches)])
    positions = [list(range(a, b)) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]
    loader = DataLoader(_Draws(dataset, flat, seeds, transform), batch_sampler=positions,
                        num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory)
    yield from loader
