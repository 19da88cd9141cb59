"""The ServerApp side: the built-in round loop (bench/simulator.py) with every piece of client code run by the
clients' ClientApps, reached through Flower messages.

The server keeps what the simulator's server does: sampling (the same RNG stream), the algorithm's server
hooks (payloads, aggregation, post-aggregation payloads), byte counting (bench.accounting.transmit, checked
against the arrays put in the messages), server FLOPs, the round's metrics and the run lifecycle (results
folder, MLflow). A client's ClientApp (bench/flower/client.py) runs its local update, its post-aggregation
step and its evaluation, and keeps its personal state in its Flower context; it reports its FLOPs, losses and
recorded metrics back in the reply.

What travels besides the algorithm's payloads (reported apart, never in bytes_up/bytes_down):
- a client's initial state, once, in its first message: the server initialises every client in order from
  the run seed, as the simulator does, so the models start identical (`flower_state_bytes` at step 0);
- the run's RNG states (augmentation generator, torch/numpy/python), passed from client to client through the
  server with every message, so batches and augmentation follow the simulator's single stream; that is why a
  round's messages go one at a time (`flower_rng_bytes`);
- the algorithm's server state, where client code reads it: with every evaluation when the prediction uses
  server state that no post-aggregation broadcast has given the clients (FedAvg's global model), and to and
  from every client update when the algorithm declares that its client updates share algorithm state
  (`batchable_clients = False`: pFedLoRA's shared momentum),
  all of state_dict() or only the attributes it names in `shared_client_state` (`flower_state_bytes`)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from algorithms.base import Payload
from bench.accounting import FLOP_KINDS
from bench.errors import UserError
from bench.flower import records
from bench.flower.link import ClientLink
from bench.simulator import ClientEval, Simulation, check_finite, summarise

UPDATE, LATE, EVALUATE = "train.update", "train.late", "evaluate.personal"


class FlowerSimulation(Simulation):
    """A Simulation whose clients live in Flower ClientApps (one message at a time, in the simulator's order)."""

    def __init__(self, cfg, algo_cls, seed, data, splits, device, hparams, link: ClientLink, key: str,
                 partition_hash: str):
        if cfg.batched_training:
            raise UserError("batched_training trains clients together in one process; under Flower each client "
                            "trains in its own ClientApp: set batched_training = false")
        super().__init__(cfg, algo_cls, seed, data, splits, device, hparams=hparams)
        self.link = link
        self.run = json.dumps({"key": key, "cfg": cfg.to_dict(), "algorithm": algo_cls.name, "seed": seed,
                               "class": f"{algo_cls.__module__}:{algo_cls.__qualname__}",
                               "hparams": dataclasses.asdict(self.algo.hp), "partition_hash": partition_hash})
        self.delivered: set[int] = set()     # clients holding their initial state
        self.extra = {"state": 0, "rng": 0}  # bytes besides the payloads, this round
        self.state_bytes: dict[int, int] = {}
        records.pack_state(self.clients[0].state, "client state", algo_cls.name)  # unserialisable: fail first

    # ---- the round, as the simulator runs it, with the extra traffic reported -----------------------------
    def initial_metrics(self) -> dict[str, float]:
        self.extra = {"state": 0, "rng": 0}
        metrics = super().initial_metrics()
        return {**metrics, "flower_state_bytes": self.extra["state"], "flower_rng_bytes": self.extra["rng"]}

    def run_round(self, round_index: int) -> dict[str, float]:
        self.extra = {"state": 0, "rng": 0}
        metrics = super().run_round(round_index)
        return {**metrics, "flower_state_bytes": self.extra["state"], "flower_rng_bytes": self.extra["rng"]}

    def local_updates(self, sampled: list[int], round_index: int) -> tuple[dict[int, Payload], dict[int, torch.Tensor]]:
        """Download, local update (in the client's ClientApp) and upload, one client after the other."""
        uploads: dict[int, Payload] = {}
        losses: dict[int, torch.Tensor] = {}
        for cid in sampled:
            record = self.send_payload(cid, round_index, late=False)
            reply = self.exchange(cid, UPDATE, round_index, record, self.update_sharing)
            trace = json.loads(str(reply.content.config_records["losses"]["json"]))
            phases = [(cid, name, torch.tensor(value, dtype=torch.float32)) for name, value in trace]
            check_finite(phases, round_index)
            if phases:
                losses[cid] = phases[-1][2].to(self.device)
            uploads[cid] = self.receive_upload(cid, reply.content.array_records["upload"], round_index)
        return uploads, losses

    def after_aggregation(self, sampled: list[int], round_index: int) -> None:
        recipients = range(self.cfg.num_clients) if self.algo.broadcast_after_aggregation else sampled
        for cid in recipients:
            record = self.send_payload(cid, round_index, late=True)
            if record is not None:
                self.exchange(cid, LATE, round_index, record, self.update_sharing)

    def evaluate(self, client_ids: Iterable[int]) -> dict[str, float]:
        client_ids = list(client_ids)
        with self.observers.span("evaluation", clients=client_ids):
            for cid in client_ids:
                reply = self.exchange(cid, EVALUATE, self.rounds_done, None, "predict" if self.predicts_from_server else "")
                m = reply.content.metric_records["metrics"]
                for split, table in (("test", self.test_evals), ("val", self.val_evals)):
                    table[cid] = ClientEval(int(m[f"{split}.correct"]), int(m[f"{split}.count"]), float(m[f"{split}.loss"]))
                self.state_bytes[cid] = int(m["state_bytes"])
        return summarise(self.test_evals, self.val_evals)

    @property
    def update_sharing(self) -> str:
        """"update" when client updates share algorithm state (batchable_clients = False) that has to travel."""
        return "update" if not self.algo.batchable_clients and server_state(self.algo, "update") else ""

    @property
    def predicts_from_server(self) -> bool:
        """The prediction reads server state the client does not hold: FedAvg's global model. An algorithm that
        broadcasts after aggregation has already brought every client's own state up to date (LG-FedAvg's and
        FedGH's eval_header="global"), so nothing more is sent for its evaluation."""
        return self.algo.prediction_uses_server_state and not self.algo.broadcast_after_aggregation

    def client_table(self) -> list[dict[str, Any]]:
        rows = super().client_table()
        for row in rows:
            row["state_bytes"] = self.state_bytes.get(row["client"], row["state_bytes"])
        return rows

    # ---- payloads: measured on the arrays put in the messages -------------------------------------------------
    def send_payload(self, cid: int, round_index: int, late: bool) -> Any:
        """The server's payload for `cid` as the ArrayRecord to send (None: no post-aggregation payload)."""
        with self.observers.span("download", client=cid, round=round_index, late=late) as info:
            make = self.algo.after_aggregation_payload if late else self.algo.server_payload
            payload = make(self.clients[cid], round_index)
            if payload is None:
                return None
            record, size = records.payload_record(payload)
            info.update(payload=records.record_payload(record, self.device), bytes=size)
        self.bytes_down[cid] += size
        self.round_bytes["down"] += size
        return record

    def receive_upload(self, cid: int, record: Any, round_index: int) -> Payload:
        with self.observers.span("upload", client=cid, round=round_index) as info:
            received, size = records.record_payload(record, self.device), records.record_bytes(record)
            info.update(payload=received, bytes=size)
        self.bytes_up[cid] += size
        self.round_bytes["up"] += size
        return received

    # ---- one message to a client and its reply ------------------------------------------------------------------
    def exchange(self, cid: int, op: str, round_index: int, payload: Any, sharing: str) -> Message:
        """Send client `cid` the operation `op` (with `payload`, its initial state at first contact, the RNG
        states and, when `sharing` ("update" or "predict"), the algorithm's server state) and fold its reply into
        the run: RNG states, FLOPs, recorded metrics and (for "update") the server state its code changed."""
        content = RecordDict()
        content["bench"] = ConfigRecord({"run": self.run, "client": cid, "round": round_index,
                                         "server": sharing})
        if payload is not None:
            content["payload"] = payload
        if cid not in self.delivered:
            self.extra["state"] += records.put_state(content, "state", records.pack_state(
                self.clients[cid].state, "client state", self.algo.name))
        self.extra["rng"] += records.put_state(content, "rng", records.rng_pack(self.ctx.generator))
        if sharing:
            self.extra["state"] += records.put_state(content, "server", records.pack_state(
                server_state(self.algo, sharing), "server state", self.algo.name))
        reply = self.link.ask(cid, op, content, f"{op} (round {round_index + 1})")
        self.take_reply(cid, reply.content, sharing == "update")
        if cid not in self.delivered:  # the client holds its state now: the server keeps none
            self.delivered.add(cid)
            self.clients[cid].state = RemoteState(self.algo.name, cid)
            self.store.put(cid, self.clients[cid].state)
        return reply

    def take_reply(self, cid: int, content: RecordDict, shared: bool) -> None:
        records.rng_restore(content, self.ctx.generator)
        self.extra["rng"] += records.record_bytes(content.array_records["rng.arrays"])
        if shared:
            self.extra["state"] += records.record_bytes(content.array_records["server.arrays"])
            self.algo.load_state_dict(records.get_state(content, "server", self.algo.state_dict(), self.device,
                                                        "server"))
        m = content.metric_records["metrics"]
        for kind in FLOP_KINDS:
            self.accountant.totals[kind] += int(m[f"flops.{kind}"])
        self.accountant.by_client[cid] += int(m["flops.by_client"])
        for name, value, weight in json.loads(str(content.config_records["recorded"]["json"])):
            self.ctx.record(name, torch.tensor(value, dtype=torch.float32), weight)



class RemoteState(dict):
    """A client's state as the server sees it once the client holds it: nothing. A server hook that reads it (a
    plugin whose server code looks into client.state) gets one line saying so instead of a KeyError."""

    def __init__(self, algorithm: str, cid: int):
        super().__init__()
        self.algorithm, self.cid = algorithm, cid

    def __getitem__(self, key: Any) -> Any:
        raise UserError(f"{self.algorithm}: a server hook reads client {self.cid}'s state[{key!r}]; under Flower a "
                        "client's state lives on its SuperNode and server hooks see only client.id, client.arch and "
                        "client.split (keep what the server needs on the server, e.g. learnt from the uploads)")

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key]


def server_state(algo: Any, sharing: str) -> dict[str, Any]:
    """The algorithm state that travels with a message: everything state_dict() holds, or for client updates
    only the attributes the algorithm names in `shared_client_state` when it declares it (e.g. pFedLoRA's
    ("adapter_momentum",); () when each download overwrites the shared state: then nothing travels)."""
    state = algo.state_dict()
    names = getattr(algo, "shared_client_state", None) if sharing == "update" else None
    return state if names is None else {name: state[name] for name in names if name in state}
