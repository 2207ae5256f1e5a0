"""Files of the Batch API: records, their JSON and the parsing of what callers give (`records`), and the
store that streams uploads to disk and keeps their metadata in the database (`store`)."""

from embedserve.files.records import (
    MAX_LIST_LIMIT,
    OUTPUT_PURPOSE,
    UPLOAD_PURPOSES,
    FileRecord,
    ListQuery,
    check_purpose,
    deleted_json,
    file_json,
    is_file_id,
    new_file_id,
    parse_expires_after,
    parse_list_query,
)
from embedserve.files.store import FileStore, Received

__all__ = [
    "MAX_LIST_LIMIT",
    "OUTPUT_PURPOSE",
    "UPLOAD_PURPOSES",
    "FileRecord",
    "FileStore",
    "ListQuery",
    "Received",
    "check_purpose",
    "deleted_json",
    "file_json",
    "is_file_id",
    "new_file_id",
    "parse_expires_after",
    "parse_list_query",
]
