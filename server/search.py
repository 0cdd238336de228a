"""Federated text->image retrieval, the coordinator's side: embed, send, collect, merge.

The coordinator embeds the query text with the global aligned model's text
side and sends only that embedding, with the image encoder and projections,
to the sites (:mod:`fedmri.client.search` answers). Each site ranks its own
catalog and returns its top-k pseudonymous series ids and cosine scores;
they share one aligned space, so the coordinator merges them by score. A site
that fails, declines or answers out of protocol is left out and reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fedmri import stages as stage_registry
from fedmri import wire
from fedmri.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    MAX_TOP_K,
    QUERY_KEY,
    SEARCH_GROUPS,
    SearchQuery,
    parse_search_reply,
    reply_status,
)
from fedmri.server.exchange import node_of


@torch.no_grad()
def embed_query(run_cfg: DictConfig, state: Mapping[str, Tensor], text: str) -> Tensor:
    """The L2-normalised text embedding (E,) of a free-text query, in the global model's aligned space.

    The text is prepared as reports are (:func:`fedmri.text.prepare_report`:
    a text without section headers reads as findings), then tokenized and
    encoded by the run's text tower and projection.

    Args:
        run_cfg: The run's resolved config (``align`` section).
        state: Global wire tensors holding the ``projections`` group and, when
            text layers train, the ``text`` group.
        text: The query, e.g. ``"enhancing lesion in the left frontal lobe"``.

    Raises:
        InputError: The text is empty.
        ValueError: ``state`` lacks tensors of the text side.
    """
    from fedmri.align import build_aligned_model
    from fedmri.text import prepare_report

    prepared = prepare_report(text)
    model = build_aligned_model(run_cfg)
    needed = wire.select(wire.align_state(model), (wire.TEXT, wire.PROJECTIONS))
    missing = sorted(set(needed) - set(state))
    if missing:
        raise ValueError(f"the model state lacks {len(missing)} text-side tensors (e.g. {missing[0]!r}); "
                         "search needs the aligned model's projections")
    wire.load_align_state(model, {k: state[k] for k in needed})
    model.eval()
    tokens = model.text_tower.tokenize([prepared])
    return model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0].float()  # E


def search_messages(run_cfg: DictConfig, state: Mapping[str, Tensor], query: Tensor, top_k: int,
                    nodes: list[int], split: str = "all") -> list[Message]:
    """One ``query`` message per node: the search config, the image side's weights and the query embedding.

    Raises:
        ValueError: ``top_k`` outside 1..1000.
    """
    config = ConfigRecord(SearchQuery(top_k=top_k, fedmri_config=OmegaConf.to_yaml(run_cfg), split=split).to_config())
    arrays = wire.to_record(wire.select(state, SEARCH_GROUPS))
    embedding = wire.to_record({"embedding": query.detach().reshape(-1)})
    return [Message(RecordDict({CONFIG_KEY: config, ARRAYS_KEY: arrays, QUERY_KEY: embedding}), dst_node_id=int(n),
                    message_type=MessageType.QUERY) for n in nodes]


def parse_reply(reply: Message, top_k: int) -> tuple[list[str], list[float]]:
    """A site's ids and scores, checked against the protocol.

    Raises:
        ValueError: Naming what is out of protocol (other records, other keys,
            wrong types, more than ``top_k`` results, scores that are not cosines).
    """
    return parse_search_reply(reply.content, top_k)


def merge_results(replies: Mapping[str, tuple[list[str], list[float]]], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` best results over all sites, by score; ties by site name, then id.

    Args:
        replies: site name -> (series ids, scores) from that site.
        top_k: Results to keep.

    Returns:
        ``[{"site", "id", "score", "rank"}]``, rank 1 first.
    """
    rows = [(site, sid, float(score)) for site, (ids, scores) in replies.items() for sid, score in zip(ids, scores)]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    return [{"site": site, "id": sid, "score": score, "rank": rank}
            for rank, (site, sid, score) in enumerate(rows[:top_k], start=1)]


