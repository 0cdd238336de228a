"""No patient data on the wire (issue 5): every message a ClientApp sends in a whole pipeline.

A full pipeline (pretrain, align with a trainable text layer, evaluate) runs
over three synthetic hospitals through :class:`LocalGrid`, which keeps every
reply the real ClientApp sent: the query answers, the training updates, the
evaluation metrics and the declines of a site whose policy refuses ``align``.
:func:`wire_problems` then holds each reply to docs/architecture.md, "What leaves a site":
parameter tensors of the stage's up groups, aggregate numeric metrics and the
few protocol strings, and nothing of what the site holds: report text, DICOM
identifiers, catalog pseudonyms, the site's salt or its paths. The checker is
shown to catch crafted leaks, so this test can fail.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydicom
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedmri import __version__, wire
from fedmri.data.catalog_db import CATALOG_FILE, SALT_FILE
from fedmri.protocol import PROTOCOL_VERSION
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline

from helpers import identity
from helpers.local_grid import LocalGrid

# Onto the micro preset (a 2-block, 32-wide encoder): one trainable text layer so that
# text weights travel up in align.
OVERRIDES = ["align.text_trainable_layers=1"]
DECLINING_SITE = "site-02"  # its policy leaves out align

# What each kind of reply may hold: record name -> record type, and for ConfigRecords
# (the only place a string may travel) key -> value type.
RECORDS = {"query": {"versions": ConfigRecord},
           "train": {"arrays": ArrayRecord, "metrics": MetricRecord, "status": ConfigRecord},
           "evaluate": {"metrics": MetricRecord, "status": ConfigRecord}}
CONFIG_KEYS = {"versions": {"fedmri_version": str, "protocol_version": int, "site_name": str},
               "status": {"declined": bool, "reason": str, "missing-groups": list}}  # missing-groups: wire group names
# Far above the ~25 aggregate metrics a stage reports, far below one value per sample of a
# real site; per-sample values as a list are refused outright.
MAX_METRICS = 40
# Shortest report fragment searched for: shorter ones ("No effusion.") are too generic to
# prove anything, and every report holds longer sentences.
MIN_SENTENCE = 12
# Array bytes are searched through their printable ASCII runs of at least this length.
MIN_ARRAY_NEEDLE = 8


@dataclass
class SiteSecrets:
    """What must never leave the sites: report text and identifiers (with where each came from)."""

    reports: dict[str, str]  # text or sentence -> "site-01 reports.csv"
    identifiers: dict[str, str]  # identifier -> "site-01 PatientID", "site-01 catalog pseudonym", ...

    def __post_init__(self) -> None:
        # Search order: longest first, so a message names the whole text rather than a sentence of it.
        self.needles = sorted(self.reports.items(), key=lambda kv: -len(kv[0])) + sorted(
            self.identifiers.items(), key=lambda kv: -len(kv[0]))
        self.anchors: dict[bytes, list[tuple[bytes, str, str]]] = {}
        for needle, source in self.needles:
            segment = max(needle.encode("ascii", "replace").split(b"?"), key=len)
            if len(segment) >= MIN_ARRAY_NEEDLE:
                self.anchors.setdefault(segment[:MIN_ARRAY_NEEDLE], []).append((segment, needle, source))


# ----------------------------------------------------------------- the checker
def wire_problems(reply: Message, kind: str, up_keys: Iterable[str], secrets: SiteSecrets) -> list[str]:
    """Everything in ``reply`` that docs/architecture.md's data flow does not allow to leave a site.

    Args:
        reply: A message a ClientApp sent.
        kind: ``"query"``, ``"train"`` or ``"evaluate"``: the request it answers.
        up_keys: Wire keys of the stage's up groups, the only tensors it may carry.
        secrets: The sites' report texts and identifiers.

    Returns:
        One line per problem; empty when the reply is clean.
    """
    if reply.has_error():  # free text made by Flower from an exception: it can hold anything
        return [f"an error reply: {reply.error.reason!r}"]
    problems: list[str] = []
    strings: list[str] = []  # every string in the reply: record names, keys, config values
    numbers: list[int | float] = []  # every numeric value of a metric or config record
    arrays: list[bytes] = []
    up = set(up_keys)
    for name, record in reply.content.items():
        strings.append(name)
        allowed = RECORDS[kind].get(name)
        if allowed is None or not isinstance(record, allowed):
            problems.append(f"record {name!r} ({type(record).__name__}) is not allowed in a {kind} reply")
        if isinstance(record, ArrayRecord):
            for key in record.keys():
                strings.append(key)
                array = record[key]
                if key not in up:
                    problems.append(f"array {key!r} is not a wire key of the stage's up groups")
                if array.dtype != "float32":
                    problems.append(f"array {key!r} is {array.dtype}, not float32")
                arrays.append(array.numpy().tobytes())
        elif isinstance(record, MetricRecord):
            problems += _metric_problems(record)
            strings += record.keys()
            numbers += [v for v in record.values() if isinstance(v, (int, float))]
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                strings.append(key)
                wanted = CONFIG_KEYS.get(name, {}).get(key)
                if wanted is None or type(value) is not wanted:
                    problems.append(f"config {name}.{key}={value!r} is not a protocol field")
                if isinstance(value, str):
                    strings.append(value)
                elif isinstance(value, (int, float)):
                    numbers.append(value)
                else:  # bytes or lists: serialise them so the search below still sees their content
                    strings.append(repr(value))
        else:
            problems.append(f"record {name!r} is a {type(record).__name__}")
    problems += _text_problems(strings, numbers, arrays, secrets)
    return problems


def _metric_problems(record: MetricRecord) -> list[str]:
    # Aggregates only: scalars (a list is one value per sample or per step), a bounded count,
    # and num-examples a count, not a value.
    problems = [f"metric {k!r} is a {type(v).__name__}, not a numeric scalar"
                for k, v in record.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if len(record) >= MAX_METRICS:
        problems.append(f"{len(record)} metrics in one reply, >= {MAX_METRICS}: per-sample values?")
    n = record.get("num-examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n < 0 or float(n) != int(n):
        problems.append(f"num-examples {n!r} is not a count")
    return problems


def _text_problems(strings: list[str], numbers: list[int | float], arrays: list[bytes],
                   secrets: SiteSecrets) -> list[str]:
    problems: list[str] = []
    # \0 never occurs in a report or identifier, so no match straddles two strings.
    text = "\0".join(strings)
    numeric = "\0".join(repr(v) for v in numbers)
    values = {float(v) for v in numbers}
    for needle, source in secrets.needles:
        if needle in text:
            problems.append(f"{source} {_short(needle)} is in a string of the reply")
        elif needle.replace(".", "", 1).isdigit():
            # A date or numeric id inside a float's digits is chance; as the value itself it is a leak.
            if float(needle) in values:
                problems.append(f"{source} {_short(needle)} is a metric value")
        elif needle in numeric:
            problems.append(f"{source} {_short(needle)} is in the metric values")
    for blob in arrays:
        problems += [f"{source} {_short(needle)} is in the bytes of an array" for needle, source in
                     _in_bytes(blob, secrets)]
    return problems


def _in_bytes(blob: bytes, secrets: SiteSecrets) -> Iterator[tuple[str, str]]:
    # Any ASCII text (or the longest ASCII piece of a text) in raw bytes lies in a run of
    # printable bytes; float32 weights give few and short ones, so looking up each window
    # of a run among the needles' first bytes is fast and exact.
    for run in re.finditer(rb"[\t\n\r\x20-\x7e]{%d,}" % MIN_ARRAY_NEEDLE, blob):
        data = run.group()
        for i in range(len(data) - MIN_ARRAY_NEEDLE + 1):
            for segment, needle, source in secrets.anchors.get(data[i:i + MIN_ARRAY_NEEDLE], ()):
                if data.startswith(segment, i):
                    yield needle, source


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ------------------------------------------------------------- what the sites hold
def _sentences(text: str) -> list[str]:
    pieces = re.split(r"\n|(?<=[.;:])\s+", text)
    pieces = [re.sub(r"^\d+\.\s*", "", p).strip() for p in pieces]
    return [p for p in pieces if len(p) >= MIN_SENTENCE]


def _collect_secrets(sites: list) -> SiteSecrets:
    reports: dict[str, str] = {}
    identifiers: dict[str, str] = {}

    def add(value: object, source: str) -> None:
        value = str(value).strip() if value is not None else ""
        if value:
            identifiers.setdefault(value, source)

    for name, site_file, catalog in sites:
        hospital = catalog.parent.parent / "hospitals" / name
        for path in sorted(p for p in (hospital / "dicom").rglob("*") if p.is_file()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for tag in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "AccessionNumber", "StudyDate", "PatientBirthDate"):
                add(ds.get(tag), f"{name} DICOM {tag}")
            add(" ".join(str(ds.get("PatientName", "")).split("^")), f"{name} DICOM PatientName")
            add(path, f"{name} DICOM file path")
        with open(hospital / "reports.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for column in ("findings", "impression"):
                    for piece in [row[column].strip(), *_sentences(row[column])]:
                        if len(piece) >= MIN_SENTENCE:
                            reports.setdefault(piece, f"{name} reports.csv {column}")
                add(row["accession_number"], f"{name} reports.csv accession")
                add(row["study_instance_uid"], f"{name} reports.csv StudyInstanceUID")
        with open(hospital / "labels.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                add(row["series_instance_uid"], f"{name} labels.csv SeriesInstanceUID")
        conn = sqlite3.connect(f"file:{catalog / CATALOG_FILE}?mode=ro", uri=True)
        try:
            for row in conn.execute("SELECT id, patient_id, study_id, series_uid, study_uid, accession, cache_key, "
                                    "cache_path, source_paths FROM series"):
                for value in row[:8]:
                    add(value, f"{name} catalog pseudonym or identifier")
                for path in json.loads(row[8]):
                    add(path, f"{name} catalog source path")
            for (pid,) in conn.execute("SELECT patient_id FROM patients"):
                add(pid, f"{name} catalog patient pseudonym")
        finally:
            conn.close()
        add((catalog / SALT_FILE).read_text(), f"{name} site salt")
        for path in (catalog, catalog / CATALOG_FILE, hospital, hospital / "dicom", site_file):
            add(path, f"{name} path")
    return SiteSecrets(reports, identifiers)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module", autouse=True)
def server_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages (tests/server/conftest.py)."""
    with identity.server_identity():
        yield


