"""The server's line to the clients: which Flower node holds which client, and one message at a time to a client
with its reply (or a clear error when it does not come).

A SuperNode says which client it is by its node config, `partition-id` (the simulation engine numbers them
0..N-1; a deployed SuperNode is started with `--node-config "partition-id=K"`). Messages go one after the
other, each waiting for its reply: the run's RNG states travel with them (bench/flower/server.py), which is what
makes a Flower run equal to the built-in simulator's."""
from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from bench.errors import UserError

HELLO = "query.hello"


class ClientLost(RuntimeError):
    """A client did not answer: its SuperNode stopped, or its ClientApp crashed."""


class ClientLink:
    def __init__(self, grid: Any, reply_timeout: float = 3600.0, connect_timeout: float = 120.0):
        self.grid = grid
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.lost: str | None = None     # why a client stopped answering (then nothing more is sent)

    def connect(self, num_clients: int) -> None:
        """Wait until the nodes holding clients 0..N-1 are connected and map each client to its node (every new
        node is asked at once: a deployed ClientApp takes seconds to start)."""
        deadline = time.monotonic() + self.connect_timeout
        found: dict[int, int] = {}
        asked: set[int] = set()
        while True:
            new = sorted(set(self.grid.get_node_ids()) - asked)
            asked.update(new)
            for node, cid in self._partitions_of(new, deadline).items():
                if cid in found and found[cid] != node:
                    raise UserError(f"two SuperNodes ({found[cid]} and {node}) both hold partition-id={cid}; "
                                    "give each SuperNode its own --node-config partition-id")
                found[cid] = node
            if all(c in found for c in range(num_clients)):
                break
            if time.monotonic() > deadline:
                missing = [c for c in range(num_clients) if c not in found]
                raise UserError(f"the run needs clients 0..{num_clients - 1}, but no connected SuperNode holds "
                                f"partition-id {', '.join(map(str, missing[:10]))} after {self.connect_timeout:g} s; "
                                f"start one SuperNode per client with --node-config \"partition-id=K\"")
            time.sleep(0.2)
        self.nodes = {c: found[c] for c in range(num_clients)}

    def _partitions_of(self, nodes: list[int], deadline: float) -> dict[int, int]:
        """node -> the partition-id it holds, asked of all `nodes` at once."""
        sent = {}
        for node in nodes:
            for message_id in self.grid.push_messages([Message(RecordDict(), node, HELLO)]):
                sent[message_id] = node
        found: dict[int, int] = {}
        while len(found) < len(sent):
            pending = [m for m, node in sent.items() if node not in found]
            for reply in self.grid.pull_messages(pending):
                node = sent[reply.metadata.reply_to_message_id]
                found[node] = int(check_reply(reply, node, "hello").content.config_records["hello"]["partition-id"])
            if len(found) < len(sent) and time.monotonic() > deadline:
                raise ClientLost(f"hello: no reply from Flower node(s) "
                                 f"{', '.join(str(n) for n in sent.values() if n not in found)} "
                                 f"within {self.connect_timeout:g} s")
            time.sleep(0.01)
        return found

    def ask(self, cid: int, message_type: str, content: RecordDict, what: str) -> Message:
        """Send `content` to client `cid` and return its reply; ClientLost when none comes in time (and for
        every later message: the federation lost a client)."""
        if self.lost is not None:
            raise ClientLost(self.lost)
        try:
            return self._exchange(self.nodes[cid], message_type, content, self.reply_timeout, f"client {cid}: {what}")
        except ClientLost as err:
            self.lost = str(err)
            raise

    def _exchange(self, node: int, message_type: str, content: RecordDict, timeout: float, what: str) -> Message:
        ids = list(self.grid.push_messages([Message(content, node, message_type)]))
        deadline, pause = time.monotonic() + timeout, 0.002
        while True:
            replies = list(self.grid.pull_messages(ids))
            if replies:
                return check_reply(replies[0], node, what)
            if time.monotonic() > deadline:
                raise ClientLost(f"{what}: no reply from Flower node {node} within {timeout:g} s "
                                 "(its SuperNode stopped or is unreachable)")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def check_reply(reply: Message, node: int, what: str) -> Message:
    """The reply itself, or the error it carries raised: a UserError on the client stays a UserError (one
    line), anything else names the client, the node and the cause."""
    if reply.has_error():
        raise ClientLost(f"{what}: Flower node {node} replied with error {reply.error.code} "
                         f"({reply.error.reason.strip()})")
    failure = reply.content.config_records.get("error")
    if failure is not None:
        kind, text = str(failure["type"]), str(failure["message"])
        if failure["user"]:
            raise UserError(text)
        raise RuntimeError(f"{what}: {kind}: {text}")
    return reply


def error_reply(message: Message, err: BaseException) -> Message:
    """The reply of a ClientApp whose handler raised: the error, for check_reply on the server."""
    content = RecordDict()
    content["error"] = ConfigRecord({"type": type(err).__name__, "message": str(err),
                                     "user": isinstance(err, UserError)})
    return Message(content, reply_to=message)
