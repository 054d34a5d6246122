"""The layer that speaks Flower: pytree <-> record conversion (and, later, Server/ClientApps)."""
