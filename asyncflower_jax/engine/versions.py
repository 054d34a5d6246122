"""Live model versions, reference-counted: a version is freed when nobody holds it any more."""

from __future__ import annotations

from ..strategy.updates import PyTree


class VersionCache:
    """version -> params for every version the server or an unaggregated client still holds."""

    def __init__(self):
        self._params: dict[int, PyTree] = {}
        self._refs: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, version: int) -> bool:
        return version in self._params

    def put(self, version: int, params: PyTree) -> None:
        """Add a new version, held once by its creator (release it when it stops being current)."""
        assert version not in self._params, f"version {version} already cached"
        self._params[version] = params
        self._refs[version] = 1

    def get(self, version: int) -> PyTree:
        return self._params[version]

    def acquire(self, version: int) -> None:
        self._refs[version] += 1

    def release(self, version: int) -> None:
        self._refs[version] -= 1
        if self._refs[version] == 0:
            del self._refs[version], self._params[version]
