"""Prefect flows (each only sequences tasks) and the `dataworth` CLI on top of them."""
