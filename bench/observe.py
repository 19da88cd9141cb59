"""Observers: watching a Simulation from outside, without patching it.

The simulator wraps each event of a round in `observer.span(event, info)` for every observer it was given,
so an observer sees the start (enter) and the end (exit) of each one, nested as they happen:

    round      info: round (0-based), clients (the sampled ids)
    download   info: client, round, late (the post-aggregation download); at exit: payload (as received),
               bytes (the server's payload hook runs inside; a late payload of None ends it without them)
    update     info: client, round (the client's own code: its local update, one span per stretch between
               phases, the phases themselves outside it; receive_after_aggregation)
    phase      info: clients (trained together; one id unless batched), phase (the Phase), round;
               at exit: losses {client: mean loss tensor}
    upload     info: client, round; at exit: payload (as received by the server), bytes
    aggregate  info: round, uploads
    evaluation info: clients (the clients (re-)evaluated after a round, or all of them before round 1)
    evaluate   info: client, split, tag; at exit: correct, count (every ctx.evaluate call)

Values added at exit are in `info` when the span's exit runs. An exception inside a span propagates through
the observers' exits. Observers must not change the run (they see live models and tensors)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence


class Observer:
    """Override `span` (a context manager); the default observes nothing."""

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        yield


class Observers:
    """The observers of one run, called in order (the first one's span encloses the others')."""

    def __init__(self, observers: Sequence[Observer] = ()):
        self.observers = list(observers)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def remove(self, observer: Observer) -> None:
        self.observers.remove(observer)

    @contextlib.contextmanager
    def span(self, event: str, **info: Any) -> Iterator[dict[str, Any]]:
        """Yields `info`, to which the simulator adds the event's results before the observers' exits run."""
        if not self.observers:
            yield info
            return
        with contextlib.ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.span(event, info))
            yield info


class AtStart(Observer):
    """Calls `fn(info)` as each `event` span starts (e.g. before a phase's first step)."""

    def __init__(self, event: str, fn: Callable[[dict[str, Any]], None]):
        self.event, self.fn = event, fn

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        if event == self.event:
            self.fn(info)
        yield


class Recorder(Observer):
    """Keeps every span's (event, info) at its exit: for tests and quick inspection."""

    def __init__(self, events: Sequence[str] | None = None):
        self.events = set(events) if events is not None else None
        self.seen: list[tuple[str, dict[str, Any]]] = []

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        yield
        if self.events is None or event in self.events:
            self.seen.append((event, dict(info)))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [info for e, info in self.seen if e == event]