@pytest.fixture(scope="module")
def secrets(federation_sites: list) -> SiteSecrets:
    return _collect_secrets(federation_sites)


@dataclass
class Exchange:
    """One request the coordinator sent and the reply it got."""

    kind: str  # query | train | evaluate
    stage: str  # query | pretrain | align | evaluate
    site: str
    reply: Message


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, federation_sites: list) -> tuple[list[Exchange], dict]:
    """A whole pipeline, 1 round per stage, one site declining align; every exchange and the up keys per stage."""
    tmp = tmp_path_factory.mktemp("wire-privacy")
    site_files = {}
    for i, (name, site_file, _) in enumerate(federation_sites):
        if name == DECLINING_SITE:
            cfg = OmegaConf.load(site_file)
            cfg.policy = {"stages": ["pretrain", "evaluate"]}
            site_file = tmp / f"{name}.yaml"
            site_file.write_text(OmegaConf.to_yaml(cfg))
        site_files[101 + i] = site_file
    body = {"name": "wire", "preset": "micro", "overrides": OVERRIDES, "min_sites": 2, "run_root": str(tmp / "runs"),
            "export": False, "wait_for_sites_s": 5,
            "stages": [{"name": "pretrain", "rounds": 1, "local_steps": 1},
                       {"name": "align", "rounds": 1, "local_steps": 1}, {"name": "evaluate"}]}
    pipeline = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))))
    grid = LocalGrid(site_files)
    pipeline.run_all(grid)

    names = {101 + i: name for i, (name, _, _) in enumerate(federation_sites)}
    assert len(grid.sent) == len(grid.received), "LocalGrid pairs each request with its reply"
    exchanges = []
    for sent, reply in zip(grid.sent, grid.received):
        kind = str(sent.metadata.message_type)
        stage = "query" if kind == "query" else str(sent.content["config"]["stage"])
        exchanges.append(Exchange(kind, stage, names[int(sent.metadata.dst_node_id)], reply))
    initial = wire.initial_state(pipeline.cfg)
    up_keys = {stage: set(wire.select(initial, wire.stage_groups(stage, pipeline.cfg).up))
               for stage in ("pretrain", "align", "evaluate")} | {"query": set()}
    return exchanges, up_keys


