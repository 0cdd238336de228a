"""The global parameter groups a site last received, kept on disk by digest.

A request names the digest of every down group (``digests``,
:data:`fedmri.protocol.DIGESTS_KEY`) and sends only the groups the site has not
acknowledged (:mod:`fedmri.server.downlink`); :func:`resolve_down` takes the others from
here. Each message to a deployed site starts a new ClientApp process, so the cache is a
folder under the catalog, next to the site's other local state:
``<catalog>/.fedmri/groups/<group>/<digest>.safetensors``, the keys' order in its metadata,
the newest :data:`KEEP_PER_GROUP` of each group kept.

An entry is checked against its digest (:func:`fedmri.wire.group_digest`) whenever it is
read: a missing, unreadable or altered entry is a miss, and is deleted. A miss is never a
wrong model: the site answers with the missing-groups status and the coordinator sends
every group in full. A disk that refuses a write costs the cache, never the round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmri.errors import FedmriError
from fedmri.protocol import RequestError
from fedmri.wire import TEACHER_SOURCES, State, group_digest, groups_in, rebuild_teacher, select

log = logging.getLogger(__name__)

# Under the site's catalog folder (heads features are in .fedmri/features).
CACHE_FOLDER = Path(".fedmri") / "groups"
# Versions of each group kept: the last one, and the one before for a site that two runs share.
KEEP_PER_GROUP = 2
# Group names and digests become file names: nothing else may.
_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class MissingGroupsError(FedmriError):
    """The request names groups by digest that this site's cache does not hold."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.groups = list(groups)
        super().__init__(f"the site's cache lacks {', '.join(self.groups)}; the coordinator sends them in full")


class GroupCache:
    """Parameter groups on disk, one file per (group, digest).

    Args:
        root: The cache folder; created on the first write.
        keep: Versions of each group kept, newest first by use (>= 1).

    Raises:
        ValueError: ``keep`` below 1.
    """

    def __init__(self, root: str | Path, keep: int = KEEP_PER_GROUP) -> None:
        if keep < 1:
            raise ValueError(f"keep {keep} must be >= 1")
        self.root = Path(root)
        self.keep = keep

    @classmethod
    def of_site(cls, site_cfg: Any) -> GroupCache:
        """The cache of a site file's catalog (:data:`CACHE_FOLDER`)."""
        return cls(Path(str(site_cfg.catalog)) / CACHE_FOLDER)

    def path(self, group: str, digest: str) -> Path:
        """Where ``group`` at ``digest`` is kept.

        Raises:
            RequestError: A group name or digest that cannot be a file name (the coordinator sent it).
        """
        if not _GROUP.fullmatch(group) or not _DIGEST.fullmatch(digest):
            raise RequestError(f"group {group[:40]!r} and digest {digest[:70]!r} must be a group name and a "
                               "SHA-256 in lowercase hex")
        return self.root / group / f"{digest}.safetensors"

    def get(self, group: str, digest: str) -> State | None:
        """The group's entries, exactly as stored under ``digest``; None when missing or not matching it."""
        from safetensors import safe_open

        path = self.path(group, digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = json.loads((f.metadata() or {})["keys"])
                entries = {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # noqa: BLE001 -- any unreadable entry is a miss
            log.warning("group cache: %s is unreadable (%s); it is dropped", path, type(exc).__name__)
            _remove(path)
            return None
        if group_digest(entries) != digest or groups_in(entries) != [group]:
            log.warning("group cache: %s does not match its digest; it is dropped", path)
            _remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # in use: the newest to keep
        return entries

    def put(self, group: str, digest: str, entries: State) -> bool:
        """Keep ``entries`` (one group, its digest checked by the caller); False when the disk refused."""
        from safetensors.torch import save_file

        path = self.path(group, digest)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in entries.items()}
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(list(entries))})
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("group cache: cannot write %s (%s); the coordinator will resend %s", path, exc, group)
            _remove(tmp)
            return False
        self._evict(path.parent, keep=path)
        return True

    def _evict(self, folder: Path, keep: Path) -> None:
        with contextlib.suppress(OSError):
            entries = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in [p for p in entries if p != keep][self.keep - 1:]:
                _remove(old)


