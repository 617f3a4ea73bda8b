"""What every ``cclm`` command shares: the arguments of the config-driven training commands (``cclm pretrain``,
``cclm recipe``: a YAML config, ``key=value`` overrides, and the ``--local_rank`` that the DeepSpeed launcher appends
to every process's arguments; the rank is also in ``LOCAL_RANK``, which is what the runtime reads), and one way of
reporting a user's error (:func:`run_command`), used by the ``cclm`` dispatcher and by the modules that launchers
start directly (``python -m cclm.train.cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from cclm.errors import UserError
from cclm.text_safety import printable

# Errors that mean bad input rather than a bug: one line, exit status 2. Besides UserError: a path that is
# missing, in the way or not allowed, and ValueError, which the commands raised for bad input before UserError
# existed (a ValueError from a bug gets a hint to the traceback).
USER_ERRORS = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
)
DEBUG_VARIABLE = "CCLM_DEBUG"


def add_config_arguments(parser: argparse.ArgumentParser, configs: str, example: str) -> None:
    """``configs``: where the user finds configs (e.g. ``configs/pretrain/``); ``example``: one override."""
    parser.add_argument("config", help=f"YAML config (see {configs})")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def start_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


_debug_flag = False  # ``cclm --debug``, while its command runs


def debugging() -> bool:
    """True under ``cclm --debug`` or when ``CCLM_DEBUG`` is set (to anything but 0/false/no): user errors show
    their traceback (also in commands that report their own errors, like ``prep``)."""
    return _debug_flag or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def run_command(
    command: str, main: Callable[[list[str]], int | None], argv: list[str], debug: bool = False
) -> int:
    """``main(argv)``'s exit status; a user error (:data:`USER_ERRORS`) becomes ``cclm <command>: <message>`` on
    stderr and status 2, with the traceback above it when ``debug`` or :func:`debugging`. Other exceptions
    propagate."""
    global _debug_flag
    outer, _debug_flag = _debug_flag, _debug_flag or debug
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        if debugging():
            traceback.print_exc()
        print(f"cclm {command}: {printable(describe(err))}", file=sys.stderr)  # names may hold escapes
        return 2
    finally:
        _debug_flag = outer


def describe(err: BaseException) -> str:
    message = _from_data_worker(str(err), err) or type(err).__name__
    if not isinstance(err, (UserError, OSError)):  # a ValueError: bad input as a rule, but maybe a bug
        message += f" ({type(err).__name__}; {DEBUG_VARIABLE}=1 shows the traceback)"
    return message


def _from_data_worker(message: str, err: BaseException) -> str:
    """A DataLoader worker's error arrives as ``Caught DataError in DataLoader worker process 0.`` followed by the
    worker's traceback: the error's own message, naming the worker."""
    caught = re.match(r"Caught \w+ in (DataLoader worker process \d+)\.\nOriginal Traceback", message)
    if not caught:
        return message
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    start = message.rfind(name)
    if start < 0:
        return message
    return f"{message[start + len(name) :].strip()} (in {caught.group(1)})"


def run_module(command: str, main: Callable[[list[str]], int | None]) -> None:
    """The ``__main__`` block of a command module that launchers start with ``python -m``: exit with
    :func:`run_command`'s status."""
    sys.exit(run_command(command, main, [command, *sys.argv[1:]]))


def resolve_model_setting(value: str, key: str) -> str:
    """The cclm model folder a config key (``pretrained``, ``init_from``) names: a folder as it is; a released
    model's name (:mod:`cclm.inference.registry`) or ``hf-hub:ORG/NAME`` fetched, or converted, once into the cache
    and that folder returned. Every rank of a job may call it at once: the Hub client and the converter hold a
    file lock per model, so one process fetches and the others then read the cache."""
    if Path(value).expanduser().is_dir():
        return str(Path(value).expanduser())
    from cclm.inference.api import resolve_model_folder

    try:
        return str(resolve_model_folder(value))
    except (FileNotFoundError, UserError) as err:
        raise UserError(f"{key}={value}: {err}") from None
