"""node-feature-discovery's local feature file, read the way its documentation and source say.

NFD (source/local, docs/usage/customization-guide.md): files in ``features.d`` whose names do
not start with a dot; a file larger than 65536 bytes is ignored; lines are trimmed, empty lines
and lines starting with ``#`` are skipped, others are ``<key>[=<value>]`` split at the first
``=`` (the value defaults to ``true``). nfd-master keeps a label only when its key is a
Kubernetes qualified name with a namespace, the namespace is not under ``kubernetes.io`` (unless
it is ``feature.node.kubernetes.io``, ``profile.node.kubernetes.io`` or a subdomain of them), and
the value is a valid label value (pkg/apis/nfd/validate, k8s.io/apimachinery validation).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

MAX_FILE_BYTES = 65536
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ALLOWED_UNDER_KUBERNETES = ("feature.node.kubernetes.io", "profile.node.kubernetes.io")


def label_problem(key: str, value: str) -> str | None:
    """Why nfd-master would refuse the label, or None when it keeps it."""
    namespace, slash, name = key.rpartition("/")
    if not slash:
        return "no namespace"
    if not namespace or len(namespace) > 253 or not _SUBDOMAIN.match(namespace):
        return f"namespace {namespace!r} is not a DNS subdomain"
    if len(name) > 63 or not _NAME.match(name):
        return f"name {name!r} is not a qualified name"
    if namespace == "kubernetes.io" or namespace.endswith(".kubernetes.io"):
        allowed = any(
            namespace == ns or namespace.endswith("." + ns) for ns in _ALLOWED_UNDER_KUBERNETES
        )
        if not allowed:
            return f"namespace {namespace!r} is denied"
    if value and (len(value) > 63 or not _NAME.match(value)):
        return f"value {value!r} is not a label value"
    return None


EXPIRY = "# +expiry-time="


def expiry_time(path: Path) -> datetime | None:
    """The time the file's ``# +expiry-time=`` directive names (RFC 3339), or None."""
    for raw in path.read_text().split("\n"):
        if raw.strip().startswith(EXPIRY):
            return datetime.fromisoformat(raw.strip()[len(EXPIRY) :].replace("Z", "+00:00"))
    return None


def read_labels(path: Path, now: datetime | None = None) -> dict[str, str]:
    """The labels NFD publishes from the feature file at *path* (at *now*, when given: labels
    after an ``# +expiry-time=`` directive that has passed are dropped, as NFD does); asserts
    every line is valid."""
    assert not path.name.startswith("."), "NFD skips dot-files"
    data = path.read_bytes()
    assert len(data) <= MAX_FILE_BYTES, f"{len(data)} bytes: NFD would ignore the file"
    labels: dict[str, str] = {}
    expired = False
    for raw in data.decode().split("\n"):
        line = raw.strip()
        if line.startswith(EXPIRY):
            moment = datetime.fromisoformat(line[len(EXPIRY) :].replace("Z", "+00:00"))
            expired = now is not None and moment < now
            continue
        if line.startswith("# +"):
            raise AssertionError(f"{line!r}: NFD refuses an unknown directive")
        if not line or line.startswith("#") or expired:
            continue
        key, _, value = line.partition("=")
        value = value if "=" in line else "true"
        problem = label_problem(key, value)
        assert problem is None, f"{line!r}: {problem}"
        assert key not in labels, f"{key} given twice"
        labels[key] = value
    return labels
