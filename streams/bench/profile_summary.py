"""Summarise a py-spy speedscope profile (`lsti bench stream --profile FILE`): where a worker's time goes.

Usage: python -m streams.bench.profile_summary FILE [--top N]. Prints self and inclusive shares per frame.
"""

from __future__ import annotations

import argparse
import collections
import json


def summarise(path: str, top: int = 25) -> str:
    d = json.load(open(path))
    frames = d["shared"]["frames"]
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0.0
    for prof in d["profiles"]:
        for sample, w in zip(prof["samples"], prof["weights"], strict=True):
            total += w
            if not sample:  # py-spy records an idle thread's sample with no frames
                continue
            own[sample[-1]] += w
            for f in set(sample):
                incl[f] += w

    def name(i: int) -> str:
        f = frames[i]
        return f"{f['name']} ({f.get('file', '').split('site-packages/')[-1]}:{f.get('line')})"

    lines = [f"samples: {total:.1f} s", "-- self"]
    lines += [f"{c / total:6.1%} {name(i)}" for i, c in own.most_common(top)]
    lines += ["-- inclusive"]
    lines += [f"{c / total:6.1%} {name(i)}" for i, c in incl.most_common(top * 3)
              if "importlib" not in name(i) and "runpy" not in name(i)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    print(summarise(a.file, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