def _declined(reply: Message) -> bool:
    status = reply.content.config_records.get("status")
    return status is not None and bool(status.get("declined"))


# ------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_every_reply_carries_only_up_tensors_aggregate_metrics_and_protocol_strings(
        pipeline_run: tuple[list[Exchange], dict], secrets: SiteSecrets) -> None:
    exchanges, up_keys = pipeline_run
    # The run had every kind of reply: 3 queries, 3 pretrain updates, 2 align updates and a
    # decline, 3 evaluations; align updates carried text weights.
    seen = sorted((x.stage, x.site, _declined(x.reply)) for x in exchanges)
    sites = sorted({x.site for x in exchanges})
    assert sites == ["site-01", "site-02", "site-03"]
    assert seen == sorted([(s, n, s == "align" and n == DECLINING_SITE) for s in
                           ("query", "pretrain", "align", "evaluate") for n in sites])
    align_up = [x.reply.content["arrays"] for x in exchanges if x.stage == "align" and not _declined(x.reply)]
    assert len(align_up) == 2 and all(any(wire.group_of(k) == wire.TEXT for k in a.keys()) for a in align_up)

    problems = {f"{x.stage} reply of {x.site}": wire_problems(x.reply, x.kind, up_keys[x.stage], secrets)
                for x in exchanges}
    assert not {k: v for k, v in problems.items() if v}, problems
    assert len(exchanges) == 12
    assert len(secrets.reports) > 50 and len(secrets.identifiers) > 1000


