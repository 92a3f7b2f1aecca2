"""When to retry a failed request and how long to wait: the installed ``openai`` client's own policy
(``BaseClient._should_retry`` / ``_calculate_retry_timeout``), restated here because bbfl runs its own retry loop
(counted retries, logged reasons) with the client's retries off.

Retried: 408 (request timeout), 409 (lock timeout), 429 (rate limit), every 5xx, unless the server says
``x-should-retry: false`` (``true`` retries any status); never when the server asks to wait longer than the
caller allows. The wait is the server's ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date) when it is
a finite number in (0, max_wait], else exponential backoff with jitter.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

RETRIED_STATUSES = (408, 409, 429)  # and every status >= 500


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked to wait (``retry-after-ms``, then ``retry-after`` as seconds or an HTTP date),
    as sent: possibly NaN, infinite or negative (the caller decides); ``None`` when absent or unreadable."""
    if headers is None:
        return None
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    try:
        parsed = email.utils.parsedate_tz(headers.get("retry-after") or "")
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def should_retry(status: int, headers: Mapping[str, str] | None, max_wait: float) -> tuple[bool, str]:
    """Whether a response with this status is retried, and why (for the log line and the error)."""
    delay = retry_after(headers)
    if delay is not None and math.isfinite(delay) and delay > max_wait:
        return False, f"the server asked to wait {delay:g} s (Retry-After), more than max_wait={max_wait:g} s"
    forced = (headers or {}).get("x-should-retry")
    if forced in ("true", "false"):
        return forced == "true", f"the server sent x-should-retry: {forced}"
    if status in RETRIED_STATUSES or status >= 500:
        return True, f"HTTP {status} is retried (408, 409, 429 and 5xx are)"
    return False, f"HTTP {status} is not retried (only 408, 409, 429 and 5xx are)"


def wait_seconds(headers: Mapping[str, str] | None, attempt: int, backoff: float, max_wait: float) -> tuple[float, str]:
    """How long to wait before retry ``attempt`` (0-based), and where that figure came from."""
    delay = retry_after(headers)
    if delay is not None and math.isfinite(delay) and 0 < delay <= max_wait:
        return delay, f"Retry-After {delay:g} s"
    wait = min(backoff * 2.0 ** min(attempt, 60) * (1 - 0.25 * random.random()), max_wait)
    if delay is None:
        return wait, "backoff"
    raw = (headers or {}).get("retry-after-ms") or (headers or {}).get("retry-after")
    return wait, f"backoff (Retry-After {raw!r} ignored: not a number of seconds in (0, {max_wait:g}])"


def safe_url(url: str | None) -> str:
    """``url`` without user:password (never in a log line or an error)."""
    if not url:
        return "the default OpenAI endpoint"
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
