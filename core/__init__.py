"""The update lifecycle of a TightGate-Pro style fleet: model, rules, runs, store, drivers."""

__version__ = "0.1.0"
