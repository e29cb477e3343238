"""Reads `wrk --latency` output; prints "requests/s p50_ms p99_ms errors"."""
import re
import sys

text = sys.stdin.read()


def millis(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = millis(re.search(r"\s50%\s+(\S+)", text).group(1))
p99 = millis(re.search(r"\s99%\s+(\S+)", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(rps, p50, p99, errors.group(1) if errors else 0)
