"""Federated text->image retrieval over three synthetic hospitals and the real site code (issue 6, section 4).

The coordinator's :func:`federated_search` talks to each site through
:class:`LocalGrid`; the sites answer with :func:`fedmri.client.search.handle_search`.
Until ``client/app.py`` routes ``task: search`` queries to it, the grid calls
it the way the ClientApp will (:func:`_client_app`); afterwards the real
ClientApp answers. Initial weights are enough to test the mechanics.
"""

from __future__ import annotations

import collections
import csv
import inspect
import math
import re

import pydicom
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import fedmri.client.app
import fedmri.client.search as client_search
from fedmri import wire
from fedmri.align import build_aligned_model
from fedmri.client.site import load_site
from fedmri.config import load_config
from fedmri.data.catalog_db import CATALOG_FILE
from fedmri.data.dataset import SeriesDataset
from fedmri.server.search import embed_query, federated_search, merge_results, search_messages

from helpers.local_grid import LocalGrid

QUERY = "Enhancing mass in the left frontal lobe with surrounding oedema."
PSEUDONYM = re.compile(r"[0-9a-f]{32}")  # fedmri.data.catalog_db.pseudonym
DICOM_TAGS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
              "AccessionNumber", "StudyDate", "PatientBirthDate")
WIRED = "handle_search" in inspect.getsource(fedmri.client.app)


def _client_app(msg: Message, context: Context) -> Message:
    """The ClientApp, with search queries routed as client/app.py is to route them."""
    config = msg.content.config_records.get("config")
    if not WIRED and config is not None and config.get("task") == "search":
        return client_search.handle_search(msg, context, load_site(context.node_config["site-config"]))
    return fedmri.client.app.app(msg, context)


def _grid(sites: list, tamper=None) -> LocalGrid:
    grid = LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(sites)}, tamper)
    grid.app = _client_app
    return grid


@pytest.fixture(scope="module")
def run_cfg():
    return load_config("micro")  # tiny's volumes, a 2-block 32-wide encoder


@pytest.fixture(scope="module")
def state(run_cfg) -> dict[str, torch.Tensor]:
    return wire.initial_state(run_cfg)


@pytest.fixture(scope="module")
def names(federation_sites: list) -> dict[int, str]:
    return {101 + i: name for i, (name, _, _) in enumerate(federation_sites)}


@pytest.fixture(scope="module")
def query(run_cfg, state) -> torch.Tensor:
    return embed_query(run_cfg, state, QUERY)


def _search_reply(reply: Message) -> tuple[list[str], list[float]]:
    assert not reply.has_error() and list(reply.content.keys()) == ["search"], reply.content
    return list(reply.content["search"]["ids"]), list(reply.content["search"]["scores"])


# --------------------------------------------------------------- the search
def test_query_embedding_is_a_unit_vector_of_the_aligned_space(query: torch.Tensor) -> None:
    assert query.shape == (32,) and torch.isfinite(query).all()
    assert query.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_search_returns_at_most_k_per_site_ranked_across_sites(
        federation_sites: list, run_cfg, state, names) -> None:
    grid, skipped = _grid(federation_sites), {}
    results = federated_search(grid, run_cfg, state, QUERY, 5, names, skipped=skipped)

    assert skipped == {}
    per_site = {names[int(r.metadata.src_node_id)]: _search_reply(r) for r in grid.received}
    assert sorted(per_site) == ["site-01", "site-02", "site-03"]
    for ids, scores in per_site.values():
        assert len(ids) == 5 and scores == sorted(scores, reverse=True)
    assert results == merge_results(per_site, 5)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["score"] == max(site_scores[0] for _, site_scores in per_site.values())
    # Each result is one its site returned, with the score it gave.
    for r in results:
        ids, site_scores = per_site[r["site"]]
        assert site_scores[ids.index(r["id"])] == r["score"]


def test_merge_ranks_by_score_then_site_then_id() -> None:
    replies = {"b": (["x", "y"], [0.9, 0.5]), "a": (["z", "w"], [0.5, 0.1]), "c": ([], [])}
    assert merge_results(replies, 3) == [
        {"site": "b", "id": "x", "score": 0.9, "rank": 1},
        {"site": "a", "id": "z", "score": 0.5, "rank": 2},
        {"site": "b", "id": "y", "score": 0.5, "rank": 3},
    ]


