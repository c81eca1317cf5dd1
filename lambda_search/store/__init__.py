"""Layer 5 of 9, where studies live and how they are read: storages (SQLite, PostgreSQL,
journal) and their typed failures, the claim lock and leases that make each point run once,
and a study's status. No torch: a finished study is read where torch is not installed.
Imports ``config`` and ``points``."""
