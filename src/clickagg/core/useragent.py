"""Device and browser from a User-Agent string, cached: real traffic repeats few agents."""

from __future__ import annotations

from functools import lru_cache

import ua_parser

_TABLETS = ("ipad", "tablet", "kindle", "nexus 7", "nexus 9", "sm-t", "galaxy tab")
_MOBILE_OS = ("ios", "android", "windows phone", "blackberry os", "kaios", "firefox os")


@lru_cache(maxsize=65_536)
def device_and_browser(user_agent: str) -> tuple[str, str]:
    """Return (device class, browser family): device is mobile, tablet, desktop or bot."""
    result = ua_parser.parse(user_agent)
    browser = result.user_agent.family if result.user_agent else "Other"
    device_family = (result.device.family if result.device else "Other").lower()
    os_family = (result.os.family if result.os else "Other").lower()
    lowered = user_agent.lower()
    if device_family == "spider" or "bot" in lowered or "crawler" in lowered:
        device = "bot"
    elif any(marker in device_family or marker in lowered for marker in _TABLETS):
        device = "tablet"
    elif os_family in _MOBILE_OS or "mobile" in lowered:
        device = "mobile"
    else:
        device = "desktop"
    return device, browser
