"""One watch per host: every served network's leases and names come through one long-lived watch of the whole prefix
(the default network's, which holds the named networks' keys too), resumed from the last revision after a break.
It is re-created only then, or after FEED_IDLE_SECONDS without a change (when its member is also asked whether it
still answers), so an idle host makes no etcd request for it in between.

Each change goes to the network it belongs to: lease events to the network's Subscription (what its LeaseWatcher
reads, as from a store), names changes to the name book. With several etcd endpoints it watches through two members
at once (`Store.watch_views`) and takes every change from whichever reports it first, by its revision: a member that
hangs delays nothing.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from pyflannel.localapi import DEFAULT_NETWORK

from .model.lease import LeaseEvent
from .store.base import KeyChange, HistoryLost, Store, StoreError

log = logging.getLogger(__name__)

FEED_IDLE_SECONDS = 120.0
NAMES = "names/"
SUBNETS = "subnets/"


class Subscription:
    """One network's share of the feed. Its lease events are read like a store's watch (`watch_leases`); a break of
    the feed's history reads as HistoryLost, etcd failing everywhere as StoreError."""

    def __init__(self, name: str):
        self.name = name
        self.queue: queue.Queue = queue.Queue()

    def watch_leases(self, position: int, timeout: float) -> tuple[list[LeaseEvent], int]:
        try:
            kind, payload = self.queue.get(timeout=timeout)
        except queue.Empty:
            return [], position
        if kind == "wake":
            return [], position
        if kind == "lost":
            raise HistoryLost(payload)
        if kind == "error":
            raise StoreError(payload)
        return payload, max(position, *(event.revision for event in payload))

    def wake(self) -> None:
        """End a wait in watch_leases now (the network has something else to do first)."""
        self.queue.put(("wake", None))


class Feed:
    def __init__(self, store: Store, stop: threading.Event, on_names: Callable[[str, list[KeyChange] | None], None],
                 count_error: Callable[[], None] = lambda: None, idle: float = FEED_IDLE_SECONDS):
        """`on_names(network, changes)`: the names changes of a network (keys below its names/), or None when the
        feed lost history and the network's names must be read again. `count_error`: a watch failed (metrics)."""
        self.store = store
        self.stop = stop
        self.on_names = on_names
        self.count_error = count_error
        self.idle = idle
        self.lock = threading.Lock()
        self.subscriptions: dict[str, Subscription] = {}
        self.position = 0  # the newest revision handed out
        self.views: list[Store] = []
        self.inbox: queue.Queue = queue.Queue()
        self.failing: dict[int, StoreError] = {}
        self.down = False  # every view failing, said to the subscribers

    def subscribe(self, name: str) -> Subscription:
        """Network `name`'s share, from now on: call it before the network lists its leases and names. The first
        call starts the feed from the store's current position (StoreError: try again)."""
        with self.lock:
            if not self.views:
                self.position = self.store.current_position()
                self.views = self.store.watch_views()
                threading.Thread(target=self._dispatch, name="feed", daemon=True).start()
                for index, view in enumerate(self.views):
                    threading.Thread(target=self._follow, args=(index, view), name=f"feed-view-{index}",
                                     daemon=True).start()
            subscription = self.subscriptions[name] = Subscription(name)
            return subscription

    def unsubscribe(self, name: str) -> None:
        with self.lock:
            self.subscriptions.pop(name, None)

    # --- threads ----------------------------------------------------------------------------------------------
    def _follow(self, index: int, view: Store) -> None:
        """One view's watch, from the feed's position on, into the inbox, until stopped. After a failure, the view
        first answers a plain read (its "back" reaches the dispatcher even when nothing changes)."""
        position, delay, failed = self.position, 0.5, False
        while not self.stop.is_set():
            position = max(position, self.position)
            try:
                if failed:
                    view.current_position()
                    self.inbox.put((index, "changes", []))
                    failed = False
                for batch in view.stream(position, self.idle):
                    self.inbox.put((index, "changes", batch))
                    if batch:
                        position = max(position, batch[-1].revision)
                    if self.stop.is_set():
                        return
                delay = 0.5
            except HistoryLost as e:
                log.info("watch fell behind etcd's history (%s): every network re-reads its leases and names", e)
                position = self._current(view, position)
                self.inbox.put((index, "lost", str(e)))
            except (StoreError, OSError) as e:
                failed = True
                self.count_error()
                self.inbox.put((index, "error", e if isinstance(e, StoreError) else StoreError(str(e))))
                self.stop.wait(delay)
                delay = min(delay * 2, 2.0)  # come back within 2 s of etcd's return

    def _current(self, view: Store, fallback: int) -> int:
        try:
            return view.current_position()
        except StoreError:
            return fallback

    def _dispatch(self) -> None:
        while not self.stop.is_set():
            try:
                index, kind, payload = self.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "error":
                self.failing[index] = payload
                if len(self.failing) == len(self.views) and not self.down:
                    self.down = True
                    self._tell_all("error", "; ".join(str(e) for e in self.failing.values()))
                continue
            self.failing.pop(index, None)
            self.down = False
            if kind == "lost":
                self._tell_all("lost", payload)
                continue
            self._hand_out([change for change in payload if change.revision > self.position])

    def _tell_all(self, kind: str, why: str) -> None:
        with self.lock:
            subscriptions = list(self.subscriptions.values())
        for subscription in subscriptions:
            subscription.queue.put((kind, why))
            if kind == "lost":
                self.on_names(subscription.name, None)

    def _hand_out(self, changes: list[KeyChange]) -> None:
        if not changes:
            return
        self.position = max(change.revision for change in changes)
        leases: dict[str, list[LeaseEvent]] = {}
        names: dict[str, list[KeyChange]] = {}
        with self.lock:
            for change in changes:
                name, key = self._network_of(change.key)
                if name not in self.subscriptions:
                    continue
                if key.startswith(SUBNETS) and change.lease is not None:
                    leases.setdefault(name, []).append(change.lease)
                elif key.startswith(NAMES):
                    names.setdefault(name, []).append(
                        KeyChange(key[len(NAMES):], change.value, change.revision, folder=change.folder))
            subscriptions = dict(self.subscriptions)
        for name, events in leases.items():
            subscriptions[name].queue.put(("events", events))
        for name, found in names.items():
            self.on_names(name, found)

    def _network_of(self, key: str) -> tuple[str, str]:
        """(network, key below the network's prefix): a named network's keys are below <prefix>/<NAME>/."""
        first, _, rest = key.partition("/")
        if first in self.subscriptions and first != DEFAULT_NETWORK:
            return first, rest
        return DEFAULT_NETWORK, key