@pytest.mark.slow
def test_metrics_are_the_same_aggregates_at_every_site(pipeline_run: tuple[list[Exchange], dict]) -> None:
    """Per-sample values would show as keys that depend on a site's data; every site reports the same names.

    Three documented groups are all-or-nothing: retrieval (``i2t_*``, ``t2i_*``)
    only when the split has image-report pairs, the 1-NN probe (``knn_*``)
    only when the site has training series to compare with, and the KoLeo loss
    (``val_koleo_loss``) only when the split has two series. Which patient lands
    in a site's validation split depends on its random pseudonym salt, so a
    site may lack a group; the rest must match exactly.
    """
    exchanges, _ = pipeline_run
    groups = {"retrieval": ("i2t_", "t2i_"), "knn": ("knn_",), "koleo": ("val_koleo_",)}
    for stage in ("pretrain", "align", "evaluate"):
        keys = {x.site: sorted(x.reply.content["metrics"].keys()) for x in exchanges
                if x.stage == stage and not _declined(x.reply)}
        assert len(keys) >= 2, (stage, keys)
        optional = tuple(p for prefixes in groups.values() for p in prefixes)
        core = {site: tuple(k for k in names if not k.startswith(optional)) for site, names in keys.items()}
        assert len(set(core.values())) == 1, (stage, keys)
        for prefixes in groups.values():
            present = {tuple(k for k in names if k.startswith(prefixes)) for names in keys.values()}
            assert len(present - {()}) <= 1, (stage, keys)  # a group is whole or absent


@pytest.mark.slow
def test_query_and_decline_replies_hold_only_the_protocol_strings(pipeline_run: tuple[list[Exchange], dict]) -> None:
    exchanges, _ = pipeline_run
    for x in exchanges:
        if x.kind == "query":
            assert dict(x.reply.content["versions"]) == {
                "fedmri_version": __version__, "protocol_version": PROTOCOL_VERSION, "site_name": x.site}
    (decline,) = [x.reply for x in exchanges if _declined(x.reply)]
    assert set(decline.content.keys()) == {"metrics", "status"}
    assert dict(decline.content["metrics"]) == {"num-examples": 0, "declined": 1}
    assert set(decline.content["status"].keys()) == {"declined", "reason"}
    assert decline.content["status"]["reason"] == \
        "stage 'align' is not in this site's policy.stages (pretrain, evaluate)"


# ----------------------------------------------------------- the checker can fail
def _crafted(kind: str, content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=101, message_type=kind)
    return Message(content, reply_to=request)


def _first(secrets: SiteSecrets, source_part: str) -> str:
    return next(k for k, v in secrets.identifiers.items() if source_part in v)


@pytest.mark.parametrize("leak", ["report-in-status", "patient-id-in-metric-key", "list-metric",
                                  "uid-as-config", "report-bytes-in-array", "date-as-value"])
def test_the_checker_catches_a_leak(federation_sites: list, secrets: SiteSecrets, leak: str) -> None:
    import numpy as np
    import torch

    sentence = next(s for s, src in secrets.reports.items() if "findings" in src and len(s) < 80)
    patient = _first(secrets, "DICOM PatientID")
    metrics = {"num-examples": 4, "loss": 1.0}
    if leak == "report-in-status":
        content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1}),
                              "status": ConfigRecord({"declined": True, "reason": f"cannot read {sentence}"})})
        expect = "reports.csv"
    elif leak == "patient-id-in-metric-key":
        content = RecordDict({"metrics": MetricRecord(metrics | {f"loss_{patient}": 0.5})})
        expect = "PatientID"
    elif leak == "list-metric":
        content = RecordDict({"metrics": MetricRecord(metrics | {"per_sample_loss": [0.1, 0.2, 0.3]})})
        expect = "not a numeric scalar"
    elif leak == "uid-as-config":
        content = RecordDict({"metrics": MetricRecord(metrics),
                              "extra": ConfigRecord({"series": _first(secrets, "DICOM SeriesInstanceUID")})})
        expect = "SeriesInstanceUID"
    elif leak == "report-bytes-in-array":
        raw = np.frombuffer(sentence.encode().ljust(4 * ((len(sentence) + 3) // 4)), dtype=np.float32)
        content = RecordDict({"arrays": ArrayRecord({"encoder/leak": torch.from_numpy(raw.copy())}),
                              "metrics": MetricRecord(metrics)})
        expect = "bytes of an array"
    else:
        content = RecordDict({"metrics": MetricRecord(metrics | {"age": float(_first(secrets, "StudyDate"))})})
        expect = "metric value"
    problems = wire_problems(_crafted("evaluate" if "array" not in leak else "train", content),
                             "evaluate" if "array" not in leak else "train", {"encoder/leak"}, secrets)
    assert any(expect in p for p in problems), problems
