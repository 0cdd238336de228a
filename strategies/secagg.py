"""The coordinator's arithmetic of secure aggregation: a ring sum of masked updates, then the masks off.

:class:`SecureSum` adds each masked update into one running sum as it arrives (the
coordinator holds one vector, whatever the number of sites), and never keeps a
site's own vector. :meth:`SecureSum.unmask` takes the secrets rebuilt from the
surviving sites' shares: the self-mask seed of every site whose input arrived,
and the mask key of every site that dropped out after sharing its keys, whose
pairwise masks its neighbours added and nobody cancelled. What is left is the
sum of the sites' encoded, weighted updates; :meth:`SecureSum.mean` decodes it.
The protocol's messages are :mod:`fedmri.server.secagg`'s; the primitives are
:mod:`fedmri.secagg`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedmri.secagg import WEIGHT_KEY, SecAggError, add_mask, agree, decode


class SecureSum:
    """A round's running sum of masked updates.

    Args:
        shapes: The update's arrays (key -> shape), as every site must send them.
        context: The round's context string (run and round), which the mask seeds are bound to.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], context: str) -> None:
        self.shapes = {k: tuple(s) for k, s in shapes.items()} | {WEIGHT_KEY: (1,)}
        self.context = context
        self.total = {k: np.zeros(s, dtype=np.uint32) for k, s in self.shapes.items()}
        self.sent: list[int] = []

    def add(self, node: int, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Fold one site's masked update into the sum; the reason it cannot be, else None."""
        if node in self.sent:
            return f"node {node} sent a second masked update"
        if set(arrays) != set(self.shapes):
            missing, extra = sorted(set(self.shapes) - set(arrays)), sorted(set(arrays) - set(self.shapes))
            return f"masked update keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, arr in arrays.items():
            if arr.dtype != np.uint32 or tuple(arr.shape) != self.shapes[key]:
                return f"{key}: expected uint32 {self.shapes[key]}, got {arr.dtype} {tuple(arr.shape)}"
        for key, arr in arrays.items():
            np.add(self.total[key], arr, out=self.total[key])
        self.sent.append(node)
        return None

    def unmask(self, graph: Mapping[int, Sequence[int]], shared: Collection[int], pk_s: Mapping[int, bytes],
               b_shares: Mapping[int, Sequence[bytes]], sk_shares: Mapping[int, Sequence[bytes]],
               thresholds: Mapping[int, int]) -> None:
        """Remove every mask that does not cancel, in place.

        Args:
            graph: node -> its neighbours, over the sites that shared keys.
            shared: The sites whose shares went out (they may have masked with each other).
            pk_s: node -> its public mask key.
            b_shares: node -> shares of its self-mask seed (sites whose input arrived).
            sk_shares: node -> shares of its private mask key (sites that shared, then dropped).
            thresholds: node -> shares needed for its secrets.

        Raises:
            SecAggError: Too few shares to rebuild a secret.
        """
        sent = set(self.sent)
        for node in sorted(sent):
            add_mask(self.total, self._rebuild(node, b_shares, thresholds, "self-mask seed"), -1)
        for node in sorted(set(shared) - sent):
            sk = self._rebuild(node, sk_shares, thresholds, "mask key")
            for peer in graph[node]:
                if peer in sent:  # the peer added +seed if peer < node, else -seed: take it off
                    add_mask(self.total, agree(sk, pk_s[peer], "mask", self.context), -1 if peer < node else +1)

    @staticmethod
    def _rebuild(node: int, shares: Mapping[int, Sequence[bytes]], thresholds: Mapping[int, int], what: str) -> bytes:
        got, need = list(shares.get(node, ())), int(thresholds[node])
        if len(got) < need:
            raise SecAggError(f"secure aggregation: {len(got)} shares of node {node}'s {what} came back, "
                              f"{need} are needed")
        try:
            return combine_shares(got[:need])
        except ValueError:
            raise SecAggError(f"secure aggregation: the shares of node {node}'s {what} do not combine") from None

    def mean(self, scale: float) -> tuple[dict[str, np.ndarray], int]:
        """The weighted mean of the updates (float64, by key) and the sum of the weights, after :meth:`unmask`.

        Raises:
            SecAggError: The weights sum to nothing (nothing arrived, or the masks did not come off).
        """
        weight = int(self.total[WEIGHT_KEY].view(np.int32)[0])
        if weight <= 0 or weight > 2**31 - 1:
            raise SecAggError(f"secure aggregation: the unmasked weight is {weight}; the masks did not come off")
        return {k: decode(v, scale) / weight for k, v in self.total.items() if k != WEIGHT_KEY}, weight
