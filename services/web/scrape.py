"""Reading a Prometheus text exposition (a service's /metrics): its samples by name, and sums
over their labels. The benchmarks and tests that read the services' counters use it; the
services' own exposition is `dapdee.web.prometheus`."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> [(labels, value)]


def parse(text: str) -> Samples:
    """Every sample of an exposition: sample name (`..._total`, `..._bucket`, ...) -> [(labels,
    value)]. ValueError for text that is not an exposition. O(len(text))."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (0 when there are none).
    O(samples of name)."""
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items()))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples `name` summed per value of `label` ('' for samples without it). O(samples of
    name)."""
    out: dict[str, float] = defaultdict(float)
    for got, v in samples.get(name, []):
        out[got.get(label, "")] += v
    return dict(out)
