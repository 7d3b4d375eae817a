"""Errors a user can cause, and how the ``rlfuse`` command reports them.

Every error rlfuse raises for something the user can fix -- a config value, a data row, a
plugin name, a model path, a resume that does not fit -- derives from :class:`RlfuseError` and
names the place (config key, ``file:line``, plugin and hook). The command prints such an
error as one or a few lines and exits non-zero (2 for config and usage errors, 1 otherwise);
``--debug`` or ``HYDRA_FULL_ERROR=1`` prints the full traceback instead. Any other exception
is a bug and keeps its traceback. See docs/reliability.md.

Plugin ``Config`` dataclasses validate their values in ``__post_init__`` with :func:`require`
and :func:`one_of`; the key is relative to the section (``clip_low``) and the plugin loader
adds the section (``loss.ppo.clip_low``)::

    @dataclass
    class Config:
        clip_low: float = 0.2

        def __post_init__(self) -> None:
            require(self.clip_low >= 0, "clip_low", ">= 0", self.clip_low)
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

_UNSET = object()


class RlfuseError(Exception):
    """An error the user can fix; the command prints its message without a traceback."""

    exit_code = 1


class ConfigError(RlfuseError, ValueError):
    """A config value is missing, of the wrong kind or out of range.

    ``ConfigError(key, problem, value)`` reads ``Config error at 'key': problem, got value``.
    """

    exit_code = 2

    def __init__(self, key: str, problem: str = "", value: Any = _UNSET) -> None:
        self.key = key
        self.problem = problem
        self.value = value
        super().__init__(self._text())

    def _text(self) -> str:
        got = "" if self.value is _UNSET else f", got {self.value!r}"
        return f"Config error at '{self.key}': {self.problem}{got}"

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix`` (``loss.ppo`` + ``clip_low``)."""
        return type(self)(f"{prefix}.{self.key}" if prefix else self.key, self.problem, self.value)


class NonFiniteError(RlfuseError):
    """A reward, loss term or gradient norm was NaN/Inf with ``trainer.nonfinite=stop``."""


class Interrupted(RlfuseError):
    """SIGINT/SIGTERM stopped a run after a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ``ConfigError(key, "must be <rule>", value)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, f"must be {rule}", value)


def one_of(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise a ConfigError naming the allowed values unless ``value`` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}", value)


# ------------------------------------------------------------------ the command's reporting

# Exceptions that are bugs in rlfuse or in a plugin, not something the user wrote: when one is
# the cause of a PluginError the traceback is kept.
_BUGS = (TypeError, AttributeError, NameError, IndexError, KeyError, AssertionError, ZeroDivisionError)


def exit_code(e: BaseException) -> int | None:
    """The exit code for an error to report in one message, or None for a bug (traceback)."""
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover
        HydraException = OmegaConfBaseException = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(e, (HydraException, OmegaConfBaseException)):  # composition, overrides, types
        return 2
    if isinstance(e, RlfuseError):
        cause = e.__cause__
        if cause is not None and not isinstance(e, ConfigError):
            root = _root(cause)
            if isinstance(root, RlfuseError):
                return root.exit_code
            if isinstance(root, _BUGS):
                return None
        return e.exit_code
    return None


def _root(e: BaseException) -> BaseException:
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    return e


def message(e: BaseException) -> str:
    """The one or few lines printed for a reported error."""
    text = str(e).strip() or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip() and str(cause) not in text:  # e.g. Hydra's own wrapping
        text += f"\n  {str(cause).strip().splitlines()[0]}"  # its first line; --debug shows the rest
    return text


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR", "").lower() in ("1", "true", "yes")


def run_cli(main: Callable[[], Any]) -> None:
    """Run the command's ``main``; report rlfuse's own errors as one clear message.

    ``--debug`` (removed from ``sys.argv`` before Hydra parses it) or ``HYDRA_FULL_ERROR=1``
    re-raises instead, with the full traceback.
    """
    debug = debug_requested(sys.argv[1:])
    sys.argv = [a for a in sys.argv if a != "--debug"]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we decide what is printed
    try:
        main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("\n[rlfuse] interrupted; the last checkpoint and metrics on disk are intact.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted into reported errors and bugs below
        code = exit_code(e)
        if code is None or debug:
            traceback.print_exc()
            sys.exit(code or 1)
        if isinstance(e, Interrupted):
            print(f"[rlfuse] {e}", file=sys.stderr)
        else:
            print(f"rlfuse: error: {message(e)}", file=sys.stderr)
            print("  (run with --debug or HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
        sys.exit(code)
