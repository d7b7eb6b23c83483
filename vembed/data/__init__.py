"""JSONL training records: reading with `path:line` errors, splitting, dedup."""

from vembed.data.records import ReadStats, Record, read_records, write_records
from vembed.data.split import SplitCounts, SplitResult, split_records, split_to_files

__all__ = ["ReadStats", "Record", "SplitCounts", "SplitResult", "read_records", "split_records", "split_to_files", "write_records"]
