"""The five studies (docs/methods.md §1-§5), each runnable as `python -m experiments.NAME`, and the report that runs
them all (`python -m experiments.report`)."""
