"""Which Kafka a command talks to: --bootstrap, LSTI_BOOTSTRAP, or the broker `lsti broker` started."""

from __future__ import annotations

import argparse
import os
import sys

from streams.config import state_home
from streams.kafka.broker import find_running_broker


def resolve_bootstrap(args: argparse.Namespace) -> str:
    """--bootstrap, else LSTI_BOOTSTRAP, else a broker already started by `lsti broker`."""
    if getattr(args, "bootstrap", None):
        return args.bootstrap
    if os.environ.get("LSTI_BOOTSTRAP"):
        return os.environ["LSTI_BOOTSTRAP"]
    found = find_running_broker(state_home() / "kafka")
    if found:
        return found
    sys.exit("error: no Kafka to talk to. Start one with `lsti broker` (embedded Apache Kafka) in another "
             "terminal, or pass --bootstrap HOST:PORT / set LSTI_BOOTSTRAP.")
