"""The host-side discrete-event engine: latency models, scheduler, simulator and its reference."""
