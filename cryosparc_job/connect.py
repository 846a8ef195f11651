"""Connecting to a live CryoSPARC v5 instance with cryosparc-tools, with one-line errors a user can act on.

``CRYOSPARC_*`` environment variables are read here, at call time (cryosparc-tools freezes them at import), and
the client is always built with ``host=None, base_port=None`` (inside CryoSPARC worker environments the
hostname/port variables are set and would clash with ``base_url``).
"""

from __future__ import annotations

import os
import re
import warnings

from crisp_ext.errors import InputError, one_line


class CryoSPARCError(InputError):
    """A problem with the CryoSPARC instance or what was asked of it (login, versions, unknown uids)."""


def env_url() -> str | None:
    """The instance URL from ``CRYOSPARC_BASE_URL``, or ``http://$CRYOSPARC_MASTER_HOSTNAME:$CRYOSPARC_BASE_PORT``."""
    url = os.environ.get("CRYOSPARC_BASE_URL")
    if url:
        return url
    host, port = os.environ.get("CRYOSPARC_MASTER_HOSTNAME"), os.environ.get("CRYOSPARC_BASE_PORT")
    if host and port:
        return f"http://{host}:{port}"
    return None


def tools_version() -> str:
    import cryosparc

    return cryosparc.__version__


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"^v?(\d+)\.(\d+)", version.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_version(cs) -> str:
    """The server's version (``vX.Y.Z``); :class:`CryoSPARCError` with the pip command when its major.minor
    differs from cryosparc-tools' (the client itself only warns)."""
    server = str(cs.api.config.get_version())
    mismatch_message(server, tools_version(), cs.base_url)
    return server


def mismatch_message(server: str, tools: str, url: str) -> None:
    """Raise :class:`CryoSPARCError` when ``server`` and ``tools`` versions differ in major.minor."""
    have, want = _major_minor(tools), _major_minor(server)
    if want is None or have is None or have == want:
        return
    hint = (" (crisp-cryosparc's live mode needs CryoSPARC v5; for this instance run `crisp-cryosparc offline` on "
            "the project directory)") if want[0] < 5 else ""
    raise CryoSPARCError(f"cryosparc-tools {tools} does not match CryoSPARC {server} at {url}: install the matching "
                         f"client with `pip install --force cryosparc-tools~={want[0]}.{want[1]}.0`{hint}")


def connect(base_url: str | None = None, *, email: str | None = None, password: str | None = None,
            timeout: int = 300):
    """A logged-in ``cryosparc.tools.CryoSPARC`` whose server version matches the installed cryosparc-tools.

    Credentials: ``email`` + ``password`` (default ``CRYOSPARC_EMAIL`` / ``CRYOSPARC_PASSWORD``), else a login
    saved by ``python -m cryosparc.tools login --url URL``.
    """
    url = (base_url or env_url() or "").strip().rstrip("/")
    if not url:
        raise CryoSPARCError("no CryoSPARC URL: give --url (e.g. http://cryosparc.example.org:39000, the address of "
                             "the web app) or set CRYOSPARC_BASE_URL")
    if not re.match(r"^https?://[^/\s]+", url):
        raise CryoSPARCError(f"CryoSPARC URL {url!r} must start with http:// or https://, e.g. "
                             f"http://cryosparc.example.org:39000")
    email = email or os.environ.get("CRYOSPARC_EMAIL") or None
    password = password or os.environ.get("CRYOSPARC_PASSWORD") or None
    if password and not email:
        raise CryoSPARCError("a CryoSPARC password was given without an email: give --email (or CRYOSPARC_EMAIL)")
    from cryosparc.tools import CryoSPARC

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cs = CryoSPARC(url, host=None, base_port=None, email=email, password=password, timeout=timeout)
        except ValueError as exc:
            if "authentication" not in str(exc):
                raise
            raise CryoSPARCError(f"no login for CryoSPARC at {url}: give --email and --password (or CRYOSPARC_EMAIL "
                                 f"and CRYOSPARC_PASSWORD), or run `python -m cryosparc.tools login --url {url}` "
                                 f"once") from None
        except RuntimeError as exc:
            raise CryoSPARCError(_explain(exc.__cause__, url, email)) from exc
    for w in caught:  # keep warnings we do not turn into errors (not the version notice, not retry notices)
        text = str(w.message)
        if "may not be compatible" in text or "API client" in text:
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_version(cs)
    return cs


def _explain(cause: BaseException | None, url: str, email: str | None) -> str:
    import httpx
    from cryosparc.errors import APIError

    if isinstance(cause, APIError) and cause.code in (401, 403):
        who = f" for {email}" if email else " (saved login)"
        return (f"CryoSPARC at {url} refused the login{who}: wrong email or password, or an expired saved login "
                f"(renew it with `python -m cryosparc.tools login --url {url}`)")
    if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 404:
        return (f"{url} does not serve the CryoSPARC v5 API (404 for {cause.request.url.path}): check the URL (the "
                f"web app's address and base port, e.g. :39000); CryoSPARC v4 instances are not supported live, use "
                f"`crisp-cryosparc offline` on the project directory")
    if isinstance(cause, (httpx.TransportError, OSError)):
        return (f"cannot reach CryoSPARC at {url} ({one_line(cause)}): check the URL and port and that the instance is "
                f"running (cryosparcm status)")
    return f"cannot connect to CryoSPARC at {url}: {one_line(cause) if cause else 'unknown error'}"


def error_text(exc: BaseException) -> str:
    """One line for any error: the server's ``detail`` for API errors, else the first line of the message."""
    from cryosparc.errors import APIError

    if isinstance(exc, APIError):
        detail = exc.data.get("detail") if isinstance(exc.data, dict) else exc.data
        return f"{detail if detail else 'request failed'} (HTTP {exc.code})"
    return one_line(exc)