def resolve_down(received: State, digests: Mapping[str, Any] | None, down: Sequence[str],
                 cache: GroupCache, rebuild: Mapping[str, Any] | None = None) -> State:
    """A request's down groups: those it carries, checked against their digests, and the others from ``cache``.

    Received groups that the request names are stored in the cache once every group is
    found, so what the site trains on is what it keeps; a group it carries without naming
    changes every round (pretraining's student), so it is neither hashed nor kept. A named
    teacher group that is neither carried nor cached is rebuilt from the student the request
    carries as its ``rebuild`` record says (:func:`fedmri.wire.rebuild_teacher`), checked
    against its digest and kept.

    Args:
        received: The request's ``arrays``, as wire tensors.
        digests: The request's ``digests`` record (group -> SHA-256) of the groups the
            round leaves unchanged or the site rebuilds; None when the coordinator named
            none, and then ``received`` is every group.
        down: The stage's down groups under the run's config.
        cache: The site's cache.
        rebuild: The request's ``rebuild`` record (:data:`fedmri.protocol.REBUILD_KEY`), or None.

    Returns:
        Every down group's entries, in the order of ``down``.

    Raises:
        RequestError: Digests of other groups than ``down``, a named group that does not
            match its digest, a malformed ``rebuild`` record, or a group neither carried
            nor named.
        MissingGroupsError: Named groups that neither came, nor are in the cache, nor could
            be rebuilt to their digest.
    """
    if digests is None:
        return received
    named = {str(g): d for g, d in digests.items()}
    if not set(named) <= set(down):
        raise RequestError(f"the request names digests of {sorted(named)}, the stage sends {sorted(down)}")
    for group, digest in named.items():
        if not isinstance(digest, str):
            raise RequestError(f"the digest of {group!r} must be a string")
        cache.path(group, digest)  # checks both as file names
    rules = _rebuild_rules(rebuild, named, cache)
    came = {g: select(received, [g]) for g in groups_in(received)}
    for group, entries in came.items():  # a group the request does not name changes every round: not kept
        if group not in down:
            raise RequestError(f"the request carries {group!r}, which the stage does not send")
        if group in named and group_digest(entries) != named[group]:
            raise RequestError(f"group {group!r} does not match its digest: the message was altered on the way")
    state: State = {}
    missing, made = [], {}
    for group in down:
        entries = came.get(group)
        if entries is None and group not in named:
            raise RequestError(f"the request neither carries nor names group {group!r}")
        if entries is None:
            entries = cache.get(group, named[group])
        if entries is None and group in rules:
            entries = made[group] = _rebuilt(group, named[group], rules[group], came, cache)
        if entries is None:
            missing.append(group)
        else:
            state |= entries
    if missing:
        raise MissingGroupsError(missing)
    for group, entries in [*came.items(), *made.items()]:
        if group in named:
            cache.put(group, named[group], entries)
    return state


def _rebuild_rules(record: Mapping[str, Any] | None, named: Mapping[str, str],
                   cache: GroupCache) -> dict[str, tuple[str, float]]:
    """A ``rebuild`` record as group -> (the digest it moves from, "" for a copy; momentum), checked."""
    if not record:
        return {}
    rules = {}
    for group in [str(k) for k in record if not str(k).endswith(".momentum")]:
        previous, momentum = record[group], record.get(f"{group}.momentum")
        if group not in TEACHER_SOURCES or group not in named:
            raise RequestError(f"the request asks to rebuild {group!r}, which is not a teacher group it names")
        if not isinstance(previous, str) or isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0.0 <= float(momentum) <= 1.0:
            raise RequestError(f"the rebuild of {group!r} needs a digest and a momentum in [0, 1], got "
                               f"{str(previous)[:70]!r} and {momentum!r}")
        if previous:
            cache.path(group, previous)  # a file name, or the request is malformed
        rules[group] = (previous, float(momentum))
    return rules


def _rebuilt(group: str, digest: str, rule: tuple[str, float], came: Mapping[str, State],
             cache: GroupCache) -> State | None:
    """Teacher ``group`` made from the carried student by ``rule``, if it matches ``digest``; else None."""
    previous_digest, momentum = rule
    student = came.get(TEACHER_SOURCES[group])
    if student is None:
        return None
    previous = cache.get(group, previous_digest) if previous_digest else None
    if previous_digest and previous is None:
        return None
    try:
        entries = rebuild_teacher(group, student, previous, momentum)
    except KeyError:
        entries = None
    if entries is None or group_digest(entries) != digest:
        log.warning("group cache: %s rebuilt from the student does not match the request's digest; "
                    "the coordinator sends it in full", group)
        return None
    return entries


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # another ClientApp may have removed it first
        path.unlink()
