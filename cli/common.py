"""What every command shares: one error style, and cheap paths (no heavy imports at CLI start).

Every failure a user can cause ends the same way: one line `error: ...` on stderr naming the
option or file and the value, exit status 2, no traceback. That covers click's usage errors (bad
or out-of-range option values, unknown options), our validation errors (ValueError family:
config files, run directories, checkpoints, option checks), missing files and other OSError-class
failures (a read-only disk, a path that is a file), and trace store errors. Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import typer
from typer import _click
from typer.core import TyperGroup

import kat_diag
from kat_diag.world.paths import DEFAULT_WORLD_DIR

# The committed world (kat_diag.world.paths imports no torch, so CLI start-up stays fast).
WORLD_DIR = DEFAULT_WORLD_DIR

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def error_message(e: BaseException) -> str:
    """The one-line message of a user error."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[0].split()) if isinstance(e, OSError) else text


def _user_error_types() -> tuple[type[BaseException], ...]:
    from kat_diag.traces.schema import TraceStoreError

    return (ValueError, KeyError, OSError, TraceStoreError, FloatingPointError)


def fail(message: str) -> None:
    """Stop the command with `error: message` (exit 2)."""
    raise UserError(message)


class UserError(Exception):
    """Raised by CLI code for a bad option value found after parsing."""


class KatGroup(TyperGroup):
    """The top-level group: runs a command and turns every user error into `error: ...` + exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        with warnings.catch_warnings():  # restores the display below when the command returns
            warnings.showwarning = _show_warning
            return self._run_command(args, prog_name, complete_var, **extra)

    def _run_command(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            return rv if isinstance(rv, int) else 0
        except _click.exceptions.NoArgsIsHelpError as e:
            e.show()
            return EXIT_USER_ERROR
        except _click.exceptions.ClickException as e:
            _echo_error(_with_value(e, args))
            return EXIT_USER_ERROR
        except typer.Abort:
            _echo_error("aborted")
            return 1
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED  # the trainer already said what it saved
        except UserError as e:
            _echo_error(str(e))
            return EXIT_USER_ERROR
        except BrokenPipeError:
            return 1
        except Exception as e:
            if isinstance(e, _user_error_types()):
                _echo_error(error_message(e))
                return EXIT_USER_ERROR
            raise


def _with_value(e: Exception, args: Any) -> str:
    """Click's message, plus the value given when click's message leaves it out."""
    message = e.format_message()  # type: ignore[attr-defined]
    param = getattr(e, "param", None)
    argv = list(sys.argv[1:] if args is None else args)
    if not isinstance(e, _click.exceptions.BadParameter) or param is None:
        return message
    for opt in getattr(param, "opts", []):
        for i, a in enumerate(argv):
            value = argv[i + 1] if a == opt and i + 1 < len(argv) else (
                a.split("=", 1)[1] if a.startswith(opt + "=") else None)
            if value is not None and value not in message:
                return f"{message} (got {opt} {value})"
    return message


_OTHER_RANKS_WAIT_S = 10.0  # costs nothing when rank 0 fails too: the launcher ends this process then


def _echo_error(message: str) -> None:
    line = f"error: {' '.join(message.split())}"
    _tell_launcher(line)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun every process has the same error: say it once
        typer.echo(line, err=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The launcher stops every process once one exits: had this rank exited first, local rank 0 could
        # be killed before it said the line. Wait (bounded) for rank 0 to fail first and end us.
        import time

        time.sleep(_OTHER_RANKS_WAIT_S)


def _tell_launcher(line: str) -> None:
    """Under torchrun (torch elastic), leave the error where the launcher looks for it: its failure
    report then shows this line as each process's root cause instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Library warnings as one plain stderr line, `warning: ...` (not Python's two-line format)."""
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kat-diag {kat_diag.__version__}")
        raise typer.Exit()


def check_positive(option: str, value: float, *, strict: bool = True) -> None:
    ok = value > 0 if strict else value >= 0
    if not ok:
        fail(f"{option} must be {'> 0' if strict else '>= 0'}, got {value}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj or obj in (float("inf"), float("-inf")):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that strict parsers accept: NaN and infinities become null."""
    import json

    return json.dumps(_finite(obj), allow_nan=False, default=str, **kwargs)
