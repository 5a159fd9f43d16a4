"""Print a few Prometheus figures of each agent pod: ``AGENT POD_IP`` lines on stdin.

Used by ``make demo`` to show what the runtimes themselves count.
"""

from __future__ import annotations

import sys
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from troupe_runtime.contract.pod import DEFAULT_HEALTH_PORT, METRICS_PATH


def scrape(ip: str) -> dict[tuple[str, str], float]:
    url = f"http://{ip}:{DEFAULT_HEALTH_PORT}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("outcome", ""))] += sample.value
    return values


def main() -> None:
    print(f"{'AGENT':10} {'HANDLED':>8} {'RETRIED':>8} {'DEAD':>6} {'MEAN MS':>8}")
    for line in sys.stdin:
        agent, ip = line.split()
        values = scrape(ip)
        dead = sum(v for (name, _), v in values.items() if name == "troupe_dead_lettered_total")
        count = values[("troupe_handler_seconds_count", "")]
        mean = 1000 * values[("troupe_handler_seconds_sum", "")] / count if count else 0.0
        handled = values[("troupe_messages_total", "succeeded")]
        retried = values[("troupe_retries_total", "")]
        print(f"{agent:10} {handled:8.0f} {retried:8.0f} {dead:6.0f} {mean:8.2f}")


if __name__ == "__main__":
    main()
