"""The pure domain: key model, lifecycle rules and authorisation policy. No I/O in here."""
