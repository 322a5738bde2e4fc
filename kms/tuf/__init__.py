"""The TUF repository that publishes key state as a signed trust bundle (docs/adr/0007)."""
