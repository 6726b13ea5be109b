"""`Registry`: hardware profiles by name — the built-in ones and a user's own."""
from __future__ import annotations

import os
from typing import Any, Iterable

from ..errors import PlinioOnnxError
from .builtin import builtin_profiles
from .profile import HardwareProfile, load_profile

__all__ = ["Registry", "for_model", "get", "names"]


class Registry:
    """Hardware profiles by name: the built-in ones (unless ``builtin=False``) plus those added.
    An explicit object rather than a module-level table, so what one caller adds no other sees."""

    def __init__(self, profiles: Iterable[HardwareProfile] = (), *, builtin: bool = True) -> None:
        self._profiles: dict[str, HardwareProfile] = dict(builtin_profiles()) if builtin else {}
        for profile in profiles:
            self.add(profile)

    def add(self, profile: HardwareProfile) -> HardwareProfile:
        """Register ``profile`` under its name (replacing a profile of the same name)."""
        if not isinstance(profile, HardwareProfile):
            raise PlinioOnnxError(f"not a HardwareProfile: {profile!r}")
        self._profiles[profile.name] = profile
        return profile

    def names(self) -> list[str]:
        return sorted(self._profiles)

    def __contains__(self, name: str) -> bool:
        return name in self._profiles

    def get(self, name: "str | HardwareProfile") -> HardwareProfile:
        """The profile called ``name``; a ``FILE.py:NAME`` or ``package.module:NAME`` reference
        loads a user-defined `HardwareProfile` from there (the CLI's ``--hardware`` takes both)."""
        if isinstance(name, HardwareProfile):
            return name
        if name in self._profiles:
            return self._profiles[name]
        if ":" in name:
            return load_profile(name)
        raise PlinioOnnxError(f"unknown hardware profile {name!r}; choose from {', '.join(self.names())} "
                              "or give FILE.py:NAME for your own")


def get(name: "str | HardwareProfile") -> HardwareProfile:
    """A built-in profile by name, a user-defined one by ``FILE.py:NAME`` / ``module:NAME``, or
    ``name`` itself when it is already a `HardwareProfile`."""
    return Registry().get(name)


def for_model(name: "str | HardwareProfile", model_path: "str | os.PathLike | None" = None, *,
              channel_multiple: int | None = None, progress: Any = None) -> HardwareProfile:
    """The profile ``name`` ready to cost ``model_path`` (the `optimize` flow's entry point).
    Analytical profiles do not depend on the model: this is `get`. (``channel_multiple`` and
    ``progress`` serve profiles measured on the model.)"""
    return get(name)


def names() -> list[str]:
    """The names of the built-in profiles."""
    return Registry().names()
