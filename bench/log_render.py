"""Log rendering cost: 100k login.success events through the text renderer and the observer.

Compares any two versions of relayproxy/logs.py in one run, e.g. the tree's
against an older one written out with git:

    git show REV:relayproxy/logs.py > /tmp/logs_before.py
    .venv/bin/python bench/log_render.py /tmp/logs_before.py relayproxy/logs.py
"""

import importlib.util
import io
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.logger import LogLevel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relayproxy.config import LogConfig  # noqa: E402


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"logs_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


EVENT = {
    "log_format": "login.success client={client} user={user} mechanism={mechanism} "
    "listener={listener} record={record}",
    "log_level": LogLevel.info,
    "log_time": 1795600800.123,
    "log_namespace": "relayproxy.proxy",
    "log_logger": object(),
    "log_source": None,
    "client": "192.0.2.7",
    "user": "alice@example.org",
    "mechanism": "PLAIN",
    "listener": "pop3",
    "record": "queued",
}
N = 100_000


def best_of_five(call: Any, reset: Any = None) -> float:
    best = float("inf")
    for _ in range(5):
        if reset is not None:
            reset()
        start = time.perf_counter()
        for _ in range(N):
            call(EVENT)
        best = min(best, time.perf_counter() - start)
    return best / N * 1e6


def measure(path: str) -> None:
    module = load(path)
    render = best_of_five(module.format_text_line)
    stream = io.StringIO()
    observer = module.make_observer(LogConfig(), stream=stream)

    def empty() -> None:
        stream.seek(0)
        stream.truncate()

    whole = best_of_five(observer, empty)
    print(f"{path}: render {render:.2f} us/event; render and write (stderr target) {whole:.2f} us")


if __name__ == "__main__":
    for argument in sys.argv[1:] or [str(ROOT / "relayproxy" / "logs.py")]:
        measure(argument)
