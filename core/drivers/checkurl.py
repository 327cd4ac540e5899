"""The URL half of the post-update check (``NodeSettings.check_url``): it must answer 2xx."""

from __future__ import annotations

import aiohttp

from core.errors import DriverError


async def check_url(node: str, url: str, *, limit: float) -> None:
    """Raise ``DriverError`` (operation ``post_check``) unless ``url`` answers 2xx in time."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit)) as session,
            session.get(url, allow_redirects=True) as response,
        ):
            if 200 <= response.status < 300:
                return
            reason = f"answered HTTP {response.status} {response.reason or ''}".rstrip()
    except TimeoutError:
        reason = f"no answer within {limit:g}s"
    except aiohttp.ClientError as exc:
        reason = f"failed: {exc or type(exc).__name__}"
    raise DriverError(
        node,
        "post_check",
        f"check_url {url} {reason}; the node does not work after the update "
        "(look at its services, then run the check again)",
    )
