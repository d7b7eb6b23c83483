"""Records as model items: what training, validation and evaluation embed."""

from __future__ import annotations

from vembed.data.records import Record
from vembed.models.base import Item


def record_items(record: Record) -> tuple[Item, Item, list[Item]]:
    """(query, positive, negatives) as model items. Image paths stay as written: they were resolved
    against the data file's directory when the records were read (vembed.data.images.RecordImages)."""
    query = Item(text=record.query, image=record.query_image, instruction=record.instruction)
    positive = Item(text=record.positive, image=record.positive_image)
    negatives = [Item(text=t) for t in record.negatives]
    negatives += [Item(image=p) for p in record.negative_images]
    return query, positive, negatives
