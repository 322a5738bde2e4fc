"""gRPC servicers: authenticate, convert, delegate to ``kms``, convert back. No business logic."""
