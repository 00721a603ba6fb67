"""The hash-chained audit log and its batching writer."""
