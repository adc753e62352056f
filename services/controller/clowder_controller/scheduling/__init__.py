"""Placement of replicas on nodes: filters drop nodes that cannot take a replica, scorers rank the rest."""
