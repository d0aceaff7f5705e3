"""Workloads: what runs, where it listens, what it is labelled and who it is."""
