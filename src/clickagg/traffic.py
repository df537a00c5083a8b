"""Synthetic but realistic ad traffic, for the demo, benchmarks and end-to-end tests.

Impressions outnumber clicks (CTR 1-8 % per ad), users repeat, a few user agents dominate,
ad servers retransmit (duplicates with the same id), mobile clients deliver late, and now
and then a line is malformed. Optionally (the demo) invalid traffic too: clicks from
declared crawlers and scripts (``bot_rate``), and a click burst from one address
(``burst_clicks`` per batch, over a minute far more than the built-in velocity limit).
Deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgspec

USER_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
)
# Declared crawlers and non-browser clients: the built-in user-agent rules flag them.
BOT_AGENTS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "python-requests/2.31.0",
    "curl/8.4.0",
)
BURST_IP = "198.51.100.23"
COUNTRIES = ("US", "US", "US", "GB", "DE", "FR", "IN", "BR", "JP", "CA")
_encoder = msgspec.json.Encoder()


@dataclass
class TrafficMix:
    ads: int = 50
    users: int = 5_000
    duplicate_rate: float = 0.10
    late_rate: float = 0.02
    malformed_rate: float = 0.005
    spread_ms: int = 60_000  # normal events are up to this old
    bot_rate: float = 0.0  # share of new events that are clicks from a crawler or script
    burst_clicks: int = 0  # clicks from BURST_IP added to each batch


class TrafficGenerator:
    def __init__(self, *, seed: int = 7, mix: TrafficMix | None = None) -> None:
        self.random = random.Random(seed)
        self.mix = mix or TrafficMix()
        self.sequence = 0
        self.ctr = {f"ad-{n:04d}": self.random.uniform(0.01, 0.08) for n in range(self.mix.ads)}
        self.ad_ids = list(self.ctr)
        self._sent: list[dict[str, object]] = []
        self.bot_clicks = 0  # distinct invalid clicks made (their copies aside)
        self.burst_clicks = 0
        self._burst_minute = -1
        self._burst_since = -60_000

    def event(self, now_ms: int) -> dict[str, object]:
        rnd = self.random
        mix = self.mix
        if self._sent and rnd.random() < mix.duplicate_rate:
            return dict(rnd.choice(self._sent[-1000:]))
        self.sequence += 1
        ad_id = rnd.choice(self.ad_ids)
        is_bot = mix.bot_rate > 0 and rnd.random() < mix.bot_rate
        is_click = is_bot or rnd.random() < self.ctr[ad_id]
        if rnd.random() < mix.late_rate:
            ts_ms = now_ms - rnd.randint(6 * 60_000, 20 * 60_000)
        else:
            ts_ms = now_ms - rnd.randint(0, mix.spread_ms)
        event: dict[str, object] = {
            "event_type": "click" if is_click else "impression",
            "event_id": f"{'c' if is_click else 'i'}-{self.sequence}",
            "ad_id": ad_id,
            "advertiser_id": f"adv-{int(ad_id[3:]) % 7}",
            "user_id": f"u-{rnd.randrange(mix.users)}",
            "timestamp": ts_ms,
            "ip": f"203.0.{rnd.randrange(256)}.{rnd.randrange(256)}",
            "user_agent": rnd.choice(USER_AGENTS),
            "country": rnd.choice(COUNTRIES),
        }
        if is_click:
            event["cost_micros"] = rnd.choice((250_000, 500_000, 1_200_000))
        if is_bot:
            event["event_id"] = f"b-{self.sequence}"
            event["user_agent"] = rnd.choice(BOT_AGENTS)
            self.bot_clicks += 1
        self._sent.append(event)
        if len(self._sent) > 5000:
            del self._sent[:1000]
        return event

    def burst_click(self, now_ms: int) -> dict[str, object]:
        """One click of the one-address burst: a script clicking the top ads, stamping its
        clicks with the UTC minute it started in for a whole minute (a minute begun at its
        end would get too few to cross a limit), times never in the future."""
        if now_ms - self._burst_since >= 60_000:
            self._burst_since = now_ms
            self._burst_minute = now_ms - now_ms % 60_000
        self.sequence += 1
        self.burst_clicks += 1
        ad_id = self.ad_ids[self.random.randrange(3)]
        return {
            "event_type": "click",
            "event_id": f"x-{self.sequence}",
            "ad_id": ad_id,
            "advertiser_id": f"adv-{int(ad_id[3:]) % 7}",
            "user_id": f"ux-{self.sequence}",  # a script: no user repeats, no one else's
            "timestamp": self._burst_minute
            + self.random.randrange(min(60_000, now_ms - self._burst_minute + 1)),
            "ip": BURST_IP,
            "user_agent": USER_AGENTS[0],
            "country": "US",
            "cost_micros": 500_000,
        }

    def ndjson(self, count: int, now_ms: int) -> bytes:
        """A batch body; a few lines are malformed on purpose."""
        lines = [_encoder.encode(self.burst_click(now_ms)) for _ in range(self.mix.burst_clicks)]
        for _ in range(count):
            if self.random.random() < self.mix.malformed_rate:
                lines.append(b'{"event_type": "click", "ad_id": "ad-0001", "timestamp": "soon"}')
            else:
                lines.append(_encoder.encode(self.event(now_ms)))
        return b"\n".join(lines) + b"\n"
