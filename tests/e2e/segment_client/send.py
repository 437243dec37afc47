"""Sends a few users' identify, track and page calls to membrane through Segment's official
Python library (segment-analytics-python), over its real transport: gzip bodies, HTTP Basic
auth with the write key, background batching and `sentAt` on every batch.

Usage: send.py HOST WRITE_KEY. Exits 1, naming the failure, if any batch was refused.
"""

import sys
from datetime import datetime, timedelta, timezone

from segment.analytics import Client

host, write_key = sys.argv[1], sys.argv[2]
failures = []


def on_error(error, batch):
    failures.append(f"{error} (a batch of {len(batch)} message(s))")


client = Client(
    write_key,
    host=host,
    gzip=True,
    # Small batches, so the pings below go out in several requests.
    upload_size=2,
    max_retries=1,
    on_error=on_error,
)

client.identify("ada", {"plan": "pro", "email": "ada@example.com"})
client.track("ada", "Order Completed", {"amount": 120})
# Three days old by the device's clock: membrane must place it then, not at receipt.
client.track(
    "grace",
    "Order Completed",
    {"amount": 80},
    timestamp=datetime.now(timezone.utc) - timedelta(days=3),
)
client.page("lin", name="Pricing", properties={"path": "/pricing"})
for _ in range(5):
    client.track("bob", "ping")
client.identify(anonymous_id="anon-7", traits={"plan": "free"})

client.flush()
client.shutdown()
if failures:
    print("membrane refused batches:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("sent")
