"""`pdmd demo`: placeholder wiring until the demo issue lands (see docs)."""
