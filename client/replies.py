"""Replies a site sends that are not results: the decline, in the one layout the coordinator reads."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmri.protocol import METRICS_KEY, NUM_EXAMPLES, STATUS_KEY


def decline(msg: Message, reason: str) -> Message:
    """``num-examples`` 0, ``declined`` 1 and the first line of ``reason`` as ``status.reason``."""
    content = RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES: 0, "declined": 1}),
                          STATUS_KEY: ConfigRecord({"declined": True, "reason": reason.splitlines()[0]})})
    return Message(content, reply_to=msg)
