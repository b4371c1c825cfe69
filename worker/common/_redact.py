"""Credentials out of everything that leaves the server.

Store URLs and MLflow URIs may carry a password (``postgresql://user:PASSWORD@host/db``,
``http://user:PASSWORD@host``). :func:`redact` is the one place that removes it: problem bodies,
log records (:func:`install_log_redaction`) and page links go through it.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: ``scheme://user:password@`` anywhere in a text (the password ends at the last ``@`` before
#: the host, so a password holding ``@`` is hidden whole).
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):[^\s/]*@")
MASK = "***"


def redact(text: str) -> str:
    """``text`` with every URL's password replaced by ``***`` (the user name is kept)."""
    return _CREDENTIALS.sub(lambda match: f"{match['head']}:{MASK}@", text)


def without_credentials(url: str) -> str:
    """``url`` with no user name nor password at all (for links handed to browsers)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process at creation, whatever its logger or handler:
    the message, its arguments and its formatted traceback (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: left for the handler to report
            return record
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacting_record)
