"""The Flower ServerApp run by the coordinator.

For now it asks every connected site for its versions and logs them; the staged
pipeline (pretrain -> align -> heads -> evaluate) comes with the federation work.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query each site's versions once."""
    node_ids = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    for reply in grid.send_and_receive(messages, timeout=60):
        if reply.has_content():
            versions = dict(reply.content["versions"])
            log(INFO, "site %s runs fedmri %s (protocol %s)", reply.metadata.src_node_id,
                versions.get("fedmri_version"), versions.get("protocol_version"))
        else:
            log(INFO, "site %s did not answer: %s", reply.metadata.src_node_id, reply.error.reason)
