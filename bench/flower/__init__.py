"""The Flower adapter: any registered algorithm, unchanged, as a Flower ServerApp and ClientApp.

    records.py  payloads <-> ArrayRecords (bytes = the arrays' element bytes), live state <-> records
                (the checkpoint format), the RNG states
    link.py     the server's line to the clients: node <-> client (node config partition-id), one message
                and its reply at a time, errors and lost clients
    server.py   FlowerSimulation: the built-in round loop with the client code in ClientApps
    client.py   the ClientApp (`app`): rebuilds the client per message from its Flower context state
    run.py      the run lifecycle over a Grid (results folder, MLflow, FAILED runs)
    deploy.py   the deployed ServerApp (`server_app`, configured by the Flower run config) and `client_app`
    app/        the Flower App directory for `flwr run` (pyproject.toml naming deploy.py's apps)

Simulation on this machine: `bench run --executor flower` (bench/executors/flower.py). Needs the `flower`
extra: pip install -e ".[flower]" (the pinned Flower version is FLOWER_VERSION)."""
from __future__ import annotations

import os

from bench.errors import UserError

FLOWER_VERSION = "1.42.0"

# Flower reports usage events unless told not to; a benchmark run sends nothing anywhere.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def require_flower() -> None:
    """A one-line error when Flower is not installed (or not the pinned version's API)."""
    try:
        import flwr  # noqa: F401
        from flwr.app import ArrayRecord  # noqa: F401
    except ImportError:
        raise UserError(f"--executor flower needs Flower {FLOWER_VERSION}: pip install 'mhpfl-bench[flower]' "
                        f"(or pip install flwr=={FLOWER_VERSION})") from None
