"""The ClientApp side: one client's part of a run, the same plugin code the simulator runs.

Each message names the run (config, algorithm, hyper-parameters, seed), the client and the round. The
ClientApp rebuilds the algorithm as the simulator built it (its constructor, init_client for this client,
init_server for the constants client code reads), restores the client's personal state from the Flower
context's state (`context.state`, kept by Flower across the run's messages; the first message brings the
initial state), sets the RNG states the message carries, runs the operation and replies:

    query.hello        which client this node holds (node config `partition-id`)
    train.update       client_update: its Phases run by bench/training.py; replies the upload, each phase's loss
    train.late         receive_after_aggregation with the post-aggregation payload
    evaluate.personal  (correct, count, loss) of algo.predict on the client's test and validation sets

Every reply carries the FLOPs counted here (train/eval/server, and the client's own training FLOPs), the
metrics the code recorded (ctx.record), the RNG states after the operation and, when the server sent its
state for a client update that shares it, that state back. Nothing about a client is kept in module globals:
the only module-level cache is the read-only dataset and partition (`_INPUTS`).

Node config keys: `partition-id` (the client this node is), optional `data-dir`, `partition-file` (a
partition file at another path than the server's) and `device`."""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from algorithms.base import Algorithm
from bench.accounting import FLOP_KINDS, FlopAccountant
from bench.checkpoint import Packer, unpack
from bench.config import RunConfig
from bench.context import Client, RunContext, modules_in
from bench.errors import UserError
from bench.flower import records
from bench.flower.link import error_reply
from bench.flower.server import server_state
from bench.plan import Inputs, load_inputs, resolve_device
from bench.registry import find_algorithm
from bench.state import ClientStore
from bench.training import run_updates
from data.partition import FILE_PREFIX
from data.portable import partition_sha256

app = ClientApp()

# The dataset and partition of the run this process serves (read-only inputs; one entry: a node serves one
# run at a time).
_INPUTS: dict[str, Inputs] = {}


def partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise UserError("this SuperNode has no partition-id; start it with --node-config \"partition-id=K\" "
                        "(K = the client it holds, 0..N-1)")
    return int(value)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    try:
        content = RecordDict()
        content["hello"] = ConfigRecord({"partition-id": partition_id(context), "torch": torch.__version__})
        return Message(content, reply_to=message)
    except Exception as err:  # noqa: BLE001 (reported to the server, which raises it)
        return error_reply(message, err)


# ---- one client, rebuilt for one message ---------------------------------------------------------------------
@dataclasses.dataclass
class Session:
    key: str
    round_index: int
    ctx: RunContext
    algo: Any
    client: Client
    context: Context
    flops_before: dict[str, int]
    own_before: int

    @classmethod
    def open(cls, content: RecordDict, context: Context) -> "Session":
        head = content.config_records["bench"]
        run, cid = json.loads(str(head["run"])), int(head["client"])
        if cid != partition_id(context):
            raise UserError(f"a message for client {cid} reached the SuperNode holding partition-id "
                            f"{partition_id(context)}")
        cfg, device = node_config(RunConfig(**run["cfg"]), context)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        inputs = inputs_for(cfg, device, run)
        splits = inputs.splits[run["seed"]]
        algo_cls = algorithm_class(run)
        accountant = FlopAccountant(cache=cfg.flop_cache)
        key = run["key"]
        forget_other_runs(context, key)
        if f"{key}/flops" in context.state:  # the FLOP cache of the earlier messages: counted steps not recounted
            accountant.load_cache(unpack(json.loads(str(context.state.config_records[f"{key}/flops"]["json"])), {}))
        ctx = RunContext(cfg, inputs.data, device, run["seed"], algo_cls.name, accountant, splits)
        algo = algo_cls(ctx, algo_cls.make_hparams(run["hparams"]))
        ctx.prediction_modules = lambda c: modules_in(c.state, algo)
        client = Client(cid, ctx.client_archs[cid], splits[cid])
        algo.init_client(client)   # the templates the state is restored into
        algo.init_server()         # constants client code may read (shapes, sizes)
        source = content if records.has_state(content, "state") else context.state
        name = "state" if source is content else f"{key}/state"
        if not records.has_state(source, name):
            raise RuntimeError(f"client {cid} holds no state for run {key} (its SuperNode restarted?)")
        client.state = records.get_state(source, name, client.state, device, f"client/{cid}")
        if records.has_state(content, "server"):
            algo.load_state_dict(records.get_state(content, "server", algo.state_dict(), device, "server"))
        records.rng_restore(content, ctx.generator)
        return cls(key, int(head["round"]), ctx, algo, client, context, accountant.snapshot(),
                   accountant.by_client[cid])

    def reply(self, content: RecordDict, out: RecordDict, changed: bool) -> None:
        """Keep the client's state (when `changed`, or first received) and the FLOP cache in the context;
        add the FLOPs, recorded metrics, RNG states and (when it came) the server state to the reply."""
        name = f"{self.key}/state"
        if changed or not records.has_state(self.context.state, name):
            records.put_state(self.context.state, name,
                              records.pack_state(self.client.state, "client state", self.algo.name))
        cache = Packer().pack(self.ctx.accountant.cache_state(), "flops")  # JSON only: keys and ints
        self.context.state[f"{self.key}/flops"] = ConfigRecord({"json": json.dumps(cache)})
        metrics = out.metric_records.get("metrics") or MetricRecord()
        after = self.ctx.accountant.snapshot()
        for kind in FLOP_KINDS:
            metrics[f"flops.{kind}"] = after[kind] - self.flops_before[kind]
        metrics["flops.by_client"] = self.ctx.accountant.by_client[self.client.id] - self.own_before
        out["metrics"] = metrics
        recorded = [[name, float(v), float(w)] for name, values in self.ctx.round_metrics.items() for v, w in values]
        out["recorded"] = ConfigRecord({"json": json.dumps(recorded)})
        records.put_state(out, "rng", records.rng_pack(self.ctx.generator))
        if content.config_records["bench"]["server"] == "update":
            records.put_state(out, "server", records.pack_state(server_state(self.algo, "update"), "server state",
                                                                self.algo.name))