def federated_search(grid: Any, run_cfg: DictConfig, state: Mapping[str, Tensor], text: str, top_k: int,
                     site_names: Mapping[int, str], *, split: str = "all", timeout: float = 60.0,
                     skipped: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Search every named site's catalog for ``text`` and rank the results across sites.

    Args:
        grid: A Flower ``Grid`` (or anything with ``send_and_receive``).
        run_cfg: The run's resolved config.
        state: The global model's wire tensors (align groups at least).
        text: The free-text query.
        top_k: Results per site and in the merged list, 1..1000.
        site_names: node id -> site name of the sites to ask.
        split: Catalog split the sites search; default every series.
        timeout: Seconds to wait for the replies.
        skipped: When given, filled with site name -> why it is not in the results
            (failed, declined, out of protocol, no reply).

    Returns:
        :func:`merge_results` over the sites that answered.
    """
    _check_top_k(top_k)
    query = embed_query(run_cfg, state, text)
    messages = search_messages(run_cfg, state, query, top_k, sorted(site_names), split)
    results: dict[str, tuple[list[str], list[float]]] = {}
    problems: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = node_of(reply, messages)
        site = site_names.get(node, f"node-{node}")
        reason = _problem(reply)
        if reason is None:
            try:
                results[site] = parse_reply(reply, top_k)
            except ValueError as exc:
                reason = f"reply out of protocol: {exc}"
        if reason is not None:
            problems[site] = reason
    for node in sorted(site_names):
        if site_names[node] not in results and site_names[node] not in problems:
            problems[site_names[node]] = f"no reply within {timeout:.0f} s"
    for site, reason in sorted(problems.items()):
        log(WARNING, "fedmri: search left out site %s: %s", site, reason)
    if skipped is not None:
        skipped.update(problems)
    merged = merge_results(results, top_k)
    log(INFO, "fedmri: search answered by %d of %d sites, %d results", len(results), len(site_names), len(merged))
    return merged


def _problem(reply: Message) -> str | None:
    if reply.has_error():
        return f"failed: {reply.error.reason}"
    declined, reason = reply_status(reply.content)
    return f"declined: {reason}" if declined else None


def _check_top_k(top_k: int) -> None:
    SearchQuery(top_k=top_k, fedmri_config="").check()


__all__ = ["MAX_TOP_K", "SEARCH_GROUPS", "embed_query", "federated_search", "merge_results", "parse_reply",
           "search_messages"]


def run_search(grid: Any, run_dir: str | Path, text: str, top_k: int, *, split: str = "all",
               timeout: float = 60.0) -> dict[str, Any]:
    """Search the federation with the aligned model of a run's last complete round.

    Writes ``<run_dir>/search/<UTC time>.json`` (the query, the merged results,
    the sites left out and why) and returns the same dict.

    Raises:
        InputError: ``run_dir`` is not a run folder, has no complete round, or never aligned.
    """
    import json
    import time

    from fedmri.errors import InputError
    from fedmri.server.checkpoint import _write_text_atomic, load_checkpoint
    from fedmri.server.config import load_federation, run_config
    from fedmri.server.pipeline import SiteRegistry

    run_dir = Path(run_dir)
    if not (run_dir / "federation.yaml").is_file():
        raise InputError(f"{run_dir} is not a run folder (no federation.yaml); give runs/<name>")
    fed = load_federation(run_dir / "federation.yaml")
    if not any(stage_registry.get(s.name).aligns for s in fed.stages):
        raise InputError(f"run {fed.name} has no align stage: its encoder has no shared text-image space to search")
    ckpt = load_checkpoint(run_dir / "ckpt")
    if ckpt is None:
        raise InputError(f"run {run_dir} has no complete round yet; nothing to search with")
    state, _, _ = ckpt
    sites = SiteRegistry()  # the sites' names: the query every run starts with
    sites.identify(grid, sorted(int(n) for n in grid.get_node_ids()))
    names = sites.compatible()
    skipped: dict[str, str] = {}
    results = federated_search(grid, run_config(fed), state, text, top_k, names, split=split, timeout=timeout,
                               skipped=skipped)
    out = {"run": fed.name, "query": text, "top_k": top_k, "split": split, "results": results, "skipped": skipped,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    folder = run_dir / "search"
    folder.mkdir(exist_ok=True)
    _write_text_atomic(folder / f"{out['time'].replace(':', '')}.json", json.dumps(out, indent=1))
    log(INFO, "fedmri: search %r over %d sites: %d results%s", text, len(names), len(results),
        f", {len(skipped)} sites left out" if skipped else "")
    for row in results:
        log(INFO, "fedmri:   %2d  %.3f  %s  %s", row["rank"], row["score"], row["site"], row["id"])
    return out
