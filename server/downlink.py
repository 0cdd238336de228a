"""Send each site only the parameter groups it lacks: the coordinator's side of the group cache.

A request names the digest of every down group that the round leaves unchanged
(:attr:`fedmri.wire.StageGroups.kept`; :func:`fedmri.wire.group_digest`) in its ``digests``
record (:data:`fedmri.protocol.DIGESTS_KEY`); its ``arrays`` carry the other groups and
those named groups whose digest that site has not acknowledged, and the site takes the
rest from its cache (:mod:`fedmri.client.group_cache`). A site acknowledges the digests of a request by a
successful reply to it (no error, no decline). The coordinator remembers them per site
name, since node ids change when a site reconnects, and keeps nothing of it in the
checkpoint: after a resume every site gets every group once.

A site that lacks a named group (its cache wiped, the site moved to a new machine) answers
with the missing-groups status (:data:`fedmri.protocol.MISSING_GROUPS`). That reply is not
the site's answer: :meth:`RoundDownlink.on_reply` returns a second message for the same
round with every down group in full, and the site's answer is its reply to that one. A site
that misses twice in a run gets every group in full from then on: its cache does not keep
what it is sent.

Per round the pipeline calls :meth:`Downlink.start` and sends ``messages``; then either

- ``grid = round.bound(grid)``: a grid whose ``push_messages``/``pull_messages`` and
  ``send_and_receive`` resend by themselves and hand over the answer to the resend as the
  reply to the first message; or
- a receive loop of its own hands every reply to ``round.on_reply`` and, when that returns a
  message, pushes it and waits for its reply instead.

Pretraining's student groups change every round by aggregation: they are neither named nor
hashed nor cached. Its teacher is rebuilt (:attr:`fedmri.wire.StageGroups.rebuilt`): the
request names the teacher's digest and, in its ``rebuild`` record
(:data:`fedmri.protocol.REBUILD_KEY`), how the site makes it from the student it carries: a
copy before the teacher first moves, then the coordinator's EMA (:meth:`Downlink.moved`) of
the teacher that site acknowledged last round. A site that did not take part in the last
round gets the teacher in full. At ``base`` that halves the pretraining downlink (892 MB to
446 MB per site per round). After alignment the frozen encoder goes once, and a heads,
evaluate or search round sends the groups that changed and 64-character digests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from torch import Tensor

from fedmri import wire
from fedmri.protocol import ARRAYS_KEY, CONFIG_KEY, DIGESTS_KEY, MISSING_GROUPS, REBUILD_KEY, STATUS_KEY, reply_status
from fedmri.server.exchange import node_of

# Missing-groups replies after which a site gets every group in full for the rest of the run.
MAX_MISSES = 2


class Downlink:
    """Which group digests each site holds, over a run.

    Args:
        enabled: False sends every down group every round and names no digests
            (the federation config's ``group_cache``, for debugging).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # site name -> group -> the digest it acknowledged last.
        self.held: dict[str, dict[str, str]] = {}
        # site name -> its missing-groups replies in this run.
        self.misses: dict[str, int] = {}
        # rebuilt group -> (the digest it moved from, the EMA momentum), for the next round only.
        self.moves: dict[str, tuple[str, float]] = {}

    def start(self, state: Mapping[str, Tensor], groups: Sequence[str], config: ConfigRecord, message_type: str,
              nodes: Iterable[int], site_name: Callable[[int], str],
              extras: Callable[[int], Mapping[str, ConfigRecord]] | None = None,
              cached: Sequence[str] | None = None, rebuilt: Sequence[str] = (),
              rounded: Sequence[str] = ()) -> RoundDownlink:
        """One round's messages: ``groups`` of ``state`` and the request ``config`` to each node.

        Args:
            state: The global wire state; the round sends these tensors (it must not change
                them in place before its last reply).
            groups: The stage's down groups.
            config: The round's request (``TrainRequest.to_config``).
            message_type: The stage's Flower message type.
            nodes: The sampled sites.
            site_name: node id -> site name.
            extras: node id -> more records for that node's messages (secure aggregation's shares).
            cached: The groups to name by digest (the round leaves them unchanged); None: all.
            rebuilt: Teacher groups that a site may rebuild from the student it is sent
                (:attr:`fedmri.wire.StageGroups.rebuilt`); named by digest too.
            rounded: Groups sent rounded to bfloat16 (a bf16 downlink: the round's up groups).
        """
        moves, self.moves = self.moves, {}
        return RoundDownlink(self, wire.select(state, groups), config, message_type, list(nodes), site_name, extras,
                             cached, rebuilt, moves, rounded)

    def moved(self, round_: RoundDownlink, momentum: float | None) -> None:
        """The coordinator moved ``round_``'s rebuilt groups by EMA with ``momentum`` after its aggregation.

        The next round's sites that acknowledged ``round_``'s digests rebuild the moved
        teacher themselves; a round without a call to this sends it to them in full.
        """
        self.moves = {} if momentum is None else {g: (round_.digests[g], float(momentum))
                                                   for g in round_.rebuilt if g in round_.digests}

    def lacks(self, site: str, digests: Mapping[str, str],
              rebuild: Mapping[str, tuple[str, float]] | None = None) -> list[str]:
        """The groups of ``digests`` whose digest ``site`` has not acknowledged and cannot rebuild.

        ``rebuild``: group -> (the digest it is rebuilt from, "" for a copy of the student; momentum).
        """
        if not self.enabled or self.misses.get(site, 0) >= MAX_MISSES:
            return list(digests)
        held = self.held.get(site, {})
        rebuild = rebuild or {}
        return [g for g, d in digests.items()
                if held.get(g) != d and not (g in rebuild and rebuild[g][0] in ("", held.get(g)))]

    def acknowledge(self, site: str, digests: Mapping[str, str]) -> None:
        """``site`` answered a request that named ``digests``: it holds those groups."""
        self.held.setdefault(site, {}).update(digests)

    def missed(self, site: str) -> None:
        """``site`` lacked groups it had acknowledged: forget what it holds."""
        self.held.pop(site, None)
        self.misses[site] = self.misses.get(site, 0) + 1
        if self.misses[site] == MAX_MISSES:
            log(WARNING, "fedmri: site %s lacked cached groups %d times; it gets every group in full from now on",
                site, MAX_MISSES)


class RoundDownlink:
    """The messages of one round, and the resend of every group to a site that lacks some.

    Attributes:
        messages: The first message to each node, in the order of the nodes.
        digests: Down group -> digest (empty when the cache is off).
        bytes_sent: node -> bytes of the arrays sent to it this round (float32, or 2 per value of a
            rounded group), a resend included.
        sent: Every message of the round, resends included.
    """

    def __init__(self, downlink: Downlink, entries: dict[str, Tensor], config: ConfigRecord, message_type: str,
                 nodes: list[int], site_name: Callable[[int], str],
                 extras: Callable[[int], Mapping[str, ConfigRecord]] | None = None,
                 cached: Sequence[str] | None = None, rebuilt: Sequence[str] = (),
                 moves: Mapping[str, tuple[str, float]] | None = None, rounded: Sequence[str] = ()) -> None:
        self.downlink = downlink
        self.extras = extras
        self.entries = entries
        self.config = config
        self.message_type = message_type
        self.site_name = site_name
        self.groups = wire.groups_in(entries)
        self.rounded = {g for g in rounded if g in self.groups}
        self.rebuilt = [g for g in rebuilt if g in self.groups]
        named = [g for g in self.groups if cached is None or g in cached or g in self.rebuilt]
        self.digests = wire.group_digests(wire.select(entries, named)) if downlink.enabled and named else {}
        # How a site makes each rebuilt group: a copy of the student before the teacher first
        # moves, else the EMA of last round's teacher (Downlink.moved); neither: sent in full.
        self.rebuild: dict[str, tuple[str, float]] = {}
        for g in self.rebuilt if self.digests else ():
            if wire.teacher_is_copy(entries, g, bf16_student=wire.TEACHER_SOURCES[g] in self.rounded):
                self.rebuild[g] = ("", 0.0)
            elif g in (moves or {}):
                self.rebuild[g] = moves[g]
        self.bytes_sent: dict[int, int] = {}
        self.sent: list[Message] = []
        self._group_bytes = {g: 0 for g in self.groups}
        for k, t in entries.items():  # float32 on the wire (wire.to_record), or bfloat16 bits
            self._group_bytes[wire.group_of(k)] += (2 if wire.group_of(k) in self.rounded else 4) * t.numel()
        self._group_records: dict[str, ArrayRecord] = {}
        self._records: dict[tuple[str, ...], ArrayRecord] = {}
        self._full: set[int] = set()
        unnamed = [g for g in self.groups if g not in self.digests]
        self.messages = [self._send(n, [*unnamed, *self.downlink.lacks(site_name(n), self.digests, self.rebuild)]
                                    if self.digests else self.groups) for n in nodes]

    def _record(self, groups: tuple[str, ...]) -> ArrayRecord:
        # One record per set of groups, built from one copy of each group: sites that lack the
        # same groups share it, and a resend shares its arrays with the first messages.
        if groups not in self._records:
            if groups == tuple(self.groups) and not self.digests and not self.rounded:
                self._records[groups] = wire.to_record(self.entries)
            else:
                for g in groups:
                    if g not in self._group_records:
                        encode = wire.to_bf16_record if g in self.rounded else wire.to_record
                        self._group_records[g] = encode(wire.select(self.entries, [g]))
                self._records[groups] = ArrayRecord({k: a for g in groups for k, a in self._group_records[g].items()})
        return self._records[groups]

    def _send(self, node: int, groups: Iterable[str]) -> Message:
        wanted = set(groups)
        sending = tuple(g for g in self.groups if g in wanted)
        content = RecordDict({ARRAYS_KEY: self._record(sending), CONFIG_KEY: self.config})
        if self.digests:
            content[DIGESTS_KEY] = ConfigRecord(dict(self.digests))
        if self.rebuild:
            content[REBUILD_KEY] = ConfigRecord({k: v for g, (prev, m) in self.rebuild.items()
                                                 for k, v in ((g, prev), (f"{g}.momentum", m))})
        for key, record in (self.extras(node) if self.extras is not None else {}).items():
            content[key] = record
        if len(sending) == len(self.groups):
            self._full.add(node)
        self.bytes_sent[node] = self.bytes_sent.get(node, 0) + sum(self._group_bytes[g] for g in sending)
        msg = Message(content, dst_node_id=node, message_type=self.message_type)
        self.sent.append(msg)
        return msg

    def node_of(self, reply: Message) -> int:
        """The node that ``reply`` answers for: by the message it answers, else its sender."""
        return node_of(reply, self.sent)

    def on_reply(self, reply: Message) -> Message | None:
        """Take one reply of the round: the message to send in its place, or None when it is the site's answer.

        A successful answer acknowledges the round's digests for that site. A missing-groups
        reply to a message that left groups out returns the same request with every group
        in full; push it and wait for its reply instead of this one. A missing-groups reply
        to a full message cannot be helped: it is the site's answer, a decline.
        """
        if not self.digests or reply.has_error():
            return None
        node = self.node_of(reply)
        site = self.site_name(node)
        status = reply.content.config_records.get(STATUS_KEY)
        if status is not None and MISSING_GROUPS in status:
            if node in self._full:
                return None
            self.downlink.missed(site)
            log(INFO, "fedmri: site %s lacks %s in its cache; sending it every group", site,
                ", ".join(str(g) for g in status[MISSING_GROUPS]))
            return self._send(node, self.groups)
        if not reply_status(reply.content)[0]:
            self.downlink.acknowledge(site, self.digests)
        return None

    def bound(self, grid: Any) -> ResendingGrid:
        """``grid`` with this round's resends done inside it (:class:`ResendingGrid`)."""
        return ResendingGrid(grid, self)


class ResendingGrid:
    """A Flower grid whose replies are the sites' answers: a missing-groups reply is resent for.

    ``push_messages``/``pull_messages`` and ``send_and_receive`` behave as ``grid``'s, except
    that a missing-groups reply never comes out: the full message goes to that site, and its
    reply comes out in its place, re-addressed as the reply to the first message so that a
    caller that waits for the first message's id sees it answered. Anything else is ``grid``'s.
    """

    def __init__(self, grid: Any, round_: RoundDownlink) -> None:
        self.grid = grid
        self.round = round_
        self._resend_of: dict[str, Message] = {}  # a resend's message id -> the first message
        self._alias: dict[str, str] = {}  # the first message's id -> its resend's

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for reply in self.grid.pull_messages([self._alias.get(i, i) for i in message_ids]):
            first = self._resend_of.get(reply.metadata.reply_to_message_id)
            again = self.round.on_reply(reply)
            if first is not None:
                out.append(_readdress(reply, first))
                continue
            if again is None:
                out.append(reply)
                continue
            ids = [i for i in self.grid.push_messages([again]) if i]
            if not ids:  # the SuperLink refused it; the missing-groups reply stands, a decline
                out.append(reply)
                continue
            first = self._first(reply)
            self._resend_of[ids[0]] = first
            self._alias[first.metadata.message_id] = ids[0]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out, resends = [], []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            again = self.round.on_reply(reply)
            if again is None:
                out.append(reply)
            else:
                resends.append((self._first(reply), again))
        if resends:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            firsts = {int(again.metadata.dst_node_id): first for first, again in resends}
            for reply in self.grid.send_and_receive([again for _, again in resends], timeout=left):
                self.round.on_reply(reply)
                out.append(_readdress(reply, firsts[self.round.node_of(reply)]))
        return out

    def _first(self, reply: Message) -> Message:
        node = self.round.node_of(reply)
        return next(m for m in self.round.sent if int(m.metadata.dst_node_id) == node)


def _readdress(reply: Message, first: Message) -> Message:
    """``reply``'s content or error as the reply to ``first``."""
    if reply.has_error():
        return Message(reply.error, reply_to=first)
    return Message(reply.content, reply_to=first)