def algorithm_class(run: dict[str, Any]) -> type:
    """The run's algorithm: by its registered name, else (a class registered by hand where the server runs, e.g.
    bench.registry.register in a notebook) the same class imported here by its module path."""
    cls = find_algorithm(run["algorithm"])
    if cls is not None:
        return cls
    module, _, qualname = run["class"].partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        raise UserError(f"algorithm {run['algorithm']!r} is neither registered nor importable ({run['class']}) "
                        "where this ClientApp runs; install the plugin on every SuperNode") from None
    if not (isinstance(found, type) and issubclass(found, Algorithm)):
        raise UserError(f"{run['class']} is not an algorithm (a subclass of algorithms.base.Algorithm)")
    return found


def node_config(cfg: RunConfig, context: Context) -> tuple[RunConfig, torch.device]:
    """The run's config as this node reads its data: the node config's data-dir / partition-file / device."""
    changes = {}
    if "data-dir" in context.node_config:
        changes["data_dir"] = str(context.node_config["data-dir"])
    if "partition-file" in context.node_config:
        changes["partition"] = FILE_PREFIX + str(context.node_config["partition-file"])
    if "device" in context.node_config:
        changes["device"] = str(context.node_config["device"])
    cfg = dataclasses.replace(cfg, **changes)
    return cfg, resolve_device(cfg.device)


def inputs_for(cfg: RunConfig, device: torch.device, run: dict[str, Any]) -> Inputs:
    """The dataset and client splits (cached while the run's inputs stay the same); a partition other than the
    server's is refused."""
    fields = ("dataset", "data_dir", "partition", "num_clients", "seeds", "classes_per_client", "dirichlet_alpha",
              "val_fraction", "augment")
    key = json.dumps([getattr(cfg, f) for f in fields] + [str(device)])
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = load_inputs(cfg, device)
    inputs = _INPUTS[key]
    digest = partition_sha256(inputs.splits[run["seed"]])
    if digest != run["partition_hash"]:
        raise UserError(f"this SuperNode's partition (sha256 {digest[:12]}...) is not the server's "
                        f"({run['partition_hash'][:12]}...); give it the same dataset and partition "
                        "(--node-config data-dir=... partition-file=...)")
    return inputs


def forget_other_runs(context: Context, key: str) -> None:
    """Runs of one Flower run execute one after the other: a message for `key` means the others have ended."""
    for name in list(context.state.keys()):
        if not name.startswith(f"{key}/"):
            del context.state[name]


# ---- the operations -------------------------------------------------------------------------------------------
def update(session: Session, content: RecordDict, out: RecordDict) -> bool:
    cid, device = session.client.id, session.ctx.device
    payload = records.record_payload(content.array_records["payload"], device)
    updates = run_updates(session.ctx, session.algo, [session.client], {cid: payload}, session.round_index)
    out["upload"], _ = records.payload_record(updates.uploads[cid])
    losses = [[phase, float(loss)] for _, phase, loss in updates.losses]
    out["losses"] = ConfigRecord({"json": json.dumps(losses)})
    return True


def late(session: Session, content: RecordDict, out: RecordDict) -> bool:
    payload = records.record_payload(content.array_records["payload"], session.ctx.device)
    session.algo.receive_after_aggregation(session.client, payload, session.round_index)
    return True


def evaluate(session: Session, content: RecordDict, out: RecordDict) -> bool:
    client, algo = session.client, session.algo
    metrics = MetricRecord()
    for split in ("test", "val"):
        correct, count, loss = session.ctx.evaluate(client, lambda x: algo.predict(client, x), split)
        metrics[f"{split}.correct"], metrics[f"{split}.count"], metrics[f"{split}.loss"] = int(correct), count, float(loss)
    store = ClientStore(session.ctx.device)
    store.put(client.id, client.state)
    metrics["state_bytes"] = store.state_bytes(client.id)
    out["metrics"] = metrics
    return False


def handle(message: Message, context: Context, operation: Callable[[Session, RecordDict, RecordDict], bool]) -> Message:
    """Run one operation; any error goes back to the server in the reply (bench/flower/link.py check_reply)."""
    try:
        session = Session.open(message.content, context)
        out = RecordDict()
        changed = operation(session, message.content, out)
        session.reply(message.content, out, changed)
        return Message(out, reply_to=message)
    except Exception as err:  # noqa: BLE001
        return error_reply(message, err)


@app.train("update")
def train_update(message: Message, context: Context) -> Message:
    return handle(message, context, update)


@app.train("late")
def train_late(message: Message, context: Context) -> Message:
    return handle(message, context, late)


@app.evaluate("personal")
def evaluate_personal(message: Message, context: Context) -> Message:
    return handle(message, context, evaluate)
