"""Progress bars that suit both a terminal and a log file.

On a terminal a bar refreshes several times a second; in a non-interactive log (stderr redirected to
a file, CI, a batch job) every refresh would be a new line, so there a bar writes at most one line
every `LOG_INTERVAL_S` seconds (plus its first and last), i.e. a few lines per command.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


def interactive(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` with a refresh interval that suits where stderr goes."""
    if not interactive(kwargs.get("file")):
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 10)
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)
