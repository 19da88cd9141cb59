"""The results store: the one owner of a results folder's layout, its lock, its atomic writers and its
readers. Everything that writes or reads a results folder (the results-folder and MLflow callbacks, resume,
`bench sync`, `bench report`, `bench paper`) goes through `ResultsStore`.

    <output-dir>/mlflow.db                     the default MLflow store (default_tracking_uri)
    <output-dir>/<run-name>/                   one results folder (one invocation)
        config.json  summary.csv  mlflow.json  .lock  plots/
        runs/<algo>-seed<k>/                   one run (run_key)
            config.json  metrics.csv  clients.csv  summary.json  mlflow.json  checkpoint/

JSON and whole CSV files are written to a temporary name and renamed (readers never see half a file);
metrics.csv grows by one appended line per round, and its reader drops a torn last line."""
from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from bench.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process locks (concurrent runs then rely on sqlite's own locking)
    fcntl = None

CONFIG, SUMMARY_TABLE, MLFLOW_FILE, LOCK, RUNS, PLOTS = "config.json", "summary.csv", "mlflow.json", ".lock", "runs", "plots"
METRICS, CLIENTS, SUMMARY, CHECKPOINT = "metrics.csv", "clients.csv", "summary.json", "checkpoint"
MLFLOW_DB = "mlflow.db"
KEY_SEPARATOR = "-seed"


def run_key(algorithm: str, seed: int) -> str:
    """The name of one (algorithm, seed) run: its folder under runs/, its MLflow child run, its summary line."""
    return f"{algorithm}{KEY_SEPARATOR}{seed}"


def parse_run_key(key: str) -> tuple[str, int]:
    algorithm, _, seed = key.rpartition(KEY_SEPARATOR)
    return algorithm, int(seed) if seed.isdigit() else 0


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(Path(output_dir) / MLFLOW_DB).resolve()}"


# ---- atomic files --------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, a folder, unreadable, not UTF-8, not JSON
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see half a file


def read_csv(path: Path) -> list[dict[str, str]]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # atomic: readers never see half a file


