"""The Flower ClientApp that runs at each hospital.

For now it answers one ``query`` message with the fedmri and protocol versions
it runs, so the coordinator can check a federation before training; the stage
trainers come with the federation work.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmri import __version__
from fedmri.protocol import PROTOCOL_VERSION

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this site's software versions, nothing about its data."""
    reply = ConfigRecord({"fedmri_version": __version__, "protocol_version": PROTOCOL_VERSION})
    return Message(RecordDict({"versions": reply}), reply_to=msg)
