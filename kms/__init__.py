"""Key management: the pure domain, the ports it needs, and the adapters behind them."""
