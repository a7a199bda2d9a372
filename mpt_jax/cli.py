"""What every command-line program of mpt_jax shares: flags defined only when run, a user's mistake
reported in one line (not a traceback), and only our own INFO lines in the log.

An absl program (train, summary, plan) ends with::

    if __name__ == "__main__":
        cli.run("train", _define_flags, main)

so importing any of them defines no flags (a notebook may import them all), and ``main`` may raise
``ValueError``/``OSError`` naming the problem: the user sees ``train: error: <message>`` and exit
status 1. ``--verbosity=1`` also logs the traceback.
"""

from __future__ import annotations

import ast
import logging as std_logging
import os
from collections.abc import Callable
from typing import Any, NoReturn

from absl import logging

# What a user can fix from the message alone: a bad value, a missing or existing file.
USER_ERRORS = (ValueError, OSError)

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ours_or_warning(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE)


def quiet_other_libraries() -> None:
    """Keep INFO lines from mpt_jax only (orbax logs every file it renames); warnings pass from all.

    Installs absl's handler on the root logger (what ``absl.app.run`` does; it also drops the plain
    stderr handler that an early absl log call adds) and filters it. Idempotent."""
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    if _ours_or_warning not in handler.filters:
        handler.addFilter(_ours_or_warning)


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line (multi-line messages joined with '; ')."""
    text = str(error)
    if isinstance(error, KeyError | AttributeError) and text[:1] in "'\"":
        try:  # KeyError('...') shows its message quoted and escaped
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines)


def fail(prog: str, error: BaseException | str) -> NoReturn:
    """Exits with status 1 after printing ``<prog>: error: <message>`` to stderr."""
    if isinstance(error, BaseException):
        logging.debug("%s: traceback", prog, exc_info=error)
    raise SystemExit(f"{prog}: error: {one_line(error)}")


def _override_flags(argv: list[str], name: str) -> list[str]:
    prefix = f"--{name}."
    return [a for a in argv if a.startswith(prefix)]


def _config_file_error(name: str, value: str) -> OSError | ValueError:
    """The error for a ``--<name>=FILE[:args]`` that ml_collections could not load."""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        return FileNotFoundError(f"--{name}={path}: no such file")
    return ValueError(f"--{name}={path}: could not be loaded as a config file (a get_config() function)")


def flags_parser(prog: str, config_flag: str | None = "config") -> Callable[[list[str]], list[str]]:
    """An ``absl.app.run`` flags parser that reports bad flags in one line.

    ml_collections raises a bare KeyError/AttributeError ("Did you mean ...") for an override
    such as ``--config.train.max_step=3``; the message keeps its suggestion and names the flag."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        given = [a.split("=", 1)[1] for a in argv if config_flag and a.startswith(f"--{config_flag}=")]
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # unknown flag, bad value, missing required flag
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            if given and "Error whilst parsing config file" in str(e):  # get_config() raised
                fail(prog, f"--{config_flag}={given[-1]}: get_config() raised {lines[-1]}")
            fail(prog, e)
        except (KeyError, AttributeError) as e:
            message = one_line(e)
            if given and "get_config" in message:
                fail(prog, f"--{config_flag}={given[-1]}: the file has no get_config() function")
            overrides = _override_flags(argv, config_flag) if config_flag else []
            key = message.split(";")[0].strip("'\" ")
            named = [a for a in overrides if f".{key}=" in a or a.endswith(f".{key}") or f".{key}." in a]
            where = f" ({', '.join(named)})" if named else ""
            fail(prog, f"unknown config key {key!r}{where}; {message.partition(';')[2].strip() or message}")
        except (TypeError, ValueError) as e:  # e.g. a value of the wrong type for a config field
            fail(prog, e)
        except OSError as e:  # an override of a config file that did not load
            fail(prog, _config_file_error(config_flag, given[-1]) if given else e)

    return parse


def config_from_flags(name: str = "config") -> Any:
    """The ConfigDict of ``--<name>=FILE``; a missing flag or an unreadable file is one clear error.

    ml_collections defers a config file's load error until the config is used; this surfaces it."""
    from absl import flags
    from ml_collections import config_flags

    holder = flags.FLAGS[name]
    config = holder.value
    if config is None:
        raise ValueError(f"--{name}=configs/<name>.py is required")
    try:
        config.keys()
    except OSError:
        raise _config_file_error(name, config_flags.get_config_filename(holder)) from None
    return config


def run(
    prog: str,
    define_flags: Callable[[], None],
    main: Callable[[list[str]], Any],
    commands: tuple[str, ...] | None = None,
) -> None:
    """Defines the flags, parses them (one-line errors), quiets other libraries' logs and runs
    ``main``; a ``USER_ERRORS`` exception from ``main`` becomes one line and exit status 1.
    ``commands``: the program takes exactly one of these words before its flags (``main`` gets
    ``[prog, command]``)."""
    from absl import app

    define_flags()

    def wrapped(argv: list[str]) -> Any:
        quiet_other_libraries()
        if commands is not None:
            if len(argv) != 2 or argv[1] not in commands:
                fail(prog, f"give one command: {' | '.join(commands)} (got {' '.join(argv[1:]) or 'none'})")
        elif len(argv) > 1:
            fail(prog, f"unexpected arguments {argv[1:]} (flags are --name=value)")
        try:
            return main(argv)
        except USER_ERRORS as e:
            fail(prog, e)

    app.run(wrapped, flags_parser=flags_parser(prog))
