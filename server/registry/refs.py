"""Adapter names, references and versions, and the registry's errors: what every backend and caller shares."""

import re
from dataclasses import dataclass
from pathlib import Path

from server.registry.validation import shown

NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,63}$"
# Aliases start with a letter so that "name@3" is always a version and "name@stable" an alias.
ALIAS_PATTERN = "^[a-z][a-z0-9._-]{0,63}$"
# Python's $ also matches before a final newline ("acme\n"), so these match with fullmatch.
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))
ALIAS_RE = re.compile(ALIAS_PATTERN.strip("^$"))
# ASCII digits only: str.isdigit() also takes "²", "١" and "１".
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
MAX_VERSION = 2**31 - 1
LATEST = "latest"
# Names of versions the gateway composes per request: content-addressed, never registered by hand.
COMPOSED_PREFIX = "composed."
STATE_FILE = "state.json"


class RegistryError(Exception):
    """Base of the registry's errors; `param` names the input at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidReference(RegistryError, ValueError):
    """An adapter reference or name that does not parse."""


class NotFound(RegistryError, LookupError):
    """No such adapter, version or alias."""


class Unavailable(RegistryError):
    """The registry could not be read."""


class Conflict(RegistryError):
    """The name cannot be taken, or the change conflicts with the registry's state."""


def unavailable(name: str) -> str:
    """Why a name another tenant owns cannot be registered; it says no more, so as not to tell that it exists."""
    return f"adapter name {name!r} is not available: choose another"


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: Path | None  # its directory, in a directory registry
    manifest: dict

    @property
    def key(self) -> str:
        """The name the version is loaded under in an engine, and answered as."""
        return f"{self.name}@{self.version}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidReference(f"invalid adapter {what} {shown(str(name))}: must match {NAME_PATTERN}", what)
    return name


def check_new_name(name: str) -> str:
    """A name someone may register under: valid, and outside the namespace of compositions made per request."""
    if check_name(name).startswith(COMPOSED_PREFIX):
        raise InvalidReference(f"adapter names starting with {COMPOSED_PREFIX!r} are reserved for compositions "
                               "made per request", "name")
    return name


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise NotFound(f"no version {str(version)[:20]}: versions run from 1 to {MAX_VERSION}")
    return version


def parse_ref(text: str) -> Ref:
    """Parses "name", "name@3" or "name@alias"."""
    if not isinstance(text, str):
        raise InvalidReference("adapter must be a string")
    name, sep, selector = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name)
    if VERSION_RE.fullmatch(selector) and int(selector) <= MAX_VERSION:
        return Ref(name, version=int(selector))
    if ALIAS_RE.fullmatch(selector):
        return Ref(name, alias=selector)
    raise InvalidReference(f"invalid adapter reference {shown(text)}: expected name, name@VERSION or name@ALIAS")


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or alias == LATEST:
        raise InvalidReference(f"invalid alias {shown(str(alias))}: must match {ALIAS_PATTERN} and not be "
                               f"{LATEST!r}", "alias")
    return alias