def new_root(output_dir: Path) -> Path:
    """A new timestamped results folder under `output_dir`, made unique with a suffix when another process
    took the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        root = output_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            root.mkdir()
            return root
        except FileExistsError:
            continue
    raise UserError(f"cannot create a new results folder under {output_dir}; give --run-name")


def is_results_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / RUNS).is_dir()


def expand_folders(paths: Iterable[Path]) -> list[Path]:
    """Results folders under the given paths: a results folder itself, or a folder whose subfolders are."""
    out: list[Path] = []
    for path in map(Path, paths):
        if is_results_folder(path):
            out.append(path)
        elif path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.is_dir() and is_results_folder(p)))
    return out


class ResultsStore:
    """One results folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = None

    # ---- layout ----
    def run_dir(self, key: str) -> Path:
        return self.root / RUNS / key

    def checkpoint_dir(self, key: str) -> Path:
        return self.run_dir(key) / CHECKPOINT

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS

    @property
    def summary_table_path(self) -> Path:
        return self.root / SUMMARY_TABLE

    def run_keys(self) -> list[str]:
        runs = self.root / RUNS
        return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []

    def plot_files(self) -> list[Path]:
        return sorted(p for p in self.plots_dir.glob("*") if p.is_file()) if self.plots_dir.is_dir() else []

    def run_files(self, key: str) -> list[Path]:
        """The run's own files (its MLflow artifacts): not its checkpoint, sync state or temporary files."""
        return [p for p in sorted(self.run_dir(key).iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name != MLFLOW_FILE]

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- exclusive use of the folder by one process ----
    def acquire(self) -> None:
        """Hold <root>/.lock for this process's lifetime (or until release): a second `bench run`/`resume`/
        `sync` on the same folder is refused instead of interleaving its writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None or self._lock is not None:
            return
        handle = open(self.root / LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another bench process is using {self.root}; wait for it to finish") from None
        except OSError:  # a filesystem without locks (some network mounts): go on unlocked
            handle.close()
            return
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            (self.root / LOCK).unlink(missing_ok=True)  # while still held: a finished folder keeps no lock file
            self._lock.close()  # closing drops the flock
            self._lock = None

    # ---- the invocation ----
    def config(self) -> dict[str, Any]:
        """config.json ({} when there is none or it is unreadable)."""
        return read_json(self.root / CONFIG)

    def has_config(self) -> bool:
        return (self.root / CONFIG).exists()

    def require_config(self) -> dict[str, Any]:
        """The config.json of a results folder a user named (`bench resume`, `bench sync`); a clear error if
        the folder is not one."""
        config = self.config()
        if config:
            return config
        path = self.root / CONFIG
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a bench results folder; give the folder that `bench run` "
                            "printed, e.g. results/<run-name>")
        if path.is_file():
            raise UserError(f"{path} is unreadable (not a JSON object: a damaged or foreign file); restore it "
                            "from a copy, or give another results folder")
        raise UserError(f"{self.root} is not a bench results folder (no config.json); give the folder that "
                        "`bench run` printed, e.g. results/<run-name>")

    def write_config(self, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / CONFIG, config)

    def summary_table(self) -> list[dict[str, str]]:
        return read_csv(self.summary_table_path)

    def write_summary_table(self, entries: list[dict[str, Any]]) -> None:
        write_csv(self.summary_table_path, entries)

    def listed_as_finished(self, key: str) -> bool:
        """summary.csv lists the run as FINISHED and its metrics are there."""
        return self.has_rows(key) and any(r.get("run") == key and r.get("status") == "FINISHED"
                                          for r in self.summary_table())

    # ---- one run ----
    def run_config(self, key: str) -> dict[str, Any]:
        return read_json(self.run_dir(key) / CONFIG)

    def write_run_config(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run_dir = self.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG, {"params": params, "tags": tags})

    def has_rows(self, key: str) -> bool:
        return (self.run_dir(key) / METRICS).exists()

    def rows(self, key: str) -> list[dict[str, str]]:
        """metrics.csv rows; a torn last line (a kill mid-append) and repeated steps are dropped."""
        rows, last = [], -1
        for row in read_csv(self.run_dir(key) / METRICS):
            step = row.get("step") or ""
            if None in row.values() or None in row or not step.isdigit() or int(step) <= last:
                continue
            rows.append(row)
            last = int(step)
        return rows

    def write_rows(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv with `rows` (none: no file)."""
        path = self.run_dir(key) / METRICS
        if rows:
            write_csv(path, rows)
        else:
            path.unlink(missing_ok=True)

    def append_row(self, key: str, row: dict[str, Any], fields: list[str]) -> None:
        with open(self.run_dir(key) / METRICS, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)

    def clients(self, key: str) -> list[dict[str, str]]:
        return read_csv(self.run_dir(key) / CLIENTS)

    def has_clients(self, key: str) -> bool:
        return (self.run_dir(key) / CLIENTS).exists()

    def summary(self, key: str) -> dict[str, Any]:
        """summary.json, with its status ({} for a run that never ended)."""
        return read_json(self.run_dir(key) / SUMMARY)

    def finished_summary(self, key: str) -> dict[str, Any] | None:
        """The summary of a run that already finished in this folder (None if it did not)."""
        summary = self.summary(key)
        return summary if summary.get("status") == "FINISHED" else None

    def write_run_end(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        run_dir = self.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        if clients:
            write_csv(run_dir / CLIENTS, clients)
        write_json(run_dir / SUMMARY, {**summary, "status": status})

    # ---- what MLflow holds of this folder (the sync state) ----
    def mlflow_info(self, key: str | None = None) -> dict[str, Any]:
        return read_json((self.root if key is None else self.run_dir(key)) / MLFLOW_FILE)

    def record_mlflow(self, key: str | None = None, **fields: Any) -> None:
        folder = self.root if key is None else self.run_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MLFLOW_FILE, {**self.mlflow_info(key), **fields})
