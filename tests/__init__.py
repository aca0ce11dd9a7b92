"""The test suite; its helpers (tiny models and rewards, synthetic datasets, plug-in rewards) import as
`tests.<module>`, also in Ray workers and subprocesses started from the repository root."""
