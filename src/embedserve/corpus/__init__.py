"""`embedserve embed`'s parts below the command: corpus readers (JSONL, CSV, Parquet, plain text), the
chunks they are embedded in, crash-safe resumable outputs (Parquet, JSONL, .npy), and the run that ties
them to the engine (design note 52)."""
