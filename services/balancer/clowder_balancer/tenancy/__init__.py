"""Tenants: cluster-wide limits and budgets per key, usage metering, and fair admission when replicas are saturated."""
