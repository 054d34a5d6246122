"""The layer that speaks Flower: pytree <-> record conversion, Flower's own strategies as rules
(stock_strategy), and the asynchronous ServerApp/ClientApp of a real federation (server_app, client_app,
loop; docs/deployment.md)."""
