"""An unwritable folder for the tests of output-dir checks: immutable where chattr works (which holds for root
too), else read-only by its mode (which holds for other users)."""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator


def can_write(folder: Path) -> bool:
    try:
        Path(tempfile.mkdtemp(dir=folder)).rmdir()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def unwritable_folder(folder: Path) -> Iterator[Path | None]:
    """`folder` (created) made unwritable for the block; None when this system cannot make it so. Restored
    afterwards, so that the test's temporary files can be deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    try:
        yield None if can_write(folder) else folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
        folder.chmod(0o755)
