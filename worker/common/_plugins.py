"""Installed plugins, found through ``importlib.metadata`` entry points, as MLflow and Optuna
find theirs: :class:`EntryPoints` loads one group once per process into a registry."""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class EntryPoints:
    """The entry points of ``group``, each passed once to ``register(name, loaded, source)``
    the first time :meth:`load` is called. An entry that fails to load or to register is logged
    and left out; the others, and the registry, stay usable. ``source`` names the entry and its
    distribution (``plugin pkg.module:obj (dist-name)``) for messages and listings."""

    def __init__(self, group: str, what: str, register: Callable[[str, object, str], None]):
        self.group = group
        self.what = what
        self._register = register
        self._lock = threading.Lock()
        self._loaded = False

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            for entry in importlib.metadata.entry_points(group=self.group):
                source = f"plugin {entry.value}" + (f" ({entry.dist.name})" if entry.dist else "")
                try:
                    self._register(entry.name, entry.load(), source)
                except Exception as error:  # a broken plugin must not take the registry down
                    logger.warning("%s %r (%s) left out: %s", self.what, entry.name, source, error)
