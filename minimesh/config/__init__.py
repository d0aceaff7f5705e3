"""Istio config: located YAML, schema checks, the typed model and its cross-checks."""
