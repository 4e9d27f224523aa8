"""Catalogue changes on the `items` topic, one JSON object per record, keyed by item id.

    {"item_id": "i42", "text": "..."}                 add (or re-add) an item; its text feeds BERT
    {"item_id": "i42", "deleted": true}               the item leaves the catalogue for good
    {"item_id": "i42", "available": false}            out of stock: not recommended until
    {"item_id": "i42", "available": true}             it is available again

The topic is read whole by every worker and by the nightly step, in order: the last change of an item
decides. Events naming a deleted or unavailable item are still applied (the history keeps it); only
recommendations leave it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class BadItemMessage(ValueError):
    pass


@dataclass(frozen=True)
class ItemChange:
    item_id: str
    text: str | None = None  # set for an addition
    deleted: bool = False
    available: bool | None = None  # None: not said

    @property
    def recommendable(self) -> bool | None:
        """False: leave it out of recommendations; True: may be recommended; None: this change says nothing."""
        if self.deleted:
            return False
        if self.available is not None:
            return self.available
        return True if self.text is not None else None


def parse_item_change(value: bytes | str | None) -> ItemChange:
    """One `items` record, or BadItemMessage with the reason."""
    if value is None:
        raise BadItemMessage("empty record")
    try:
        rec = json.loads(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadItemMessage(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise BadItemMessage("not a JSON object")
    iid = rec.get("item_id")
    if isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid) == "":
        raise BadItemMessage("item_id missing or not a string/integer")
    deleted = rec.get("deleted", False)
    available = rec.get("available")
    text = rec.get("text")
    if not isinstance(deleted, bool) or (available is not None and not isinstance(available, bool)):
        raise BadItemMessage("deleted/available must be true or false")
    if text is not None and not isinstance(text, str):
        raise BadItemMessage("text must be a string")
    if not deleted and available is None and text is None:
        raise BadItemMessage("neither text, deleted nor available given")
    return ItemChange(str(iid), text=None if deleted else text, deleted=deleted, available=available)


def item_change_json(change: ItemChange) -> bytes:
    out: dict = {"item_id": change.item_id}
    if change.deleted:
        out["deleted"] = True
    else:
        if change.text is not None:
            out["text"] = change.text
        if change.available is not None:
            out["available"] = change.available
    return json.dumps(out, separators=(",", ":")).encode()
