"""The second process of the two-process NFC test: emulates a tag carrying a join offer on an nfcpy udp path.

Usage: python -m tests.drivers.nfc.offer_peer <path> <timeout> <offer as JSON>. Prints "ready" once the frontend
is open and "read" or "unread" when offer() returns; exits 0 when a reader read the offer, 3 when not.
"""

from __future__ import annotations

import asyncio
import json
import sys

from drivers.base import JoinOffer
from drivers.nfc.nfcpy_link import NfcpyLink


async def main(path: str, timeout: float, offer: JoinOffer) -> int:
    """Open the link, offer once, report."""
    link = NfcpyLink(path)
    await link.open()
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        was_read = await link.offer(offer, timeout)
    finally:
        await link.close()
    sys.stdout.write("read\n" if was_read else "unread\n")
    sys.stdout.flush()
    return 0 if was_read else 3


if __name__ == "__main__":
    fields = json.loads(sys.argv[3])
    sys.exit(asyncio.run(main(sys.argv[1], float(sys.argv[2]), JoinOffer(**fields))))