def test_a_known_series_image_embedding_finds_that_series_first(
        federation_sites: list, run_cfg, state, names) -> None:
    name, _, catalog = federation_sites[1]
    dataset = SeriesDataset(catalog, None)
    target = dataset.rows[5]["meta"]["series_id"]
    model = build_aligned_model(run_cfg)
    wire.load_align_state(model, wire.select(state, client_search.SEARCH_GROUPS))
    with torch.no_grad():
        embedding = model.eval().encode_image(dataset[5]["image"][None])[0]  # E

    node = next(n for n, s in names.items() if s == name)
    (reply,) = _grid(federation_sites).send_and_receive(search_messages(run_cfg, state, embedding, 3, [node]))
    ids, scores = _search_reply(reply)
    assert ids[0] == target and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1] < scores[0]


def test_repeated_queries_reuse_the_cached_catalog_embeddings(
        federation_sites: list, run_cfg, state, query, monkeypatch: pytest.MonkeyPatch) -> None:
    site = load_site(federation_sites[0][1])
    first = client_search.site_search(site, run_cfg, state, query, 4)

    def no_embedding(*args: object) -> None:
        raise AssertionError("the catalog was embedded again")

    monkeypatch.setattr(client_search, "_embed", no_embedding)
    assert client_search.site_search(site, run_cfg, state, -query, 4) != first
    moved = {k: v + 0.01 if wire.group_of(k) == wire.ENCODER else v for k, v in state.items()}
    with pytest.raises(AssertionError, match="embedded again"):  # another encoder, another cache entry
        client_search.site_search(site, run_cfg, moved, query, 4)


# --------------------------------------------------- what leaves the sites
def _site_secrets(sites: list) -> dict[str, str]:
    """Identifiers, report text and paths each site holds: value -> where it was first found."""
    import sqlite3

    secrets: dict[str, str] = {}

    def add(values: object, source: str) -> None:
        for value in values:  # type: ignore[attr-defined]
            if value:
                secrets.setdefault(str(value).strip(), source)

    for name, site_file, catalog in sites:
        hospital = catalog.parent.parent / "hospitals" / name
        for folder in sorted({p.parent for p in (hospital / "dicom").rglob("*") if p.is_file()}):
            path = min(p for p in folder.iterdir() if p.is_file())  # one header per series
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for tag in DICOM_TAGS:
                add([ds.get(tag)], f"{name} DICOM {tag}")
            add([path], f"{name} DICOM path")
        for row in SeriesDataset(catalog, None).rows:
            for section in row["report_sections"].values():
                add([s for s in re.split(r"(?<=[.:])\s+", section) if len(s.strip()) >= 12], f"{name} report")
        with open(hospital / "reports.csv", newline="", encoding="utf-8") as fh:
            add([r["accession_number"] for r in csv.DictReader(fh)], f"{name} accession")
        conn = sqlite3.connect(f"file:{catalog / CATALOG_FILE}?mode=ro", uri=True)
        try:
            for row in conn.execute("SELECT patient_id, study_id, series_uid, study_uid, accession FROM series"):
                add(row, f"{name} catalog identifier")
        finally:
            conn.close()
        add([catalog, hospital, site_file], f"{name} path")
    return secrets


def test_every_search_reply_holds_only_pseudonymous_ids_and_scores(
        federation_sites: list, run_cfg, state, query, names) -> None:
    grid = _grid(federation_sites)
    # top-k 12: every series of every site leaves
    replies = grid.send_and_receive(search_messages(run_cfg, state, query, 12, sorted(names)))
    secrets = _site_secrets(federation_sites)
    kinds = collections.Counter(source.split(" ", 1)[1] for source in secrets.values())
    assert len(replies) == 3 and kinds["DICOM SeriesInstanceUID"] == 36 and kinds["report"] > 50
    assert all(kinds[f"DICOM {tag}"] > 0 for tag in DICOM_TAGS), kinds
    for reply in replies:
        site = names[int(reply.metadata.src_node_id)]
        assert list(reply.content.keys()) == ["search"]
        record = reply.content["search"]
        assert isinstance(record, ConfigRecord) and sorted(record.keys()) == ["ids", "scores"]
        ids, scores = list(record["ids"]), list(record["scores"])
        assert len(ids) == len(scores) == 12
        assert all(type(s) is float and math.isfinite(s) for s in scores)
        catalog = next(c for n, _, c in federation_sites if n == site)
        assert set(ids) == {row["meta"]["series_id"] for row in SeriesDataset(catalog, None).rows}
        for sid in ids:
            assert type(sid) is str and PSEUDONYM.fullmatch(sid), sid
            leaks = [src for value, src in secrets.items() if value in sid or sid in value]
            assert not leaks, (site, sid, leaks)


