"""Federated text->image retrieval at a site: rank the catalog's series against a query embedding.

The coordinator embeds a text query with the aligned model's text side and
sends only that embedding, with the global image encoder and projections. The
site embeds its catalog's series in the aligned space, ranks them by cosine
similarity and answers with its top-k pseudonymous series ids (the catalog's
salted HMAC pseudonyms, never a DICOM UID) and their scores: nothing else
leaves. Image embeddings are kept in memory per encoder digest, so repeated
queries against the same global model only embed series indexed since.

A request the site will not run gets the ClientApp's decline layout
(``metrics`` with ``declined`` 1, ``status.reason``), with a reason written
here that never quotes the site's data.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fedmri.client.trainers.context import (
    DeclineError,
    RequestError,
    check_state_keys,
    configure_torch,
    parse_run_config,
    site_device,
)
from fedmri.client.replies import decline
from fedmri.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    MAX_TOP_K,
    QUERY_KEY,
    SEARCH_GROUPS,
    SEARCH_KEY,
    SearchQuery,
    search_reply,
)
from fedmri.wire import (
    ALIGN_GROUPS,
    State,
    align_state,
    from_record,
    groups_in,
    load_align_state,
    select,
)

log = logging.getLogger(__name__)

# Encoder digests whose catalog embeddings stay in memory (one per global model a coordinator searches with).
_CACHE_SIZE = 4
# (image weights digest, model config, catalogs) -> {(series id, cache path): embedding (E,)}
_EMBEDDINGS: OrderedDict[tuple[str, ...], dict[tuple[str, str], Tensor]] = OrderedDict()


@dataclass(frozen=True)
class SearchRequest:
    """A search message, parsed and checked at the boundary."""

    # Results wanted from this site, 1..MAX_TOP_K.
    top_k: int
    # YAML of the run's resolved FedmriConfig.
    fedmri_config: str
    # Catalog split to search; "all" = every series.
    split: str
    # Wire tensors: at least the encoder and projections groups.
    state: State
    # The query's text embedding (E,).
    query: Tensor

    @classmethod
    def from_message(cls, msg: Message) -> SearchRequest:
        """Parse a search message.

        Raises:
            RequestError: A missing record or key, a wrong type or an out-of-range value.
        """
        for name in (CONFIG_KEY, ARRAYS_KEY, QUERY_KEY):
            if name not in msg.content:
                raise RequestError(f"the search message lacks its {name!r} record")
        config = SearchQuery.from_config(msg.content[CONFIG_KEY])
        query = from_record(msg.content[QUERY_KEY])
        if sorted(query) != ["embedding"]:
            raise RequestError(f"the query record must hold one array 'embedding', got {sorted(query)}")
        state = from_record(msg.content[ARRAYS_KEY])
        unknown = sorted(set(groups_in(state)) - set(ALIGN_GROUPS))
        if unknown:
            raise RequestError(f"search takes align groups ({', '.join(ALIGN_GROUPS)}), got also {unknown}")
        return cls(top_k=config.top_k, fedmri_config=config.fedmri_config, split=config.split, state=state,
                   query=query["embedding"])


def check_query(query: Tensor, embed_dim: int, top_k: int, split: str = "all") -> Tensor:
    """The L2-normalised query, after checking it and the request's other numbers.

    Raises:
        RequestError: ``top_k`` outside 1..1000, an unknown split, a query not
            of shape (``embed_dim``,), not finite, or of zero norm.
    """
    SearchQuery(top_k=top_k, fedmri_config="", split=split).check()
    if tuple(query.shape) != (embed_dim,):
        raise RequestError(f"the query embedding has shape {tuple(query.shape)}, the run's aligned space is "
                           f"({embed_dim},)")
    if not query.is_floating_point() or not torch.isfinite(query).all():
        raise RequestError("the query embedding must hold finite floating-point values")
    norm = query.float().norm()
    if norm == 0:
        raise RequestError("the query embedding is all zeros")
    return query.float() / norm


def site_search(site_cfg: DictConfig, run_cfg: DictConfig, state: Mapping[str, Tensor], query: Tensor,
                top_k: int, split: str = "all") -> list[tuple[str, float]]:
    """The site's ``top_k`` series most similar to ``query`` in the aligned space.

    Args:
        site_cfg: The site file (:func:`fedmri.client.site.load_site`).
        run_cfg: The run's resolved config (model and align sections).
        state: Wire tensors of the global model: the encoder and projections
            groups at least; other groups are ignored.
        query: The text embedding of the query (E,); normalised here.
        top_k: Results wanted, 1..1000 (fewer when the catalog is smaller).
        split: Catalog split, or ``"all"`` (default).

    Returns:
        ``(pseudonymous series id, cosine similarity)``, best first; ties by id.

    Raises:
        RequestError: A bad ``top_k``, split or query, or weights that do not fit the run's model.
        DeclineError: The catalog (split) holds no series.
    """
    q = check_query(query, int(run_cfg.align.embed_dim), top_k, split)
    from fedmri.client.trainers.data import site_dataset

    dataset = site_dataset(site_cfg, None if split == "all" else split)  # type: ignore[arg-type]
    if len(dataset) == 0:
        raise DeclineError(f"the site's catalog ({split}) holds no series to search")
    image = catalog_embeddings(site_cfg, run_cfg, select(state, SEARCH_GROUPS), dataset)  # N, E
    scores = (image @ q).tolist()  # N
    ids = [row["meta"]["series_id"] for row in dataset.rows]
    ranked = sorted(zip(ids, scores), key=lambda pair: (-pair[1], pair[0]))
    return [(sid, float(score)) for sid, score in ranked[:top_k]]


def catalog_embeddings(site_cfg: DictConfig, run_cfg: DictConfig, state: State, dataset: Any) -> Tensor:
    """L2-normalised image embeddings (N, E) of ``dataset``'s series, from the cache or computed.

    The cache is keyed by the digest of the image side's weights (encoder and
    image projection), the model config and the catalogs; within it, by series
    id and cache file, so a re-indexed volume is embedded again.
    """
    from fedmri.export import weights_digest

    image_side = {k: v for k, v in state.items() if not k.endswith("text_proj.weight")}
    catalogs = [str(site_cfg.catalog), *map(str, site_cfg.get("extra_catalogs") or [])]
    key = (weights_digest(image_side), OmegaConf.to_yaml(run_cfg.model), str(run_cfg.align.image_pooling),
           *catalogs)
    cache = _EMBEDDINGS.get(key, {})
    rows = [(row["meta"]["series_id"], row["cache_path"]) for row in dataset.rows]
    missing = [i for i, r in enumerate(rows) if r not in cache]
    if missing:  # weights that do not fit raise here, before they take a cache slot
        log.info("search: embedding %d of %d series", len(missing), len(rows))
        for i, emb in zip(missing, _embed(site_cfg, run_cfg, state, dataset, missing)):
            cache[rows[i]] = emb
    _EMBEDDINGS[key] = cache
    _EMBEDDINGS.move_to_end(key)  # most recently used last
    while len(_EMBEDDINGS) > _CACHE_SIZE:
        _EMBEDDINGS.popitem(last=False)
    return torch.stack([cache[r] for r in rows])  # N, E


@torch.no_grad()
def _embed(site_cfg: DictConfig, run_cfg: DictConfig, state: State, dataset: Any, indices: list[int]) -> Tensor:
    from fedmri.client.trainers.align import build_site_aligned_model

    device = site_device(site_cfg)
    model = build_site_aligned_model(run_cfg)
    check_state_keys(state, select(align_state(model), SEARCH_GROUPS), "search")
    load_align_state(model, state)
    model.to(device).eval()
    bs = max(1, int(site_cfg.batch_size))
    parts = []
    for start in range(0, len(indices), bs):
        images = torch.stack([dataset[i]["image"] for i in indices[start:start + bs]])  # b, 1, X, Y, Z
        parts.append(model.encode_image(images.to(device)).float().cpu())  # b, E
    return torch.cat(parts)  # n, E


def handle_search(msg: Message, context: Context, site_cfg: DictConfig) -> Message:
    """Answer a search query: ``{"search": ConfigRecord{"ids": [...], "scores": [...]}}`` and nothing else.

    Args:
        msg: A ``query`` message whose ``config`` has ``task: search``, ``top-k``
            and ``fedmri-config``, with the ``arrays`` and ``query`` records.
        context: The ClientApp's context (unused: the site file is the caller's).
        site_cfg: The site file, loaded by the ClientApp from its node config.

    Returns:
        The reply, or a decline (``metrics`` + ``status``) whose reason names
        only the request, never the site's data.
    """
    try:
        if msg.metadata.message_type != MessageType.QUERY:
            raise RequestError(f"search came as a {msg.metadata.message_type!r} message, not a query")
        if "search" not in site_cfg.policy.stages:
            raise DeclineError("search is not in this site's policy.stages "
                               f"({', '.join(site_cfg.policy.stages) or 'none'})")
        request = SearchRequest.from_message(msg)
        configure_torch(site_cfg)
        run_cfg = parse_run_config(request.fedmri_config)
        results = site_search(site_cfg, run_cfg, request.state, request.query, request.top_k, request.split)
    except DeclineError as exc:
        log.warning("declined search: %s", exc)
        return decline(msg, str(exc))
    except Exception as exc:  # noqa: BLE001 -- its text may quote paths or pseudonyms (client/app.py)
        log.exception("search failed at this site")
        return decline(msg, f"search failed at the site ({type(exc).__name__}); the site's log has the details")
    reply = ConfigRecord(search_reply([sid for sid, _ in results], [score for _, score in results]))
    return Message(RecordDict({SEARCH_KEY: reply}), reply_to=msg)



__all__ = ["MAX_TOP_K", "SEARCH_GROUPS", "SearchRequest", "catalog_embeddings", "check_query", "handle_search",
           "site_search"]
