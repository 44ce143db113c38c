"""One registry type for every plugin kind, fed by Python entry points.

Built-in plugins are declared in mmkd's own pyproject.toml under the same entry-point
groups a third-party distribution would use, so both are found the same way. Entry
points are loaded lazily: a plugin that fails to import is recorded with its traceback,
the other plugins keep working, and the error is raised only when that plugin is used.
"""

from __future__ import annotations

import difflib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Generic, TypeVar

from mmkd.errors import DuplicatePluginError, PluginLoadError, UnknownPluginError
from mmkd.plugin_api import GROUPS, PLUGIN_API_VERSION

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    """A registered name: either a loaded object or a way to load it."""

    source: str
    load: Callable[[], T] | None = None
    obj: T | None = None
    error: str | None = field(default=None)


class Registry(Generic[T]):
    """Named plugins of one kind, such as fusion modules or loss terms.

    Args:
        kind: Human-readable kind used in messages, e.g. "fusion".
        group: Entry-point group scanned by `load_entry_points`, e.g. "mmkd.fusion".

    Example:
        >>> from mmkd.registry import get_registry
        >>> fusion = get_registry("fusion")
        >>> "concat" in fusion.names()
        True
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, _Entry[T]] = {}
        self._scanned = False

    def register(self, name: str, obj: T, *, source: str) -> None:
        """Register an already imported plugin under `name`.

        Raises:
            DuplicatePluginError: `name` is taken; the message names both sources.
        """
        self._check_free(name, source)
        self._entries[name] = _Entry(source=source, obj=obj)

    def register_lazy(self, name: str, load: Callable[[], T], *, source: str) -> None:
        """Register `name` with a loader that runs on first `get`, as an entry point does.

        An exception from `load` and a plugin API mismatch are recorded and raised as
        `PluginLoadError` when the name is used, so the other names keep working.

        Raises:
            DuplicatePluginError: `name` is taken; the message names both sources.
        """
        self._check_free(name, source)
        self._entries[name] = _Entry(source=source, load=load)

    def load_entry_points(self) -> None:
        """Record every entry point of this registry's group, importing none yet."""
        if self._scanned:
            return
        found: dict[str, _Entry[T]] = {}
        for entry_point in metadata.entry_points(group=self.group):
            dist = entry_point.dist.name if entry_point.dist is not None else "unknown"
            source = f"{entry_point.value} (distribution {dist})"
            self._check_free(entry_point.name, source, found)
            found[entry_point.name] = _Entry(source=source, load=entry_point.load)
        # Only a scan without duplicates is kept, so a failed scan is reported again next time.
        self._entries.update(found)
        self._scanned = True

    def names(self) -> list[str]:
        """Return the sorted names of every plugin found, importable or not."""
        self.load_entry_points()
        return sorted(self._entries)

    def source(self, name: str) -> str:
        """Return where the plugin `name` comes from (module path and distribution)."""
        return self._lookup(name).source

    def get(self, name: str) -> T:
        """Return the plugin registered as `name`, importing it on first use.

        Raises:
            UnknownPluginError: no plugin has that name; lists the names and the closest.
            PluginLoadError: the plugin failed to import or needs another plugin API.
        """
        entry = self._lookup(name)
        if entry.obj is None and entry.error is None:
            self._import(name, entry)
        if entry.error is not None:
            raise PluginLoadError(entry.error)
        assert entry.obj is not None
        return entry.obj

    def _lookup(self, name: str) -> _Entry[T]:
        self.load_entry_points()
        if name in self._entries:
            return self._entries[name]
        available = sorted(self._entries)
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPluginError(
            f"Unknown {self.kind} plugin {name!r}. Available: {', '.join(available) or 'none'}."
            f"{hint}"
        )

    def _import(self, name: str, entry: _Entry[T]) -> None:
        assert entry.load is not None
        try:
            obj = entry.load()
        except Exception:  # noqa: BLE001 - any import failure must not break other plugins
            entry.error = (
                f"The {self.kind} plugin {name!r} from {entry.source} failed to import:\n"
                f"{traceback.format_exc()}"
            )
            logger.warning("%s plugin %r failed to import; others still work", self.kind, name)
            return
        required_api = getattr(obj, "plugin_api", None)
        if required_api != PLUGIN_API_VERSION:
            entry.error = (
                f"The {self.kind} plugin {name!r} from {entry.source} was written for plugin "
                f"API version {required_api}, but this mmkd provides version {PLUGIN_API_VERSION}. "
                f"Install a release of the plugin made for API version {PLUGIN_API_VERSION}."
            )
            logger.warning(entry.error)
            return
        entry.obj = obj

    def _check_free(self, name: str, source: str, pending: dict[str, _Entry[T]] | None = None) -> None:
        taken = self._entries.get(name) or (pending or {}).get(name)
        if taken is not None:
            raise DuplicatePluginError(
                f"Two {self.kind} plugins are named {name!r}: {taken.source} "
                f"and {source}. Rename one of them or uninstall one distribution."
            )


_REGISTRIES: dict[str, Registry] = {}


def get_registry(kind: str) -> Registry:
    """Return the process-wide registry of a plugin kind: "fusion", "alignment" or "losses"."""
    if kind not in GROUPS:
        raise UnknownPluginError(
            f"Unknown plugin kind {kind!r}. Available: {', '.join(sorted(GROUPS))}."
        )
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind, GROUPS[kind])
    return _REGISTRIES[kind]
