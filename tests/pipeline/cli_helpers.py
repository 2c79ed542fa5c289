"""Calling the `r1flow` CLI in-process from tests, its standard output captured."""
from __future__ import annotations

import json
from contextlib import redirect_stdout
from io import StringIO
from typing import Any

from pipeline.cli import main


def cli(*args: str) -> tuple[int, str]:
    """(exit code, standard output) of `r1flow ARGS...`."""
    buf = StringIO()
    with redirect_stdout(buf):
        code = main(list(args))
    return code, buf.getvalue()


def cli_json(*args: str) -> dict[str, Any]:
    """The last line of a `--json` command's output, parsed; the command must succeed."""
    code, out = cli(*args)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])
