"""Structured, quiet-by-default logging: key=value (logfmt) or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time

# Log lines carry strings a peer chose (a Hello name, a Bye reason, an Error text, a guest's
# file name): one record must stay one line, and no terminal escape may pass. Backslash,
# quote, C0/C1 controls, DEL and the Unicode line and paragraph separators are escaped.
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def logfmt_value(text: str) -> str:
    """`text` as the inside of a logfmt double-quoted value: one line, nothing raw."""
    return text.translate(_ESCAPES)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        line = f'ts={ts}.{int(record.msecs):03d} level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{logfmt_value(record.getMessage())}"'
        if record.exc_info:
            line += f' exc="{logfmt_value(self.formatException(record.exc_info))}"'
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
