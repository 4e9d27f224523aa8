"""The dead-letter record (`schemas/dead_letter.schema.json`): the original bytes, the reason, where it came from."""

from __future__ import annotations

import base64
import json
import time


def dead_letter(value: bytes | None, key: bytes | None, reason: str, topic: str, partition: int,
                offset: int) -> bytes:
    return json.dumps({
        "reason": reason,
        "original_b64": base64.b64encode(value or b"").decode(),
        "original_key_b64": base64.b64encode(key).decode() if key is not None else None,
        "topic": topic, "partition": partition, "offset": offset, "ts": time.time(),
    }).encode()
