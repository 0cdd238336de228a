"""The coordinator's messages of secure aggregation: keys and shares before a training round, unmasking after.

A secure round (``secure_aggregation.enabled`` on a training stage) wraps the
stage's ``train`` message in SecAgg+'s steps (:mod:`fedmri.client.secagg` has the
site's side):

1. :meth:`SecureRound.setup` asks every sampled site for two public keys, draws the
   round's neighbour graph over the sites that answered, sends each site its
   neighbours' keys and collects the encrypted shares they make, which it cannot read;
2. the pipeline sends the train message, with :meth:`SecureRound.extras` (the shares
   addressed to each site), and folds each masked reply into a
   :class:`~fedmri.strategies.secagg.SecureSum`;
3. :meth:`SecureRound.unmask` tells each site whose input arrived which neighbours
   survived and which dropped, collects the shares until every secret has its
   threshold of them (a site that died after sending is not waited for), and takes
   the masks off the sum.

A site that fails or declines a step is left out from there on, as in SecAgg+: its
pairwise masks are removed through its neighbours' shares of its mask key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedmri.protocol import SECAGG_KEY, SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK
from fedmri.secagg import (
    SEED_BYTES,
    SecAggError,
    distributed_bound,
    fixed_point_scale,
    neighbour_graph,
    share_threshold,
)
from fedmri.server.exchange import GridLike, ReplyBook, exchange
from fedmri.strategies.secagg import SecureSum


@dataclass
class SecureRound:
    """One training round's secure aggregation.

    Args:
        context: Run name and round: the mask seeds and share keys are bound to it.
        nodes: The sampled sites.
        degree: Neighbours per site (0: every other site).
        threshold: Fraction of a site's share holders needed to rebuild its secrets (at least a majority).
        clip_norm: L2 norm each site clips its update to.
        max_weight: A site's weight (example count) is capped at this.
        seed: The graph's seed.
        timeout_s: Seconds each step waits for replies.
    """

    context: str
    nodes: list[int]
    degree: int
    threshold: float
    clip_norm: float
    max_weight: float
    seed: int
    timeout_s: float
    pk_c: dict[int, bytes] = field(default_factory=dict)
    pk_s: dict[int, bytes] = field(default_factory=dict)
    graph: dict[int, tuple[int, ...]] = field(default_factory=dict)
    thresholds: dict[int, int] = field(default_factory=dict)
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ciphertext
    problems: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """The fixed-point scale for this round's sites (:func:`fedmri.secagg.fixed_point_scale`)."""
        return fixed_point_scale(len(self.nodes), self.max_weight, self.clip_norm)

    @property
    def shared(self) -> list[int]:
        """The sites whose shares went out: they mask, and may be unmasked."""
        return sorted(self.inbox)

    def _step(self, grid: GridLike, message_type: str, bodies: dict[int, dict],
              enough: Callable[[ConfigRecord], bool] | None = None) -> dict[int, ConfigRecord]:
        """Send ``bodies`` and collect the replies' records, until every site answered, the
        timeout passed, or ``enough`` (called on each record as it arrives) says the rest are not needed."""
        messages = [Message(RecordDict({SECAGG_KEY: ConfigRecord(body)}), dst_node_id=node, message_type=message_type)
                    for node, body in bodies.items()]
        book = ReplyBook(messages, self.timeout_s)
        got: dict[int, ConfigRecord] = {}
        for reply in exchange(grid, messages, self.timeout_s):
            node = book.take(reply)
            if node is None:
                continue
            record = reply.content.config_records.get(SECAGG_KEY)
            if record is None:
                book.problems.append((node, "failed", f"{message_type} reply without its {SECAGG_KEY!r} record"))
                continue
            got[node] = record
            if enough is not None and enough(record):
                unheard = book.nodes - book.answered
                if unheard:
                    log(INFO, "fedmri: secure aggregation: %s: enough replies, not waiting for node(s) %s",
                        message_type, sorted(unheard))
                book.answered |= unheard  # not needed, so not failed
                break
        step = message_type.split(".", 1)[1]
        self.problems += [(node, kind, f"{step}: {reason}") for node, kind, reason in book.finish()]
        return got

    def setup(self, grid: GridLike) -> list[int]:
        """Steps 1 and 2: keys, graph, shares. Returns the sites that go on to train.

        Raises:
            SecAggError: Too few sites answered to keep any site's secrets above the threshold.
        """
        replies = self._step(grid, SECAGG_KEYS, {n: {"context": self.context} for n in self.nodes})
        for node, record in replies.items():
            pk_c, pk_s = record.get("pk-c"), record.get("pk-s")
            if not (isinstance(pk_c, bytes) and isinstance(pk_s, bytes) and len(pk_c) == len(pk_s) == SEED_BYTES):
                self.problems.append((node, "failed", "secagg_keys: malformed public keys"))
                continue
            self.pk_c[node], self.pk_s[node] = pk_c, pk_s
        keyed = sorted(self.pk_c)
        if len(keyed) < 2:
            raise SecAggError(f"secure aggregation needs 2 sites with keys, {len(keyed)} answered")
        self.graph = neighbour_graph(keyed, self.degree, self.seed)
        self.thresholds = {n: share_threshold(len(self.graph[n]) + 1, self.threshold) for n in keyed}
        bodies = {n: {"context": self.context, "threshold": self.thresholds[n], "nodes": list(self.graph[n]),
                      "pk-c": [self.pk_c[v] for v in self.graph[n]], "pk-s": [self.pk_s[v] for v in self.graph[n]]}
                  for n in keyed}
        for node, record in self._step(grid, SECAGG_SHARES, bodies).items():
            dst, ciphertexts = list(record.get("dst", [])), list(record.get("ciphertexts", []))
            if sorted(dst) != sorted(self.graph[node]) or len(dst) != len(ciphertexts):
                self.problems.append((node, "failed", "secagg_shares: shares for other nodes than its neighbours"))
                continue
            for receiver, ciphertext in zip(dst, ciphertexts, strict=True):
                self.inbox.setdefault(int(receiver), {})
                self.inbox[int(receiver)][node] = bytes(ciphertext)
            self.inbox.setdefault(node, {})
        senders = {s for box in self.inbox.values() for s in box}
        self.inbox = {n: {s: c for s, c in box.items() if s in senders}
                      for n, box in self.inbox.items() if n in senders}
        ready = self.shared
        log(INFO, "fedmri: secure aggregation: %d of %d sites shared keys (neighbours %s, thresholds %s)", len(ready),
            len(self.nodes), "all" if self.degree <= 0 else self.degree, sorted(set(self.thresholds.values())))
        return ready

    def extras(self, node: int) -> dict[str, ConfigRecord]:
        """The records to add to ``node``'s train message: the shares its neighbours made for it."""
        box = self.inbox.get(node, {})
        return {SECAGG_KEY: ConfigRecord({"context": self.context, "src": list(box),
                                          "ciphertexts": [box[s] for s in box]})}

    def unmask(self, grid: GridLike, total: SecureSum) -> None:
        """Steps 3 and 4: shares from the sites whose input arrived; the masks off ``total``.

        Raises:
            SecAggError: Too few shares of some secret came back.
        """
        sent, shared = set(total.sent), set(self.shared)
        bodies = {n: {"context": self.context, "survivors": sorted((set(self.graph[n]) | {n}) & sent),
                      "dropped": sorted(set(self.graph[n]) & (shared - sent))} for n in sorted(sent)}
        b_shares: dict[int, list[bytes]] = {}
        sk_shares: dict[int, list[bytes]] = {}
        needed = [(n, b_shares) for n in sent] + [(n, sk_shares) for n in shared - sent]

        def collect(record: ConfigRecord) -> bool:
            """File one site's shares; True once every secret has its threshold of them."""
            for key, into in (("b", b_shares), ("sk", sk_shares)):
                for src, share in zip(record.get(f"{key}-src", []), record.get(f"{key}-shares", []), strict=False):
                    into.setdefault(int(src), []).append(bytes(share))
            return all(len(into.get(n, ())) >= self.thresholds[n] for n, into in needed)

        # A site that died after its masked update arrived never answers: the SuperLink only says
        # so once its heartbeat lapses (up to a minute), so the step ends as soon as the shares suffice.
        self._step(grid, SECAGG_UNMASK, bodies, enough=collect)
        total.unmask(self.graph, shared, self.pk_s, b_shares, sk_shares, self.thresholds)
        log(INFO, "fedmri: secure aggregation: unmasked the sum of %d sites (%d dropped after sharing keys)",
            len(sent), len(shared - sent))


def secure_round(stage: Any, context: str, nodes: list[int], seed: int, timeout_s: float) -> SecureRound:
    """A :class:`SecureRound` from a stage's config (``secure_aggregation``, and ``site_dp``).

    Under distributed site DP every site weighs 1, and the ring must hold each clipped update
    plus its noise share (:func:`fedmri.secagg.distributed_bound`), not the update alone.
    """
    sec, site_dp = stage.secure_aggregation, stage.site_dp
    clip_norm, max_weight = float(sec.clip_norm), float(sec.max_weight)
    if site_dp.mode == "distributed":
        clip_norm = distributed_bound(float(site_dp.clip_norm), float(site_dp.noise_multiplier), len(nodes))
        max_weight = 1.0
    return SecureRound(context=context, nodes=list(nodes), degree=int(sec.neighbours), threshold=float(sec.threshold),
                       clip_norm=clip_norm, max_weight=max_weight, seed=seed, timeout_s=timeout_s)