# ------------------------------------------------------------------ declines
def _one_message(run_cfg, state, query, names, **config: object) -> list[Message]:
    (msg,) = search_messages(run_cfg, state, query, 3, [min(names)])
    for key, value in config.items():
        msg.content["config"][key] = value
    return [msg]


@pytest.mark.parametrize(("change", "reason"), [
    ({"top-k": 0}, "top-k 0 must be an integer in 1..1000"),
    ({"top-k": 1001}, "top-k 1001 must be an integer in 1..1000"),
    ({"top-k": True}, "config key 'top-k' must be int, got bool"),
    ({"embedding": torch.ones(33)}, "the query embedding has shape (33,), the run's aligned space is (32,)"),
    ({"embedding": torch.full((32,), math.nan)}, "the query embedding must hold finite floating-point values"),
    ({"split": "everything"}, "split 'everything' is not one of all, train, val, test"),
])
def test_bad_requests_are_declined_with_a_clear_reason(
        federation_sites: list, run_cfg, state, query, names, change: dict,
        reason: str) -> None:
    embedding = change.pop("embedding", query)
    messages = _one_message(run_cfg, state, embedding, names, **change)
    (reply,) = _grid(federation_sites).send_and_receive(messages)
    assert sorted(reply.content.keys()) == ["metrics", "status"]
    assert dict(reply.content["status"]) == {"declined": True, "reason": reason}


def test_the_coordinator_refuses_a_bad_top_k_and_leaves_out_sites_out_of_protocol(
        federation_sites: list, run_cfg, state, query, names) -> None:
    with pytest.raises(ValueError, match="top-k 0 must be"):
        search_messages(run_cfg, state, query, 0, sorted(names))

    def tamper(node: int, reply: Message) -> Message | None:
        if names[node] == "site-02":  # a site that sends more than ids and scores
            reply.content["extra"] = ConfigRecord({"report": "Findings: ..."})
        return None if names[node] == "site-03" else reply

    skipped: dict[str, str] = {}
    results = federated_search(_grid(federation_sites, tamper), run_cfg, state, QUERY, 4, names,
                               skipped=skipped, timeout=1.0)
    assert {r["site"] for r in results} == {"site-01"} and len(results) == 4
    assert skipped == {"site-02": "reply out of protocol: records ['extra', 'search'] instead of one 'search' "
                                  "ConfigRecord", "site-03": "no reply within 1 s"}


def test_search_must_come_as_a_query(federation_sites: list, run_cfg, state, query, names) -> None:
    (msg,) = search_messages(run_cfg, state, query, 3, [min(names)])
    train = Message(msg.content, dst_node_id=min(names), message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=min(names), node_config={}, state=RecordDict(), run_config={})
    reply = client_search.handle_search(train, context, load_site(federation_sites[0][1]))
    assert reply.content["status"]["reason"] == "search came as a 'train' message, not a query"


def test_a_site_whose_policy_leaves_out_search_declines_it(federation_sites: list, run_cfg, state, query, names,
                                                           tmp_path) -> None:
    (msg,) = search_messages(run_cfg, state, query, 3, [min(names)])
    context = Context(run_id=1, node_id=min(names), node_config={}, state=RecordDict(), run_config={})
    site = load_site(federation_sites[0][1], ["policy.stages=[pretrain,align,heads,evaluate]"])
    reply = client_search.handle_search(msg, context, site)
    assert "search is not in this site's policy.stages" in reply.content["status"]["reason"]
    assert "search" not in reply.content


@pytest.mark.skipif(not WIRED, reason="client/app.py does not route task=search queries yet")
def test_the_client_app_answers_search_queries(federation_sites: list, run_cfg, state, query) -> None:
    grid = LocalGrid({101: federation_sites[0][1]})
    (reply,) = grid.send_and_receive(search_messages(run_cfg, state, query, 2, [101]))
    assert len(_search_reply(reply)[0]) == 2
