#!/usr/bin/env python3
"""Load the MLflow UI of a benchmark store in a real headless Chromium, check that it shows the runs, and save
screenshots: the experiment's run list and the compare view with the methods side by side.

    python scripts/ui_screenshot.py --output-dir results                # the store of `bench run`
    python scripts/ui_screenshot.py --output-dir results/paper-smoke/runs --experiment mhpfl-paper-smoke --recipe t1

Needs Chromium (Debian: `apt-get install chromium`; chromium-driver is not needed). Starts `mlflow ui` on
127.0.0.1 on a free port, checks the run list through the REST API, renders the pages with
`chromium --headless --screenshot` and `--dump-dom`, and checks that the compare page names every compared
run. Writes <out>/mlflow_runs.png, <out>/mlflow_compare.png and <out>/ui_check.json; exit code 0 when every
check passes, 1 when one fails, 2 when Chromium or the store is missing."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3 opens "custom_model_development" experiments on their runs


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    return next((shutil.which(name) for name in CHROMIUMS if shutil.which(name)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def select_runs(client, experiment_id: str, parent: str | None, recipe: str | None = None, limit: int = 8) -> list:
    """The runs to compare: the children of the named (or latest) invocation when it has several; otherwise
    the latest run of each method in the setting of the latest run (a `bench paper` cell holds one method),
    among the runs of `recipe` when given."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=2000)
    if recipe is not None:
        runs = [r for r in runs if recipe in r.data.tags.get("recipe", "").split(",")]
    parents = [r for r in runs if r.data.tags.get("bench.kind") == "invocation"
               and (parent is None or parent in (r.info.run_name, r.info.run_id))]
    children = [r for r in runs if "algorithm" in r.data.tags]
    if parent is not None and not parents:
        raise SystemExit(f"error: no invocation named {parent!r} in the experiment")
    if parents:
        mine = [r for r in children if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        if len(mine) > 1 or parent is not None:
            return mine[:limit]
    if not children:
        return []
    latest = children[0].data.tags
    same = [r for r in children if all(r.data.tags.get(k) == latest.get(k) for k in ("dataset", "setting", "seed",
                                                                                         "group"))]
    picked: dict[str, object] = {}
    for run in same:
        picked.setdefault(run.data.tags.get("method", run.data.tags["algorithm"]), run)
    return list(picked.values())[:limit]


def chromium(binary: str, url: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={profile}", "--window-size=1900,1200",
               "--virtual-time-budget=20000", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` with one worker and without MLflow's job runner (GenAI jobs; it starts a dozen processes)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop_ui(proc: subprocess.Popen) -> None:
    """Stop the server we started and whatever it spawned: its own process group (Ctrl-C, then kill)."""
    for sig, grace in ((signal.SIGINT, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="results", help="results root holding mlflow.db (default: results)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite store in --output-dir)")
    parser.add_argument("--experiment", default="mhpfl-bench")
    parser.add_argument("--run", dest="parent", help="invocation (parent run) whose runs to compare (default: latest)")
    parser.add_argument("--recipe", help="compare runs of this `bench paper` recipe (tag recipe), e.g. t1")
    parser.add_argument("--out", default="results/ui", help="folder for the screenshots and ui_check.json")
    parser.add_argument("--port", type=int, default=0, help="port for mlflow ui (default: a free one)")
    parser.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server")
    args = parser.parse_args(argv)

    binary = find_chromium(args.chromium)
    if binary is None:
        print("error: Chromium not found; install it (Debian: apt-get install chromium) or pass --chromium PATH",
              file=sys.stderr)
        return 2
    db = Path(args.output_dir) / "mlflow.db"
    if args.tracking_uri is None and not db.exists():
        print(f"error: no MLflow store at {db}; run `bench run` first or pass --output-dir/--tracking-uri",
              file=sys.stderr)
        return 2
    uri = args.tracking_uri or f"sqlite:///{db.resolve()}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: no experiment {args.experiment!r} in {uri}", file=sys.stderr)
        return 2
    if EXPERIMENT_KIND not in exp.tags:  # a training benchmark, not a GenAI app: open on the runs table
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    selected = select_runs(client, exp.experiment_id, args.parent, args.recipe)
    if not selected:
        print(f"error: no (algorithm, seed) runs in experiment {args.experiment!r}", file=sys.stderr)
        return 2
    names = [r.info.run_name for r in selected]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_ui(uri, port, out / "mlflow_ui.log")
    check: dict = {"url": base, "experiment": args.experiment, "experiment_id": exp.experiment_id,
                   "compared_runs": names, "checks": {}}
    started = time.monotonic()
    try:
        if not wait_healthy(base, proc, args.timeout):
            print(f"error: mlflow ui did not answer on {base} within {args.timeout:.0f} s; see {out / 'mlflow_ui.log'}",
                  file=sys.stderr)
            return 1
        check["server_start_s"] = round(time.monotonic() - started, 1)
        listed = get_json(f"{base}/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [exp.experiment_id], "max_results": 1000})
        listed_names = {r["info"].get("run_name") for r in listed.get("runs", [])}
        check["checks"]["rest_api_lists_runs"] = set(names) <= listed_names

        runs_png, compare_png = out / "mlflow_runs.png", out / "mlflow_compare.png"
        runs_url = f"{base}/#/experiments/{exp.experiment_id}/runs"
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in selected]))
        compare_url = f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}"
        check["compare_url"] = compare_url
        for url, png in ((runs_url, runs_png), (compare_url, compare_png)):
            t = time.monotonic()
            result = chromium(binary, url, [f"--screenshot={png}"], timeout=120)
            check[f"{png.stem}_s"] = round(time.monotonic() - t, 1)
            check["checks"][f"screenshot_{png.stem}"] = png.exists() and png.stat().st_size > 20_000
            if result.returncode != 0:
                check.setdefault("chromium_errors", []).append(result.stderr[-2000:])
        t = time.monotonic()
        dom = chromium(binary, compare_url, ["--dump-dom"], timeout=120).stdout
        check["dump_dom_s"] = round(time.monotonic() - t, 1)
        (out / "mlflow_compare.html").write_text(dom)
        missing = [n for n in names if n not in dom]
        check["checks"]["compare_page_names_every_run"] = not missing and "Comparing" in dom
        check["missing_in_page"] = missing
        check["screenshots"] = [str(runs_png), str(compare_png)]
    finally:
        t = time.monotonic()
        stop_ui(proc)
        check["stop_s"] = round(time.monotonic() - t, 1)
        check["wall_s"] = round(time.monotonic() - started, 1)
        (out / "ui_check.json").write_text(json.dumps(check, indent=2))
    ok = all(check["checks"].values())
    for name, passed in check["checks"].items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    print(f"screenshots: {', '.join(check.get('screenshots', []))} ({check['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
