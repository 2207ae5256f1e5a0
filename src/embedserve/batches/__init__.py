"""OpenAI's Batch API behind `/v1/batches`: batches and their lines in the database (store), checked and
run by the runner in the server's idle capacity, exactly once, and swept once expired."""
