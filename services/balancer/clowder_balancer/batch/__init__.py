"""Batch inference: the OpenAI Files and Batches API, run through the balancer's pipeline on idle capacity."""
