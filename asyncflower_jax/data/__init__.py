"""Datasets, partitioners and the device-resident client data store."""
