"""Replica choice as plugins: filters narrow the candidates, weighted scorers rank them, a picker decides."""
