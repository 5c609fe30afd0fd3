"""``vfiocapsctl migration fingerprint/check``: a device's fingerprint, and checking another's."""

from __future__ import annotations

import argparse
import json
import sys

from ..client import VfiocapsClient, as_json, key_values
from ..errors import InvalidArgumentError
from ..fingerprint import MAX_DOCUMENT_BYTES
from .exits import EXIT_INCOMPATIBLE, EXIT_OK, EXIT_UNDECIDED


def _read_fingerprint(name: str) -> str:
    """The fingerprint document named on the command line, read bounded."""
    try:
        if name == "-":
            text = sys.stdin.read(MAX_DOCUMENT_BYTES + 1)
        else:
            with open(name, encoding="utf-8") as file:
                text = file.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgumentError(f"cannot read the fingerprint {name}: {err}") from err
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidArgumentError(f"{name} is larger than a fingerprint ({MAX_DOCUMENT_BYTES} B)")
    return text


async def migration_command(
    args: argparse.Namespace, client: VfiocapsClient, want_json: bool
) -> int:
    if args.verb == "fingerprint":
        document = json.loads(await client.migration_fingerprint(args.id))
        print(as_json(document) if want_json else key_values(document))
        return EXIT_OK
    verdict, reasons = await client.check_migration(_read_fingerprint(args.file), args.device)
    if want_json:
        rows = [{"field": f, "verdict": v, "detail": d} for f, v, d in reasons]
        print(as_json({"verdict": verdict, "reasons": rows}))
    else:
        print(verdict)
        width = max((len(field) for field, _, _ in reasons), default=0)
        for field, judged, detail in reasons:
            print(f"  {field:<{width}}  {judged:<12}  {detail}")
    return {"compatible": EXIT_OK, "incompatible": EXIT_INCOMPATIBLE}.get(verdict, EXIT_UNDECIDED)
