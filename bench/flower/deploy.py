"""The deployed Flower app (`flwr run bench/flower/app <connection>`): `server_app` runs on the SuperLink's
machine and writes the results folder and MLflow there, as `bench run` does; each SuperNode runs
bench/flower/client.py's `app` for the client its node config names (`partition-id`). app/pyproject.toml names
that module directly, so a ClientApp process (one per message) skips this server side's imports; `client_app` here
is the same object.

The run config (bench/flower/app/pyproject.toml lists the keys and defaults) says what to run: `config` (a bench
TOML file), `set` (";"-separated --set overrides), `run-name`, `output-dir`, and the timeouts. A run whose client
stops answering ends FAILED with the reason (its finished rounds stay in the results folder); the ServerApp then
raises, so Flower marks its run failed too."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from bench.config import load_config
from bench.executors.flower import FlowerExecutor
from bench.flower import client
from bench.flower.run import FlowerOptions
from bench.runner import run_invocation

server_app = ServerApp()
client_app = client.app  # the same ClientApp (app/pyproject.toml names client.app itself)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    sets = [item.strip() for item in str(rc.get("set", "")).split(";") if item.strip()]
    options = {"run_name": str(rc.get("run-name", "")) or None, "output_dir": str(rc.get("output-dir", "")) or None}
    cfg = load_config(str(rc.get("config", "")) or None, sets=sets, options=options)
    flower = FlowerOptions(reply_timeout=float(rc.get("reply-timeout", 3600.0)),
                           connect_timeout=float(rc.get("connect-timeout", 120.0)))
    result = run_invocation(cfg, executor=FlowerExecutor(flower=flower, grid=grid))
    if result.failed:
        reasons = "; ".join(f"{key}: {reason}" for key, reason in result.failed.items())
        raise RuntimeError(f"{len(result.failed)} run(s) failed ({reasons}); results in {result.root}")
